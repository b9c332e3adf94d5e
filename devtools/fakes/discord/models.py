"""Data records and Discord-shaped payload builders for the local Discord stand-in.

Everything here is plain data: what the stand-in stores (messages, attachments,
interactions, recorded requests) and how it renders those as the JSON objects
Discord's API v10 would send.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import mimetypes
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DISCORD_EPOCH_MS = 1420070400000

# Message flags the stand-in reasons about.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15

# Interaction types (what Discord sends) and callback types (what the bot answers).
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_MESSAGE_COMPONENT = 3
INTERACTION_MODAL_SUBMIT = 5

CALLBACK_CHANNEL_MESSAGE = 4
CALLBACK_DEFERRED_CHANNEL_MESSAGE = 5
CALLBACK_DEFERRED_UPDATE_MESSAGE = 6
CALLBACK_UPDATE_MESSAGE = 7
CALLBACK_MODAL = 9

# Message types used for bot-authored messages.
MESSAGE_DEFAULT = 0
MESSAGE_REPLY = 19
MESSAGE_CHAT_INPUT_COMMAND = 20

CHANNEL_GUILD_TEXT = 0
CHANNEL_DM = 1
CHANNEL_PUBLIC_THREAD = 11

# Permission bits for a plain member (view, send, embed, attach, history, reactions,
# external emoji, use application commands, invite, nickname, voice connect/speak).
DEFAULT_MEMBER_PERMISSIONS = (
    (1 << 0)
    | (1 << 6)
    | (1 << 10)
    | (1 << 11)
    | (1 << 14)
    | (1 << 15)
    | (1 << 16)
    | (1 << 18)
    | (1 << 20)
    | (1 << 21)
    | (1 << 26)
    | (1 << 31)
)
# The bot's managed role: member permissions plus manage messages and embeds in threads.
BOT_ROLE_PERMISSIONS = DEFAULT_MEMBER_PERMISSIONS | (1 << 13) | (1 << 38)
PERMISSION_ADMINISTRATOR = 1 << 3
PERMISSION_MANAGE_GUILD = 1 << 5
# What Administrator grants: every permission bit Discord defines (up to Use External Apps).
ALL_PERMISSIONS = (1 << 51) - 1


class SnowflakeFactory:
    """Issues unique snowflakes whose embedded timestamp is the current time."""

    def __init__(self, worker_id: int = 1) -> None:
        self._worker_id = worker_id & 0x1F
        self._last_ms = 0
        self._increment = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            now_ms = int(time.time() * 1000)
            if now_ms <= self._last_ms:
                now_ms = self._last_ms
                self._increment += 1
                if self._increment > 0xFFF:
                    now_ms += 1
                    self._increment = 0
            else:
                self._increment = 0
            self._last_ms = now_ms
            return ((now_ms - DISCORD_EPOCH_MS) << 22) | (self._worker_id << 17) | self._increment


def iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.isoformat(timespec="microseconds")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RecordedFile(NamedTuple):
    """One uploaded multipart file part."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class RecordedRequest:
    """A REST request as the stand-in received it.

    The Authorization header is recorded only as present or absent: tests can
    assert on it without the token ending up in logs or failure output.
    """

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[RecordedFile]
    headers: dict[str, str]
    has_authorization: bool
    time: float
    route: str = ""
    status: int | None = None
    response: Any = None

    def __repr__(self) -> str:
        files = f" files={[f.filename for f in self.files]}" if self.files else ""
        return f"<{self.method} {self.path} route={self.route} status={self.status}{files}>"


@dataclass
class StoredAttachment:
    id: int
    filename: str
    data: bytes
    content_type: str
    url: str
    description: str | None = None
    width: int | None = None
    height: int | None = None
    ephemeral: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.description is not None:
            payload["description"] = self.description
        if self.width is not None and self.height is not None:
            payload["width"] = self.width
            payload["height"] = self.height
        if self.ephemeral:
            payload["ephemeral"] = True
        return payload


