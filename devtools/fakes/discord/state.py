"""The simulated Discord world behind the local Discord stand-in.

Holds guilds, channels, users, messages, interactions and synced commands, and
implements the operations the REST and gateway sides share (creating and editing
messages, building interaction payloads). Nothing here touches sockets.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devtools.fakes.discord.automod import normalize_rule
from devtools.fakes.discord.models import (
    ALL_PERMISSIONS,
    BOT_ROLE_PERMISSIONS,
    CHANNEL_DM,
    CHANNEL_GUILD_TEXT,
    CHANNEL_PUBLIC_THREAD,
    DEFAULT_MEMBER_PERMISSIONS,
    FLAG_COMPONENTS_V2,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    INTERACTION_APPLICATION_COMMAND,
    INTERACTION_MESSAGE_COMPONENT,
    INTERACTION_MODAL_SUBMIT,
    MESSAGE_DEFAULT,
    PERMISSION_ADMINISTRATOR,
    PERMISSION_MANAGE_GUILD,
    ChangeNotifier,
    InteractionHandle,
    RecordedFile,
    RecordedRequest,
    SnowflakeFactory,
    StoredAttachment,
    StoredMessage,
    bot_user_payload,
    image_size,
    iso,
    iter_components,
    member_payload,
    role_payload,
    sniff_content_type,
    user_payload,
    utcnow,
)
from devtools.fakes.discord.validation import FormErrors

INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_AUTO_MODERATION_CONFIGURATION = 1 << 20

# Flags a bot may set when creating a message, and the subset it may change by editing.
CREATE_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_EPHEMERAL | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
EDIT_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_COMPONENTS_V2

OPTION_SUB_COMMAND = 1
OPTION_SUB_COMMAND_GROUP = 2
OPTION_STRING = 3
OPTION_INTEGER = 4
OPTION_BOOLEAN = 5
OPTION_USER = 6
OPTION_CHANNEL = 7
OPTION_ROLE = 8
OPTION_MENTIONABLE = 9
OPTION_NUMBER = 10
OPTION_ATTACHMENT = 11

FILE_FIELD = re.compile(r"^files\[(\d+)\]$")

# (guild id or None for DMs, event name, data, intent bit the receiver needs or None)
EventSink = Callable[[int | None, str, dict[str, Any], int | None], None]


class NoGatewayClientError(RuntimeError):
    """Raised when an interaction is sent but no gateway session could ever receive it."""


@dataclass
class Guild:
    id: int
    name: str
    owner_id: int
    bot_role_id: int
    channel_ids: list[int]
    joined_at: dt.datetime = field(default_factory=utcnow)
    # user id -> member payload (with user), the bot's member included
    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    # role id -> name, for roles beyond @everyone and the bot's own
    roles: dict[int, str] = field(default_factory=dict)
    # the bot's managed role's permissions
    bot_permissions: int = BOT_ROLE_PERMISSIONS
    # active threads, which Discord lists apart from the guild's channels
    thread_ids: list[int] = field(default_factory=list)
    # rule id -> AutoMod rule payload
    automod_rules: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Channel:
    id: int
    type: int
    guild_id: int | None = None
    name: str | None = None
    recipient_id: int | None = None
    last_message_id: int | None = None
    nsfw: bool = False
    # threads only: the text channel they are in, who started them, and their counters
    parent_id: int | None = None
    owner_id: int | None = None
    created_at: dt.datetime = field(default_factory=utcnow)
    message_count: int = 0
    total_message_sent: int = 0

    @property
    def is_thread(self) -> bool:
        return self.type == CHANNEL_PUBLIC_THREAD


class DiscordWorld:
    def __init__(
        self,
        *,
        application_id: int,
        bot_user_id: int,
        bot_username: str,
        bot_token: str,
        attachment_size_limit: int,
        callback_window: float,
        token_lifetime: float = 15 * 60,
    ) -> None:
        self.application_id = application_id
        self.bot_user_id = bot_user_id
        self.bot_username = bot_username
        self.bot_token = bot_token
        self.attachment_size_limit = attachment_size_limit
        self.callback_window = callback_window
        self.token_lifetime = token_lifetime
        self.application_flags = (1 << 19) | (1 << 23)
        self.owner_id = 1_100_000_000_000_000_001
        self.snowflakes = SnowflakeFactory()
        self.notifier = ChangeNotifier()
        self.base_url = ""
        self.event_sink: EventSink = lambda *_: None
        self.users: dict[int, dict[str, Any]] = {
            bot_user_id: user_payload(bot_user_id, bot_username, bot=True),
            self.owner_id: user_payload(self.owner_id, "stand-in-owner"),
        }
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.dm_channels: dict[int, int] = {}
        self.messages: dict[int, StoredMessage] = {}
        self.attachments: dict[int, StoredAttachment] = {}
        self.interactions: dict[int, InteractionHandle] = {}
        self.interactions_by_token: dict[str, InteractionHandle] = {}
        self.synced_commands: dict[int | None, list[dict[str, Any]]] = {}
        self.requests: list[RecordedRequest] = []
        # Exceptions raised while handling requests (answered with 400); tests can assert it stays empty.
        self.internal_errors: list[Exception] = []

    # -- identity -------------------------------------------------------------------------

    @property
    def bot_user(self) -> dict[str, Any]:
        return self.users[self.bot_user_id]

    def me_payload(self) -> dict[str, Any]:
        return bot_user_payload(self.bot_user_id, self.bot_username)

    def user(self, user_id: int, username: str | None = None) -> dict[str, Any]:
        """Returns (creating or renaming) the user with this id."""
        existing = self.users.get(user_id)
        if existing is None or (username is not None and existing["username"] != username):
            self.users[user_id] = user_payload(user_id, username or f"user{user_id}")
        return self.users[user_id]

    def application_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot_username,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "hook": True,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "owner": dict(self.users[self.owner_id]),
            "team": None,
            "flags": self.application_flags,
            "bot": dict(self.bot_user),
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "role_connections_verification_url": None,
            "tags": [],
            "integration_types_config": {"0": {}},
            "approximate_guild_count": len(self.guilds),
            "approximate_user_install_count": 0,
        }

    # -- guilds and channels ---------------------------------------------------------------

    def add_guild(self, guild_id: int, channel_id: int, name: str) -> Guild:
        guild = Guild(
            id=guild_id,
            name=name,
            owner_id=self.owner_id,
            bot_role_id=self.snowflakes.next(),
            channel_ids=[channel_id],
        )
        guild.members[self.bot_user_id] = member_payload(self.bot_user, [guild.bot_role_id], guild.joined_at)
        self.guilds[guild_id] = guild
        self.channels[channel_id] = Channel(
            id=channel_id, type=CHANNEL_GUILD_TEXT, guild_id=guild_id, name="general"
        )
        return guild

    def add_channel(self, guild_id: int, channel_id: int, name: str, *, nsfw: bool) -> Channel:
        """A text channel in the guild, announced as Discord does (CHANNEL_CREATE)."""
        guild = self.guilds.get(guild_id)
        if guild is None:
            raise LookupError(f"unknown guild {guild_id}")
        if channel_id in self.channels:
            raise ValueError(f"channel {channel_id} already exists")
        channel = Channel(id=channel_id, type=CHANNEL_GUILD_TEXT, guild_id=guild_id, name=name, nsfw=nsfw)
        self.channels[channel_id] = channel
        guild.channel_ids.append(channel_id)
        self.event_sink(guild_id, "CHANNEL_CREATE", self.channel_payload(channel), INTENT_GUILDS)
        return channel

    def add_thread(self, thread_id: int, parent_id: int, name: str, owner_id: int) -> Channel:
        """A public thread in a text channel, announced with THREAD_CREATE (newly_created)."""
        parent = self.channels.get(parent_id)
        if parent is None or parent.type != CHANNEL_GUILD_TEXT or parent.guild_id is None:
            raise LookupError(f"{parent_id} is not a guild text channel; threads need one as parent")
        if thread_id in self.channels:
            raise ValueError(f"channel {thread_id} already exists")
        self.user(owner_id)
        thread = Channel(
            id=thread_id,
            type=CHANNEL_PUBLIC_THREAD,
            guild_id=parent.guild_id,
            name=name,
            parent_id=parent_id,
            owner_id=owner_id,
        )
        self.channels[thread_id] = thread
        self.guilds[parent.guild_id].thread_ids.append(thread_id)
        data = {**self.channel_payload(thread), "newly_created": True}
        self.event_sink(parent.guild_id, "THREAD_CREATE", data, INTENT_GUILDS)
        return thread

    def set_channel_nsfw(self, channel_id: int, nsfw: bool) -> None:
        """Marks a text channel age-restricted or not (CHANNEL_UPDATE); threads follow their parent."""
        channel = self.channels.get(channel_id)
        if channel is None or channel.type != CHANNEL_GUILD_TEXT or channel.guild_id is None:
            raise LookupError(f"{channel_id} is not a guild text channel (threads take their parent's flag)")
        channel.nsfw = nsfw
        self.event_sink(channel.guild_id, "CHANNEL_UPDATE", self.channel_payload(channel), INTENT_GUILDS)

    # -- permissions ------------------------------------------------------------------------

    def set_bot_permissions(self, guild_id: int, permissions: int) -> None:
        """Sets the bot role's permissions, telling sessions as Discord does (GUILD_ROLE_UPDATE)."""
        guild = self.guilds[guild_id]
        guild.bot_permissions = permissions
        role = next(r for r in self.guild_roles(guild) if r["id"] == str(guild.bot_role_id))
        self.event_sink(
            guild_id, "GUILD_ROLE_UPDATE", {"guild_id": str(guild_id), "role": role}, INTENT_GUILDS
        )

    def bot_permissions(self, guild: Guild) -> int:
        """The bot's guild-level permissions: @everyone's plus its role's, everything with Administrator."""
        permissions = DEFAULT_MEMBER_PERMISSIONS | guild.bot_permissions
        return ALL_PERMISSIONS if permissions & PERMISSION_ADMINISTRATOR else permissions

    def bot_can_manage_guild(self, guild: Guild) -> bool:
        return bool(self.bot_permissions(guild) & PERMISSION_MANAGE_GUILD)

    # -- AutoMod ----------------------------------------------------------------------------

    def put_automod_rule(self, guild_id: int, rule: Mapping[str, Any]) -> dict[str, Any]:
        """Creates (no or an unknown "id") or updates a rule, filled in and checked as Discord does."""
        guild = self.guilds.get(guild_id)
        if guild is None:
            raise LookupError(f"unknown guild {guild_id}")
        rule_id = int(rule["id"]) if rule.get("id") is not None else self.snowflakes.next()
        existing = guild.automod_rules.get(rule_id)
        stored = normalize_rule(
            {k: v for k, v in rule.items() if k not in ("id", "guild_id")},
            existing,
            rule_id=rule_id,
            guild_id=guild_id,
            creator_id=guild.owner_id,
            others=[r for key, r in guild.automod_rules.items() if key != rule_id],
        )
        guild.automod_rules[rule_id] = stored
        event = "AUTO_MODERATION_RULE_UPDATE" if existing is not None else "AUTO_MODERATION_RULE_CREATE"
        self._emit_automod_event(guild, event, stored)
        return copy.deepcopy(stored)

    def delete_automod_rule(self, guild_id: int, rule_id: int) -> None:
        guild = self.guilds.get(guild_id)
        if guild is None:
            raise LookupError(f"unknown guild {guild_id}")
        rule = guild.automod_rules.pop(rule_id, None)
        if rule is None:
            raise LookupError(f"guild {guild_id} has no AutoMod rule {rule_id}")
        self._emit_automod_event(guild, "AUTO_MODERATION_RULE_DELETE", rule)

    def _emit_automod_event(self, guild: Guild, event: str, rule: dict[str, Any]) -> None:
        # Discord sends rule events only to bots that could read the rules (Manage Server).
        if self.bot_can_manage_guild(guild):
            self.event_sink(guild.id, event, copy.deepcopy(rule), INTENT_AUTO_MODERATION_CONFIGURATION)

    def guild_roles(self, guild: Guild) -> list[dict[str, Any]]:
        return [
            role_payload(guild.id, "@everyone", DEFAULT_MEMBER_PERMISSIONS, 0),
            role_payload(
                guild.bot_role_id, self.bot_username, guild.bot_permissions, 1, bot_id=self.bot_user_id
            ),
            *(
                role_payload(role_id, name, DEFAULT_MEMBER_PERMISSIONS, 2 + position)
                for position, (role_id, name) in enumerate(guild.roles.items())
            ),
        ]

    def channel_payload(self, channel: Channel, *, with_guild_id: bool = True) -> dict[str, Any]:
        if channel.type == CHANNEL_DM:
            recipient = self.user(channel.recipient_id or 0)
            return {
                "id": str(channel.id),
                "type": CHANNEL_DM,
                "last_message_id": _str_or_none(channel.last_message_id),
                "flags": 0,
                "recipients": [dict(recipient)],
            }
        if channel.is_thread:
            return self._thread_payload(channel)
        guild = self.guilds.get(channel.guild_id or 0)
        payload: dict[str, Any] = {
            "id": str(channel.id),
            "type": channel.type,
            "name": channel.name,
            "position": guild.channel_ids.index(channel.id)
            if guild and channel.id in guild.channel_ids
            else 0,
            "permission_overwrites": [],
            "parent_id": None,
            "topic": None,
            "nsfw": channel.nsfw,
            "rate_limit_per_user": 0,
            "last_message_id": _str_or_none(channel.last_message_id),
            "flags": 0,
        }
        if with_guild_id:
            payload["guild_id"] = str(channel.guild_id)
        return payload

    def _thread_payload(self, thread: Channel) -> dict[str, Any]:
        """A thread as Discord sends it: no nsfw of its own (clients ask the parent), with metadata."""
        created = iso(thread.created_at)
        return {
            "id": str(thread.id),
            "type": thread.type,
            "guild_id": str(thread.guild_id),
            "parent_id": str(thread.parent_id),
            "owner_id": str(thread.owner_id),
            "name": thread.name,
            "last_message_id": _str_or_none(thread.last_message_id),
            "rate_limit_per_user": 0,
            "flags": 0,
            "message_count": thread.message_count,
            "member_count": 1,
            "total_message_sent": thread.total_message_sent,
            "member_ids_preview": [str(thread.owner_id)],
            "thread_metadata": {
                "archived": False,
                "archive_timestamp": created,
                "auto_archive_duration": 1440,
                "locked": False,
                "create_timestamp": created,
            },
        }

    def guild_payload(self, guild: Guild, *, full: bool = True) -> dict[str, Any]:
        """A guild object; `full` adds the GUILD_CREATE-only fields (channels, members, ...)."""
        payload: dict[str, Any] = {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "features": [],
            "roles": self.guild_roles(guild),
            "emojis": [],
            "stickers": [],
            "system_channel_id": str(guild.channel_ids[0]),
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "max_members": 500000,
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
            "application_id": None,
            "widget_enabled": False,
            "incidents_data": None,
        }
        if full:
            payload.update(
                {
                    "joined_at": guild.joined_at.isoformat(timespec="microseconds"),
                    "large": False,
                    "lazy": True,
                    "unavailable": False,
                    "member_count": len(guild.members),
                    "members": [dict(m) for m in guild.members.values()],
                    "channels": [
                        self.channel_payload(self.channels[c], with_guild_id=False) for c in guild.channel_ids
                    ],
                    "threads": [self.channel_payload(self.channels[t]) for t in guild.thread_ids],
                    "presences": [],
                    "voice_states": [],
                    "stage_instances": [],
                    "guild_scheduled_events": [],
                    "soundboard_sounds": [],
                    "embedded_activities": [],
                }
            )
        return payload

    def dm_channel_for(self, user_id: int) -> Channel:
        channel_id = self.dm_channels.get(user_id)
        if channel_id is None:
            channel_id = self.snowflakes.next()
            self.channels[channel_id] = Channel(id=channel_id, type=CHANNEL_DM, recipient_id=user_id)
            self.dm_channels[user_id] = channel_id
        return self.channels[channel_id]

    # -- attachments ------------------------------------------------------------------------

    def store_attachment(
        self, channel_id: int, file: RecordedFile, descriptor: Mapping[str, Any] | None, *, ephemeral: bool
    ) -> StoredAttachment:
        attachment_id = self.snowflakes.next()
        filename = str((descriptor or {}).get("filename") or file.filename or "unknown")
        content_type = sniff_content_type(file.data, filename, file.content_type)
        size = image_size(file.data, content_type)
        attachment = StoredAttachment(
            id=attachment_id,
            filename=filename,
            data=file.data,
            content_type=content_type,
            url=f"{self.base_url}/attachments/{channel_id}/{attachment_id}/{filename}",
            description=(descriptor or {}).get("description"),
            width=size[0] if size else None,
            height=size[1] if size else None,
            ephemeral=ephemeral,
        )
        self.attachments[attachment_id] = attachment
        return attachment

    def resolve_attachments(
        self,
        channel_id: int,
        payload: Mapping[str, Any],
        files: list[RecordedFile],
        existing: list[StoredAttachment],
        *,
        ephemeral: bool,
        prefix: tuple[str, ...] = (),
    ) -> list[StoredAttachment]:
        """Applies Discord's v10 rule: an `attachments` array lists every attachment the message
        keeps (existing ones by id, new uploads by their files[n] index); without it, uploads
        are appended to what the message already has."""
        uploads = _uploads_by_index(files)
        descriptors = payload.get("attachments")
        if descriptors is None:
            new = [self.store_attachment(channel_id, f, None, ephemeral=ephemeral) for f in uploads.values()]
            return [*existing, *new]
        kept_by_id = {a.id: a for a in existing}
        result: list[StoredAttachment] = []
        errors = FormErrors(prefix)
        for index, descriptor in enumerate(descriptors):
            try:
                key = int(descriptor.get("id"))
            except (TypeError, ValueError):
                errors.required(("attachments", index, "id"))
                continue
            if key in kept_by_id:
                result.append(kept_by_id[key])
            elif key in uploads:
                result.append(
                    self.store_attachment(channel_id, uploads.pop(key), descriptor, ephemeral=ephemeral)
                )
            else:
                errors.add(("attachments", index, "id"), "ATTACHMENT_NOT_FOUND", "Unknown attachment")
        errors.raise_if_any()
        # Uploads nobody referenced are still attached, after the listed ones.
        result.extend(
            self.store_attachment(channel_id, f, None, ephemeral=ephemeral) for f in uploads.values()
        )
        return result

    # -- messages ---------------------------------------------------------------------------

    def create_message(
        self,
        channel_id: int,
        payload: Mapping[str, Any],
        files: list[RecordedFile],
        *,
        message_type: int = MESSAGE_DEFAULT,
        extra_flags: int = 0,
        interaction: InteractionHandle | None = None,
        prefix: tuple[str, ...] = (),
    ) -> StoredMessage:
        channel = self.channels[channel_id]
        flags = (int(payload.get("flags") or 0) & CREATE_FLAGS) | extra_flags
        if interaction is None:
            flags &= ~FLAG_EPHEMERAL
        message = StoredMessage(
            id=self.snowflakes.next(),
            channel_id=channel_id,
            guild_id=channel.guild_id,
            author=dict(self.bot_user),
            content=payload.get("content") or "",
            embeds=list(payload.get("embeds") or []),
            components=list(payload.get("components") or []),
            flags=flags,
            allowed_mentions=payload.get("allowed_mentions"),
            tts=bool(payload.get("tts")),
            type=message_type,
            message_reference=payload.get("message_reference"),
        )
        message.attachments = self.resolve_attachments(
            channel_id, payload, files, [], ephemeral=message.ephemeral, prefix=prefix
        )
        if interaction is not None:
            message.webhook_id = self.application_id
            message.application_id = self.application_id
            message.interaction_id = interaction.id
            message.interaction_metadata = self._interaction_metadata(interaction)
        self.messages[message.id] = message
        if not message.ephemeral:
            channel.last_message_id = message.id
            if channel.is_thread:
                channel.message_count += 1
                channel.total_message_sent += 1
            self._emit_message_event("MESSAGE_CREATE", message)
        return message

    def edit_message(
        self,
        message: StoredMessage,
        payload: Mapping[str, Any],
        files: list[RecordedFile],
        *,
        prefix: tuple[str, ...] = (),
    ) -> None:
        attachments = message.attachments
        if "attachments" in payload or files:
            attachments = self.resolve_attachments(
                message.channel_id,
                payload,
                files,
                message.attachments,
                ephemeral=message.ephemeral,
                prefix=prefix,
            )
        message.attachments = attachments
        if "content" in payload:
            message.content = payload.get("content") or ""
        if "embeds" in payload:
            message.embeds = list(payload.get("embeds") or [])
        if "components" in payload:
            message.components = list(payload.get("components") or [])
        if "allowed_mentions" in payload:
            message.allowed_mentions = payload.get("allowed_mentions")
        if payload.get("flags") is not None:
            changeable = int(payload["flags"]) & EDIT_FLAGS
            message.flags = (message.flags & ~EDIT_FLAGS) | changeable
        # An edit is what resolves a deferred ("thinking") response.
        message.flags &= ~FLAG_LOADING
        message.edited_timestamp = utcnow()
        message.edits.append((time.monotonic(), dict(payload)))
        if not message.ephemeral:
            self._emit_message_event("MESSAGE_UPDATE", message)

    def delete_message(self, message: StoredMessage) -> None:
        if message.deleted:
            return
        message.deleted = True
        channel = self.channels.get(message.channel_id)
        if channel is not None and channel.is_thread and not message.ephemeral:
            channel.message_count = max(0, channel.message_count - 1)
        if not message.ephemeral:
            data: dict[str, Any] = {"id": str(message.id), "channel_id": str(message.channel_id)}
            if message.guild_id is not None:
                data["guild_id"] = str(message.guild_id)
            self.event_sink(message.guild_id, "MESSAGE_DELETE", data, self._message_intent(message))

    def _message_intent(self, message: StoredMessage) -> int:
        return INTENT_GUILD_MESSAGES if message.guild_id is not None else INTENT_DIRECT_MESSAGES

    def _emit_message_event(self, event: str, message: StoredMessage) -> None:
        data = message.to_payload()
        if message.guild_id is not None:
            member = self.guilds[message.guild_id].members.get(self.bot_user_id)
            if member is not None:
                data["member"] = {k: v for k, v in member.items() if k != "user"}
        self.event_sink(message.guild_id, event, data, self._message_intent(message))

    # -- interactions -----------------------------------------------------------------------

    def _interaction_metadata(self, interaction: InteractionHandle) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "id": str(interaction.id),
            "type": interaction.type,
            "user": dict(interaction.user),
            "authorizing_integration_owners": interaction.payload.get("authorizing_integration_owners", {}),
        }
        if interaction.name is not None:
            metadata["name"] = interaction.name
            metadata["command_type"] = 1
        if interaction.source_message_id is not None:
            metadata["interacted_message_id"] = str(interaction.source_message_id)
        if interaction.original is not None:
            metadata["original_response_message_id"] = str(interaction.original.id)
        return metadata

    def interaction_expired(self, handle: InteractionHandle) -> bool:
        return handle.expired or time.monotonic() - handle.created_at > self.token_lifetime

    def new_interaction(
        self,
        *,
        interaction_type: int,
        channel_id: int,
        user_id: int,
        username: str | None,
        roles: Sequence[int],
        permissions: int,
        waiter: Callable[[Callable[[], bool], float], Any],
        name: str | None = None,
        source_message_id: int | None = None,
    ) -> InteractionHandle:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise LookupError(f"unknown channel {channel_id}")
        user = self.user(user_id, username)
        interaction_id = self.snowflakes.next()
        handle = InteractionHandle(
            interaction_id=interaction_id,
            token="aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48),
            application_id=self.application_id,
            interaction_type=interaction_type,
            guild_id=channel.guild_id,
            channel_id=channel_id,
            user=user,
            waiter=waiter,
            name=name,
            source_message_id=source_message_id,
        )
        handle.payload = self._interaction_base(handle, channel, roles, permissions)
        self.interactions[interaction_id] = handle
        self.interactions_by_token[handle.token] = handle
        return handle

    def _interaction_base(
        self, handle: InteractionHandle, channel: Channel, roles: Sequence[int], permissions: int
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(handle.id),
            "application_id": str(self.application_id),
            "type": handle.type,
            "token": handle.token,
            "version": 1,
            "channel_id": str(channel.id),
            "channel": {**self.channel_payload(channel), "permissions": str(permissions)},
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        guild = self.guilds.get(channel.guild_id) if channel.guild_id is not None else None
        if guild is None:
            payload.update(
                {
                    "user": dict(handle.user),
                    "app_permissions": str(BOT_ROLE_PERMISSIONS),
                    "context": 1,
                    "authorizing_integration_owners": {"0": "0"},
                }
            )
            return payload
        member = member_payload(handle.user, list(roles), guild.joined_at, permissions=permissions)
        guild.members.setdefault(
            int(handle.user["id"]), {k: v for k, v in member.items() if k != "permissions"}
        )
        payload.update(
            {
                "guild_id": str(guild.id),
                "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": member,
                "app_permissions": str(self.bot_permissions(guild)),
                "context": 0,
                "authorizing_integration_owners": {"0": str(guild.id)},
            }
        )
        return payload

    def find_command(self, name: str, guild_id: int | None) -> tuple[dict[str, Any] | None, bool]:
        """Returns the synced definition (guild scope first) and whether it is a guild command."""
        scopes: list[tuple[int | None, bool]] = [(None, False)]
        if guild_id is not None:
            scopes.insert(0, (guild_id, True))
        for scope, is_guild in scopes:
            for command in self.synced_commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == 1:
                    return command, is_guild
        return None, False

    def command_data(
        self,
        path: str,
        options: Mapping[str, object] | None,
        raw_options: list[dict[str, Any]] | None,
        guild_id: int | None,
        channel_id: int,
        *,
        permissions: int = DEFAULT_MEMBER_PERMISSIONS,
    ) -> dict[str, Any]:
        """Builds an application command interaction's `data` as the Discord client would.

        `permissions` are the invoking member's, which resolved channels carry."""
        parts = path.split()
        definition, is_guild = self.find_command(parts[0], guild_id)
        # Once anything was synced, only synced commands exist for users (a guild's commands
        # are not offered in DMs or other guilds); before that, names are taken on trust.
        if definition is None and any(self.synced_commands.values()):
            visible = self.synced_commands.get(None, []) + self.synced_commands.get(guild_id, [])
            names = sorted({c["name"] for c in visible})
            raise LookupError(f"/{parts[0]} is not synced for this channel (available: {names})")
        data: dict[str, Any] = {
            "id": str(definition["id"]) if definition else str(self.snowflakes.next()),
            "name": parts[0],
            "type": 1,
        }
        if is_guild:
            data["guild_id"] = str(guild_id)
        resolved: dict[str, dict[str, Any]] = {}
        if raw_options is not None:
            data["options"] = raw_options
        else:
            level_defs = list((definition or {}).get("options") or [])
            container = data
            for part in parts[1:]:
                sub = next((o for o in level_defs if o["name"] == part and o["type"] in (1, 2)), None)
                if definition is not None and sub is None:
                    raise LookupError(f"/{path}: no subcommand {part!r}")
                node: dict[str, Any] = {"name": part, "type": sub["type"] if sub else OPTION_SUB_COMMAND}
                container["options"] = [node]
                container = node
                level_defs = list((sub or {}).get("options") or [])
            built = self._build_options(
                level_defs, options or {}, resolved, channel_id, permissions, strict=definition is not None
            )
            container["options"] = built
        if resolved:
            data["resolved"] = resolved
        return data

    def _build_options(
        self,
        definitions: list[dict[str, Any]],
        values: Mapping[str, object],
        resolved: dict[str, dict[str, Any]],
        channel_id: int,
        permissions: int,
        *,
        strict: bool,
    ) -> list[dict[str, Any]]:
        by_name = {d["name"]: d for d in definitions}
        result = []
        for name, value in values.items():
            definition = by_name.get(name)
            if strict and definition is None:
                raise ValueError(f"unknown option {name!r}; the command defines {sorted(by_name)}")
            option_type = int(definition["type"]) if definition else _infer_option_type(value)
            coerced = self._option_value(option_type, value, resolved, channel_id, permissions)
            if definition is not None:
                _check_option_constraints(definition, coerced)
            result.append({"name": name, "type": option_type, "value": coerced})
        missing = [d["name"] for d in definitions if d.get("required") and d["name"] not in values]
        if strict and missing:
            raise ValueError(f"missing required options {missing}")
        return result

    def _option_value(
        self,
        option_type: int,
        value: object,
        resolved: dict[str, dict[str, Any]],
        channel_id: int,
        permissions: int,
    ) -> Any:
        if option_type == OPTION_STRING:
            return str(value)
        if option_type == OPTION_INTEGER:
            return int(value)  # type: ignore[call-overload]
        if option_type == OPTION_NUMBER:
            return float(value)  # type: ignore[arg-type]
        if option_type == OPTION_BOOLEAN:
            return bool(value)
        if option_type in (OPTION_USER, OPTION_MENTIONABLE):
            user = self.user(int(value))  # type: ignore[call-overload]
            resolved.setdefault("users", {})[user["id"]] = dict(user)
            return user["id"]
        if option_type == OPTION_CHANNEL:
            channel = self.channels[int(value)]  # type: ignore[call-overload]
            # Discord's resolved channels carry the invoking member's permissions there.
            resolved.setdefault("channels", {})[str(channel.id)] = {
                **self.channel_payload(channel),
                "permissions": str(permissions),
            }
            return str(channel.id)
        if option_type == OPTION_ROLE:
            guild = self.guilds[self.channels[channel_id].guild_id or 0]
            role = next(r for r in self.guild_roles(guild) if r["id"] == str(value))
            resolved.setdefault("roles", {})[role["id"]] = role
            return role["id"]
        if option_type == OPTION_ATTACHMENT:
            attachment = self._option_attachment(value, channel_id)
            resolved.setdefault("attachments", {})[str(attachment.id)] = attachment.to_payload()
            return str(attachment.id)
        raise ValueError(f"unsupported option type {option_type}")

    def _option_attachment(self, value: object, channel_id: int) -> StoredAttachment:
        if isinstance(value, StoredAttachment):
            return value
        if isinstance(value, bytes):
            filename, data = "upload.bin", value
        elif isinstance(value, tuple) and len(value) == 2:
            filename, data = str(value[0]), bytes(value[1])
        else:
            raise TypeError("attachment options take bytes, (filename, bytes) or a StoredAttachment")
        upload = RecordedFile("files[0]", filename, "application/octet-stream", data)
        return self.store_attachment(channel_id, upload, None, ephemeral=True)

    def find_message_component(
        self, message: StoredMessage, custom_id: str, kinds: set[int]
    ) -> dict[str, Any]:
        component = message.find_component(custom_id)
        if component is None:
            present = [c.get("custom_id") for c in iter_components(message.components) if c.get("custom_id")]
            raise LookupError(f"message {message.id} has no component {custom_id!r} (has {present})")
        if component.get("type") not in kinds:
            raise LookupError(
                f"component {custom_id!r} has type {component.get('type')}, expected {sorted(kinds)}"
            )
        if component.get("disabled"):
            raise LookupError(f"component {custom_id!r} is disabled; a user cannot use it")
        return component


def _str_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)


