"""The Segmind stand-in: Dreamshaper SDXL's API as Segmind's API page states it (`server.SegmindServer`)."""