def iter_components(components: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Walks every component, including those nested in rows, sections, containers and labels."""
    for component in components:
        yield component
        yield from iter_components(component.get("components") or [])
        for key in ("accessory", "component"):
            child = component.get(key)
            if isinstance(child, dict):
                yield from iter_components([child])


@dataclass
class StoredMessage:
    id: int
    channel_id: int
    guild_id: int | None
    author: dict[str, Any]
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[StoredAttachment] = field(default_factory=list)
    flags: int = 0
    allowed_mentions: dict[str, Any] | None = None
    tts: bool = False
    type: int = MESSAGE_DEFAULT
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_metadata: dict[str, Any] | None = None
    message_reference: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.monotonic)
    timestamp: dt.datetime = field(default_factory=utcnow)
    edited_timestamp: dt.datetime | None = None
    deleted: bool = False
    # (monotonic time, payload as received) for every accepted edit.
    edits: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    def find_component(self, custom_id: str) -> dict[str, Any] | None:
        for component in iter_components(self.components):
            if component.get("custom_id") == custom_id:
                return component
        return None

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "content": self.content,
            "channel_id": str(self.channel_id),
            "author": dict(self.author),
            "attachments": [a.to_payload() for a in self.attachments],
            "embeds": [dict(e) for e in self.embeds],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": self.tts,
            "timestamp": iso(self.timestamp),
            "edited_timestamp": iso(self.edited_timestamp),
            "flags": self.flags,
            "components": [dict(c) for c in self.components],
        }
        if self.guild_id is not None:
            payload["guild_id"] = str(self.guild_id)
        if self.webhook_id is not None:
            payload["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            payload["application_id"] = str(self.application_id)
        if self.interaction_metadata is not None:
            payload["interaction_metadata"] = dict(self.interaction_metadata)
        if self.message_reference is not None:
            payload["message_reference"] = dict(self.message_reference)
        return payload


@dataclass
class CallbackRecord:
    """One POST to an interaction's callback endpoint, accepted or not."""

    type: int
    data: dict[str, Any] | None
    time: float
    status: int
    files: list[RecordedFile] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


class InteractionHandle:
    """What the stand-in knows about one interaction it dispatched.

    `original` is the interaction's original response message once one exists
    (for component interactions answered with type 6/7 it is the message the
    component is on); `followups` are messages created through the followup webhook.
    """

    def __init__(
        self,
        *,
        interaction_id: int,
        token: str,
        application_id: int,
        interaction_type: int,
        guild_id: int | None,
        channel_id: int,
        user: dict[str, Any],
        waiter: Callable[[Callable[[], bool], float], Any],
        name: str | None = None,
        source_message_id: int | None = None,
    ) -> None:
        self.id = interaction_id
        self.token = token
        self.application_id = application_id
        self.type = interaction_type
        self.guild_id = guild_id
        self.channel_id = channel_id
        self.user = user
        self.name = name
        self.source_message_id = source_message_id
        self.payload: dict[str, Any] = {}
        self.created_at = time.monotonic()
        self.callbacks: list[CallbackRecord] = []
        self.original: StoredMessage | None = None
        self.followups: list[StoredMessage] = []
        self.modal: dict[str, Any] | None = None
        self.expired = False
        self._waiter = waiter

    def __repr__(self) -> str:
        return (
            f"<InteractionHandle id={self.id} type={self.type} name={self.name!r} "
            f"callback={self.callback_type}>"
        )

    @property
    def callback(self) -> CallbackRecord | None:
        return next((c for c in self.callbacks if c.accepted), None)

    @property
    def callback_type(self) -> int | None:
        record = self.callback
        return record.type if record else None

    @property
    def acknowledged(self) -> bool:
        return self.callback is not None

    @property
    def deferred(self) -> bool:
        return self.callback_type in (CALLBACK_DEFERRED_CHANNEL_MESSAGE, CALLBACK_DEFERRED_UPDATE_MESSAGE)

    @property
    def is_ephemeral(self) -> bool:
        """Whether the interaction's response is visible only to the invoking user."""
        if self.original is not None:
            return self.original.ephemeral
        record = self.callback
        return bool(record and record.data and int(record.data.get("flags") or 0) & FLAG_EPHEMERAL)

    async def wait_for_callback(self, timeout: float = 10) -> CallbackRecord:
        await self._waiter(lambda: self.acknowledged, timeout)
        assert self.callback is not None
        return self.callback

    async def wait_for_original(self, timeout: float = 10, *, resolved: bool = True) -> StoredMessage:
        """Waits for the original response; with `resolved`, also for a deferral to be edited."""

        def ready() -> bool:
            return self.original is not None and not (resolved and self.original.loading)

        await self._waiter(ready, timeout)
        assert self.original is not None
        return self.original

    async def wait_for_followups(self, count: int = 1, timeout: float = 10) -> list[StoredMessage]:
        await self._waiter(lambda: len(self.followups) >= count, timeout)
        return self.followups


class ChangeNotifier:
    """Lets test code wait for a predicate that becomes true as the stand-in's state changes.

    Predicates are re-checked on every change and also every `poll_interval` seconds, so a
    predicate may look at the bot's own state too (which the stand-in never hears about).
    """

    poll_interval = 0.02

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float, describe: Callable[[], str] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                detail = f"\n{describe()}" if describe else ""
                raise TimeoutError(f"condition not met within {timeout}s{detail}")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, min(remaining, self.poll_interval))
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)


