"""The offline demo's transcript: every message the bot created or edited, as data and as Markdown.

The Discord stand-in keeps each message's latest state plus the raw payload of every edit. To show what a
member saw after each edit, `TranscriptRecorder.watch` snapshots messages whenever the stand-in's state
changes. Times come from the stand-in's own records (when it accepted a callback or an edit), not from when
the snapshot was taken, so they are exact even if the watcher runs a little late.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devtools.fakes.discord.models import (
    CALLBACK_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_UPDATE_MESSAGE,
    CALLBACK_MODAL,
    CALLBACK_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    InteractionHandle,
    StoredMessage,
    iter_components,
)
from devtools.fakes.discord.server import DiscordStandIn

CALLBACK_NAMES = {
    CALLBACK_CHANNEL_MESSAGE: "reply with a message",
    CALLBACK_DEFERRED_CHANNEL_MESSAGE: 'deferred reply ("is thinking…")',
    CALLBACK_DEFERRED_UPDATE_MESSAGE: "deferred update of the message",
    CALLBACK_UPDATE_MESSAGE: "update of the message",
    CALLBACK_MODAL: "opened a modal",
}
FLAG_NAMES = (
    (FLAG_EPHEMERAL, "ephemeral"),
    (FLAG_LOADING, "loading"),
    (FLAG_SUPPRESS_EMBEDS, "suppress-embeds"),
    (FLAG_SUPPRESS_NOTIFICATIONS, "silent"),
)
BUTTON_TYPE = 2


@dataclass
class MessageEvent:
    """A message as it stood right after being created, edited or deleted.

    `observed` is False when two changes came too close together for a snapshot in between: the event
    then shows only what the bot's edit request carried (`payload`), not the resulting state.
    """

    message_id: int
    interaction_id: int | None
    kind: str  # "created", "edited" or "deleted"
    at: float  # time.monotonic(), as the stand-in recorded it
    observed: bool = True
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    payload: dict[str, Any] | None = None


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES if flags & bit]


def describe_attachment(message: StoredMessage) -> list[dict[str, Any]]:
    return [
        {
            "id": str(a.id),
            "filename": a.filename,
            "size": a.size,
            "content_type": a.content_type,
            "width": a.width,
            "height": a.height,
        }
        for a in message.attachments
    ]


def snapshot(message: StoredMessage, kind: str, at: float) -> MessageEvent:
    return MessageEvent(
        message_id=message.id,
        interaction_id=message.interaction_id,
        kind=kind,
        at=at,
        content=message.content,
        # Deep copies: later edits must not rewrite what an earlier snapshot shows.
        embeds=copy.deepcopy(message.embeds),
        components=copy.deepcopy(message.components),
        attachments=describe_attachment(message),
        flags=flag_names(message.flags),
    )


def from_payload(message: StoredMessage, at: float, payload: Mapping[str, Any]) -> MessageEvent:
    """An edit known only by its request: fields the request did not carry are left empty."""
    return MessageEvent(
        message_id=message.id,
        interaction_id=message.interaction_id,
        kind="edited",
        at=at,
        observed=False,
        content=str(payload.get("content") or ""),
        embeds=copy.deepcopy(list(payload.get("embeds") or [])),
        components=copy.deepcopy(list(payload.get("components") or [])),
        attachments=[
            {"filename": a.get("filename"), "size": None}
            for a in payload.get("attachments") or []
            if isinstance(a, dict)
        ],
        payload=copy.deepcopy(dict(payload)),
    )


@dataclass
class TrackedInteraction:
    label: str  # e.g. "/imagine" or "Info button"
    handle: InteractionHandle
    action: str  # what the member did, e.g. "used `/imagine prompt:…`"
    options: dict[str, Any]
    username: str


class TranscriptRecorder:
    """Follows every bot-authored message in the stand-in and the interactions the demo started."""

    def __init__(self, stand_in: DiscordStandIn) -> None:
        self._stand_in = stand_in
        self._edits_seen: dict[int, int] = {}
        self._deleted_seen: set[int] = set()
        self.events: list[MessageEvent] = []
        self.interactions: list[TrackedInteraction] = []

    def track(
        self,
        label: str,
        handle: InteractionHandle,
        *,
        action: str,
        username: str,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.interactions.append(TrackedInteraction(label, handle, action, dict(options or {}), username))
        self.observe()

    def observe(self) -> None:
        """Records whatever changed since the last call."""
        for message in list(self._stand_in.messages.values()):
            seen = self._edits_seen.get(message.id)
            edits = message.edits
            if seen is None:
                if edits:
                    self.events.append(
                        MessageEvent(message.id, message.interaction_id, "created", message.created_at, False)
                    )
                else:
                    self.events.append(snapshot(message, "created", message.created_at))
                seen = 0
            for index in range(seen, len(edits)):
                at, payload = edits[index]
                if index == len(edits) - 1:
                    self.events.append(snapshot(message, "edited", at))
                else:
                    self.events.append(from_payload(message, at, payload))
            self._edits_seen[message.id] = len(edits)
            if message.deleted and message.id not in self._deleted_seen:
                self._deleted_seen.add(message.id)
                self.events.append(
                    MessageEvent(message.id, message.interaction_id, "deleted", time.monotonic())
                )

    async def watch(self) -> None:
        """Observes after every change in the stand-in until cancelled."""

        def keep_watching() -> bool:
            self.observe()
            return False

        while True:
            try:
                await self._stand_in.wait_for(keep_watching, timeout=3600)
            except TimeoutError:
                continue

    def message_events(self, message_id: int) -> list[MessageEvent]:
        return [event for event in self.events if event.message_id == message_id]


# ---- the transcript as data ----------------------------------------------------------------------


def _seconds(at: float, origin: float) -> float:
    return round(at - origin, 3)


def _event_data(event: MessageEvent, origin: float, role: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "t": _seconds(event.at, origin),
        "kind": "message",
        "event": event.kind,
        "message_id": str(event.message_id),
        "message": role,
        "observed": event.observed,
    }
    if event.kind != "deleted" and (event.observed or event.payload is not None):
        data.update(
            {
                "content": event.content,
                "embeds": event.embeds,
                "buttons": button_labels(event.components),
                "components": event.components,
                "attachments": event.attachments,
                "flags": event.flags,
            }
        )
    if event.payload is not None:
        data["edit_request"] = event.payload
    return data


def _message_roles(handle: InteractionHandle, messages: Sequence[StoredMessage]) -> dict[int, str]:
    roles: dict[int, str] = {}
    followups = 0
    for message in messages:
        if handle.original is not None and message.id == handle.original.id:
            roles[message.id] = "response"
        else:
            followups += 1
            roles[message.id] = f"follow-up {followups}"
    return roles


def build_transcript(
    recorder: TranscriptRecorder, stand_in: DiscordStandIn, origin: float, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The whole transcript as JSON-ready data; `extra` (summary, result, files) is merged in at the top."""
    recorder.observe()
    tracked_ids = {item.handle.id for item in recorder.interactions}
    all_messages = sorted(stand_in.messages.values(), key=lambda m: m.id)
    interactions: list[dict[str, Any]] = []
    for item in recorder.interactions:
        handle = item.handle
        messages = [m for m in all_messages if m.interaction_id == handle.id]
        roles = _message_roles(handle, messages)
        timeline: list[tuple[float, dict[str, Any]]] = [
            (
                callback.time,
                {
                    "t": _seconds(callback.time, origin),
                    "kind": "callback",
                    "type": callback.type,
                    "name": CALLBACK_NAMES.get(callback.type, f"type {callback.type}"),
                    "status": callback.status,
                    "accepted": callback.accepted,
                    "flags": flag_names(int((callback.data or {}).get("flags") or 0)),
                },
            )
            for callback in handle.callbacks
        ]
        for message in messages:
            timeline.extend(
                (event.at, _event_data(event, origin, roles[message.id]))
                for event in recorder.message_events(message.id)
            )
        timeline.sort(key=lambda entry: entry[0])
        interactions.append(
            {
                "label": item.label,
                "interaction_id": str(handle.id),
                "user": item.username,
                "action": item.action,
                "options": item.options,
                "sent_at": _seconds(handle.created_at, origin),
                "events": [entry for _, entry in timeline],
            }
        )
    others = [
        _event_data(event, origin, f"<#{message.channel_id}>")
        for message in all_messages
        if message.interaction_id not in tracked_ids
        for event in recorder.message_events(message.id)
    ]
    return {
        "title": "Dreamshaper bot: offline demo transcript",
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "time_origin": "seconds since /imagine was sent",
        **extra,
        "interactions": interactions,
        "other_messages": others,
    }


