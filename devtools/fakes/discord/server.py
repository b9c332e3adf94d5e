"""A local Discord stand-in: Discord's REST API v10 and gateway over real sockets.

Tests run the real, unmodified discord.py bot against it and assert on what
Discord would have received (requests, messages, interaction callbacks) while
driving users' actions (slash commands, button presses, modal submits).

The bot reaches it through DISCORD_API_BASE and DISCORD_GATEWAY_URL, which `bot.point_discord_py_at`
applies before login (Route objects capture BASE when they are built). RESUMEs follow READY's
resume_gateway_url and an AutoShardedClient without shard_count follows GET /gateway/bot's url; the
stand-in points both at itself.

Interactions and other events go, as on Discord, to every live session of the
guild's shard. A session that lost its connection stays live (events are kept
and replayed on RESUME) for `gateway_resume_timeout` seconds; one whose client
closed with 1000/1001 or that was invalidated ends at once. An interaction that
no live session can receive raises `NoGatewayClientError` instead of being queued.
(discord.py's `Client.close()` in fact closes with 4000, so a closed bot's
session ends only when the resume timeout has passed.)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from devtools.fakes.discord.gateway import Gateway, GatewayConnectionInfo, GatewaySession
from devtools.fakes.discord.models import (
    BOT_ROLE_PERMISSIONS,
    DEFAULT_MEMBER_PERMISSIONS,
    INTERACTION_APPLICATION_COMMAND,
    INTERACTION_MESSAGE_COMPONENT,
    INTERACTION_MODAL_SUBMIT,
    CallbackRecord,
    InteractionHandle,
    RecordedFile,
    RecordedRequest,
    StoredAttachment,
    StoredMessage,
    iter_components,
)
from devtools.fakes.discord.rest import RestApi
from devtools.fakes.discord.state import DiscordWorld, NoGatewayClientError
from devtools.fakes.discord.validation import SELECT_TYPES

DEFAULT_BOT_USER_ID = 1_234_567_890_123_456_789
DEFAULT_GUILD_ID = 1_300_000_000_000_000_000
DEFAULT_CHANNEL_ID = 1_300_000_000_000_000_100
DEFAULT_USER_ID = 1_111_111_111_111_111_111
DEFAULT_USERNAME = "tester"
BUTTON = 2

__all__ = [
    "BOT_ROLE_PERMISSIONS",
    "DEFAULT_BOT_USER_ID",
    "DEFAULT_CHANNEL_ID",
    "DEFAULT_GUILD_ID",
    "DEFAULT_MEMBER_PERMISSIONS",
    "DEFAULT_USER_ID",
    "CallbackRecord",
    "DiscordStandIn",
    "GatewayConnectionInfo",
    "GatewaySession",
    "InteractionHandle",
    "NoGatewayClientError",
    "RecordedFile",
    "RecordedRequest",
    "StoredAttachment",
    "StoredMessage",
]


class DiscordStandIn:
    def __init__(
        self,
        *,
        application_id: int | None = None,
        bot_user_id: int = DEFAULT_BOT_USER_ID,
        guild_id: int = DEFAULT_GUILD_ID,
        channel_id: int = DEFAULT_CHANNEL_ID,
        bot_token: str = "stand-in-token",
        attachment_size_limit: int = 10 * 1024 * 1024,
        bot_username: str = "Stand-in Bot",
        guild_name: str = "Stand-in Guild",
        heartbeat_interval_ms: int = 41250,
        interaction_callback_window: float = 3.0,
        gateway_resume_timeout: float = 5.0,
        recommended_shards: int = 1,
    ) -> None:
        """`application_id` defaults to the bot user's id, as for every current Discord app.
        `interaction_callback_window` is Discord's 3 s deadline for the first callback;
        tests may shorten it to prove a bot defers in time without sleeping for 3 s.
        `gateway_resume_timeout` is how long a disconnected session stays resumable (and
        keeps receiving events for replay) before it counts as ended."""
        self.guild_id = guild_id
        self.channel_id = channel_id
        self.world = DiscordWorld(
            application_id=application_id if application_id is not None else bot_user_id,
            bot_user_id=bot_user_id,
            bot_username=bot_username,
            bot_token=bot_token,
            attachment_size_limit=attachment_size_limit,
            callback_window=interaction_callback_window,
        )
        self.world.add_guild(guild_id, channel_id, guild_name)
        self.gateway = Gateway(
            self.world, heartbeat_interval_ms=heartbeat_interval_ms, resume_timeout=gateway_resume_timeout
        )
        self.rest = RestApi(self.world, lambda: self.gateway_url, recommended_shards)
        self._runner: web.AppRunner | None = None
        self._base = ""

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # Accept bodies well past the attachment limit so oversize uploads get Discord's 413 JSON.
        app = web.Application(client_max_size=self.world.attachment_size_limit * 11 + (1 << 20))
        app.router.add_route("*", r"/api/v{version:\d+}/{tail:.*}", self.rest.handle)
        for path in ("/gateway", "/gateway/", "/gateway/resume"):
            app.router.add_get(path, self.gateway.handle)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self.rest.serve_attachment)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self._base = f"http://{bound_host}:{bound_port}"
        self.world.base_url = self._base
        self.gateway.resume_url = f"ws://{bound_host}:{bound_port}/gateway/resume"

    async def stop(self) -> None:
        await self.gateway.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DiscordStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def api_base(self) -> str:
        """Base URL without the /api/v10 suffix."""
        self._require_started()
        return self._base

    @property
    def gateway_url(self) -> str:
        self._require_started()
        return self._base.replace("http://", "ws://", 1) + "/gateway"

    def _require_started(self) -> None:
        if not self._base:
            raise RuntimeError("DiscordStandIn.start() has not been awaited")

    # -- observed state ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.world.requests

    @property
    def messages(self) -> dict[int, StoredMessage]:
        return self.world.messages

    @property
    def synced_commands(self) -> dict[int | None, list[dict[str, Any]]]:
        return self.world.synced_commands

    @property
    def interactions(self) -> dict[int, InteractionHandle]:
        return self.world.interactions

    @property
    def gateway_sessions(self) -> list[GatewaySession]:
        return self.gateway.sessions

    @property
    def gateway_connections(self) -> list[GatewayConnectionInfo]:
        return self.gateway.connections

    @property
    def internal_errors(self) -> list[Exception]:
        """Exceptions the stand-in hit while handling requests (each answered with a 400)."""
        return self.world.internal_errors

    def requests_for(self, route: str) -> list[RecordedRequest]:
        """Recorded requests by route name (the names `inject` accepts)."""
        return [r for r in self.requests if r.route == route]

    # -- waiting ----------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        """Waits until `predicate()` holds; it is re-checked after every REST request and gateway event."""
        await self.world.notifier.wait_for(predicate, timeout, self._describe)

    async def wait_until_ready(self, timeout: float = 10, *, count: int = 1) -> None:
        """Waits until `count` IDENTIFYs in total were answered with READY (+ GUILD_CREATE)."""
        await self.wait_for(lambda: self.gateway.ready_count >= count, timeout)

    def _describe(self) -> str:
        recent = "\n".join(f"  {r!r}" for r in self.requests[-10:]) or "  (none)"
        return f"recent requests:\n{recent}\ngateway sessions: {self.gateway.sessions}"

    # -- users' actions ---------------------------------------------------------------------

    async def send_slash_command(
        self,
        name: str,
        options: Mapping[str, object] | None = None,
        *,
        user_id: int = DEFAULT_USER_ID,
        username: str = DEFAULT_USERNAME,
        roles: Sequence[int] = (),
        permissions: int = DEFAULT_MEMBER_PERMISSIONS,
        guild_id: int | None = None,
        channel_id: int | None = None,
        raw_options: list[dict[str, Any]] | None = None,
    ) -> InteractionHandle:
        """Dispatches an application command interaction as if a member used `/name`.

        `name` may include subcommands ("image generate"). Option types come from the synced
        definition; values are coerced like the Discord client would (users, channels, roles
        by id; attachments as bytes or (filename, bytes)). Once any commands were synced, a
        name not synced globally or to the channel's guild raises LookupError, as no user
        could invoke it there.
        """
        channel = self._channel(guild_id, channel_id)
        data = self.world.command_data(
            name, options, raw_options, channel.guild_id, channel.id, permissions=permissions
        )
        handle = self.world.new_interaction(
            interaction_type=INTERACTION_APPLICATION_COMMAND,
            channel_id=channel.id,
            user_id=user_id,
            username=username,
            roles=roles,
            permissions=permissions,
            waiter=self.wait_for,
            name=data["name"],
        )
        handle.payload["data"] = data
        return self._dispatch(handle)

    async def press_button(
        self,
        message: StoredMessage | int,
        custom_id: str,
        *,
        user_id: int = DEFAULT_USER_ID,
        username: str = DEFAULT_USERNAME,
        roles: Sequence[int] = (),
        permissions: int = DEFAULT_MEMBER_PERMISSIONS,
    ) -> InteractionHandle:
        """Clicks a (non-link, enabled) button on a stored message."""
        stored = self._message(message)
        component = self.world.find_message_component(stored, custom_id, {BUTTON})
        if component.get("style") == 5:
            raise LookupError(f"button {custom_id!r} is a link button; it opens a URL instead")
        return self._component_interaction(
            stored, custom_id, BUTTON, component, None, user_id, username, roles, permissions
        )

    async def choose_select(
        self,
        message: StoredMessage | int,
        custom_id: str,
        values: Sequence[str],
        *,
        user_id: int = DEFAULT_USER_ID,
        username: str = DEFAULT_USERNAME,
        roles: Sequence[int] = (),
        permissions: int = DEFAULT_MEMBER_PERMISSIONS,
    ) -> InteractionHandle:
        """Picks `values` in a select menu on a stored message."""
        stored = self._message(message)
        component = self.world.find_message_component(stored, custom_id, set(SELECT_TYPES))
        return self._component_interaction(
            stored,
            custom_id,
            int(component["type"]),
            component,
            list(values),
            user_id,
            username,
            roles,
            permissions,
        )

    async def submit_modal(
        self,
        opened_by: InteractionHandle,
        values: Mapping[str, str],
        *,
        user_id: int | None = None,
        username: str | None = None,
        roles: Sequence[int] = (),
        permissions: int = DEFAULT_MEMBER_PERMISSIONS,
    ) -> InteractionHandle:
        """Submits the modal the bot opened (callback type 9) on `opened_by`.

        Text inputs are filled by custom_id; inputs not in `values` are submitted empty."""
        modal = opened_by.modal
        if modal is None:
            raise LookupError(f"interaction {opened_by.id} did not open a modal")
        handle = self.world.new_interaction(
            interaction_type=INTERACTION_MODAL_SUBMIT,
            channel_id=opened_by.channel_id,
            user_id=user_id if user_id is not None else int(opened_by.user["id"]),
            username=username if username is not None else opened_by.user["username"],
            roles=roles,
            permissions=permissions,
            waiter=self.wait_for,
            source_message_id=opened_by.source_message_id,
        )
        handle.payload["data"] = {"custom_id": modal["custom_id"], "components": _filled_modal(modal, values)}
        if opened_by.source_message_id is not None:
            handle.payload["message"] = self._message(opened_by.source_message_id).to_payload()
        return self._dispatch(handle)

    def _component_interaction(
        self,
        message: StoredMessage,
        custom_id: str,
        component_type: int,
        component: dict[str, Any],
        values: list[str] | None,
        user_id: int,
        username: str,
        roles: Sequence[int],
        permissions: int,
    ) -> InteractionHandle:
        handle = self.world.new_interaction(
            interaction_type=INTERACTION_MESSAGE_COMPONENT,
            channel_id=message.channel_id,
            user_id=user_id,
            username=username,
            roles=roles,
            permissions=permissions,
            waiter=self.wait_for,
            source_message_id=message.id,
        )
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
        if "id" in component:
            data["id"] = component["id"]
        if values is not None:
            data["values"] = values
        handle.payload["data"] = data
        handle.payload["message"] = message.to_payload()
        return self._dispatch(handle)

    def _dispatch(self, handle: InteractionHandle) -> InteractionHandle:
        self.gateway.dispatch_interaction(handle.guild_id, handle.payload)
        # The creation time is when the event left for the client, as on Discord.
        handle.created_at = time.monotonic()
        self.world.notifier.notify()
        return handle

    def _channel(self, guild_id: int | None, channel_id: int | None) -> Any:
        if channel_id is None:
            if guild_id is None or guild_id == self.guild_id:
                channel_id = self.channel_id
            else:
                channel_id = self.world.guilds[guild_id].channel_ids[0]
        channel = self.world.channels.get(channel_id)
        if channel is None:
            raise LookupError(f"unknown channel {channel_id}")
        if guild_id is not None and channel.guild_id != guild_id:
            raise LookupError(f"channel {channel_id} is not in guild {guild_id}")
        return channel

    def _message(self, message: StoredMessage | int) -> StoredMessage:
        message_id = message.id if isinstance(message, StoredMessage) else int(message)
        stored = self.world.messages.get(message_id)
        if stored is None or stored.deleted:
            raise LookupError(f"message {message_id} does not exist (or was deleted)")
        return stored

    # -- world changes and faults -----------------------------------------------------------

    def add_guild(self, guild_id: int, channel_id: int, name: str = "Another Guild") -> None:
        """Adds a guild with one text channel; connected shards responsible for it get GUILD_CREATE."""
        guild = self.world.add_guild(guild_id, channel_id, name)
        self.gateway.dispatch_event(guild_id, "GUILD_CREATE", self.world.guild_payload(guild), 1)

    def add_role(self, role_id: int, name: str, guild_id: int | None = None) -> None:
        """Creates a role in a guild, telling connected clients as Discord does (GUILD_ROLE_CREATE)."""
        guild = self.world.guilds[guild_id or self.guild_id]
        guild.roles[role_id] = name
        role = next(r for r in self.world.guild_roles(guild) if r["id"] == str(role_id))
        self.gateway.dispatch_event(
            guild.id, "GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role}, 1
        )

    def add_channel(
        self, channel_id: int, *, name: str = "general", nsfw: bool = False, guild_id: int | None = None
    ) -> None:
        """Adds a text channel (age-restricted with `nsfw`) to a guild; sessions with the GUILDS
        intent get CHANNEL_CREATE, so the bot's cache has it before any interaction there."""
        self.world.add_channel(guild_id or self.guild_id, channel_id, name, nsfw=nsfw)
        self.world.notifier.notify()

    def add_thread(
        self, thread_id: int, parent_id: int, *, name: str = "thread", owner_id: int = DEFAULT_USER_ID
    ) -> None:
        """Starts a public thread (type 11) in a text channel, as the member `owner_id` would;
        sessions with the GUILDS intent get THREAD_CREATE. Interactions may then be sent with
        `channel_id=thread_id`; a thread is age-restricted when its parent is."""
        self.world.add_thread(thread_id, parent_id, name, owner_id)
        self.world.notifier.notify()

    def set_channel_nsfw(self, channel_id: int, nsfw: bool) -> None:
        """Turns a text channel's age restriction on or off, with CHANNEL_UPDATE to GUILDS sessions."""
        self.world.set_channel_nsfw(channel_id, nsfw)
        self.world.notifier.notify()

    def set_bot_permissions(self, permissions: int, guild_id: int | None = None) -> None:
        """Sets the bot's role permissions in a guild (default BOT_ROLE_PERMISSIONS), with
        GUILD_ROLE_UPDATE to GUILDS sessions. As on Discord the bot also has @everyone's
        permissions (DEFAULT_MEMBER_PERMISSIONS), and Administrator (1 << 3) grants all; that
        sum is interactions' `app_permissions` and what the AutoMod routes check."""
        self.world.set_bot_permissions(guild_id or self.guild_id, permissions)
        self.world.notifier.notify()

    def bot_permissions(self, guild_id: int | None = None) -> int:
        """The bot's effective guild permissions, as `app_permissions` carries them."""
        return self.world.bot_permissions(self.world.guilds[guild_id or self.guild_id])

    def automod_rules(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        """The guild's AutoMod rules as GET /guilds/{id}/auto-moderation/rules returns them."""
        rules = self.world.guilds[guild_id or self.guild_id].automod_rules.values()
        return [copy.deepcopy(r) for r in rules]

    def put_automod_rule(self, rule: Mapping[str, Any], guild_id: int | None = None) -> dict[str, Any]:
        """Creates (no "id", or one the guild lacks) or updates an AutoMod rule, as a moderator
        would in the server settings, and returns it in full.

        What the caller leaves out is filled in as Discord does (a new snowflake id, keyword
        trigger, empty keyword metadata, block-message action, enabled, no exemptions); what
        Discord would refuse raises ValueError (too many or too long keywords, patterns or
        allow-list entries, too many exemptions, an unknown trigger type, an unsupported action).
        Sessions with the AUTO_MODERATION_CONFIGURATION intent (1 << 20) get
        AUTO_MODERATION_RULE_CREATE/UPDATE, but only while the bot has Manage Server (1 << 5)."""
        rule = self.world.put_automod_rule(guild_id or self.guild_id, rule)
        self.world.notifier.notify()
        return rule

    def delete_automod_rule(self, rule_id: int, guild_id: int | None = None) -> None:
        """Deletes an AutoMod rule (LookupError if there is none); AUTO_MODERATION_RULE_DELETE
        carries the rule as it was, under the same intent and permission conditions."""
        self.world.delete_automod_rule(guild_id or self.guild_id, rule_id)
        self.world.notifier.notify()

    def dm_channel(self, user_id: int = DEFAULT_USER_ID) -> int:
        """The id of the DM channel between the bot and a user (created on first use)."""
        return self.world.dm_channel_for(user_id).id

    def inject(
        self, route: str, *, status: int, count: int = 1, retry_after: float = 1.0, code: int | None = None
    ) -> None:
        """Makes the next `count` requests on `route` (a name from `requests_for`, or "any") fail.

        429 uses Discord's rate-limit body and headers (discord.py sleeps `retry_after` and
        retries); 5xx answers plain text; other statuses answer {"message", "code": code}.
        """
        self.rest.inject(route, status=status, count=count, retry_after=retry_after, code=code)

    def expire_interaction_tokens(self) -> None:
        """Every existing interaction token now behaves as if older than 15 minutes."""
        for handle in self.world.interactions.values():
            handle.expired = True

    def delete_message(self, message_id: int) -> None:
        """Deletes a message as a moderator would; later edits get 404 Unknown Message."""
        self.world.delete_message(self._message(message_id))
        self.world.notifier.notify()

    async def request_reconnect(self) -> None:
        """Sends op 7 RECONNECT to every connected client."""
        await self.gateway.request_reconnect()

    async def drop_gateway_connections(self, code: int = 4000) -> None:
        """Closes every gateway websocket server-side; sessions stay resumable."""
        await self.gateway.drop_connections(code)

    async def invalidate_sessions(self, *, resumable: bool = False) -> None:
        """Sends op 9 INVALID_SESSION to every connected client."""
        await self.gateway.invalidate_sessions(resumable=resumable)


def _filled_modal(modal: dict[str, Any], values: Mapping[str, str]) -> list[dict[str, Any]]:
    """Mirrors the modal's layout with the submitted text input values, as Discord does."""
    inputs = [c for c in iter_components(modal.get("components") or []) if c.get("type") == 4]
    unknown = set(values) - {c.get("custom_id") for c in inputs}
    if unknown:
        raise LookupError(f"modal has no text inputs {sorted(unknown)}")

    def submitted(component: dict[str, Any]) -> dict[str, Any]:
        custom_id = component.get("custom_id")
        answer: dict[str, Any] = {"type": 4, "custom_id": custom_id, "value": values.get(str(custom_id), "")}
        if "id" in component:
            answer["id"] = component["id"]
        return answer

    result: list[dict[str, Any]] = []
    for top in modal.get("components") or []:
        if top.get("type") == 1:
            children = [submitted(c) for c in top.get("components") or [] if c.get("type") == 4]
            result.append({"type": 1, "components": children})
        elif top.get("type") == 18 and (top.get("component") or {}).get("type") == 4:
            result.append({"type": 18, "component": submitted(top["component"])})
    return result
