"""The offline demo: the real bot answers one /imagine through local Discord and Segmind stand-ins.

    .venv/bin/python -m devtools.demo [--prompt TEXT] [--samples N] [--aspect W:H] [--seed N]
                                      [--timeout SECONDS] [--out DIR]

Needs no Discord token, no Segmind key and no internet: both services are stand-ins on loopback ports,
and the bot (`DreamshaperBot` from bot.py, unmodified) runs in this process, on the same event loop, as
in the end-to-end tests (`devtools.stack` builds both). A member sends /imagine, waits for the images, then clicks the Info button.
The images (the bytes Discord received) and a transcript of every message the bot created or edited
are written to the output folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import discord

from cogs.buttons import InfoButton
from cogs.imagine import ASPECTS
from devtools.demo.admin import AdminDemoError, run_admin_demo
from devtools.demo.transcript import (
    CALLBACK_NAMES,
    MessageEvent,
    TranscriptRecorder,
    as_shown,
    build_transcript,
    button_labels,
    names_of,
    render_markdown,
    stop_watching,
)
from devtools.fakes.discord.models import (
    CALLBACK_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_CHANNEL_MESSAGE,
    InteractionHandle,
    StoredAttachment,
    StoredMessage,
    iter_components,
)
from devtools.fakes.discord.server import DiscordStandIn
from devtools.stack import (
    PROGRESS_MARKS,
    BotStack,
    BotStopped,
    Credentials,
    running_bot,
    stand_ins,
    started_a_job,
)

log = logging.getLogger("devtools.demo")

DEFAULT_PROMPT = "a lighthouse on a cliff at golden hour, gentle waves, soft clouds, watercolor"
DEFAULT_OUT = Path("demo-output")
DEFAULT_TIMEOUT = 60.0

CREDENTIALS = Credentials(bot_token="demo.bot-token.offline", segmind_key="sg_demo_offline_key")
BOT_NAME = "Dreamshaper"
GUILD_NAME = "Demo Guild"
USERNAME = "demo-user"

# Short but realistic: a second in Segmind's queue, then about 3 s of generation per 7:9 image at 30 steps.
# Shorter would finish before the bot's first check of a running job (its priors expect a slower GPU), and
# the member would never see the "Generating" line.
QUEUE_SECONDS = 1.0
SECONDS_PER_STEP = 0.1

STARTUP_TIMEOUT = 20.0
INFO_TIMEOUT = 10.0
DATABASE_NAME = "bot.sqlite3"
TRANSCRIPT_MD = "transcript.md"
TRANSCRIPT_JSON = "transcript.json"


class DemoError(Exception):
    """A failure the demo reports in one line, without a traceback."""


# ---- command line --------------------------------------------------------------------------------


def _prompt(raw: str) -> str:
    if not raw.strip():
        raise argparse.ArgumentTypeError("the prompt must not be empty")
    return raw


def _seed(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < -1:
        raise argparse.ArgumentTypeError("the seed must be -1 (random) or a number from 0")
    return value


def _timeout(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("the timeout must be a positive number of seconds")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description=(
            "Watch the bot work offline: starts local stand-ins for Discord and Segmind on free loopback "
            "ports, runs the real bot against them, sends one /imagine as a member, waits for the images, "
            "clicks the Info button, and writes the images and a transcript of every message the bot "
            "created or edited. No Discord token, Segmind key or internet is needed."
        ),
    )
    parser.add_argument(
        "--prompt", type=_prompt, default=DEFAULT_PROMPT, help="what to draw (default: %(default)r)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        choices=range(1, 5),
        default=2,
        metavar="{1-4}",
        help="images (default: %(default)s)",
    )
    parser.add_argument(
        "--aspect", choices=list(ASPECTS), default="7:9", help="size preset (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=_seed, default=None, help="reuse a seed to reproduce an image (default: random)"
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the result after sending /imagine (default: %(default)g)",
    )
    parser.add_argument(
        "--admin",
        action="store_true",
        help=(
            "then show the server's side: an admin sets a mod log and a blocklist, a member's blocked prompt "
            "is refused, and a moderator bans them from the mod-log entry (default: the member's side only)"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=(
            "folder for the images, transcript.md, transcript.json and the bot's SQLite store "
            "(default: %(default)s/); files of a previous demo there are replaced"
        ),
    )
    return parser.parse_args(argv)


# ---- what one run found --------------------------------------------------------------------------


@dataclass
class SavedImage:
    file: str
    size: int
    width: int | None
    height: int | None
    content_type: str


@dataclass
class DemoRun:
    out: Path
    options: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    command: InteractionHandle | None = None
    info: InteractionHandle | None = None
    result: StoredMessage | None = None
    result_attachments: list[StoredAttachment] = field(default_factory=list)
    images: list[SavedImage] = field(default_factory=list)
    summary: dict[str, str] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    progress_texts: list[str] = field(default_factory=list)
    seed: str | None = None
    admin_summary: dict[str, str] = field(default_factory=dict)  # with --admin
    names: dict[str, dict[str, str]] = field(default_factory=dict)  # the stand-in's ids, by name

    @property
    def origin(self) -> float:
        return self.command.created_at if self.command is not None else self.started


# ---- the run -------------------------------------------------------------------------------------


async def wait_until(stack: BotStack, predicate: Callable[[], bool], timeout: float) -> bool:
    """True once `predicate` holds, False on timeout; a bot that stopped meanwhile is a DemoError."""
    try:
        await stack.wait_for(predicate, timeout)
    except TimeoutError:
        return False
    except BotStopped as error:
        raise DemoError(one_line(str(error))) from None
    return True


def answer_state(handle: InteractionHandle) -> str | None:
    """How /imagine ended ("result" or "failure"), or None while the bot is still working on it."""
    callback, message = handle.callback, handle.original
    if callback is None or message is None:
        return None
    if message.deleted:
        return "failure"
    if message.attachments:
        return "result"
    if message.loading or (_is_progress_line(message.content) and not message.ephemeral):
        return None
    # Anything else is final: a refusal (over quota, invalid option, out of credits) or a failure.
    return "failure" if message.content or callback.type == CALLBACK_CHANNEL_MESSAGE else None


def _is_progress_line(content: str | None) -> bool:
    return bool(content) and str(content).split(" ", 1)[0] in PROGRESS_MARKS


def one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def shown_text(message: StoredMessage | None) -> str:
    if message is None:
        return "no answer at all"
    if message.loading:
        return '"is thinking…"'
    if message.content:
        return repr(one_line(message.content, 120))
    if message.embeds:
        return repr(
            one_line(str(message.embeds[0].get("description") or message.embeds[0].get("title")), 120)
        )
    return "an empty message"


async def send_imagine(
    run: DemoRun, stack: BotStack, recorder: TranscriptRecorder, timeout: float
) -> StoredMessage:
    command_line = "/imagine " + " ".join(f"{name}:{value}" for name, value in run.options.items())
    try:
        handle = await stack.discord.send_slash_command("imagine", run.options, username=USERNAME)
    except (LookupError, ValueError) as error:
        # The stand-in refuses what the Discord client would refuse to send (e.g. a value out of range).
        raise DemoError(f"Discord would not send this /imagine: {error}") from None
    run.command = handle
    recorder.track(
        "/imagine", handle, action=f"used `{command_line}`", username=USERNAME, options=run.options
    )
    log.info("demo: %s sent %s", USERNAME, command_line)
    if not await wait_until(stack, lambda: answer_state(handle) is not None, timeout):
        raise DemoError(
            f"no result within {timeout:g} s of sending /imagine (the bot showed {shown_text(handle.original)})"
        )
    message = handle.original
    assert message is not None
    if answer_state(handle) == "failure":
        raise DemoError(f"the bot answered /imagine without images: {shown_text(message)}")
    run.result = message
    # Kept now: a later edit of the message must not change which images the demo saves.
    run.result_attachments = list(message.attachments)
    return message


async def press_info(
    run: DemoRun, stack: BotStack, recorder: TranscriptRecorder, message: StoredMessage
) -> None:
    button = next(
        (
            component
            for component in iter_components(message.components)
            if str(component.get("custom_id", "")).startswith(InfoButton.custom_id_for(""))
        ),
        None,
    )
    if button is None:
        raise DemoError(
            "the result has no Info button (no component whose custom_id starts with "
            f"{InfoButton.custom_id_for('')})"
        )
    handle = await stack.discord.press_button(message, button["custom_id"], username=USERNAME)
    run.info = handle
    label = (button_labels([button]) or ["Info"])[0]
    recorder.track(
        f"{button.get('label') or 'Info'} button",
        handle,
        action=f"clicked `[{label}]` on the result",
        username=USERNAME,
    )
    log.info("demo: %s clicked %s", USERNAME, label)

    def answered() -> bool:
        callback = handle.callback
        if callback is None:
            return False
        return callback.type != CALLBACK_CHANNEL_MESSAGE or handle.original is not None

    if not await wait_until(stack, answered, INFO_TIMEOUT):
        raise DemoError(f"the Info button got no answer within {INFO_TIMEOUT:g} s")


def seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def summarize(run: DemoRun, recorder: TranscriptRecorder) -> None:
    handle = run.command
    if handle is None:
        return
    origin = run.origin
    if handle.callback is not None:
        first = handle.callback.time - origin
        run.timings["first_answer_s"] = round(first, 3)
        run.timings["first_answer_type"] = handle.callback.type
        if handle.callback.type == CALLBACK_DEFERRED_CHANNEL_MESSAGE:
            run.summary["deferral"] = f'after {seconds_text(first)} (the member sees "is thinking…")'
        elif started_a_job(handle):
            run.summary["first answer"] = f"after {seconds_text(first)}: the job's first progress line"
        else:
            name = CALLBACK_NAMES.get(handle.callback.type, "an answer")
            run.summary["first answer"] = f"after {seconds_text(first)}: {name}"
    if run.result is not None:
        events = recorder.message_events(run.result.id)
        delivered: MessageEvent | None = next((e for e in events if e.attachments), None)
        if delivered is not None:
            progress = [e for e in events if e.kind == "edited" and e.at < delivered.at]
            # The first progress line may be the acknowledgement itself, not an edit.
            first_line = [e.content for e in events[:1] if e.kind == "created" and e.content]
            run.progress_texts = first_line + [e.content for e in progress if e.content]
            run.timings["progress_edits"] = len(progress)
            run.timings["result_s"] = round(delivered.at - origin, 3)
            run.summary["progress edits"] = str(len(progress))
            run.summary["result"] = f"after {seconds_text(delivered.at - origin)}"
        run.seed = result_seed(run.result)
        if run.seed is not None:
            run.summary["seed"] = run.seed
        run.summary["images"] = str(len(run.result_attachments))
    info = run.info
    if info is not None and info.callback is not None:
        after = info.callback.time - info.created_at
        run.timings["info_reply_s"] = round(after, 3)
        private = ", ephemeral" if info.is_ephemeral else ""
        name = CALLBACK_NAMES.get(info.callback.type, "an answer")
        run.summary["Info button"] = f"answered after {seconds_text(after)}: {name}{private}"
    run.summary.update(run.admin_summary)


def result_seed(message: StoredMessage) -> str | None:
    """The concrete seed, as the result embed shows it (a random seed is only known from there)."""
    for embed in message.embeds:
        for embed_field in embed.get("fields") or []:
            if str(embed_field.get("name", "")).lower() == "seed":
                return str(embed_field.get("value", "")).strip("` ") or None
    return None


# ---- the output folder ---------------------------------------------------------------------------


def clear_previous_outputs(out: Path) -> None:
    """Removes what an earlier demo wrote here (and only that), so a rerun starts fresh: a new store
    means a full quota, and no stale images sit next to the new ones."""
    previous = out / TRANSCRIPT_JSON
    names = {DATABASE_NAME, f"{DATABASE_NAME}-wal", f"{DATABASE_NAME}-shm", TRANSCRIPT_MD, TRANSCRIPT_JSON}
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        names.update(Path(str(name)).name for name in json.loads(previous.read_text("utf-8"))["files"])
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def safe_filename(name: str, taken: set[str]) -> str:
    # Only a plain name inside the output folder; duplicates get a number.
    base = Path(name.replace("\\", "/")).name.lstrip(".") or "image"
    if base in {TRANSCRIPT_MD, TRANSCRIPT_JSON, DATABASE_NAME}:
        base = f"image-{base}"
    candidate, number = base, 1
    stem, dot, suffix = base.rpartition(".")
    while candidate in taken:
        number += 1
        candidate = f"{stem}-{number}.{suffix}" if dot else f"{base}-{number}"
    taken.add(candidate)
    return candidate


def save_images(run: DemoRun) -> None:
    taken: set[str] = set()
    for attachment in run.result_attachments:
        if not attachment.content_type.startswith("image/"):
            continue
        name = safe_filename(attachment.filename, taken)
        (run.out / name).write_bytes(attachment.data)
        run.images.append(
            SavedImage(name, attachment.size, attachment.width, attachment.height, attachment.content_type)
        )


def write_transcripts(run: DemoRun, recorder: TranscriptRecorder, stand_in: DiscordStandIn) -> None:
    run.names = names_of(stand_in)
    files = [image.file for image in run.images] + [TRANSCRIPT_MD, TRANSCRIPT_JSON]
    extra = {
        "bot_name": BOT_NAME,
        "command": {"name": "imagine", "options": run.options, "user": USERNAME},
        "summary": run.summary,
        "timings": run.timings,
        "result": {
            "seed": run.seed,
            "progress_texts": run.progress_texts,
            "images": [vars(image) for image in run.images],
        },
        "files": files,
        "names": run.names,
    }
    data = build_transcript(recorder, stand_in, run.origin, extra)
    (run.out / TRANSCRIPT_JSON).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (run.out / TRANSCRIPT_MD).write_text(render_markdown(data), "utf-8")


def shown_path(path: Path) -> str:
    try:
        return f"{path.relative_to(Path.cwd())}{os.sep}"
    except ValueError:
        return f"{path}{os.sep}"


def report(run: DemoRun) -> None:
    elapsed = time.monotonic() - run.started
    print()
    print(f"The bot answered /imagine offline in {elapsed:.1f} s (local Discord and Segmind stand-ins).")
    for name, value in run.summary.items():
        print(f"  {name}: {as_shown(value, run.names, datetime.now(UTC))}")
    if run.progress_texts:
        print("  progress shown: " + " → ".join(run.progress_texts))
    print(f"Wrote to {shown_path(run.out)}")
    for image in run.images:
        size = f"{image.width}×{image.height}, " if image.width and image.height else ""
        print(f"  {image.file}  ({size}{image.size / 1024:.1f} KiB)")
    print(f"  {TRANSCRIPT_MD}  (every message the bot created or edited)")
    print(f"  {TRANSCRIPT_JSON}  (the same, as data)")


async def run_demo(args: argparse.Namespace) -> DemoRun:
    out: Path = args.out.expanduser().resolve()
    options: dict[str, Any] = {"prompt": args.prompt, "samples": args.samples, "aspect": args.aspect}
    if args.seed is not None:
        options["seed"] = args.seed
    run = DemoRun(out=out, options=options)

    async with contextlib.AsyncExitStack() as exits:
        env = await exits.enter_async_context(
            stand_ins(
                CREDENTIALS,
                CREDENTIALS.segmind_settings(queue_seconds=QUEUE_SECONDS, seconds_per_step=SECONDS_PER_STEP),
                bot_username=BOT_NAME,
                guild_name=GUILD_NAME,
            )
        )
        stand_in = env.discord
        log.info(
            "demo: Segmind stand-in at %s, Discord stand-in at %s", env.segmind.base_url, stand_in.api_base
        )

        recorder = TranscriptRecorder(stand_in)
        exits.push_async_callback(stop_watching, asyncio.create_task(recorder.watch()))

        try:
            stack = await exits.enter_async_context(
                running_bot(
                    env, f"sqlite:///{out / DATABASE_NAME}", startup_timeout=STARTUP_TIMEOUT, LOG_LEVEL="INFO"
                )
            )
        except (TimeoutError, BotStopped) as error:
            raise DemoError(one_line(str(error))) from None

        try:
            message = await send_imagine(run, stack, recorder, args.timeout)
            save_images(run)
            await press_info(run, stack, recorder, message)
            if args.admin:
                try:
                    await run_admin_demo(stack, recorder, member=USERNAME, summary=run.admin_summary)
                except AdminDemoError as error:
                    raise DemoError(f"the admin demo: {error}") from None
        except DemoError as error:
            if run.command is not None:
                summarize(run, recorder)
                write_transcripts(run, recorder, stand_in)
                raise DemoError(
                    f"{error}; the transcript so far is in {shown_path(out)}{TRANSCRIPT_MD}"
                ) from None
            raise
        summarize(run, recorder)
        write_transcripts(run, recorder, stand_in)
        log.info("demo: done; shutting down")
    return run


def setup_logging() -> None:
    discord.utils.setup_logging(level=logging.INFO, root=True)
    # One line per HTTP request to the stand-ins would bury the bot's own log lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The bot never joins voice; the missing voice libraries are not a problem worth a warning here.
    discord.VoiceClient.warn_nacl = False
    discord.VoiceClient.warn_dave = False


def prepare_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoError(f"cannot create the output folder {out}: {error.strerror or error}") from None
    clear_previous_outputs(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        # Before the event loop starts: plain blocking file work.
        prepare_output_folder(args.out.expanduser().resolve())
        run = asyncio.run(run_demo(args))
    except DemoError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    report(run)
    return 0