def _uploads_by_index(files: list[RecordedFile]) -> dict[int, RecordedFile]:
    uploads: dict[int, RecordedFile] = {}
    for position, upload in enumerate(files):
        match = FILE_FIELD.match(upload.field)
        uploads[int(match.group(1)) if match else position] = upload
    return uploads


def _infer_option_type(value: object) -> int:
    if isinstance(value, bool):
        return OPTION_BOOLEAN
    if isinstance(value, int):
        return OPTION_INTEGER
    if isinstance(value, float):
        return OPTION_NUMBER
    if isinstance(value, bytes | tuple | StoredAttachment):
        return OPTION_ATTACHMENT
    return OPTION_STRING


def _check_option_constraints(definition: dict[str, Any], value: Any) -> None:
    """The Discord client refuses to send values outside a command's declared constraints."""
    name = definition["name"]
    choices = definition.get("choices")
    if choices and value not in [c["value"] for c in choices]:
        raise ValueError(f"option {name!r}: {value!r} is not one of the declared choices")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = definition.get("min_value"), definition.get("max_value")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"option {name!r}: {value!r} is outside [{low}, {high}]")
    if isinstance(value, str) and definition["type"] == OPTION_STRING:
        low, high = definition.get("min_length"), definition.get("max_length", 6000)
        if (low is not None and len(value) < low) or (high is not None and len(value) > high):
            raise ValueError(f"option {name!r}: length {len(value)} is outside [{low}, {high}]")


__all__ = [
    "INTENT_AUTO_MODERATION_CONFIGURATION",
    "INTENT_DIRECT_MESSAGES",
    "INTENT_GUILDS",
    "INTENT_GUILD_MESSAGES",
    "INTERACTION_APPLICATION_COMMAND",
    "INTERACTION_MESSAGE_COMPONENT",
    "INTERACTION_MODAL_SUBMIT",
    "Channel",
    "DiscordWorld",
    "Guild",
    "NoGatewayClientError",
]
