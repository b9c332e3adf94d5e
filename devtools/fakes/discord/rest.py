"""REST (HTTP API v10) side of the local Discord stand-in.

Every request under /api/v{n}/ is recorded, routed by a small regex table,
optionally failed by an injected fault, and answered with Discord-shaped JSON
or Discord's error bodies.
"""

from __future__ import annotations

import email.message
import email.parser
import email.utils
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from devtools.fakes.discord.models import (
    CALLBACK_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_UPDATE_MESSAGE,
    CALLBACK_MODAL,
    CALLBACK_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    INTERACTION_APPLICATION_COMMAND,
    INTERACTION_MESSAGE_COMPONENT,
    INTERACTION_MODAL_SUBMIT,
    MESSAGE_CHAT_INPUT_COMMAND,
    MESSAGE_DEFAULT,
    MESSAGE_REPLY,
    CallbackRecord,
    InteractionHandle,
    RecordedFile,
    RecordedRequest,
    StoredMessage,
)
from devtools.fakes.discord.state import DiscordWorld
from devtools.fakes.discord.validation import (
    DiscordError,
    FormErrors,
    api_error,
    check_file_sizes,
    invalid_webhook_token,
    rate_limited,
    too_large,
    unknown_interaction,
    unknown_message,
    validate_message,
    validate_modal,
)

_log = logging.getLogger(__name__)

Reply = tuple[int, Any]
Handler = Callable[["ApiCall"], Awaitable[Reply]]

COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
ALLOWED_CALLBACKS: dict[int, frozenset[int]] = {
    INTERACTION_APPLICATION_COMMAND: frozenset(
        {CALLBACK_CHANNEL_MESSAGE, CALLBACK_DEFERRED_CHANNEL_MESSAGE, CALLBACK_MODAL}
    ),
    INTERACTION_MESSAGE_COMPONENT: frozenset(
        {
            CALLBACK_CHANNEL_MESSAGE,
            CALLBACK_DEFERRED_CHANNEL_MESSAGE,
            CALLBACK_DEFERRED_UPDATE_MESSAGE,
            CALLBACK_UPDATE_MESSAGE,
            CALLBACK_MODAL,
        }
    ),
    INTERACTION_MODAL_SUBMIT: frozenset(
        {
            CALLBACK_CHANNEL_MESSAGE,
            CALLBACK_DEFERRED_CHANNEL_MESSAGE,
            CALLBACK_DEFERRED_UPDATE_MESSAGE,
            CALLBACK_UPDATE_MESSAGE,
        }
    ),
}


@dataclass
class ApiCall:
    request: web.Request
    record: RecordedRequest
    params: dict[str, str]

    @property
    def json(self) -> Any:
        return self.record.json

    @property
    def files(self) -> list[RecordedFile]:
        return self.record.files

    def body(self) -> dict[str, Any]:
        body = self.record.json
        return body if isinstance(body, dict) else {}

    def int_param(self, name: str) -> int:
        return int(self.params[name])


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler
    auth: bool


@dataclass
class Injection:
    route: str
    status: int
    remaining: int
    retry_after: float
    code: int | None


