"""Fault suite: does every /imagine end with its images exactly once while Segmind and Discord misbehave?

    python -m devtools.fault_suite [--jobs N] [--seed S] [--kills K] [--store sqlite|redis]
                                   [--edge-kills] [--workdir DIR] [--out report.json]

The real bot runs as a subprocess (`python bot.py`) against the in-process Discord and Segmind stand-ins.
Several members send N uniquely worded /imagine commands over time while, at seeded-random moments, the
stand-ins answer with Segmind 5xx bursts, dropped connections and slow answers (status, result, output),
429 on submit, Discord 429 and 5xx on the edit of the original response, an interaction token expiring
mid-job, and the bot is SIGKILLed mid-job K times, each time started again on the same store.

Segmind also turns hostile (see `devtools.fault_suite.plan` for each kind and what is left out):
status and response URLs on another origin, redirects there, absurd rate-limit reset headers, huge and
malformed bodies, multi-picture JPEG outputs, more outputs than asked for. The other origin is a
server the suite starts itself (127.0.0.1, a free port) that records every request and answers 404;
`key_sent_elsewhere` counts the requests that reached it carrying the Segmind key, and any such request
fails the run.

Mid-job kills keep clear of three moments a SIGKILL can still hurt (see `plan.PlannedKill`);
`--edge-kills` adds one kill aimed at each of them, with a job of its own.

Everything is then counted from what the stand-ins recorded: Segmind's accepted submits and the Discord
messages holding each command's images. Exit status 0 only when nothing was lost, nothing duplicated and
the key was never sent elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from devtools.fakes.discord.server import DEFAULT_USER_ID, DiscordStandIn, NoGatewayClientError
from devtools.fakes.segmind.server import SegmindServer
from devtools.fakes.segmind.stats import RequestRecord
from devtools.fault_suite.count import (
    FiredCommand,
    InjectedFault,
    KillRecord,
    SuiteReport,
    command_outcomes,
    faults_served,
    latency_summary,
    message_text,
    problems,
    scan_logs,
    tag_in,
    tally,
)
from devtools.fault_suite.plan import (
    EDGE_STYLES,
    HOSTILE_FAULT_NAMES,
    KillStyle,
    Plan,
    PlannedCommand,
    PlannedFault,
    PlannedKill,
    make_plan,
)
from devtools.launcher import BotLauncher, BotProcess
from devtools.stack import (
    PROGRESS_MARKS,
    REDIS_URL,
    Credentials,
    drop_redis_keys,
    redis_answers,
    redis_url,
    sqlite_url,
    stand_ins,
)

BOT_TOKEN = "bot.fault-suite.token-5d21"
SEGMIND_KEY = "sg_fault_suite_key_0c7e"
CREDENTIALS = Credentials(BOT_TOKEN, SEGMIND_KEY)
READY_TIMEOUT = 40.0
TERMINATE_TIMEOUT = 15.0
SEGMIND_TARGETS = ("submit", "status", "result", "output")
POLL = 0.1
# A mid-job kill keeps this far from an acknowledgement, a submit and a channel post (see PlannedKill).
EDGE_CLEARANCE = 0.3
EDGE_HOLD_SECONDS = 1.5
# Planned fault -> the stand-in's fault kind, for the faults whose parameters pass through as planned.
SEGMIND_KINDS = {
    "segmind_5xx": "server_error",
    "segmind_drop": "drop",
    "segmind_slow": "slow",
    "segmind_odd_reset": "odd_reset",
    "segmind_huge_body": "huge_body",
    "segmind_malformed": "malformed",
    "segmind_odd_image": "odd_image",
    "segmind_many_outputs": "many_outputs",
}
# Faults the request records cannot tell from an ordinary answer (or, for odd_reset, from a plain 429):
# the requests they hit are attributed from the order of arrival (see `devtools.fault_suite.count`).
ATTRIBUTED_FAULTS = frozenset({"segmind_slow", *HOSTILE_FAULT_NAMES})
# Of those, the ones whose answer the bot retries: the request has failed until a retry succeeds.
FAILING_ATTRIBUTED_FAULTS = frozenset(
    {"segmind_redirect", "segmind_odd_reset", "segmind_huge_body", "segmind_malformed"}
)


@dataclass
class ElsewhereRequest:
    method: str
    path: str
    time: float
    key_in: list[str]  # the header names (and "url") that carried the Segmind key; the key is not kept


class OtherOrigin:
    """Another origin on 127.0.0.1 (a free port): records every request that reaches it and answers 404.

    A hostile Segmind points URLs and redirects here; a bot that followed them would send its key along.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.requests: list[ElsewhereRequest] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner = runner
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _answer(self, request: web.Request) -> web.Response:
        key_in = [name for name, value in request.headers.items() if self.secret in f"{name}: {value}"]
        if self.secret in request.path_qs:
            key_in.append("url")
        path = request.path.replace(self.secret, "***")
        self.requests.append(ElsewhereRequest(request.method, path, time.monotonic(), key_in))
        return web.json_response({"error": "Not found"}, status=404)

    @property
    def key_sent(self) -> list[ElsewhereRequest]:
        return [record for record in self.requests if record.key_in]


