"""The command lines under devtools/: each explains itself with its defaults, the Discord stand-in serves
from one, and none needs more than requirements.txt.

The Segmind stand-in's own command line is tested with the rest of it, in tests/test_segmind_server.py.
"""

from __future__ import annotations

import ast
import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNABLES = [
    "devtools.demo",
    "devtools.bench",
    "devtools.fault_suite",
    "devtools.fakes.segmind",
    "devtools.fakes.discord",
]
# What requirements-dev.txt adds; devtools/ must run without it.
DEV_ONLY = {"pytest", "_pytest", "hypothesis", "xdist", "pytest_asyncio", "pytest_timeout", "tests"}


@pytest.mark.parametrize("module", RUNNABLES)
def test_help_names_every_option_with_its_default(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}"), done.stdout
    options = done.stdout.split("options:", 1)[1]
    # One entry per option: its flags at the start of a line, then its help, perhaps over several lines.
    entries = re.split(r"\n  (?=-)", options)[1:]
    assert entries, done.stdout
    for entry in entries:
        if entry.startswith("-h, --help"):
            continue
        assert "default" in " ".join(entry.split()), f"{module}: no default in\n{entry}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_the_discord_stand_in_serves_rest_and_the_gateway_from_the_command_line() -> None:
    port = free_port()
    token = "cli.stand-in.token"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.fakes.discord",
        "--port",
        str(port),
        "--bot-token",
        token,
        "--log-level",
        "WARNING",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readline(), timeout=15)
        assert first.decode().strip().endswith(f"http://127.0.0.1:{port}")
        env: dict[str, str] = {}
        while "DISCORD_GUILD_IDS" not in env:
            name, _, value = (
                (await asyncio.wait_for(process.stdout.readline(), 5)).decode().strip().partition("=")
            )
            env[name] = value
        assert env["DISCORD_API_BASE"] == f"http://127.0.0.1:{port}"
        assert env["DISCORD_GATEWAY_URL"] == f"ws://127.0.0.1:{port}/gateway"
        assert env["DISCORD_TOKEN"] == token

        api = f"{env['DISCORD_API_BASE']}/api/v10"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{api}/users/@me", headers={"Authorization": f"Bot {token}"}) as reply:
                assert reply.status == 200
            async with http.get(f"{api}/users/@me", headers={"Authorization": "Bot wrong"}) as reply:
                assert reply.status == 401
            async with http.ws_connect(f"{env['DISCORD_GATEWAY_URL']}?v=10&encoding=json") as gateway:
                hello = await gateway.receive_json(timeout=5)
                assert hello["op"] == 10
                await gateway.send_json({"op": 2, "d": {"token": token, "intents": 1, "properties": {}}})
                ready = await gateway.receive_json(timeout=5)
                assert (ready["op"], ready["t"]) == (0, "READY")
                guilds = [guild["id"] for guild in ready["d"]["guilds"]]
                assert guilds == [env["DISCORD_GUILD_IDS"]]
    finally:
        process.terminate()
        return_code = await asyncio.wait_for(process.wait(), timeout=10)
    assert return_code == 0


def test_devtools_imports_nothing_from_the_dev_requirements_or_the_tests() -> None:
    found = []
    for path in sorted((REPO_ROOT / "devtools").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(REPO_ROOT)}: {name}" for name in names if name.split(".")[0] in DEV_ONLY
            ]
    assert found == []