class RestApi:
    def __init__(self, world: DiscordWorld, gateway_url: Callable[[], str], shard_count: int = 1) -> None:
        self.world = world
        self._gateway_url = gateway_url
        self._shard_count = shard_count
        self.injections: list[Injection] = []
        self.routes: list[Route] = []
        self._register_routes()

    @property
    def route_names(self) -> set[str]:
        return {r.name for r in self.routes} | {"any"}

    def _add(self, method: str, path: str, name: str, handler: Handler, *, auth: bool = True) -> None:
        # Snowflake parameters only match digits, so "@me"/"@original" never reach an id handler.
        def group(match: re.Match[str]) -> str:
            param = match.group(1)
            return f"(?P<{param}>{'[0-9]+' if param.endswith('_id') else '[^/]+'})"

        regex = re.sub(r"\{(\w+)\}", group, path)
        self.routes.append(Route(method, re.compile(f"^{regex}$"), name, handler, auth))

    def _register_routes(self) -> None:
        add = self._add
        add("GET", "/users/@me", "users_me", self._users_me)
        add("GET", "/users/{user_id}", "get_user", self._get_user)
        add("POST", "/users/@me/channels", "create_dm", self._create_dm)
        add("GET", "/oauth2/applications/@me", "application", self._application)
        add("GET", "/applications/@me", "application", self._application)
        add("GET", "/gateway", "gateway", self._gateway, auth=False)
        add("GET", "/gateway/bot", "gateway_bot", self._gateway_bot)
        for scope in ("", "/guilds/{guild_id}"):
            base = "/applications/{app_id}" + scope + "/commands"
            add("GET", base, "get_commands", self._get_commands)
            add("PUT", base, "sync_commands", self._put_commands)
            add("POST", base, "create_command", self._create_command)
            add("GET", base + "/{command_id}", "get_command", self._get_command)
            add("PATCH", base + "/{command_id}", "edit_command", self._edit_command)
            add("DELETE", base + "/{command_id}", "delete_command", self._delete_command)
        add("POST", "/interactions/{interaction_id}/{token}/callback", "callback", self._callback, auth=False)
        hook = "/webhooks/{app_id}/{token}"
        add("POST", hook, "followup", self._followup, auth=False)
        add("GET", hook + "/messages/@original", "get_original", self._get_original, auth=False)
        add("PATCH", hook + "/messages/@original", "edit_original", self._edit_original, auth=False)
        add("DELETE", hook + "/messages/@original", "delete_original", self._delete_original, auth=False)
        add("GET", hook + "/messages/{message_id}", "get_followup", self._get_followup, auth=False)
        add("PATCH", hook + "/messages/{message_id}", "edit_followup", self._edit_followup, auth=False)
        add("DELETE", hook + "/messages/{message_id}", "delete_followup", self._delete_followup, auth=False)
        add("GET", "/channels/{channel_id}", "get_channel", self._get_channel)
        add("POST", "/channels/{channel_id}/typing", "typing", self._typing)
        add("GET", "/channels/{channel_id}/messages", "channel_messages", self._channel_messages)
        add("POST", "/channels/{channel_id}/messages", "channel_message", self._channel_message)
        msg = "/channels/{channel_id}/messages/{message_id}"
        add("GET", msg, "get_channel_message", self._get_channel_message)
        add("PATCH", msg, "edit_channel_message", self._edit_channel_message)
        add("DELETE", msg, "delete_channel_message", self._delete_channel_message)
        add("GET", "/guilds/{guild_id}", "get_guild", self._get_guild)
        add("GET", "/guilds/{guild_id}/channels", "guild_channels", self._guild_channels)
        add("GET", "/guilds/{guild_id}/members/{user_id}", "get_member", self._get_member)
        rules = "/guilds/{guild_id}/auto-moderation/rules"
        add("GET", rules, "automod_rules", self._automod_rules)
        add("GET", rules + "/{rule_id}", "automod_rule", self._automod_rule)

    # -- request pipeline -----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            json=None,
            files=[],
            headers=headers,
            has_authorization="Authorization" in request.headers,
            time=time.monotonic(),
        )
        self.world.requests.append(record)
        try:
            route, params = self._match(request.method, path)
            record.route = route.name
            await self._read_body(request, record)
            if route.auth and request.headers.get("Authorization") != f"Bot {self.world.bot_token}":
                raise api_error(401)
            self._apply_injection(route.name)
            status, body = await route.handler(ApiCall(request, record, params))
            response = _json_response(status, body)
        except DiscordError as exc:
            body = exc.body
            response = _error_response(exc)
        except Exception as exc:
            # A stand-in bug or a body shape it cannot digest. Answer 400 rather than 500 so
            # discord.py fails at once instead of retrying with back-off, and keep the error.
            _log.exception("stand-in failed on %s %s", request.method, path)
            self.world.internal_errors.append(exc)
            body = {"message": f"stand-in could not handle this request: {exc!r}", "code": 0}
            response = _error_response(DiscordError(400, body))
        record.status = response.status
        record.response = body
        self.world.notifier.notify()
        return response

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        path_matched = False
        for route in self.routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            path_matched = True
            if route.method == method:
                return route, found.groupdict()
        raise api_error(405 if path_matched else 404)

    async def _read_body(self, request: web.Request, record: RecordedRequest) -> None:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large() from None
        if not raw:
            return
        content_type = request.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            record.json, record.files = parse_multipart(raw, content_type)
            return
        try:
            record.json = json.loads(raw)
        except ValueError:
            raise api_error(400, 50109) from None

    def inject(self, route: str, *, status: int, count: int, retry_after: float, code: int | None) -> None:
        if route not in self.route_names:
            raise ValueError(f"unknown route {route!r}; choose from {sorted(self.route_names)}")
        self.injections.append(Injection(route, status, count, retry_after, code))

    def _apply_injection(self, route_name: str) -> None:
        for injection in self.injections:
            if injection.remaining > 0 and injection.route in (route_name, "any"):
                injection.remaining -= 1
                raise _injected_error(injection)

    # -- identity and gateway discovery ---------------------------------------------------------

    async def _users_me(self, call: ApiCall) -> Reply:
        return 200, self.world.me_payload()

    async def _get_user(self, call: ApiCall) -> Reply:
        user = self.world.users.get(call.int_param("user_id"))
        if user is None:
            raise api_error(404, 10013)
        return 200, user

    async def _application(self, call: ApiCall) -> Reply:
        return 200, self.world.application_payload()

    async def _gateway(self, call: ApiCall) -> Reply:
        return 200, {"url": self._gateway_url()}

    async def _gateway_bot(self, call: ApiCall) -> Reply:
        limit = {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1}
        return 200, {"url": self._gateway_url(), "shards": self._shard_count, "session_start_limit": limit}

    # -- application commands -------------------------------------------------------------------

    def _command_scope(self, call: ApiCall) -> int | None:
        if call.int_param("app_id") != self.world.application_id:
            raise api_error(403, 50001)
        guild_id = call.params.get("guild_id")
        if guild_id is None:
            return None
        if int(guild_id) not in self.world.guilds:
            raise api_error(403, 50001)
        return int(guild_id)

    def _normalize_command(
        self, scope: int | None, body: dict[str, Any], existing: dict[str, Any] | None
    ) -> dict[str, Any]:
        command = {
            "type": 1,
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
            **body,
        }
        command["id"] = existing["id"] if existing else str(self.world.snowflakes.next())
        command["application_id"] = str(self.world.application_id)
        command["version"] = str(self.world.snowflakes.next())
        if scope is not None:
            command["guild_id"] = str(scope)
        return command

    def _validate_commands(self, bodies: list[dict[str, Any]]) -> None:
        errors = FormErrors()
        seen: set[tuple[str, int]] = set()
        for index, body in enumerate(bodies):
            name = str(body.get("name", ""))
            kind = int(body.get("type", 1))
            if not COMMAND_NAME.match(name) or (kind == 1 and name != name.lower()):
                errors.add((index, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            if kind == 1:
                errors.too_long((index, "description"), body.get("description"), 100)
            errors.too_long((index, "options"), body.get("options"), 25)
            if (name, kind) in seen:
                errors.add(
                    (index, "name"),
                    "APPLICATION_COMMANDS_DUPLICATE_NAME",
                    "Application command names must be unique",
                )
            seen.add((name, kind))
        errors.raise_if_any()

    async def _get_commands(self, call: ApiCall) -> Reply:
        return 200, self.world.synced_commands.get(self._command_scope(call), [])

    async def _put_commands(self, call: ApiCall) -> Reply:
        scope = self._command_scope(call)
        bodies = call.json if isinstance(call.json, list) else []
        self._validate_commands(bodies)
        current = {(c["name"], c.get("type", 1)): c for c in self.world.synced_commands.get(scope, [])}
        commands = [
            self._normalize_command(scope, body, current.get((body["name"], body.get("type", 1))))
            for body in bodies
        ]
        self.world.synced_commands[scope] = commands
        return 200, commands

    async def _create_command(self, call: ApiCall) -> Reply:
        scope = self._command_scope(call)
        body = call.body()
        self._validate_commands([body])
        commands = self.world.synced_commands.setdefault(scope, [])
        key = (body.get("name"), body.get("type", 1))
        existing = next((c for c in commands if (c["name"], c.get("type", 1)) == key), None)
        command = self._normalize_command(scope, body, existing)
        if existing is not None:
            commands[commands.index(existing)] = command
            return 200, command
        commands.append(command)
        return 201, command

    def _find_command(self, call: ApiCall) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        commands = self.world.synced_commands.get(self._command_scope(call), [])
        for command in commands:
            if command["id"] == call.params["command_id"]:
                return commands, command
        raise api_error(404, 10063)

    async def _get_command(self, call: ApiCall) -> Reply:
        return 200, self._find_command(call)[1]

    async def _edit_command(self, call: ApiCall) -> Reply:
        _, command = self._find_command(call)
        command.update({k: v for k, v in call.body().items() if k not in ("id", "application_id")})
        command["version"] = str(self.world.snowflakes.next())
        return 200, command

    async def _delete_command(self, call: ApiCall) -> Reply:
        commands, command = self._find_command(call)
        commands.remove(command)
        return 204, None

    # -- interaction callback ------------------------------------------------------------------

    async def _callback(self, call: ApiCall) -> Reply:
        handle = self.world.interactions.get(call.int_param("interaction_id"))
        if handle is None or handle.token != call.params["token"]:
            raise unknown_interaction()
        body = call.body()
        callback_type = int(body.get("type") or 0)
        data = body.get("data") if isinstance(body.get("data"), dict) else None
        record = CallbackRecord(callback_type, data, time.monotonic(), 0, list(call.files))
        handle.callbacks.append(record)
        try:
            reply = self._apply_callback(handle, callback_type, data or {}, call)
        except DiscordError as exc:
            record.status = exc.status
            raise
        record.status = reply[0]
        return reply

    def _apply_callback(
        self, handle: InteractionHandle, callback_type: int, data: dict[str, Any], call: ApiCall
    ) -> Reply:
        if any(c.accepted for c in handle.callbacks):
            raise api_error(400, 40060)
        # Discord forgets an interaction that was not answered within its window.
        if (
            self.world.interaction_expired(handle)
            or time.monotonic() - handle.created_at > self.world.callback_window
        ):
            raise unknown_interaction()
        if callback_type not in ALLOWED_CALLBACKS.get(handle.type, frozenset()):
            errors = FormErrors()
            errors.add(
                ("type",),
                "INTERACTION_CALLBACK_TYPE_INVALID",
                "Invalid interaction callback type for this interaction",
            )
            errors.raise_if_any()
        if callback_type in (CALLBACK_CHANNEL_MESSAGE, CALLBACK_UPDATE_MESSAGE):
            check_file_sizes(call.files, self.world.attachment_size_limit)
            validate_message(
                data, call.files, creating=callback_type == CALLBACK_CHANNEL_MESSAGE, prefix=("data",)
            )
        if callback_type == CALLBACK_MODAL:
            validate_modal(data)
            handle.modal = data
        elif callback_type == CALLBACK_CHANNEL_MESSAGE:
            handle.original = self.world.create_message(
                handle.channel_id,
                data,
                call.files,
                message_type=self._response_type(handle),
                interaction=handle,
                prefix=("data",),
            )
        elif callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE:
            loading = {"flags": int(data.get("flags") or 0) & FLAG_EPHEMERAL}
            handle.original = self.world.create_message(
                handle.channel_id,
                loading,
                [],
                message_type=self._response_type(handle),
                extra_flags=FLAG_LOADING,
                interaction=handle,
            )
        elif callback_type in (CALLBACK_DEFERRED_UPDATE_MESSAGE, CALLBACK_UPDATE_MESSAGE):
            handle.original = self._source_message(handle)
            if callback_type == CALLBACK_UPDATE_MESSAGE:
                self.world.edit_message(handle.original, data, call.files, prefix=("data",))
        if call.record.query.get("with_response", "").lower() not in ("1", "true"):
            return 204, None
        return 200, self._callback_response(handle, callback_type)

    def _response_type(self, handle: InteractionHandle) -> int:
        return (
            MESSAGE_CHAT_INPUT_COMMAND if handle.type == INTERACTION_APPLICATION_COMMAND else MESSAGE_DEFAULT
        )

    def _source_message(self, handle: InteractionHandle) -> StoredMessage:
        message = self.world.messages.get(handle.source_message_id or 0)
        if message is None or message.deleted:
            raise unknown_message()
        return message

    def _callback_response(self, handle: InteractionHandle, callback_type: int) -> dict[str, Any]:
        interaction: dict[str, Any] = {"id": str(handle.id), "type": handle.type}
        response: dict[str, Any] = {"interaction": interaction}
        if callback_type in (
            CALLBACK_CHANNEL_MESSAGE,
            CALLBACK_DEFERRED_CHANNEL_MESSAGE,
            CALLBACK_UPDATE_MESSAGE,
        ):
            assert handle.original is not None
            interaction.update(
                {
                    "response_message_id": str(handle.original.id),
                    "response_message_loading": handle.original.loading,
                    "response_message_ephemeral": handle.original.ephemeral,
                }
            )
            response["resource"] = {"type": callback_type, "message": handle.original.to_payload()}
        return response

    # -- interaction webhooks -------------------------------------------------------------------

    def _webhook_interaction(self, call: ApiCall) -> InteractionHandle:
        if call.int_param("app_id") != self.world.application_id:
            raise api_error(404, 10015)
        handle = self.world.interactions_by_token.get(call.params["token"])
        if handle is None or self.world.interaction_expired(handle):
            raise invalid_webhook_token()
        return handle

    def _original(self, handle: InteractionHandle) -> StoredMessage:
        if handle.original is None or handle.original.deleted:
            raise unknown_message()
        return handle.original

    def _followup_message(self, handle: InteractionHandle, call: ApiCall) -> StoredMessage:
        message_id = call.int_param("message_id")
        owned = [m for m in (handle.original, *handle.followups) if m is not None]
        message = next((m for m in owned if m.id == message_id and not m.deleted), None)
        if message is None:
            raise unknown_message()
        return message

    def _edit(self, message: StoredMessage, call: ApiCall) -> Reply:
        check_file_sizes(call.files, self.world.attachment_size_limit)
        validate_message(call.body(), call.files, creating=False)
        self.world.edit_message(message, call.body(), call.files)
        return 200, message.to_payload()

    def _delete(self, message: StoredMessage) -> Reply:
        self.world.delete_message(message)
        return 204, None

    async def _followup(self, call: ApiCall) -> Reply:
        handle = self._webhook_interaction(call)
        if not handle.acknowledged:
            raise api_error(404, 10015)
        body = call.body()
        check_file_sizes(call.files, self.world.attachment_size_limit)
        validate_message(body, call.files, creating=True)
        original = handle.original
        if original is not None and original.loading and not original.deleted:
            # Discord treats the first followup after a "thinking" deferral as resolving it:
            # it edits the loading message, whose ephemerality was fixed when deferring.
            self.world.edit_message(original, body, call.files)
            handle.followups.append(original)
            return 200, original.to_payload()
        message = self.world.create_message(
            handle.channel_id, body, call.files, message_type=self._response_type(handle), interaction=handle
        )
        handle.followups.append(message)
        return 200, message.to_payload()

    async def _get_original(self, call: ApiCall) -> Reply:
        return 200, self._original(self._webhook_interaction(call)).to_payload()

    async def _edit_original(self, call: ApiCall) -> Reply:
        return self._edit(self._original(self._webhook_interaction(call)), call)

    async def _delete_original(self, call: ApiCall) -> Reply:
        return self._delete(self._original(self._webhook_interaction(call)))

    async def _get_followup(self, call: ApiCall) -> Reply:
        handle = self._webhook_interaction(call)
        return 200, self._followup_message(handle, call).to_payload()

    async def _edit_followup(self, call: ApiCall) -> Reply:
        handle = self._webhook_interaction(call)
        return self._edit(self._followup_message(handle, call), call)

    async def _delete_followup(self, call: ApiCall) -> Reply:
        handle = self._webhook_interaction(call)
        return self._delete(self._followup_message(handle, call))

    # -- channels and messages ------------------------------------------------------------------

    def _channel(self, call: ApiCall) -> Any:
        channel = self.world.channels.get(call.int_param("channel_id"))
        if channel is None:
            raise api_error(404, 10003)
        return channel

    def _channel_message_or_404(self, call: ApiCall) -> StoredMessage:
        channel = self._channel(call)
        message = self.world.messages.get(call.int_param("message_id"))
        # Ephemeral messages exist only for their recipient; channel routes cannot see them.
        if message is None or message.deleted or message.ephemeral or message.channel_id != channel.id:
            raise unknown_message()
        return message

    async def _get_channel(self, call: ApiCall) -> Reply:
        return 200, self.world.channel_payload(self._channel(call))

    async def _typing(self, call: ApiCall) -> Reply:
        self._channel(call)
        return 204, None

    async def _channel_messages(self, call: ApiCall) -> Reply:
        channel = self._channel(call)
        limit = min(int(call.record.query.get("limit", 50)), 100)
        visible = [
            m
            for m in self.world.messages.values()
            if m.channel_id == channel.id and not m.deleted and not m.ephemeral
        ]
        visible.sort(key=lambda m: m.id, reverse=True)
        return 200, [m.to_payload() for m in visible[:limit]]

    async def _channel_message(self, call: ApiCall) -> Reply:
        channel = self._channel(call)
        body = call.body()
        check_file_sizes(call.files, self.world.attachment_size_limit)
        validate_message(body, call.files, creating=True)
        message_type = MESSAGE_REPLY if body.get("message_reference") else MESSAGE_DEFAULT
        message = self.world.create_message(channel.id, body, call.files, message_type=message_type)
        return 200, message.to_payload()

    async def _get_channel_message(self, call: ApiCall) -> Reply:
        return 200, self._channel_message_or_404(call).to_payload()

    async def _edit_channel_message(self, call: ApiCall) -> Reply:
        message = self._channel_message_or_404(call)
        if message.author.get("id") != str(self.world.bot_user_id):
            raise api_error(403, 50005)
        return self._edit(message, call)

    async def _delete_channel_message(self, call: ApiCall) -> Reply:
        return self._delete(self._channel_message_or_404(call))

    async def _create_dm(self, call: ApiCall) -> Reply:
        recipient = call.body().get("recipient_id")
        if recipient is None:
            errors = FormErrors()
            errors.required(("recipient_id",))
            errors.raise_if_any()
        channel = self.world.dm_channel_for(int(recipient))
        return 200, self.world.channel_payload(channel)

    # -- guilds ---------------------------------------------------------------------------------

    def _guild(self, call: ApiCall) -> Any:
        guild = self.world.guilds.get(call.int_param("guild_id"))
        if guild is None:
            raise api_error(404, 10004)
        return guild

    async def _get_guild(self, call: ApiCall) -> Reply:
        guild = self._guild(call)
        payload = self.world.guild_payload(guild, full=False)
        if call.record.query.get("with_counts", "").lower() in ("1", "true"):
            payload["approximate_member_count"] = len(guild.members)
            payload["approximate_presence_count"] = 0
        return 200, payload

    async def _guild_channels(self, call: ApiCall) -> Reply:
        guild = self._guild(call)
        return 200, [self.world.channel_payload(self.world.channels[c]) for c in guild.channel_ids]

    async def _get_member(self, call: ApiCall) -> Reply:
        member = self._guild(call).members.get(call.int_param("user_id"))
        if member is None:
            raise api_error(404, 10007, "Unknown Member")
        return 200, member

    # -- AutoMod --------------------------------------------------------------------------------

    def _automod_guild(self, call: ApiCall) -> Any:
        guild = self._guild(call)
        # Reading rules takes Manage Server, as configuring them does.
        if not self.world.bot_can_manage_guild(guild):
            raise api_error(403, 50013)
        return guild

    async def _automod_rules(self, call: ApiCall) -> Reply:
        guild = self._automod_guild(call)
        return 200, [dict(r) for r in guild.automod_rules.values()]

    async def _automod_rule(self, call: ApiCall) -> Reply:
        rule = self._automod_guild(call).automod_rules.get(call.int_param("rule_id"))
        if rule is None:
            raise api_error(404, 10066)
        return 200, dict(rule)

    # -- served attachments (the CDN) -----------------------------------------------------------

    async def serve_attachment(self, request: web.Request) -> web.StreamResponse:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            json=None,
            files=[],
            headers={k: v for k, v in request.headers.items() if k.lower() != "authorization"},
            has_authorization="Authorization" in request.headers,
            time=time.monotonic(),
            route="attachment",
        )
        self.world.requests.append(record)
        attachment = self.world.attachments.get(int(request.match_info["attachment_id"]))
        if attachment is None or attachment.filename != request.match_info["filename"]:
            response = web.Response(status=404, text="Not Found")
        else:
            response = web.Response(body=attachment.data, headers={"Content-Type": attachment.content_type})
        record.status = response.status
        self.world.notifier.notify()
        return response


def _injected_error(injection: Injection) -> DiscordError:
    if injection.status == 429:
        return rate_limited(injection.retry_after)
    if injection.status >= 500:
        return DiscordError(injection.status, f"{injection.status}: stand-in injected server error")
    return api_error(injection.status, injection.code)


# discord.py parses a body as JSON only when Content-Type is exactly "application/json",
# as Discord sends it (aiohttp's content_type= would append a charset).
JSON_HEADERS = {"Content-Type": "application/json"}


def _json_response(status: int, body: Any) -> web.Response:
    if status == 204 or body is None:
        return web.Response(status=204)
    return web.Response(status=status, body=json.dumps(body).encode(), headers=JSON_HEADERS)


def _error_response(exc: DiscordError) -> web.Response:
    if isinstance(exc.body, str):
        return web.Response(status=exc.status, text=exc.body, headers=exc.headers)
    headers = {**exc.headers, **JSON_HEADERS}
    return web.Response(status=exc.status, body=json.dumps(exc.body).encode(), headers=headers)


def parse_multipart(raw: bytes, content_type: str) -> tuple[Any, list[RecordedFile]]:
    """Splits a multipart/form-data body into `payload_json` and file parts, byte-exact."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise api_error(400, 50109)
    payload: Any = None
    fields: dict[str, str] = {}
    files: list[RecordedFile] = []
    sections = (b"\r\n" + raw).split(b"\r\n--" + boundary.encode())
    for section in sections[1:]:
        if section.startswith(b"--"):
            break
        _, _, part = section.partition(b"\r\n")
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            continue
        headers = email.parser.BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        name = email.utils.collapse_rfc2231_value(name) if name else ""
        filename = headers.get_filename()
        if filename is not None:
            files.append(RecordedFile(str(name), filename, headers.get_content_type(), content))
        elif name == "payload_json":
            try:
                payload = json.loads(content)
            except ValueError:
                raise api_error(400, 50109) from None
        else:
            fields[str(name)] = content.decode(errors="replace")
    if payload is None and fields:
        payload = fields
    return payload, files


__all__ = ["ApiCall", "RestApi", "parse_multipart"]
