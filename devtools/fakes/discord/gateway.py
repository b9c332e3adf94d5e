"""Gateway (websocket) side of the local Discord stand-in.

Speaks gateway v10 JSON over aiohttp websockets: HELLO, IDENTIFY -> READY +
GUILD_CREATE, heartbeats, RESUME with replay, sharding, and the transport
compression discord.py asks for (`zlib-stream`, or `zstd-stream` when the
`zstandard` package is importable, or none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from devtools.fakes.discord.state import INTENT_GUILDS, DiscordWorld, NoGatewayClientError

OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_VOICE_STATE_UPDATE = 4
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

CLOSE_UNKNOWN_ERROR = 4000
CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_NOT_AUTHENTICATED = 4003
CLOSE_AUTHENTICATION_FAILED = 4004
CLOSE_ALREADY_AUTHENTICATED = 4005
CLOSE_INVALID_SHARD = 4010
CLOSE_INVALID_API_VERSION = 4012

# A client closing with these codes ends its session (Discord will not let it RESUME).
SESSION_ENDING_CLOSE_CODES = frozenset({1000, 1001})
HISTORY_LIMIT = 5000


def make_compressor(kind: str | None) -> Callable[[bytes], bytes] | None:
    """One compression context per connection; every message is flushed so the client can
    decode it on its own, exactly as Discord's transport compression does."""
    if kind is None:
        return None
    if kind == "zlib-stream":
        context = zlib.compressobj()
        return lambda data: context.compress(data) + context.flush(zlib.Z_SYNC_FLUSH)
    if kind == "zstd-stream":
        import zstandard  # only present when discord.py itself would ask for zstd

        zcontext = zstandard.ZstdCompressor().compressobj()
        return lambda data: zcontext.compress(data) + zcontext.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    raise ValueError(f"unsupported gateway compression {kind!r}")


@dataclass
class GatewayConnectionInfo:
    """What one websocket connection asked for and did, for assertions in tests."""

    path: str
    query: dict[str, str]
    compress: str | None
    opened_at: float
    op: str | None = None  # "IDENTIFY" or "RESUME"
    session_id: str | None = None
    shard: tuple[int, int] | None = None
    close_code: int | None = None
    closed_by_client: bool | None = None
    replayed: int = 0  # dispatches re-sent after a RESUME
    received_ops: list[int] = field(default_factory=list)


