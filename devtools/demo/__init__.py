"""The offline demo: the real bot answers one /imagine through the local stand-ins (`run`)."""
