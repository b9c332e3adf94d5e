"""Answering an interaction: within Discord's 3 s even when the store hangs, and never with a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import discord

from cogs import render
from services.store.guarded import StoreUnavailable

log = logging.getLogger(__name__)

# Store work an interaction waits on before its answer; twice this still leaves time within Discord's 3 s.
ACK_STORE_SECONDS = 1.2
# Discord's "Interaction has already been acknowledged".
ALREADY_ACKNOWLEDGED = 40060


@contextlib.asynccontextmanager
async def before_answering() -> AsyncIterator[None]:
    """Bounds store work that an interaction's first answer waits on, so a stuck store still gets a reply."""
    try:
        async with asyncio.timeout(ACK_STORE_SECONDS):
            yield
    except TimeoutError:
        raise StoreUnavailable(f"the store did not answer within {ACK_STORE_SECONDS:g} s") from None


async def send_ephemeral(
    interaction: discord.Interaction, text: str, *, view: discord.ui.View = discord.utils.MISSING
) -> None:
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True, view=view)
    else:
        await interaction.response.send_message(text, ephemeral=True, view=view)


async def answer_failure(interaction: discord.Interaction, reply: render.FailureReply) -> None:
    """Tells the member what went wrong without ever showing a traceback; the log has the details."""
    try:
        if interaction.response.is_done():
            await _replace_original(interaction, reply)
            return
        try:
            await interaction.response.send_message(reply.text, ephemeral=True)
        except discord.HTTPException as error:
            if error.code != ALREADY_ACKNOWLEDGED:
                raise
            # Discord took an earlier answer whose reply never came back (a job's first progress line,
            # say): that answer is what the member sees, so it is the one to replace.
            await _replace_original(interaction, reply)
    except discord.HTTPException as error:
        log.warning("could not tell the member about a failure: %s", error)


async def _replace_original(interaction: discord.Interaction, reply: render.FailureReply) -> None:
    await interaction.edit_original_response(content=reply.text, embed=None, attachments=[], view=None)


async def refuse(interaction: discord.Interaction, text: str) -> bool:
    """Tells the presser why nothing happens; False, for `interaction_check` to return."""
    try:
        await send_ephemeral(interaction, text)
    except discord.HTTPException as error:
        log.warning("could not tell the member why a button did nothing: %s", error)
    return False