@dataclass
class SuiteOptions:
    jobs: int = 40
    seed: int = 1
    kills: int = 3
    store: str = "sqlite"
    members: int = 4
    faults: int | None = None  # None: about two for every three jobs, at least one of each kind
    # Kills aimed at the edge moments (see PlannedKill), each with one more job of its own.
    edge_kills: tuple[KillStyle, ...] = ()
    lease_seconds: float = 2.0
    settle_timeout: float = 120.0  # after the last command, how long to wait for every delivery at most
    quiet_seconds: float = 5.0  # then, how long no request may reach either stand-in before counting
    workdir: Path | None = None  # logs and the SQLite file; a new temporary directory by default
    database_url: str | None = None  # overrides `store`
    # Segmind's timings: short, but with the shape of the real thing (a queue, then steps).
    queue_seconds: float = 0.6
    seconds_per_step: float = 0.12
    workers: int = 4


class FaultSuite:
    def __init__(self, options: SuiteOptions, *, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.say = say
        self.plan: Plan = make_plan(
            jobs=options.jobs,
            kills=options.kills,
            seed=options.seed,
            members=options.members,
            faults=options.faults,
            edge_kills=options.edge_kills,
        )
        self.rng = random.Random(f"{options.seed}/run")
        self.zero = time.monotonic()
        self.fired: list[FiredCommand] = []
        self.kills: list[KillRecord] = []
        self.injections: list[InjectedFault] = []
        self.up = asyncio.Event()
        # One fault per target at a time, so no single request ever meets two faults back to back.
        self._pending: dict[str, tuple[int, int]] = {}
        self._faults: asyncio.Task[None] | None = None
        self._play_start = 0.0
        self.discord: DiscordStandIn
        self.segmind: SegmindServer
        self.elsewhere = OtherOrigin(SEGMIND_KEY)
        self.database = ""
        self.launcher: BotLauncher

    def now(self) -> float:
        return time.monotonic() - self.zero

    # -- the run -----------------------------------------------------------------------------------

    async def run(self) -> SuiteReport:
        options = self.options
        workdir = options.workdir or Path(tempfile.mkdtemp(prefix="fault-suite-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.database = options.database_url or await store_url(options.store, workdir)
        segmind_settings = CREDENTIALS.segmind_settings(
            queue_seconds=options.queue_seconds,
            seconds_per_step=options.seconds_per_step,
            workers=options.workers,
        )
        # Keys of a Redis store the suite made for itself go with it; a caller's store is the caller's.
        own_redis_store = options.database_url is None and options.store == "redis"
        try:
            async with contextlib.AsyncExitStack() as exits:
                # A killed bot's gateway session must end quickly, or events would wait for a resume that
                # never comes.
                env = await exits.enter_async_context(
                    stand_ins(CREDENTIALS, segmind_settings, gateway_resume_timeout=0.5)
                )
                self.discord, self.segmind = env.discord, env.segmind
                await self.elsewhere.start()
                exits.push_async_callback(self.elsewhere.stop)
                self.launcher = BotLauncher(env, workdir, env=self._bot_env(), clock_zero=self.zero)
                exits.push_async_callback(self.launcher.stop_all)
                exits.push_async_callback(self._stop_faults)
                self.say(
                    f"fault suite: {self.plan.jobs} jobs, {len(self.plan.faults)} faults, "
                    f"{len(self.plan.kills)} kills, seed {options.seed}, store {redact(self.database)}; "
                    f"logs in {workdir}"
                )
                await self._start_bot()
                self.up.set()
                await self._play()
                await self._settle()
                await self._stop_faults()
                current = self.launcher.current
                if current is not None:
                    await current.end(signal.SIGTERM, TERMINATE_TIMEOUT)
                wall = self.now()
                return self._report(workdir, self.database, wall)
        finally:
            if own_redis_store:
                await drop_redis_keys(self.database)

    def _bot_env(self) -> dict[str, str]:
        return {
            # Far above what the suite sends, so the suite measures faults, not the request budget.
            "SEGMIND_REQUESTS_PER_MINUTE": "600",
            # The quota must never refuse a command: a refusal is not a job.
            "QUOTA_DAILY_IMAGES": "100000",
            "QUOTA_MAX_CONCURRENT": "1000",
            "JOB_LEASE_SECONDS": f"{self.options.lease_seconds:g}",
            "LOG_LEVEL": "INFO",
        }

    async def _start_bot(self) -> BotProcess:
        """Starts a bot process on the suite's store, once the one before it (if any) has ended."""
        if self.launcher.current is not None:
            raise RuntimeError("a bot process is already running")
        return await self.launcher.start(self.database, ready_timeout=READY_TIMEOUT)

    async def _play(self) -> None:
        """Commands and kills in one timeline (no command is sent while the bot is down); faults in another.

        Returns once every command was sent; faults still waiting for their target then keep going
        until the end of the settle step.
        """
        start = time.monotonic()
        self._play_start = self.now()
        self._faults = asyncio.create_task(self._inject_faults(start))
        timeline: list[tuple[float, int, PlannedCommand | PlannedKill]] = [
            (command.at, 1, command) for command in self.plan.commands
        ]
        timeline += [(kill.at, 0, kill) for kill in self.plan.kills]
        for at, _order, event in sorted(timeline, key=lambda item: (item[0], item[1])):
            await sleep_until(start + at)
            if isinstance(event, PlannedKill):
                await self._kill_and_restart(event)
            else:
                await self._fire(event)

    async def _stop_faults(self) -> None:
        if self._faults is not None and not self._faults.done():
            self._faults.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._faults

    async def _fire(self, command: PlannedCommand) -> FiredCommand:
        await self.up.wait()
        user_id = DEFAULT_USER_ID + command.member
        fired = FiredCommand(command, self.now(), user_id)
        self.fired.append(fired)
        try:
            fired.handle = await self.discord.send_slash_command(
                "imagine", command.options, user_id=user_id, username=f"member{command.member + 1}"
            )
        except (NoGatewayClientError, LookupError) as error:
            fired.fire_error = f"{type(error).__name__}: {error}"
        return fired

    # -- kills -------------------------------------------------------------------------------------

    async def _kill_and_restart(self, kill: PlannedKill) -> None:
        # Every command sent so far must have been answered first: one the bot never received would be
        # Discord's "did not respond", not a job the bot lost.
        await self._wait(lambda: all(self._acknowledged(f) for f in self.fired if f.handle), 10)
        if kill.style == "mid_job":
            aimed = await self._wait(self._mid_job, 15)
        else:
            aimed = await self._aim_at_edge(kill)
        current = self.launcher.current
        if current is None:
            raise RuntimeError("no bot process is running")
        record = KillRecord(
            at=self.now(),
            planned_at=self._play_start + kill.at,
            style=kill.style,
            process=current.name,
            in_flight=[f.planned.tag for f in self._in_flight(submitted=False)],
            submitted_in_flight=[f.planned.tag for f in self._in_flight(submitted=True)],
            on_target=aimed,
        )
        self.up.clear()
        await current.end(signal.SIGKILL)
        self.kills.append(record)
        self.say(
            f"  {record.at:6.1f} s  SIGKILL {record.process} ({kill.style}{'' if aimed else ', missed'}) with "
            f"{len(record.in_flight)} job(s) in flight, {len(record.submitted_in_flight)} at Segmind"
        )
        run = await self._start_bot()
        record.restarted_ready_at = run.ready_at
        self.up.set()

    def _mid_job(self) -> bool:
        """A job is at Segmind, and the moment is clear of the edge styles' moments (see PlannedKill).

        A process just started is first left time to take over its predecessor's jobs.
        """
        run = self.launcher.current
        if run is None or run.ready_at is None:
            return False
        restarted = len(self.launcher.started) > 1
        if restarted and self.now() - run.ready_at < self.options.lease_seconds * 2 + 1:
            return False
        if not self._in_flight(submitted=True):
            return False
        now = time.monotonic()
        callbacks = self.discord.requests_for("callback")
        if callbacks and now - callbacks[-1].time < EDGE_CLEARANCE:
            return False
        submits = self.segmind.stats.requests_to("submit")
        if any(r.status is None for r in submits) or (submits and now - submits[-1].time < EDGE_CLEARANCE):
            return False
        channel_posts = [r for r in self.discord.requests_for("channel_message") if r.files]
        return not channel_posts or now - channel_posts[-1].time >= EDGE_CLEARANCE

    async def _aim_at_edge(self, kill: PlannedKill) -> bool:
        """Sends the kill's own command and returns inside the moment its style aims at.

        Each moment is held open (1.5 s: a slow answer from Segmind or Discord, which happens), so
        the kill lands in it every time instead of racing the bot for a few milliseconds.
        """
        assert kill.command is not None
        if kill.style == "during_submit":
            # Faults are served in the order injected: a 429 still pending only delays this slow submit.
            self.segmind.inject("slow", count=1, target="submit", seconds=EDGE_HOLD_SECONDS)
        elif kill.style == "after_ack":
            hold_answers(self.discord, "callback", EDGE_HOLD_SECONDS)
        fired = await self._fire(kill.command)
        handle = fired.handle
        if handle is None:
            return False
        tag = kill.command.tag
        try:
            await self.discord.wait_for(lambda: handle.callback is not None, 10)
            if kill.style == "after_ack":
                return True
            if kill.style == "after_channel_post":
                handle.expired = True
                hold_answers(self.discord, "channel_message", EDGE_HOLD_SECONDS)
                await self.discord.wait_for(
                    lambda: any(
                        m.attachments and m.interaction_id is None and tag_in(message_text(m), tag)
                        for m in self.discord.messages.values()
                    ),
                    30,
                )
                return True
            # during_submit: Segmind accepted the submit at once; its answer is being held back.
            return await self._wait(
                lambda: (
                    any(tag_in(str(s.payload.get("prompt") or ""), tag) for s in self.segmind.stats.submits)
                    and any(r.status is None for r in self.segmind.stats.requests_to("submit"))
                ),
                15,
            )
        except TimeoutError:
            return False

    def _acknowledged(self, fired: FiredCommand) -> bool:
        return fired.handle is not None and fired.handle.callback is not None

    def _in_flight(self, *, submitted: bool) -> list[FiredCommand]:
        """Commands acknowledged whose images have not reached Discord (and, if asked, Segmind has them)."""
        submitted_prompts = "\n".join(str(s.payload.get("prompt") or "") for s in self.segmind.stats.submits)
        delivered = "\n".join(
            message_text(message) for message in self.discord.messages.values() if message.attachments
        )
        found = []
        for fired in self.fired:
            tag = fired.planned.tag
            if not self._acknowledged(fired) or tag_in(delivered, tag):
                continue
            if submitted and not tag_in(submitted_prompts, tag):
                continue
            found.append(fired)
        return found

    # -- faults ------------------------------------------------------------------------------------

    async def _inject_faults(self, start: float) -> None:
        """One lane per target, so a fault waiting for its target to clear never holds up another target."""
        lanes: dict[str, list[PlannedFault]] = {}
        for planned in self.plan.faults:
            lanes.setdefault(planned.target, []).append(planned)
        await asyncio.gather(*(self._inject_lane(start, faults) for faults in lanes.values()))

    async def _inject_lane(self, start: float, faults: list[PlannedFault]) -> None:
        for planned in faults:
            await sleep_until(start + planned.at)
            injected = InjectedFault(
                planned.name, planned.target, planned.count, planned.params, self._play_start + planned.at
            )
            self.injections.append(injected)
            if planned.name == "token_expired":
                await self._expire_one_token(injected)
                continue
            await self._wait_until_target_is_clear(planned.target)
            self._inject(planned, injected)
            injected.injected_at = self.now()

    def _inject(self, planned: PlannedFault, injected: InjectedFault) -> None:
        name, target, count, params = planned.name, planned.target, planned.count, planned.params
        if target in SEGMIND_TARGETS:
            injected.first_request = self._requests_to(target)
        if name in SEGMIND_KINDS:
            self.segmind.inject(SEGMIND_KINDS[name], count=count, target=target, **params)  # type: ignore[arg-type]
        elif name == "segmind_foreign_urls":
            self.segmind.inject("foreign_urls", count=count, target="submit", origin=self.elsewhere.base_url)
        elif name == "segmind_redirect":
            location = self.elsewhere.base_url + params["path"]
            self.segmind.inject("redirect", count=count, target=target, location=location)  # type: ignore[arg-type]
        elif name == "segmind_429_submit":
            self.segmind.inject("rate_limit", count=count, target="submit", reset_after=params["reset_after"])
        elif name == "discord_429_edit":
            self.discord.inject("edit_original", status=429, count=count, retry_after=params["retry_after"])
        elif name == "discord_5xx_edit":
            self.discord.inject("edit_original", status=params["status"], count=count)
        else:
            raise ValueError(f"unknown fault {name}")
        self._pending[target] = (self._requests_to(target), count)

    async def _expire_one_token(self, injected: InjectedFault) -> None:
        """Expires the token of one job Segmind is working on; its images must then go to the channel."""
        found = await self._wait(lambda: bool(self._in_flight(submitted=True)), 10)
        candidates = self._in_flight(submitted=True)
        if not found or not candidates:
            injected.detail = "no job in flight"
            return
        victim = self.rng.choice(candidates)
        assert victim.handle is not None
        victim.handle.expired = True
        injected.injected_at = self.now()
        injected.detail = victim.planned.tag

    def _requests_to(self, target: str) -> int:
        if target in SEGMIND_TARGETS:
            return len(self.segmind.stats.requests_to(target))
        return len(self.discord.requests_for(target))

    def _failed_chains(self, target: str) -> set[str]:
        """URLs whose latest request on this target failed in a way clients retry: they may be retrying now.

        On Segmind, a request a hostile fault answered with something the bot retries (a redirect, a huge
        or malformed body, an absurd 429) has failed too; one a slow or harmless fault took has not, even
        while its answer is still on its way. A URL naming no job Segmind accepted is left out: the bot's
        one-off key check at start-up asks for a random id and never asks again.
        """
        if target not in SEGMIND_TARGETS:
            records = self.discord.requests_for(target)
            latest = {record.path: retryable_failure(record.status) for record in records}
            return {path for path, failed in latest.items() if failed}
        failing: set[int] = set()
        harmless: set[int] = set()
        for name, record in self._attributed(target):
            (failing if name in FAILING_ATTRIBUTED_FAULTS else harmless).add(id(record))
        known = {submit.request_id for submit in self.segmind.stats.submits}
        latest = {
            record.path: id(record) in failing
            or (id(record) not in harmless and retryable_failure(record.status))
            for record in self.segmind.stats.requests_to(target)
        }
        return {
            path
            for path, failed in latest.items()
            if failed and (target == "submit" or job_in_path(path) in known)
        }

    def _attributed(self, target: str | None = None) -> list[tuple[str, RequestRecord]]:
        """The requests hit by faults the records cannot tell apart, each with the fault's name.

        Only one fault is pending per target and the stand-in serves them in order, so a fault's hits are
        the first `count` requests to reach its target after it was injected.
        """
        found: list[tuple[str, RequestRecord]] = []
        by_target: dict[str, list[RequestRecord]] = {}
        for injection in self.injections:
            start = injection.first_request
            if injection.name not in ATTRIBUTED_FAULTS or start is None:
                continue
            if target is not None and injection.target != target:
                continue
            if injection.target not in by_target:
                by_target[injection.target] = self.segmind.stats.requests_to(injection.target)
            records = by_target[injection.target][start : start + injection.count]
            found += [(injection.name, record) for record in records]
        return found

    async def _wait_until_target_is_clear(self, target: str) -> None:
        """Until the previous fault on this target was served and every request it failed has succeeded.

        The bot retries a failed GET (or webhook edit) a fixed number of times; two faults meeting the
        same retried request back to back could exhaust them, and that would test the plan, not the bot.
        """

        def clear() -> bool:
            pending = self._pending.get(target)
            if pending is not None and self._requests_to(target) - pending[0] < pending[1]:
                return False
            return not self._failed_chains(target)

        await self._wait(clear, 60)

    # -- the end -----------------------------------------------------------------------------------

    async def _settle(self) -> None:
        """Waits for every command to be answered for good, then for both stand-ins to go quiet.

        A job the bot forgot makes no traffic at all, so a long silence also ends the first wait.
        """
        options = self.options
        silence = max(options.quiet_seconds * 3, options.lease_seconds * 4)

        def settled() -> bool:
            return all(self._finished(fired) for fired in self.fired) or self._quiet_for() >= silence

        await self._wait(settled, options.settle_timeout)
        unanswered = sum(not self._finished(fired) for fired in self.fired)
        if unanswered:
            self.say(
                f"  {unanswered} command(s) still unanswered; nothing has happened for {self._quiet_for():.0f} s"
            )
        # A job redone after a kill may still be on its way to a second delivery; wait for silence.
        await self._wait(lambda: self._quiet_for() >= options.quiet_seconds, options.settle_timeout)

    def _quiet_for(self) -> float:
        """Seconds since either stand-in last received a request (gateway heartbeats aside)."""
        last = max(
            [r.time for r in self.segmind.stats.requests[-1:]] + [r.time for r in self.discord.requests[-1:]],
            default=0.0,
        )
        return time.monotonic() - last

    def _finished(self, fired: FiredCommand) -> bool:
        if fired.handle is None:
            return True
        tag = fired.planned.tag
        if any(m.attachments and tag_in(message_text(m), tag) for m in self.discord.messages.values()):
            return True
        original = fired.handle.original
        # An answer that is neither images nor progress is final: an error the member was shown.
        return (
            original is not None
            and not original.loading
            and bool(original.content)
            and not original.content.startswith(PROGRESS_MARKS)
        )

    def _report(self, workdir: Path, database: str, wall: float) -> SuiteReport:
        outcomes, unmatched = command_outcomes(self.fired, self.discord, self.segmind, self.zero)
        logs = {run.name: run.log() for run in self.launcher.started}
        counts = tally(outcomes, len(self.segmind.stats.submits), unmatched)
        options = {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()},
            "database_url": redact(database),
            "workdir": str(workdir),
        }
        injected = Counter(i.name for i in self.injections if i.injected_at is not None)
        injected["kill"] = len(self.kills)
        planned = Counter(f.name for f in self.plan.faults)
        planned["kill"] = len(self.plan.kills)
        found = problems(outcomes, self.kills, logs)
        leaks = self.elsewhere.key_sent
        if leaks:
            found.append(
                {
                    "tag": "(the other origin)",
                    "issues": [f"the Segmind key was sent to another origin {len(leaks)} time(s)"],
                    "submits": [],
                    "log_lines": [
                        f"{r.time - self.zero:.2f} s {r.method} {r.path} (key in {', '.join(r.key_in)})"
                        for r in leaks
                    ],
                }
            )
        return SuiteReport(
            options=options,
            tally=counts,
            commands=outcomes,
            faults_planned=dict(sorted(planned.items())),
            faults_injected=dict(sorted(injected.items())),
            faults_served=self._served(),
            injections=self.injections,
            kills=self.kills,
            processes=[
                {
                    "name": run.name,
                    "log": str(run.log_path),
                    "started_at": round(run.started_at, 2),
                    "ready_at": None if run.ready_at is None else round(run.ready_at, 2),
                    "ended_at": None if run.ended_at is None else round(run.ended_at, 2),
                    "how_ended": run.how_ended,
                    "exit_code": run.exit_code,
                }
                for run in self.launcher.started
            ],
            wall_seconds=wall,
            latency=latency_summary(outcomes),
            log_findings={
                **scan_logs(logs),
                # e.g. an upload cut off by a SIGKILL, which the Discord stand-in counts as its own error.
                "stand_in_errors": [repr(error) for error in self.discord.internal_errors],
            },
            problems=found,
            requests_elsewhere=len(self.elsewhere.requests),
            key_sent_elsewhere=len(leaks),
        )

    def _served(self) -> dict[str, int]:
        # A slow answer, a malformed or huge 200 and the like look like any answer in the records; only
        # one fault is pending per target, so the first requests to reach it after the injection are its.
        return faults_served(self.discord, self.segmind, self._attributed())

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL)
        return True


def hold_answers(discord: DiscordStandIn, route: str, seconds: float, count: int = 1) -> None:
    """The next `count` requests on a Discord route take effect at once, but their answers come late."""
    remaining = [count]
    for entry in discord.rest.routes:
        if entry.name != route:
            continue
        handler = entry.handler

        async def held(call: Any, handler: Any = handler) -> Any:
            reply = await handler(call)
            if remaining[0] > 0:
                remaining[0] -= 1
                await asyncio.sleep(seconds)
            return reply

        entry.handler = held


def job_in_path(path: str) -> str | None:
    """The Segmind request id a status, result or output path names."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["v2", "requests"]:
        return parts[2]
    if len(parts) >= 2 and parts[0] == "outputs":
        return parts[1]
    return None


def retryable_failure(status: int | None) -> bool:
    # No status: dropped, or still in flight (waiting for its answer too is harmless).
    return status is None or status == 429 or status >= 500


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def store_url(kind: str, workdir: Path) -> str:
    if kind == "sqlite":
        return sqlite_url(workdir)
    if kind == "redis":
        if not await redis_answers():
            raise RuntimeError(f"no Redis answers at {REDIS_URL} (set TEST_REDIS_URL)")
        return redis_url("fault-suite")
    raise ValueError(f"unknown store {kind!r}; use sqlite or redis")


def redact(url: str) -> str:
    # A Redis URL may carry a password; the report only needs to say which kind of store it was.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


async def run_suite(options: SuiteOptions, *, say: Callable[[str], None] = print) -> SuiteReport:
    return await FaultSuite(options, say=say).run()


# -- command line ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = SuiteOptions()
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fault_suite",
        description="Run the real bot under injected faults (plain and hostile Segmind answers, Discord "
        "errors, SIGKILLs) and count lost and duplicated jobs, and requests that sent the Segmind key to "
        "another origin. Exit status 0 only when all three are 0.",
    )
    parser.add_argument(
        "--jobs", type=int, default=defaults.jobs, help="how many /imagine commands (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds the plan: commands, faults, kill times (default: %(default)s)",
    )
    parser.add_argument(
        "--kills",
        type=int,
        default=defaults.kills,
        help="SIGKILLs mid-job, each followed by a restart (default: %(default)s)",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "redis"),
        default=defaults.store,
        help=f"the bot's store; redis uses {redact(REDIS_URL)} (TEST_REDIS_URL) (default: %(default)s)",
    )
    parser.add_argument(
        "--members",
        type=int,
        default=defaults.members,
        help="how many members send commands (default: %(default)s)",
    )
    parser.add_argument(
        "--faults",
        type=int,
        default=defaults.faults,
        help="how many faults (default: about 2 per 3 jobs, and at least one of each kind)",
    )
    parser.add_argument(
        "--edge-kills",
        action="store_true",
        help="also kill right after an acknowledgement, during a submit, and after a channel post "
        "(one more job each; default: off)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=defaults.settle_timeout,
        help="after the last command, how long to wait for every delivery at most, in seconds "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="bot logs and SQLite file (default: a new temporary directory)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON report here (default: no report file)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.kills < 0 or args.members < 1:
        parser.error("--jobs and --members must be at least 1, --kills at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fault-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # The stand-ins log every fault they serve; that belongs next to the bot's logs, not in the table.
    logging.basicConfig(
        filename=workdir / "stand-ins.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    options = SuiteOptions(
        jobs=args.jobs,
        seed=args.seed,
        kills=args.kills,
        store=args.store,
        members=args.members,
        faults=args.faults,
        edge_kills=EDGE_STYLES if args.edge_kills else (),
        settle_timeout=args.settle_timeout,
        workdir=workdir,
    )
    report = asyncio.run(run_suite(options))
    print(report.table())
    for problem in report.problems:
        print(f"  {problem['tag']}: {', '.join(problem['issues'])}; submits {problem['submits']}")
    if args.out is not None:
        report.write(args.out)
        print(f"report written to {args.out}")
    return 0 if report.ok else 1