def button_labels(components: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = []
    for component in iter_components(list(components)):  # type: ignore[arg-type]
        if component.get("type") != BUTTON_TYPE:
            continue
        emoji = (component.get("emoji") or {}).get("name")
        label = component.get("label") or ""
        labels.append(f"{emoji} {label}".strip() if emoji else label)
    return labels


# ---- the transcript as Markdown ------------------------------------------------------------------


def _quoted(text: str) -> list[str]:
    return [f"> {line}" if line else ">" for line in text.splitlines()] or [">"]


def _size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size} B"


def _embed_lines(embed: Mapping[str, Any]) -> list[str]:
    lines = ["Embed:", ""]
    body: list[str] = []
    if embed.get("title"):
        body.append(f"**{embed['title']}**")
    if embed.get("description"):
        body.extend(["", *str(embed["description"]).splitlines()])
    fields = embed.get("fields") or []
    if fields:
        body.append("")
        body.extend(f"- **{f.get('name', '')}**: {f.get('value', '')}" for f in fields)
    footer = (embed.get("footer") or {}).get("text")
    if footer:
        body.extend(["", f"— {footer}"])
    lines.extend(_quoted("\n".join(body)))
    return lines


def _message_lines(entry: Mapping[str, Any], bot_name: str) -> list[str]:
    if "content" not in entry:
        return ["(the state after this change was not captured)"]
    lines: list[str] = []
    if not entry.get("observed", True):
        lines.append("(only the bot's edit request was captured; fields it did not send are not shown)")
    flags = entry.get("flags") or []
    if "ephemeral" in flags:
        lines.append("Visible only to the member who used it (ephemeral).")
    if "loading" in flags:
        lines.append(f'Shown as "{bot_name} is thinking…" until the bot edits it.')
    if entry.get("content"):
        lines.extend(["Content:", "", *_quoted(entry["content"])])
    for embed in entry.get("embeds") or []:
        lines.extend(["", *_embed_lines(embed)])
    if entry.get("buttons"):
        lines.extend(["", "Buttons: " + " ".join(f"`[{label}]`" for label in entry["buttons"])])
    attachments = entry.get("attachments") or []
    if attachments:
        lines.extend(["", "Attachments:"])
        for attachment in attachments:
            dimensions = (
                f"{attachment['width']}×{attachment['height']}, "
                if attachment.get("width") and attachment.get("height")
                else ""
            )
            lines.append(f"- `{attachment.get('filename')}` ({dimensions}{_size(attachment.get('size'))})")
    while lines and not lines[0]:
        lines.pop(0)
    return lines or ["(empty)"]


