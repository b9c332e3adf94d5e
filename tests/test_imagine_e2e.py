"""The real bot, end to end: /imagine over the Discord stand-in's gateway and REST, images from the local Segmind."""

from __future__ import annotations

import io

from PIL import Image

from tests.conftest import StackFactory


async def test_imagine_delivers_images_with_embed_and_buttons(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle = await stack.imagine(prompt="a lighthouse at dusk", samples=2, aspect="7:9", seed=1234)

    callback = handle.callback
    assert callback is not None and callback.type == 5  # deferred first
    message = handle.original
    assert message is not None
    assert len(message.attachments) == 2
    for attachment in message.attachments:
        image = Image.open(io.BytesIO(attachment.data))
        image.load()
        assert image.size == (896, 1152)
    embed = message.embeds[0]
    fields = {field["name"]: field["value"] for field in embed["fields"]}
    assert fields["Seed"] == "`1234`"
    assert fields["Size"] == "896×1152"
    assert "lighthouse" in embed["description"]
    labels = [c["label"] for row in message.components for c in row["components"]]
    assert labels == ["Reroll", "Same seed", "Info", "Delete"]