def sniff_content_type(data: bytes, filename: str, declared: str | None) -> str:
    """Discord derives the content type from the bytes/name, not from the part header
    (discord.py always declares application/octet-stream)."""
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
    )
    for magic, content_type in signatures:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed, _ = mimetypes.guess_type(filename)
    if guessed:
        return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed
    if declared and declared != "application/octet-stream":
        return declared
    return "application/octet-stream"


def image_size(data: bytes, content_type: str) -> tuple[int, int] | None:
    if content_type == "image/png" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not content_type.startswith("image/"):
        return None
    try:
        import io

        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


def user_payload(user_id: int, username: str, *, bot: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": str(user_id),
        "username": username,
        "global_name": None if bot else username,
        "discriminator": "0",
        "avatar": None,
        "avatar_decoration_data": None,
        "public_flags": 0,
        "flags": 0,
        "banner": None,
        "accent_color": None,
        "primary_guild": None,
        "collectibles": None,
    }
    if bot:
        payload["bot"] = True
    return payload


def bot_user_payload(user_id: int, username: str) -> dict[str, Any]:
    """The /users/@me shape: the bot user plus account fields only the owner sees."""
    payload = user_payload(user_id, username, bot=True)
    payload.update(
        {"verified": True, "mfa_enabled": True, "email": None, "locale": "en-US", "premium_type": 0}
    )
    return payload


def member_payload(
    user: dict[str, Any], roles: list[int], joined_at: dt.datetime, *, permissions: int | None = None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "user": dict(user),
        "roles": [str(r) for r in roles],
        "joined_at": iso(joined_at),
        "nick": None,
        "avatar": None,
        "banner": None,
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "pending": False,
        "flags": 0,
        "communication_disabled_until": None,
        "unusual_dm_activity_until": None,
    }
    if permissions is not None:
        payload["permissions"] = str(permissions)
    return payload


def role_payload(
    role_id: int, name: str, permissions: int, position: int, *, bot_id: int | None = None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": str(role_id),
        "name": name,
        "description": None,
        "color": 0,
        "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
        "hoist": False,
        "icon": None,
        "unicode_emoji": None,
        "position": position,
        "permissions": str(permissions),
        "managed": bot_id is not None,
        "mentionable": False,
        "flags": 0,
    }
    if bot_id is not None:
        payload["tags"] = {"bot_id": str(bot_id)}
    return payload