class GatewaySession:
    """A gateway session: survives its connection so the client can RESUME and get replays."""

    def __init__(self, session_id: str, shard: tuple[int, int] | None, intents: int) -> None:
        self.session_id = session_id
        self.shard = shard
        self.intents = intents
        self.sequence = 0
        self.history: deque[tuple[int, dict[str, Any]]] = deque(maxlen=HISTORY_LIMIT)
        self.connection: _Connection | None = None
        self.invalidated = False
        self.identified_at = time.monotonic()
        self.disconnected_at: float | None = None
        self.dispatched: list[str] = []

    def __repr__(self) -> str:
        state = "invalidated" if self.invalidated else ("connected" if self.connection else "disconnected")
        return f"<GatewaySession {self.session_id[:8]} shard={self.shard} {state} seq={self.sequence}>"

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.closing

    def alive(self, resume_timeout: float) -> bool:
        """Connected, or disconnected recently enough that Discord would still accept a RESUME."""
        if self.invalidated:
            return False
        if self.connection is not None or self.disconnected_at is None:
            return True
        return time.monotonic() - self.disconnected_at <= resume_timeout

    def detach(self) -> None:
        self.connection = None
        self.disconnected_at = time.monotonic()

    def handles_guild(self, guild_id: int | None) -> bool:
        shard_id, shard_count = self.shard or (0, 1)
        if guild_id is None:
            return shard_id == 0
        return (guild_id >> 22) % shard_count == shard_id

    def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Queues a dispatch; while disconnected it is only kept for replay on RESUME."""
        self.sequence += 1
        message = {"op": OP_DISPATCH, "d": data, "s": self.sequence, "t": event}
        self.history.append((self.sequence, message))
        self.dispatched.append(event)
        if self.connected:
            assert self.connection is not None
            self.connection.send(message)


class _Connection:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        info: GatewayConnectionInfo,
        compress: Callable[[bytes], bytes] | None,
    ) -> None:
        self.ws = ws
        self.info = info
        self.compress = compress
        self.session: GatewaySession | None = None
        self.closing = False
        self.closed_by_server = False
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop())

    def send(self, message: dict[str, Any]) -> None:
        if not self.closing:
            self._queue.put_nowait(message)

    def send_op(self, op: int, data: Any) -> None:
        self.send({"op": op, "d": data, "s": None, "t": None})

    async def _write_loop(self) -> None:
        # A single writer keeps frames in order and the compression context sequential.
        while (message := await self._queue.get()) is not None:
            raw = json.dumps(message, separators=(",", ":")).encode()
            try:
                if self.compress is None:
                    await self.ws.send_str(raw.decode())
                else:
                    await self.ws.send_bytes(self.compress(raw))
            except (ConnectionError, RuntimeError):
                return

    async def close(self, code: int, reason: str = "") -> None:
        """Flushes what is queued, then closes with a gateway close code."""
        if self.closing:
            return
        self.closing = True
        self.closed_by_server = True
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, RuntimeError):
            await asyncio.wait_for(asyncio.shield(self._writer), 5)
        await self.ws.close(code=code, message=reason.encode())

    async def finish(self) -> None:
        self.closing = True
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._writer, 5)


class Gateway:
    def __init__(self, world: DiscordWorld, *, heartbeat_interval_ms: int, resume_timeout: float) -> None:
        self.world = world
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.resume_timeout = resume_timeout
        self.resume_url = ""
        self.sessions: list[GatewaySession] = []
        self.connections: list[GatewayConnectionInfo] = []
        self.ready_count = 0
        self._live: set[_Connection] = set()
        world.event_sink = self.dispatch_event

    # -- public operations used by the stand-in ----------------------------------------------

    def dispatch_event(
        self, guild_id: int | None, event: str, data: dict[str, Any], intent: int | None
    ) -> None:
        """Sends an event to every live session responsible for the guild that has the intent."""
        for session in self._alive_sessions(guild_id):
            if intent is None or session.intents & intent:
                session.dispatch(event, data)

    def dispatch_interaction(self, guild_id: int | None, payload: dict[str, Any]) -> list[GatewaySession]:
        """Like Discord, every live session of the guild's shard gets the interaction (two bot
        processes on one token both receive it, and the slower one's callback gets 40060)."""
        sessions = self._alive_sessions(guild_id)
        if not sessions:
            raise NoGatewayClientError(
                "no gateway session can receive this interaction: no client has IDENTIFYed for "
                f"guild {guild_id}'s shard, or its session ended; await wait_until_ready() first"
            )
        for session in sessions:
            session.dispatch("INTERACTION_CREATE", payload)
        return sessions

    async def request_reconnect(self) -> None:
        """Sends op 7 RECONNECT to every connected client (it should reconnect and RESUME)."""
        for connection in list(self._live):
            connection.send_op(OP_RECONNECT, None)

    async def drop_connections(self, code: int = CLOSE_UNKNOWN_ERROR) -> None:
        """Closes every live websocket from the server side, keeping sessions resumable."""
        for connection in list(self._live):
            if connection.session is not None and connection.session.connection is connection:
                connection.session.detach()
            await connection.close(code, "dropped by stand-in")

    async def invalidate_sessions(self, *, resumable: bool = False) -> None:
        """Sends op 9 INVALID_SESSION; with resumable=False the client must IDENTIFY again."""
        for connection in list(self._live):
            if connection.session is not None and not resumable:
                connection.session.invalidated = True
            connection.send_op(OP_INVALID_SESSION, resumable)

    async def close_all(self) -> None:
        for connection in list(self._live):
            await connection.close(1001, "stand-in stopping")

    # -- websocket handling -------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0, compress=False, autoping=True)
        await ws.prepare(request)
        query = dict(request.query)
        info = GatewayConnectionInfo(
            path=request.path, query=query, compress=query.get("compress"), opened_at=time.monotonic()
        )
        self.connections.append(info)
        try:
            compressor = make_compressor(info.compress)
        except (ValueError, ImportError):
            await ws.close(code=CLOSE_DECODE_ERROR, message=b"Unsupported compression.")
            return ws
        connection = _Connection(ws, info, compressor)
        self._live.add(connection)
        try:
            await self._serve(connection, query)
        finally:
            self._live.discard(connection)
            await connection.finish()
            self._connection_ended(connection)
            self.world.notifier.notify()
        return ws

    async def _serve(self, connection: _Connection, query: dict[str, str]) -> None:
        if query.get("v", "10") not in ("9", "10"):
            await connection.close(CLOSE_INVALID_API_VERSION, "Invalid API version.")
            return
        if query.get("encoding", "json") != "json":
            await connection.close(CLOSE_DECODE_ERROR, "Only JSON encoding is supported.")
            return
        connection.send_op(
            OP_HELLO, {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["stand-in"]}
        )
        async for message in connection.ws:
            if message.type is WSMsgType.TEXT:
                try:
                    payload = json.loads(message.data)
                    op = int(payload["op"])
                except (ValueError, KeyError, TypeError):
                    await connection.close(CLOSE_DECODE_ERROR, "Error while decoding payload.")
                    break
                connection.info.received_ops.append(op)
                await self._handle_op(connection, op, payload.get("d"))
                self.world.notifier.notify()
            elif message.type is WSMsgType.BINARY:
                await connection.close(CLOSE_DECODE_ERROR, "Error while decoding payload.")
            else:
                break
            if connection.closing:
                break

    async def _handle_op(self, connection: _Connection, op: int, data: Any) -> None:
        if op == OP_HEARTBEAT:
            connection.send_op(OP_HEARTBEAT_ACK, None)
        elif op == OP_IDENTIFY:
            await self._identify(connection, data or {})
        elif op == OP_RESUME:
            await self._resume(connection, data or {})
        elif op in (OP_PRESENCE_UPDATE, OP_VOICE_STATE_UPDATE, OP_REQUEST_GUILD_MEMBERS):
            if connection.session is None:
                await connection.close(CLOSE_NOT_AUTHENTICATED, "Not authenticated.")
            elif op == OP_REQUEST_GUILD_MEMBERS:
                self._send_member_chunk(connection.session, data or {})
        else:
            await connection.close(CLOSE_UNKNOWN_OPCODE, "Unknown opcode.")

    async def _identify(self, connection: _Connection, data: dict[str, Any]) -> None:
        if connection.session is not None:
            await connection.close(CLOSE_ALREADY_AUTHENTICATED, "Already authenticated.")
            return
        if data.get("token") != self.world.bot_token:
            await connection.close(CLOSE_AUTHENTICATION_FAILED, "Authentication failed.")
            return
        shard = data.get("shard")
        shard_tuple: tuple[int, int] | None = None
        if shard is not None:
            shard_id, shard_count = int(shard[0]), int(shard[1])
            if shard_count < 1 or not 0 <= shard_id < shard_count:
                await connection.close(CLOSE_INVALID_SHARD, "Invalid shard.")
                return
            shard_tuple = (shard_id, shard_count)
        session = GatewaySession(secrets.token_hex(16), shard_tuple, int(data.get("intents") or 0))
        self.sessions.append(session)
        self._attach(connection, session, "IDENTIFY")
        guilds = [g for g in self.world.guilds.values() if session.handles_guild(g.id)]
        session.dispatch("READY", self._ready_payload(session, [g.id for g in guilds]))
        if session.intents & INTENT_GUILDS:
            for guild in guilds:
                session.dispatch("GUILD_CREATE", self.world.guild_payload(guild))
        self.ready_count += 1

    async def _resume(self, connection: _Connection, data: dict[str, Any]) -> None:
        if data.get("token") != self.world.bot_token:
            await connection.close(CLOSE_AUTHENTICATION_FAILED, "Authentication failed.")
            return
        session = next((s for s in self.sessions if s.session_id == data.get("session_id")), None)
        if session is None or not session.alive(self.resume_timeout):
            connection.send_op(OP_INVALID_SESSION, False)
            return
        previous = session.connection
        if previous is not None and previous is not connection:
            await previous.close(CLOSE_UNKNOWN_ERROR, "Session resumed elsewhere.")
        self._attach(connection, session, "RESUME")
        last_seen = int(data.get("seq") or 0)
        for sequence, message in list(session.history):
            if sequence > last_seen:
                connection.send(message)
                connection.info.replayed += 1
        session.dispatch("RESUMED", {"_trace": ["stand-in"]})

    def _attach(self, connection: _Connection, session: GatewaySession, op: str) -> None:
        connection.session = session
        session.connection = connection
        session.disconnected_at = None
        connection.info.op = op
        connection.info.session_id = session.session_id
        connection.info.shard = session.shard

    def _connection_ended(self, connection: _Connection) -> None:
        info = connection.info
        info.close_code = connection.ws.close_code
        info.closed_by_client = not connection.closed_by_server
        session = connection.session
        if session is None or session.connection is not connection:
            return
        session.detach()
        if info.closed_by_client and info.close_code in SESSION_ENDING_CLOSE_CODES:
            session.invalidated = True

    def _alive_sessions(self, guild_id: int | None) -> list[GatewaySession]:
        return [s for s in self.sessions if s.handles_guild(guild_id) and s.alive(self.resume_timeout)]

    def _ready_payload(self, session: GatewaySession, guild_ids: list[int]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "v": 10,
            "user": self.world.me_payload(),
            "user_settings": {},
            "session_type": "normal",
            "session_id": session.session_id,
            "resume_gateway_url": self.resume_url,
            "guilds": [{"id": str(g), "unavailable": True} for g in guild_ids],
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["stand-in"],
            "auth": {},
            "application": {"id": str(self.world.application_id), "flags": self.world.application_flags},
            "_trace": ["stand-in"],
        }
        if session.shard is not None:
            payload["shard"] = list(session.shard)
        return payload

    def _send_member_chunk(self, session: GatewaySession, data: dict[str, Any]) -> None:
        guild = self.world.guilds.get(int(data.get("guild_id") or 0))
        if guild is None:
            return
        wanted = {int(u) for u in data.get("user_ids") or []}
        members = [m for uid, m in guild.members.items() if not wanted or uid in wanted]
        chunk: dict[str, Any] = {
            "guild_id": str(guild.id),
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [str(u) for u in wanted - set(guild.members)],
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        session.dispatch("GUILD_MEMBERS_CHUNK", chunk)