def _entry_lines(entry: Mapping[str, Any], bot_name: str) -> list[str]:
    t = f"t = {entry['t']:.2f} s"
    if entry["kind"] == "callback":
        outcome = "accepted" if entry["accepted"] else f"refused with HTTP {entry['status']}"
        flags = f", {', '.join(entry['flags'])}" if entry.get("flags") else ""
        return [f"- **{t}**: the bot answered the interaction: {entry['name']}{flags} ({outcome})."]
    heading = f"- **{t}**: {entry['message']} message `{entry['message_id']}` {entry['event']}"
    if entry["event"] == "deleted":
        return [heading + "."]
    body = _message_lines(entry, bot_name)
    return [heading + ":", "", *(f"  {line}" if line else "" for line in body)]


def names_of(stand_in: DiscordStandIn) -> dict[str, dict[str, str]]:
    """Who and what the stand-in's ids are, for `as_shown`."""
    world = stand_in.world
    return {
        "users": {str(user_id): str(user.get("username")) for user_id, user in world.users.items()},
        "channels": {
            str(channel.id): str(channel.name) for channel in world.channels.values() if channel.name
        },
        "roles": {
            str(role_id): name for guild in world.guilds.values() for role_id, name in guild.roles.items()
        },
    }


MENTION = re.compile(r"<(@&|@!?|#)(\d+)>|<t:(-?\d+)(?::([tTdDfFR]))?>")


