"""`python -m devtools.demo --admin`: the server's admin and moderators at work, after the member's /imagine.

An admin gives the server a mod log and blocks a term; the member's prompt with it, disguised, is refused
before anything is spent; the mod log shows the entry with its buttons; a moderator bans the member from
it; and the member's next /imagine is told until when. Every step is in the transcript.
"""

from __future__ import annotations

from typing import Any

from devtools.demo.transcript import TranscriptRecorder
from devtools.fakes.discord.models import DEFAULT_MEMBER_PERMISSIONS
from devtools.fakes.discord.server import InteractionHandle, StoredMessage
from devtools.stack import BotStack, BotStopped

ADMIN_ID, ADMIN_NAME = 2_000_000_000_000_000_001, "demo-admin"
MODERATOR_ID, MODERATOR_NAME = 2_000_000_000_000_000_002, "demo-moderator"
MANAGE_GUILD, MANAGE_MESSAGES = 1 << 5, 1 << 13
MOD_LOG_CHANNEL = 2_000_000_000_000_000_100
BLOCKED_TERMS = "kid, gore*"
BLOCKED_PROMPT = "a k1d in a garden"
AFTER_THE_BAN = "a lighthouse at night"
ENTRY_TITLE = "Prompt blocked"
STEP_TIMEOUT = 15.0


class AdminDemoError(Exception):
    """A step of the admin demo did not happen; the text says which."""


async def run_admin_demo(
    stack: BotStack, recorder: TranscriptRecorder, *, member: str, summary: dict[str, str]
) -> StoredMessage:
    """Runs the admin's and the moderator's steps; the mod-log entry, as the moderator left it."""
    discord = stack.discord
    discord.add_channel(MOD_LOG_CHANNEL, name="mod-log")
    await _command(
        stack, recorder, "admin modlog", {"channel": MOD_LOG_CHANNEL}, ADMIN_NAME, ADMIN_ID, MANAGE_GUILD
    )
    await _command(
        stack, recorder, "admin blocklist add", {"terms": BLOCKED_TERMS}, ADMIN_NAME, ADMIN_ID, MANAGE_GUILD
    )
    refused = await _command(stack, recorder, "imagine", {"prompt": BLOCKED_PROMPT}, member)
    summary["blocked prompt"] = _reply(refused)

    def entries() -> list[StoredMessage]:
        return [
            m
            for m in discord.messages.values()
            if m.channel_id == MOD_LOG_CHANNEL and m.embeds and ENTRY_TITLE in str(m.embeds[0].get("title"))
        ]

    await _wait(stack, lambda: bool(entries()), "the mod log got no entry for the blocked prompt")
    entry = entries()[0]
    ban = next(
        (c for row in entry.components for c in row.get("components", []) if c.get("label") == "Ban 24 h"),
        None,
    )
    if ban is None:
        raise AdminDemoError("the mod-log entry has no Ban 24 h button")
    pressed = await discord.press_button(
        entry,
        ban["custom_id"],
        user_id=MODERATOR_ID,
        username=MODERATOR_NAME,
        permissions=_with(MANAGE_MESSAGES),
    )
    recorder.track(
        "Ban 24 h button",
        pressed,
        action="clicked `[Ban 24 h]` on the mod-log entry",
        username=MODERATOR_NAME,
    )
    await _wait(
        stack,
        lambda: any(f.get("name") == "Decision" for f in entry.embeds[0].get("fields", [])),
        "the mod-log entry did not show the moderator's decision",
    )
    summary["mod log"] = f"entry posted in #mod-log; {MODERATOR_NAME} pressed Ban 24 h"
    again = await _command(stack, recorder, "imagine", {"prompt": AFTER_THE_BAN}, member)
    summary["after the ban"] = _reply(again)
    return entry


def _with(permissions: int) -> int:
    return DEFAULT_MEMBER_PERMISSIONS | permissions


async def _command(
    stack: BotStack,
    recorder: TranscriptRecorder,
    name: str,
    options: dict[str, Any],
    username: str,
    user_id: int | None = None,
    permissions: int = 0,
) -> InteractionHandle:
    who: dict[str, Any] = {"username": username, "permissions": _with(permissions)}
    if user_id is not None:
        who["user_id"] = user_id
    handle = await stack.discord.send_slash_command(name, options, **who)
    # A channel option as the member picked it: by name (the transcript shows `<#id>` as #name).
    shown = {key: f"<#{value}>" if key == "channel" else value for key, value in options.items()}
    line = f"/{name} " + " ".join(f"{key}:{value}" for key, value in shown.items())
    recorder.track(f"/{name}", handle, action=f"used `{line}`", username=username, options=options)
    await _wait(stack, lambda: handle.callback is not None, f"/{name} got no answer")
    return handle


def _reply(handle: InteractionHandle) -> str:
    data = handle.callback.data if handle.callback is not None else None
    return " ".join(str((data or {}).get("content", "")).split())[:160]


async def _wait(stack: BotStack, done: Any, problem: str) -> None:
    try:
        await stack.wait_for(done, STEP_TIMEOUT)
    except TimeoutError:
        raise AdminDemoError(f"{problem} within {STEP_TIMEOUT:g} s") from None
    except BotStopped as error:
        raise AdminDemoError(str(error)) from None
