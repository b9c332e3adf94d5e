"""The Segmind stand-in from the command line, for a bot (or curl) started by hand.

    python -m devtools.fakes.segmind [--host HOST] [--port PORT] [--api-key KEY] [options]

Prints the base URL to set as SEGMIND_BASE_URL, then serves until SIGINT or SIGTERM. Another process can
inject faults and change settings through `/_control/...` (see `devtools.fakes.segmind.server`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

from devtools.fakes.segmind.server import SegmindServer
from devtools.fakes.segmind.settings import (
    DEFAULT_MODEL,
    EARLY_RESULTS,
    QUEUE_DISTRIBUTIONS,
    SegmindServerSettings,
)

DEFAULT_PORT = 8700


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fakes.segmind",
        description="Serve Segmind's Dreamshaper SDXL API locally, with real JPEG outputs.",
    )
    defaults = SegmindServerSettings()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (default: %(default)s)"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="the model slug; others answer 404 (default: %(default)s)"
    )
    parser.add_argument(
        "--queue-seconds",
        type=float,
        default=defaults.queue_seconds,
        help="minimum time a job stays QUEUED, or its mean with --queue-distribution exponential "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--early-result",
        choices=EARLY_RESULTS,
        default=defaults.early_result,
        help="how the result URL answers before the job has ended: state (like the status URL) or "
        "not_found (404) (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-distribution",
        choices=QUEUE_DISTRIBUTIONS,
        default=defaults.queue_distribution,
        help="fixed: every job waits --queue-seconds; exponential: each job's wait is drawn with that "
        "mean; either way a job then waits for a free worker (default: %(default)s)",
    )
    parser.add_argument(
        "--seconds-per-step",
        type=float,
        default=defaults.seconds_per_step,
        help="generation time per step for one 1024x1024 sample (default: %(default)s)",
    )
    parser.add_argument(
        "--inference-jitter",
        type=float,
        default=defaults.inference_jitter,
        metavar="J",
        help="multiply each job's generation time by uniform(1-J, 1+J), 0 <= J < 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--inference-range",
        type=float,
        nargs=2,
        default=defaults.inference_range,
        metavar=("LOW", "HIGH"),
        help="generation takes uniform(LOW, HIGH) seconds whatever the parameters; overrides "
        "--seconds-per-step and --inference-jitter (default: off, time follows steps, size and samples)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the server's random draws (queue and generation times, seeds for -1), for a "
        "reproducible run (default: a random seed)",
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="jobs run at once (default: %(default)s)"
    )
    parser.add_argument(
        "--retention",
        type=float,
        default=defaults.retention_seconds,
        help="seconds a finished job can still be polled (default: %(default)s)",
    )
    parser.add_argument(
        "--block-word",
        action="append",
        default=[],
        help="prompts with this whole word end FAILED; repeatable (default: none)",
    )
    parser.add_argument(
        "--requests-per-minute",
        type=int,
        default=None,
        help="per key; more answer 429 (default: no limit)",
    )
    parser.add_argument(
        "--api-key", action="append", default=[], help="a key to accept; repeatable (default: accept any key)"
    )
    parser.add_argument(
        "--public-base-url",
        default=None,
        help="base of the absolute URLs in answers (default: the request's own host)",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="how much the stand-in logs (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def settings_from_args(args: argparse.Namespace) -> SegmindServerSettings:
    """The settings the arguments ask for (ValueError, naming the setting, for a bad timing value)."""
    return SegmindServerSettings(
        api_keys=frozenset(args.api_key) if args.api_key else None,
        model=args.model,
        queue_seconds=args.queue_seconds,
        seconds_per_step=args.seconds_per_step,
        workers=args.workers,
        retention_seconds=args.retention,
        blocked_words=frozenset(args.block_word),
        requests_per_minute=args.requests_per_minute,
        public_base_url=args.public_base_url,
        queue_distribution=args.queue_distribution,
        early_result=args.early_result,
        inference_jitter=args.inference_jitter,
        inference_range=None if args.inference_range is None else tuple(args.inference_range),
        seed=args.seed,
    )


async def serve(settings: SegmindServerSettings, host: str, port: int) -> None:
    """Run until SIGINT or SIGTERM."""
    server = SegmindServer(settings)
    await server.start(host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    # Printed (not only logged) so that a parent process can wait for this line.
    print(f"Segmind-compatible server listening on {server.base_url}", flush=True)
    print(f"SEGMIND_BASE_URL={server.base_url}", flush=True)
    try:
        await stopping.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(settings_from_args(args), args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
