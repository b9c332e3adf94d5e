"""The local Discord stand-in, driven by a real discord.py bot over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from discord.gateway import DiscordWebSocket
from discord.http import Route
from PIL import Image

from cogs.app import point_discord_py_at
from devtools.fakes.discord.models import ALL_PERMISSIONS
from devtools.fakes.discord.server import (
    BOT_ROLE_PERMISSIONS,
    DEFAULT_CHANNEL_ID,
    DEFAULT_GUILD_ID,
    DEFAULT_MEMBER_PERMISSIONS,
    DEFAULT_USER_ID,
    DiscordStandIn,
    NoGatewayClientError,
)

TOKEN = "stand-in-token"
NSFW_CHANNEL_ID = 1_300_000_000_000_000_200
THREAD_ID = 1_300_000_000_000_000_300
OTHER_GUILD_ID = 1_400_000_000_000_000_000
MANAGE_GUILD = 1 << 5
AUTOMOD_CONFIGURATION = 1 << 20


def _png(width: int = 12, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class BotState:
    """What the bot under test observed, for assertions."""

    def __init__(self) -> None:
        self.errors: dict[str, Exception] = {}
        self.presses: list[int] = []
        self.modal_answers: list[str] = []
        self.release = asyncio.Event()
        self.last_original: discord.InteractionMessage | None = None
        self.channels: list[Any] = []
        self.app_permissions: list[discord.Permissions] = []
        self.automod: list[tuple[str, discord.AutoModRule]] = []


class PingView(discord.ui.View):
    def __init__(self, state: BotState) -> None:
        super().__init__(timeout=None)
        self.state = state

    @discord.ui.button(label="Again", custom_id="ping:again", style=discord.ButtonStyle.primary)
    async def again(self, interaction: discord.Interaction, _button: discord.ui.Button[PingView]) -> None:
        self.state.presses.append(interaction.user.id)
        await interaction.response.defer()
        await interaction.followup.send("only you can see this", ephemeral=True)

    @discord.ui.button(label="Reroll", custom_id="ping:reroll")
    async def reroll(self, interaction: discord.Interaction, _button: discord.ui.Button[PingView]) -> None:
        picture = discord.File(io.BytesIO(_png(4, 4)), filename="reroll.png")
        await interaction.response.edit_message(content="rerolled", attachments=[picture])


class PromptModal(discord.ui.Modal, title="Describe it"):
    prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(label="Prompt", custom_id="prompt")

    def __init__(self, state: BotState) -> None:
        super().__init__(custom_id="describe:modal")
        self.state = state

    async def on_submit(self, interaction: discord.Interaction) -> None:
        self.state.modal_answers.append(self.prompt.value)
        sketch = discord.File(io.BytesIO(PNG), filename="sketch.png")
        await interaction.response.send_message(f"drawing {self.prompt.value}", file=sketch)


def install_commands(tree: app_commands.CommandTree[Any], state: BotState) -> None:
    @tree.command(name="ping", description="Replies with a picture")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        picture = discord.File(io.BytesIO(PNG), filename="pong.png")
        state.last_original = await interaction.edit_original_response(
            content="pong", attachments=[picture], view=PingView(state)
        )

    @tree.command(name="say", description="Repeats text")
    async def say(interaction: discord.Interaction, text: str, times: int = 1) -> None:
        try:
            await interaction.response.send_message(text * times)
        except discord.HTTPException as exc:
            state.errors["say"] = exc

    @tree.command(name="upload", description="Uploads a blob")
    async def upload(interaction: discord.Interaction, kilobytes: int) -> None:
        await interaction.response.defer()
        blob = discord.File(io.BytesIO(b"\0" * kilobytes * 1024), filename="blob.bin")
        try:
            await interaction.edit_original_response(attachments=[blob])
        except discord.HTTPException as exc:
            state.errors["upload"] = exc

    @tree.command(name="slow", description="Thinks before deferring")
    async def slow(interaction: discord.Interaction, seconds: float) -> None:
        await asyncio.sleep(seconds)
        try:
            await interaction.response.defer()
        except discord.HTTPException as exc:
            state.errors["slow"] = exc

    @tree.command(name="hold", description="Defers, then edits when released")
    async def hold(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        await state.release.wait()
        try:
            await interaction.edit_original_response(content="done")
        except discord.HTTPException as exc:
            state.errors["hold"] = exc

    @tree.command(name="describe", description="Opens a modal")
    async def describe(interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(PromptModal(state))

    @tree.command(name="where", description="Says whether this channel is age-restricted")
    async def where(interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
        here = interaction.channel
        state.channels.append(here)
        state.app_permissions.append(interaction.app_permissions)
        nsfw = isinstance(here, discord.TextChannel | discord.Thread) and here.is_nsfw()
        await interaction.response.send_message(f"nsfw={nsfw}")


class StandInBehaviour:
    """Shared by the plain and the sharded test bot: commands, guild sync, no identify delay."""

    tree: app_commands.CommandTree[Any]

    def __init__(self, guild_id: int, *, intents: discord.Intents | None = None, **options: Any) -> None:
        super().__init__(  # type: ignore[call-arg]
            command_prefix=commands.when_mentioned,
            intents=intents or discord.Intents(guilds=True),
            guild_ready_timeout=0.05,
            **options,
        )
        self.guild_id = guild_id
        self.state = BotState()
        install_commands(self.tree, self.state)

    async def setup_hook(self) -> None:
        guild = discord.Object(self.guild_id)
        self.tree.copy_global_to(guild=guild)
        await self.tree.sync(guild=guild)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # discord.py waits 5 s between IDENTIFYs to respect Discord's limit; the stand-in has none.
        return None

    async def on_automod_rule_create(self, rule: discord.AutoModRule) -> None:
        self.state.automod.append(("create", rule))

    async def on_automod_rule_update(self, rule: discord.AutoModRule) -> None:
        self.state.automod.append(("update", rule))

    async def on_automod_rule_delete(self, rule: discord.AutoModRule) -> None:
        self.state.automod.append(("delete", rule))


class StandInBot(StandInBehaviour, commands.Bot):
    pass


class ShardedStandInBot(StandInBehaviour, commands.AutoShardedBot):
    pass


@contextlib.asynccontextmanager
async def running(bot: commands.Bot, standin: DiscordStandIn, *, ready_count: int = 1) -> AsyncIterator[None]:
    await bot.login(TOKEN)
    task = asyncio.create_task(bot.connect())
    try:
        await standin.wait_until_ready(count=ready_count)
        await asyncio.wait_for(bot.wait_until_ready(), 5)
        yield
    finally:
        await bot.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@pytest.fixture
async def standin(request: pytest.FixtureRequest) -> AsyncIterator[DiscordStandIn]:
    options = getattr(request, "param", {})
    server = DiscordStandIn(bot_token=TOKEN, **options)
    await server.start()
    saved = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    point_discord_py_at(server.api_base, server.gateway_url)
    try:
        yield server
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved
        await server.stop()
    assert not server.internal_errors


@pytest.fixture
async def bot(standin: DiscordStandIn) -> AsyncIterator[StandInBot]:
    client = StandInBot(standin.guild_id)
    async with running(client, standin):
        yield client


async def test_bot_connects_and_syncs_guild_commands(standin: DiscordStandIn, bot: StandInBot) -> None:
    names = {c["name"] for c in standin.synced_commands[DEFAULT_GUILD_ID]}
    assert names == {"ping", "say", "upload", "slow", "hold", "describe", "where"}
    assert all(
        int(c["id"]) > 0 and c["guild_id"] == str(DEFAULT_GUILD_ID)
        for c in standin.synced_commands[DEFAULT_GUILD_ID]
    )
    guild = bot.get_guild(DEFAULT_GUILD_ID)
    assert guild is not None and guild.me is not None
    assert isinstance(bot.get_channel(DEFAULT_CHANNEL_ID), discord.TextChannel)
    routes = [r.route for r in standin.requests]
    assert routes[:3] == ["users_me", "application", "sync_commands"]
    assert all(r.has_authorization and "Authorization" not in r.headers for r in standin.requests)
    assert TOKEN not in repr(standin.requests)
    [connection] = standin.gateway_connections
    # zlib-stream, or zstd-stream when the zstandard package is installed
    requested = discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE
    assert (connection.path, connection.op, connection.compress) == ("/gateway", "IDENTIFY", requested)
    [session] = standin.gateway_sessions
    assert session.dispatched[:2] == ["READY", "GUILD_CREATE"]


async def test_deferred_ping_edits_original_with_png_and_button(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    handle = await standin.send_slash_command("ping")
    callback = await handle.wait_for_callback()
    assert callback.type == 5
    original = await handle.wait_for_original()
    assert original.content == "pong" and not original.loading and not handle.is_ephemeral
    [attachment] = original.attachments
    assert (attachment.filename, attachment.content_type, attachment.data) == ("pong.png", "image/png", PNG)
    assert (attachment.width, attachment.height) == (12, 8)
    [edit] = standin.requests_for("edit_original")
    assert [(f.field, f.filename) for f in edit.files] == [("files[0]", "pong.png")]
    assert edit.json["attachments"] == [{"id": 0, "filename": "pong.png"}]
    button = original.find_component("ping:again")
    assert button is not None and button["label"] == "Again"
    async with aiohttp.ClientSession() as session, session.get(attachment.url) as response:
        assert await response.read() == PNG

    press = await standin.press_button(original, "ping:again")
    assert (await press.wait_for_callback()).type == 6
    [followup] = await press.wait_for_followups()
    assert bot.state.presses == [DEFAULT_USER_ID]
    assert followup.flags & 64 and followup.content == "only you can see this"
    assert standin.requests_for("followup")[0].json["flags"] == 64
    channel_url = f"{standin.api_base}/api/v10/channels/{DEFAULT_CHANNEL_ID}/messages/{followup.id}"
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bot {TOKEN}"}
        async with session.get(channel_url, headers=headers) as response:
            assert response.status == 404  # ephemeral messages are invisible to channel routes

    reroll = await standin.press_button(original, "ping:reroll")
    callback = await reroll.wait_for_callback()
    assert callback.type == 7 and [f.filename for f in callback.files] == ["reroll.png"]
    assert reroll.original is original and original.content == "rerolled"
    assert [a.filename for a in original.attachments] == ["reroll.png"] and len(original.edits) == 2


async def test_options_carry_types_from_the_synced_definition(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    handle = await standin.send_slash_command("say", {"text": "ab", "times": 3})
    assert handle.payload["data"]["options"] == [
        {"name": "text", "type": 3, "value": "ab"},
        {"name": "times", "type": 4, "value": 3},
    ]
    assert handle.payload["data"]["guild_id"] == str(DEFAULT_GUILD_ID)
    original = await handle.wait_for_original()
    assert original.content == "ababab" and handle.callback_type == 4
    with pytest.raises(LookupError):
        await standin.send_slash_command("nonexistent")
    with pytest.raises(LookupError):  # synced to the guild only, so not offered in DMs
        await standin.send_slash_command("say", {"text": "hi"}, channel_id=standin.dm_channel())


async def test_injected_429_on_edit_is_waited_out_and_retried(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    standin.inject("edit_original", status=429, retry_after=0.3)
    handle = await standin.send_slash_command("ping")
    await handle.wait_for_original()
    edits = standin.requests_for("edit_original")
    assert [e.status for e in edits] == [429, 200]
    assert edits[1].time - edits[0].time >= 0.29


async def test_expired_token_makes_the_edit_fail_with_50027(standin: DiscordStandIn, bot: StandInBot) -> None:
    handle = await standin.send_slash_command("hold")
    await handle.wait_for_callback()
    assert handle.is_ephemeral
    standin.expire_interaction_tokens()
    bot.state.release.set()
    await standin.wait_for(lambda: "hold" in bot.state.errors)
    error = bot.state.errors["hold"]
    assert isinstance(error, discord.HTTPException) and (error.status, error.code) == (401, 50027)


@pytest.mark.parametrize("standin", [{"interaction_callback_window": 0.3}], indirect=True)
async def test_callback_after_the_window_is_unknown_interaction(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    handle = await standin.send_slash_command("slow", {"seconds": 0.5})
    await standin.wait_for(lambda: "slow" in bot.state.errors)
    error = bot.state.errors["slow"]
    assert isinstance(error, discord.NotFound) and error.code == 10062
    assert not handle.acknowledged and handle.callbacks[0].status == 404


async def test_content_over_2000_is_invalid_form_body(standin: DiscordStandIn, bot: StandInBot) -> None:
    await standin.send_slash_command("say", {"text": "x" * 2001})
    await standin.wait_for(lambda: "say" in bot.state.errors)
    error = bot.state.errors["say"]
    assert isinstance(error, discord.HTTPException) and (error.status, error.code) == (400, 50035)
    assert "data.content" in error.text
    channel = bot.get_channel(DEFAULT_CHANNEL_ID)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as raised:
        await channel.send("y" * 2001)
    assert raised.value.code == 50035


@pytest.mark.parametrize("standin", [{"attachment_size_limit": 64 * 1024}], indirect=True)
async def test_oversize_file_is_413(standin: DiscordStandIn, bot: StandInBot) -> None:
    small = await standin.send_slash_command("upload", {"kilobytes": 8})
    assert len((await small.wait_for_original()).attachments[0].data) == 8 * 1024
    await standin.send_slash_command("upload", {"kilobytes": 65})
    await standin.wait_for(lambda: "upload" in bot.state.errors)
    error = bot.state.errors["upload"]
    assert isinstance(error, discord.HTTPException) and (error.status, error.code) == (413, 40005)


async def test_deleted_message_edits_get_unknown_message(standin: DiscordStandIn, bot: StandInBot) -> None:
    handle = await standin.send_slash_command("ping")
    original = await handle.wait_for_original()
    await standin.wait_for(lambda: bot.state.last_original is not None)
    assert bot.state.last_original is not None
    standin.delete_message(original.id)
    with pytest.raises(discord.NotFound) as raised:
        await bot.state.last_original.edit(content="too late")
    assert raised.value.code == 10008


async def test_modal_round_trip(standin: DiscordStandIn, bot: StandInBot) -> None:
    opened = await standin.send_slash_command("describe")
    assert (await opened.wait_for_callback()).type == 9
    submitted = await standin.submit_modal(opened, {"prompt": "a red fox"})
    reply = await submitted.wait_for_original()
    assert bot.state.modal_answers == ["a red fox"] and reply.content == "drawing a red fox"
    assert submitted.callbacks[0].files[0].data == PNG and reply.attachments[0].filename == "sketch.png"


async def test_dm_channel_and_channel_messages(standin: DiscordStandIn, bot: StandInBot) -> None:
    await (await standin.send_slash_command("say", {"text": "hi"})).wait_for_original()
    user = await bot.fetch_user(DEFAULT_USER_ID)
    sent = await user.send("your image", file=discord.File(io.BytesIO(PNG), filename="dm.png"))
    stored = standin.messages[sent.id]
    assert stored.guild_id is None and stored.attachments[0].data == PNG
    assert sent.attachments[0].content_type == "image/png"
    assert [r.route for r in standin.requests[-2:]] == ["create_dm", "channel_message"]
    await bot.tree.sync()  # global commands are offered in DMs too
    handle = await standin.send_slash_command("say", {"text": "in a DM"}, channel_id=standin.dm_channel())
    assert "guild_id" not in handle.payload and handle.payload["user"]["id"] == str(DEFAULT_USER_ID)
    reply = await handle.wait_for_original()
    assert reply.content == "in a DM" and reply.guild_id is None


async def test_gateway_resume_replays_events_sent_while_disconnected(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    await standin.drop_gateway_connections()
    handle = await standin.send_slash_command("say", {"text": "still here"})
    assert (await handle.wait_for_original()).content == "still here"
    resumed = [c for c in standin.gateway_connections if c.op == "RESUME"]
    assert resumed and resumed[0].path == "/gateway/resume" and resumed[0].replayed >= 1
    [session] = standin.gateway_sessions
    assert "RESUMED" in session.dispatched and standin.gateway.ready_count == 1


async def test_reconnect_request_resumes_and_invalid_session_reidentifies(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    await standin.request_reconnect()
    await standin.wait_for(lambda: any(c.op == "RESUME" for c in standin.gateway_connections))
    await standin.invalidate_sessions()
    await standin.wait_until_ready(count=2)
    assert [c.op for c in standin.gateway_connections] == ["IDENTIFY", "RESUME", "IDENTIFY"]
    handle = await standin.send_slash_command("say", {"text": "fresh session"})
    assert (await handle.wait_for_original()).content == "fresh session"


@pytest.mark.parametrize("standin", [{"gateway_resume_timeout": 0.2}], indirect=True)
async def test_restarted_bot_identifies_again(standin: DiscordStandIn) -> None:
    with pytest.raises(NoGatewayClientError):
        await standin.send_slash_command("say", {"text": "nobody yet"})
    first = StandInBot(standin.guild_id)
    async with running(first, standin):
        pass
    await standin.wait_for(lambda: not any(s.connected for s in standin.gateway_sessions))
    await asyncio.sleep(0.3)  # past the resume timeout: the old session has ended
    with pytest.raises(NoGatewayClientError):
        await standin.send_slash_command("say", {"text": "nobody any more"})
    second = StandInBot(standin.guild_id)
    async with running(second, standin, ready_count=2):
        handle = await standin.send_slash_command("say", {"text": "back"})
        assert (await handle.wait_for_original()).content == "back"


@pytest.mark.parametrize(
    ("standin", "options"),
    [({}, {"shard_count": 2}), ({"recommended_shards": 2}, {})],
    indirect=["standin"],
    ids=["explicit-count", "from-gateway-bot"],
)
async def test_two_shards_get_their_own_guilds_interactions(
    standin: DiscordStandIn, options: dict[str, Any]
) -> None:
    sharded = ShardedStandInBot(standin.guild_id, **options)
    async with running(sharded, standin, ready_count=2):
        handle = await standin.send_slash_command("say", {"text": "sharded"})
        assert (await handle.wait_for_original()).content == "sharded"
    owner = (DEFAULT_GUILD_ID >> 22) % 2
    by_shard = {s.shard: s for s in standin.gateway_sessions}
    assert set(by_shard) == {(0, 2), (1, 2)}
    assert "INTERACTION_CREATE" in by_shard[(owner, 2)].dispatched
    assert "INTERACTION_CREATE" not in by_shard[(1 - owner, 2)].dispatched
    assert "GUILD_CREATE" not in by_shard[(1 - owner, 2)].dispatched


async def test_raw_uncompressed_gateway_and_double_callback(standin: DiscordStandIn) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{standin.gateway_url}?v=10&encoding=json") as ws:
            assert (await ws.receive_json())["op"] == 10
            await ws.send_json({"op": 1, "d": None})
            assert (await ws.receive_json())["op"] == 11
            await ws.send_json({"op": 2, "d": {"token": TOKEN, "intents": 1, "properties": {}}})
            ready, guild = await ws.receive_json(), await ws.receive_json()
            assert (ready["t"], ready["s"], guild["t"], guild["s"]) == ("READY", 1, "GUILD_CREATE", 2)
            assert ready["d"]["resume_gateway_url"].endswith("/gateway/resume")
            handle = await standin.send_slash_command("anything", {"n": 2})
            event = await ws.receive_json()
            assert event["t"] == "INTERACTION_CREATE" and event["d"]["id"] == str(handle.id)
            assert event["d"]["data"]["options"] == [{"name": "n", "type": 4, "value": 2}]
            url = f"{standin.api_base}/api/v10/interactions/{handle.id}/{handle.token}/callback"
            body = {"type": 4, "data": {"content": "hi"}}
            async with http.post(url, json=body) as first:
                assert first.status == 204
            async with http.post(url, json=body, params={"with_response": "true"}) as second:
                assert second.status == 400 and (await second.json())["code"] == 40060
        async with http.ws_connect(standin.gateway_url) as ws:
            await ws.receive_json()
            await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 1, "properties": {}}})
            await ws.receive()
            assert ws.close_code == 4004
        async with http.get(f"{standin.api_base}/api/v10/users/@me") as response:
            assert response.status == 401


async def test_injected_server_error_and_error_codes(standin: DiscordStandIn) -> None:
    standin.inject("users_me", status=502)
    standin.inject("get_channel", status=404, code=10003, count=2)
    auth = {"Authorization": f"Bot {TOKEN}"}
    async with aiohttp.ClientSession(base_url=standin.api_base, headers=auth) as http:
        async with http.get("/api/v10/users/@me") as response:
            assert response.status == 502 and response.content_type == "text/plain"
        async with http.get("/api/v10/users/@me") as response:
            assert response.status == 200 and (await response.json())["bot"] is True
        for _ in range(2):
            async with http.get(f"/api/v10/channels/{DEFAULT_CHANNEL_ID}") as response:
                assert response.status == 404
                assert await response.json() == {"message": "Unknown Channel", "code": 10003}
        async with http.get(f"/api/v10/channels/{DEFAULT_CHANNEL_ID}") as response:
            assert (await response.json())["name"] == "general"
    with pytest.raises(ValueError, match="unknown route"):
        standin.inject("no_such_route", status=500)


@pytest.mark.parametrize(
    ("payload", "error_path"),
    [
        ({"embeds": [{"title": "t"}] * 11}, ["embeds"]),
        ({"embeds": [{"title": "t" * 257}]}, ["embeds", "0", "title"]),
        ({"embeds": [{"description": "d" * 4000}, {"description": "d" * 2500}]}, ["embeds"]),
        (
            {
                "content": "x",
                "components": [
                    {"type": 1, "components": [{"type": 2, "style": 1, "label": "b", "custom_id": str(i)}]}
                    for i in range(6)
                ],
            },
            ["components"],
        ),
        (
            {
                "content": "x",
                "components": [
                    {
                        "type": 1,
                        "components": [
                            {"type": 2, "style": 1, "label": "b", "custom_id": str(i)} for i in range(6)
                        ],
                    }
                ],
            },
            ["components", "0", "components"],
        ),
        (
            {
                "content": "x",
                "components": [
                    {"type": 1, "components": [{"type": 2, "style": 1, "label": "b", "custom_id": "c" * 101}]}
                ],
            },
            ["components", "0", "components", "0", "custom_id"],
        ),
        (
            {
                "content": "x",
                "components": [
                    {"type": 1, "components": [{"type": 2, "style": 1, "label": "l" * 81, "custom_id": "c"}]}
                ],
            },
            ["components", "0", "components", "0", "label"],
        ),
    ],
)
async def test_channel_message_limits(
    standin: DiscordStandIn, payload: dict[str, Any], error_path: list[str]
) -> None:
    url = f"{standin.api_base}/api/v10/channels/{DEFAULT_CHANNEL_ID}/messages"
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bot {TOKEN}"}) as http,
        http.post(url, json=payload) as response,
    ):
        body = await response.json()
    assert (response.status, body["code"], body["message"]) == (400, 50035, "Invalid Form Body")
    node = body["errors"]
    for part in error_path:
        node = node[part]
    assert node["_errors"]


async def _identify_raw(ws: aiohttp.ClientWebSocketResponse, intents: int) -> list[dict[str, Any]]:
    """IDENTIFYs an uncompressed raw session and returns the dispatches up to its last GUILD_CREATE."""
    assert (await ws.receive_json())["op"] == 10
    await ws.send_json({"op": 2, "d": {"token": TOKEN, "intents": intents, "properties": {}}})
    return await _events_until(ws, "GUILD_CREATE" if intents & 1 else "READY")


async def _events_until(ws: aiohttp.ClientWebSocketResponse, name: str) -> list[dict[str, Any]]:
    """Dispatches received up to and including the first `name` event."""
    events: list[dict[str, Any]] = []
    while True:
        frame = await asyncio.wait_for(ws.receive_json(), 5)
        if frame["op"] == 0:
            events.append(frame)
            if frame["t"] == name:
                return events


async def test_guild_create_and_channel_events_carry_nsfw_and_thread_parent(standin: DiscordStandIn) -> None:
    standin.add_channel(NSFW_CHANNEL_ID, name="after-dark", nsfw=True)
    standin.add_thread(THREAD_ID, NSFW_CHANNEL_ID, name="spicy")
    other_channel, other_thread = NSFW_CHANNEL_ID + 1, THREAD_ID + 1
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{standin.gateway_url}?v=10&encoding=json") as ws:
            guild = (await _identify_raw(ws, 1))[-1]["d"]
            channels = {c["id"]: c for c in guild["channels"]}
            assert set(channels) == {str(DEFAULT_CHANNEL_ID), str(NSFW_CHANNEL_ID)}  # threads are apart
            assert (channels[str(NSFW_CHANNEL_ID)]["nsfw"], channels[str(DEFAULT_CHANNEL_ID)]["nsfw"]) == (
                True,
                False,
            )
            [thread] = guild["threads"]
            assert (thread["id"], thread["type"], thread["parent_id"]) == (
                str(THREAD_ID),
                11,
                str(NSFW_CHANNEL_ID),
            )
            assert thread["owner_id"] == str(DEFAULT_USER_ID) and "nsfw" not in thread
            assert thread["thread_metadata"]["archived"] is False and thread["message_count"] == 0

            standin.add_channel(other_channel, name="sfw")
            [created] = await _events_until(ws, "CHANNEL_CREATE")
            assert created["d"]["guild_id"] == str(DEFAULT_GUILD_ID) and created["d"]["nsfw"] is False
            standin.add_thread(other_thread, other_channel)
            [thread_created] = await _events_until(ws, "THREAD_CREATE")
            assert thread_created["d"]["parent_id"] == str(other_channel)
            assert thread_created["d"]["newly_created"] is True
            standin.set_channel_nsfw(other_channel, True)
            [updated] = await _events_until(ws, "CHANNEL_UPDATE")
            assert (updated["d"]["id"], updated["d"]["nsfw"]) == (str(other_channel), True)
        with pytest.raises(LookupError):
            standin.add_thread(THREAD_ID + 2, THREAD_ID)  # a thread cannot hold a thread
        with pytest.raises(LookupError):
            standin.set_channel_nsfw(THREAD_ID, True)  # threads follow their parent
        auth = {"Authorization": f"Bot {TOKEN}"}
        async with http.get(f"{standin.api_base}/api/v10/channels/{THREAD_ID}", headers=auth) as response:
            assert (await response.json())["parent_id"] == str(NSFW_CHANNEL_ID)
        async with http.get(
            f"{standin.api_base}/api/v10/channels/{NSFW_CHANNEL_ID}", headers=auth
        ) as response:
            assert (await response.json())["nsfw"] is True
        url = f"{standin.api_base}/api/v10/guilds/{DEFAULT_GUILD_ID}/channels"
        async with http.get(url, headers=auth) as response:
            listed = {c["id"]: c["nsfw"] for c in await response.json()}
        assert listed == {
            str(DEFAULT_CHANNEL_ID): False,
            str(NSFW_CHANNEL_ID): True,
            str(other_channel): True,
        }


async def test_commands_in_an_age_restricted_channel_and_its_thread(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    standin.add_channel(NSFW_CHANNEL_ID, name="after-dark", nsfw=True)
    standin.add_thread(THREAD_ID, NSFW_CHANNEL_ID, name="spicy")
    guild = bot.get_guild(DEFAULT_GUILD_ID)
    assert guild is not None
    await standin.wait_for(lambda: guild.get_thread(THREAD_ID) is not None)

    in_channel = await standin.send_slash_command("where", channel_id=NSFW_CHANNEL_ID)
    assert (await in_channel.wait_for_original()).content == "nsfw=True"
    in_thread = await standin.send_slash_command("where", channel_id=THREAD_ID)
    reply = await in_thread.wait_for_original()
    assert (reply.content, reply.channel_id) == ("nsfw=True", THREAD_ID)
    assert in_channel.payload["channel"]["nsfw"] is True
    assert in_thread.payload["channel"]["parent_id"] == str(NSFW_CHANNEL_ID)
    channel, thread = bot.state.channels
    assert isinstance(channel, discord.TextChannel) and channel.id == NSFW_CHANNEL_ID and channel.is_nsfw()
    assert isinstance(thread, discord.Thread) and thread.parent_id == NSFW_CHANNEL_ID and thread.is_nsfw()

    pinged = await standin.send_slash_command("ping", channel_id=THREAD_ID)
    press = await standin.press_button(await pinged.wait_for_original(), "ping:again")
    [followup] = await press.wait_for_followups()
    assert press.payload["channel"]["id"] == str(THREAD_ID) and followup.channel_id == THREAD_ID
    sent = await thread.send("hello")
    await sent.edit(content="edited")
    stored = standin.messages[sent.id]
    assert (stored.channel_id, stored.content, len(stored.edits)) == (THREAD_ID, "edited", 1)

    standin.set_channel_nsfw(NSFW_CHANNEL_ID, False)
    await standin.wait_for(lambda: not channel.is_nsfw())
    assert not thread.is_nsfw()  # asks the parent, which CHANNEL_UPDATE changed
    again = await standin.send_slash_command("where", channel_id=THREAD_ID)
    assert (await again.wait_for_original()).content == "nsfw=False"


async def test_bot_permissions_reach_its_role_and_interactions(
    standin: DiscordStandIn, bot: StandInBot
) -> None:
    standin.add_guild(OTHER_GUILD_ID, OTHER_GUILD_ID + 100)
    await standin.wait_for(lambda: bot.get_guild(OTHER_GUILD_ID) is not None)
    guild, other = bot.get_guild(DEFAULT_GUILD_ID), bot.get_guild(OTHER_GUILD_ID)
    assert guild is not None and other is not None
    assert guild.me.guild_permissions.value == BOT_ROLE_PERMISSIONS
    member_permissions = DEFAULT_MEMBER_PERMISSIONS | (1 << 13)
    handle = await standin.send_slash_command(
        "where", {"channel": DEFAULT_CHANNEL_ID}, permissions=member_permissions
    )
    await handle.wait_for_original()
    assert handle.payload["app_permissions"] == str(BOT_ROLE_PERMISSIONS)
    # Resolved channels carry the invoking member's permissions, not the bot's.
    resolved = handle.payload["data"]["resolved"]["channels"][str(DEFAULT_CHANNEL_ID)]
    assert resolved["permissions"] == str(member_permissions)

    standin.set_bot_permissions(BOT_ROLE_PERMISSIONS | MANAGE_GUILD)
    await standin.wait_for(lambda: guild.me.guild_permissions.manage_guild)
    assert not other.me.guild_permissions.manage_guild
    assert standin.bot_permissions(OTHER_GUILD_ID) == BOT_ROLE_PERMISSIONS
    handle = await standin.send_slash_command("where")
    await handle.wait_for_original()
    assert int(handle.payload["app_permissions"]) == BOT_ROLE_PERMISSIONS | MANAGE_GUILD
    assert bot.state.app_permissions[-1].manage_guild

    standin.set_bot_permissions(0)  # the role grants nothing; @everyone's permissions remain
    await standin.wait_for(lambda: guild.me.guild_permissions.value == DEFAULT_MEMBER_PERMISSIONS)
    handle = await standin.send_slash_command("where")
    await handle.wait_for_original()
    assert handle.payload["app_permissions"] == str(DEFAULT_MEMBER_PERMISSIONS)

    standin.set_bot_permissions(1 << 3)  # Administrator
    await standin.wait_for(lambda: guild.me.guild_permissions.administrator)
    handle = await standin.send_slash_command("where")
    await handle.wait_for_original()
    assert handle.payload["app_permissions"] == str(ALL_PERMISSIONS)
    assert bot.state.app_permissions[-1].manage_guild
    [session] = standin.gateway_sessions
    assert session.dispatched.count("GUILD_ROLE_UPDATE") == 3


async def test_automod_routes_need_manage_server(standin: DiscordStandIn, bot: StandInBot) -> None:
    rule = standin.put_automod_rule(
        {"name": "No cats", "trigger_metadata": {"keyword_filter": ["cat*"]}, "exempt_roles": [123]}
    )
    rules_url = f"/api/v10/guilds/{DEFAULT_GUILD_ID}/auto-moderation/rules"
    guild = bot.get_guild(DEFAULT_GUILD_ID)
    assert guild is not None
    auth = {"Authorization": f"Bot {TOKEN}"}
    async with aiohttp.ClientSession(base_url=standin.api_base, headers=auth) as http:
        for url in (rules_url, f"{rules_url}/{rule['id']}"):
            async with http.get(url) as response:
                assert response.status == 403
                assert await response.json() == {"message": "Missing Permissions", "code": 50013}
        with pytest.raises(discord.Forbidden):
            await guild.fetch_automod_rules()

        standin.set_bot_permissions(BOT_ROLE_PERMISSIONS | MANAGE_GUILD)
        async with http.get(rules_url) as response:
            assert (response.status, await response.json()) == (200, [rule])
        async with http.get(f"{rules_url}/{rule['id']}") as response:
            assert (response.status, await response.json()) == (200, rule)
        async with http.get(f"{rules_url}/{int(rule['id']) + 1}") as response:
            assert response.status == 404
            assert await response.json() == {"message": "Unknown auto moderation rule", "code": 10066}
        other_rules = f"/api/v10/guilds/{OTHER_GUILD_ID}/auto-moderation/rules"
        for url in (other_rules, f"{other_rules}/{rule['id']}"):
            async with http.get(url) as response:
                assert response.status == 404 and (await response.json())["code"] == 10004

    [fetched] = await guild.fetch_automod_rules()
    assert (fetched.id, fetched.name, fetched.creator_id) == (int(rule["id"]), "No cats", guild.owner_id)
    assert fetched.trigger.type is discord.AutoModRuleTriggerType.keyword
    assert fetched.trigger.keyword_filter == ["cat*"] and fetched.exempt_role_ids == {123}
    assert [a.type for a in fetched.actions] == [discord.AutoModRuleActionType.block_message]
    single = await guild.fetch_automod_rule(int(rule["id"]))
    assert single.enabled and single.event_type is discord.AutoModRuleEventType.message_send
    assert [r.status for r in standin.requests_for("automod_rules")] == [403, 403, 200, 404, 200]
    assert [r.status for r in standin.requests_for("automod_rule")] == [403, 200, 404, 404, 200]


async def test_automod_rule_events_need_the_intent_and_manage_server(standin: DiscordStandIn) -> None:
    intents = discord.Intents(guilds=True, auto_moderation_configuration=True)
    bot = StandInBot(standin.guild_id, intents=intents)
    async with (
        running(bot, standin),
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{standin.gateway_url}?v=10&encoding=json") as ws,
    ):
        await _identify_raw(ws, 1)  # GUILDS only
        unseen = standin.put_automod_rule({"name": "before Manage Server"})
        standin.set_bot_permissions(BOT_ROLE_PERMISSIONS | MANAGE_GUILD)
        created = standin.put_automod_rule(
            {"name": "No cats", "trigger_metadata": {"keyword_filter": ["cat"]}}
        )
        updated = standin.put_automod_rule({"id": created["id"], "enabled": False})
        standin.delete_automod_rule(int(created["id"]))
        await standin.wait_for(lambda: len(bot.state.automod) == 3)
        heard = [(kind, rule.id, rule.name, rule.enabled) for kind, rule in bot.state.automod]
        rule_id = int(created["id"])
        assert heard == [
            ("create", rule_id, "No cats", True),
            ("update", rule_id, "No cats", False),
            ("delete", rule_id, "No cats", False),
        ]
        assert bot.state.automod[0][1].trigger.keyword_filter == ["cat"]
        standin.add_role(4242, "sentinel")
        events = await _events_until(ws, "GUILD_ROLE_CREATE")
        assert "GUILD_ROLE_UPDATE" in [e["t"] for e in events]
        assert not [e["t"] for e in events if e["t"].startswith("AUTO_MODERATION")]
    [with_intent] = [s for s in standin.gateway_sessions if s.intents & AUTOMOD_CONFIGURATION]
    frames = [m for _, m in with_intent.history if m["t"].startswith("AUTO_MODERATION")]
    assert [(m["t"], m["d"]) for m in frames] == [
        ("AUTO_MODERATION_RULE_CREATE", created),
        ("AUTO_MODERATION_RULE_UPDATE", updated),
        ("AUTO_MODERATION_RULE_DELETE", updated),
    ]
    assert unseen["id"] not in {m["d"]["id"] for m in frames}


async def test_automod_rule_defaults_and_updates(standin: DiscordStandIn) -> None:
    rule = standin.put_automod_rule({})
    assert int(rule["id"]) > 0
    assert rule == {
        "id": rule["id"],
        "guild_id": str(DEFAULT_GUILD_ID),
        "name": "Block Custom Words",
        "creator_id": str(standin.world.owner_id),
        "event_type": 1,
        "trigger_type": 1,
        "trigger_metadata": {"keyword_filter": [], "regex_patterns": [], "allow_list": []},
        "actions": [{"type": 1, "metadata": {}}],
        "enabled": True,
        "exempt_roles": [],
        "exempt_channels": [],
    }
    rule["trigger_metadata"]["keyword_filter"].append("mutated")  # the caller's copy only
    updated = standin.put_automod_rule(
        {
            "id": int(rule["id"]),
            "exempt_channels": [DEFAULT_CHANNEL_ID],
            "actions": [{"type": 2, "metadata": {"channel_id": DEFAULT_CHANNEL_ID}}],
        }
    )
    assert updated["id"] == rule["id"] and updated["trigger_metadata"]["keyword_filter"] == []
    assert updated["exempt_channels"] == [str(DEFAULT_CHANNEL_ID)]
    assert updated["actions"] == [{"type": 2, "metadata": {"channel_id": str(DEFAULT_CHANNEL_ID)}}]
    with pytest.raises(ValueError, match="cannot be changed"):
        standin.put_automod_rule({"id": rule["id"], "trigger_type": 3})
    chosen = standin.put_automod_rule({"id": 77, "trigger_type": 3})  # an unknown id creates
    assert (chosen["id"], chosen["trigger_metadata"], chosen["name"]) == (
        "77",
        {},
        "Block Suspected Spam Content",
    )
    with pytest.raises(ValueError, match="at most 1"):
        standin.put_automod_rule({"trigger_type": 3})
    assert [r["id"] for r in standin.automod_rules()] == [rule["id"], "77"]
    standin.delete_automod_rule(77)
    with pytest.raises(LookupError):
        standin.delete_automod_rule(77)
    assert [r["id"] for r in standin.automod_rules()] == [rule["id"]]


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [
        ({"trigger_metadata": {"keyword_filter": ["w"] * 1001}}, "keyword_filter"),
        ({"trigger_metadata": {"keyword_filter": ["w" * 61]}}, "keyword_filter"),
        ({"trigger_metadata": {"regex_patterns": ["a+"] * 11}}, "regex_patterns"),
        ({"trigger_metadata": {"regex_patterns": ["a" * 261]}}, "regex_patterns"),
        ({"trigger_metadata": {"allow_list": ["ok"] * 101}}, "allow_list"),
        ({"exempt_roles": list(range(1, 22))}, "exempt_roles"),
        ({"exempt_channels": list(range(1, 52))}, "exempt_channels"),
        ({"trigger_type": 2}, "trigger_type"),
        ({"trigger_type": 99}, "trigger_type"),
        ({"trigger_type": 4, "trigger_metadata": {"presets": [9]}}, "presets"),
        ({"trigger_type": 5}, "mention_total_limit"),
        ({"actions": [{"type": 3, "metadata": {"duration_seconds": 0}}]}, "duration_seconds"),
        ({"actions": [{"type": 2, "metadata": {}}]}, "channel_id"),
        ({"trigger_type": 3, "actions": [{"type": 3, "metadata": {"duration_seconds": 60}}]}, "not allowed"),
    ],
)
async def test_automod_rules_discord_would_refuse(
    standin: DiscordStandIn, rule: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        standin.put_automod_rule(rule)
    assert standin.automod_rules() == []


async def test_automod_limits_are_inclusive(standin: DiscordStandIn) -> None:
    rule = standin.put_automod_rule(
        {
            "trigger_metadata": {
                "keyword_filter": [f"w{i}" for i in range(1000)],
                "regex_patterns": ["a" * 260] * 10,
                "allow_list": ["k" * 60] * 100,
            },
            "exempt_roles": list(range(1, 21)),
            "exempt_channels": list(range(1, 51)),
        }
    )
    assert len(rule["trigger_metadata"]["keyword_filter"]) == 1000 and len(rule["exempt_channels"]) == 50
    for _ in range(5):  # six keyword rules in all
        standin.put_automod_rule({})
    with pytest.raises(ValueError, match="at most 6"):
        standin.put_automod_rule({})
