"""The Discord stand-in from the command line: REST API and gateway on one port, for a bot started by hand.

    python -m devtools.fakes.discord [--host HOST] [--port PORT] [--bot-token TOKEN]

Prints the variables that point the bot at it (DISCORD_API_BASE, DISCORD_GATEWAY_URL, and the
DISCORD_TOKEN and DISCORD_GUILD_IDS it accepts), then serves until SIGINT or SIGTERM. With the Segmind
stand-in (`python -m devtools.fakes.segmind`) the bot starts and logs in offline; its guild has one
text channel.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

from devtools.fakes.discord.server import DEFAULT_CHANNEL_ID, DEFAULT_GUILD_ID, DiscordStandIn

DEFAULT_PORT = 8701
DEFAULT_TOKEN = "stand-in-token"

log = logging.getLogger("devtools.fakes.discord")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fakes.discord",
        description="Serve Discord's REST API v10 and gateway locally, for the bot to log in to.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (default: %(default)s)"
    )
    parser.add_argument(
        "--bot-token", default=DEFAULT_TOKEN, help="the only bot token accepted (default: %(default)s)"
    )
    parser.add_argument(
        "--guild-id", type=int, default=DEFAULT_GUILD_ID, help="the bot's guild (default: %(default)s)"
    )
    parser.add_argument(
        "--channel-id",
        type=int,
        default=DEFAULT_CHANNEL_ID,
        help="the guild's text channel (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="how much the stand-in logs (default: %(default)s)"
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGINT or SIGTERM."""
    stand_in = DiscordStandIn(bot_token=args.bot_token, guild_id=args.guild_id, channel_id=args.channel_id)
    await stand_in.start(args.host, args.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    # Printed (not only logged) so that a parent process can wait for these lines.
    print(f"Discord stand-in listening on {stand_in.api_base}", flush=True)
    for name, value in (
        ("DISCORD_API_BASE", stand_in.api_base),
        ("DISCORD_GATEWAY_URL", stand_in.gateway_url),
        ("DISCORD_TOKEN", args.bot_token),
        ("DISCORD_GUILD_IDS", str(stand_in.guild_id)),
    ):
        print(f"{name}={value}", flush=True)
    log.info("REST at %s/api/v10, gateway at %s", stand_in.api_base, stand_in.gateway_url)
    try:
        await stopping.wait()
    finally:
        await stand_in.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