def as_shown(text: str, names: Mapping[str, Mapping[str, str]], now: dt.datetime) -> str:
    """Mentions and timestamps as a Discord client shows them: `@name`, `#channel`, a date or "in 1 day"."""

    def shown(match: re.Match[str]) -> str:
        kind, snowflake, epoch, style = match.groups()
        if epoch is not None:
            at = dt.datetime.fromtimestamp(int(epoch), dt.UTC)
            return _relative(at, now) if style == "R" else at.strftime("%d %b %Y %H:%M UTC")
        table = {"#": "channels", "@&": "roles"}.get(kind, "users")
        name = names.get(table, {}).get(snowflake)
        sigil = "#" if kind == "#" else "@"
        return f"{sigil}{name}" if name else match.group(0)

    return MENTION.sub(shown, text)


def _relative(at: dt.datetime, now: dt.datetime) -> str:
    seconds = (at - now).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        count = round(abs(seconds) / size)
        if count >= 1:
            span = f"{count} {unit}{'s' if count != 1 else ''}"
            return f"in {span}" if seconds > 0 else f"{span} ago"
    return "just now"


def render_markdown(data: Mapping[str, Any]) -> str:
    names = data.get("names") or {}
    now = dt.datetime.fromisoformat(str(data["recorded_at"]))
    text = _render_markdown(data)
    return as_shown(text, names, now) if names else text


def _render_markdown(data: Mapping[str, Any]) -> str:
    bot_name = str(data.get("bot_name") or "The bot")
    lines = [f"# {data['title']}", ""]
    lines.append(
        "The real bot, run against the local Discord and Segmind stand-ins. "
        f"Recorded {data['recorded_at']}; every time below is in {data['time_origin']}."
    )
    summary = data.get("summary") or {}
    if summary:
        lines.extend(["", "| | |", "|---|---|"])
        lines.extend(f"| {name} | {value} |" for name, value in summary.items())
    result = data.get("result") or {}
    if result.get("images"):
        lines.extend(["", "Files written next to this transcript:", ""])
        lines.extend(
            f"- `{image['file']}` ({image['width']}×{image['height']}, {_size(image['size'])})"
            for image in result["images"]
        )
    for number, interaction in enumerate(data["interactions"], start=1):
        lines.extend(["", f"## {number}. {interaction['label']}", ""])
        lines.append(
            f"- **t = {interaction['sent_at']:.2f} s**: `{interaction['user']}` {interaction['action']}."
        )
        for entry in interaction["events"]:
            lines.extend(_entry_lines(entry, bot_name))
    if data.get("other_messages"):
        lines.extend(["", "## Other messages the bot posted", ""])
        for entry in data["other_messages"]:
            lines.extend(_entry_lines(entry, bot_name))
    return "\n".join(lines).rstrip() + "\n"


async def stop_watching(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
