"""The fault suite's seeded plan: which commands are sent when, which faults are injected, when the bot dies.

The plan is fully determined by the seed. How it interleaves with the bot's own timing is not (the bot
runs in another process with jittered retries), so two runs with one seed send the same commands and the
same faults in the same order, but not at exactly the same points of each job.

Besides plain failures (5xx bursts, dropped connections, slow answers, 429s), the plan holds the hostile
answers of a Segmind that breaks its own API (see devtools/fakes/segmind/faults.py) that the bot promises to
ride out, each job still ending with its images:

* `segmind_foreign_urls` (submit): the answer's status and response URLs point at another origin; the
  bot polls the documented URLs on its base URL instead, and the key never leaves it.
* `segmind_redirect` (status, result): `307` to another origin, never followed; retried like a 5xx.
* `segmind_odd_reset` (status): `429` whose reset header is absurd ("inf", "-1", "garbage",
  "99999999999"); counted as unknown, so the bot waits briefly and asks again.
* `segmind_huge_body` (status): 8 to 20 MiB of JSON, cut off at the bot's cap and retried.
* `segmind_malformed` (status, result): a 200 that is not JSON, not an object, or an unknown status;
  retried like a 5xx.
* `segmind_odd_image` (output): the file is a multi-picture JPEG (MPO); delivered as a JPEG.
* `segmind_many_outputs` (result): more outputs than samples asked for; only those asked for are fetched.

The "other origin" is a server the suite starts itself; it records every request and the suite counts
those carrying the Segmind key (`key_sent_elsewhere`, which must stay 0).

Left out on purpose, because they make a job fail by design (the client tests cover them): `echo_key`
(an error text repeating the key: the job fails, with the key scrubbed), foreign output URLs
(`foreign_urls` on a result: outputs outside Segmind are refused), and odd images other than MPO (GIF,
garbage and the like are refused).

Every failing fault is kept within the retries the bot promises: status and result GETs get five
attempts, downloads three, so one injection hits its target at most two or three times, and the suite
injects the next fault on a target only once the requests the previous one failed have succeeded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FaultName = Literal[
    "segmind_5xx",
    "segmind_drop",
    "segmind_slow",
    "segmind_429_submit",
    "segmind_foreign_urls",
    "segmind_redirect",
    "segmind_odd_reset",
    "segmind_huge_body",
    "segmind_malformed",
    "segmind_odd_image",
    "segmind_many_outputs",
    "discord_429_edit",
    "discord_5xx_edit",
    "token_expired",
]

# Every fault stays within what the bot promises to ride out, so every job should still end with images:
# status and result GETs get five attempts, downloads three, a Discord webhook call five.
FAULT_NAMES: tuple[FaultName, ...] = get_args(FaultName)
# The hostile answers (see the module docstring): Segmind breaking its own API.
HOSTILE_FAULT_NAMES: tuple[FaultName, ...] = (
    "segmind_foreign_urls",
    "segmind_redirect",
    "segmind_odd_reset",
    "segmind_huge_body",
    "segmind_malformed",
    "segmind_odd_image",
    "segmind_many_outputs",
)
# How often each fault is drawn, relative to the others.
FAULT_WEIGHTS: dict[FaultName, float] = {
    "segmind_5xx": 3.0,
    "segmind_drop": 3.0,
    "segmind_slow": 2.0,
    "segmind_429_submit": 1.5,
    "segmind_foreign_urls": 0.8,
    "segmind_redirect": 1.0,
    "segmind_odd_reset": 0.8,
    "segmind_huge_body": 0.6,
    "segmind_malformed": 1.0,
    "segmind_odd_image": 0.8,
    "segmind_many_outputs": 0.8,
    "discord_429_edit": 2.0,
    "discord_5xx_edit": 2.0,
    "token_expired": 0.6,
}

SUBJECTS = (
    "a lighthouse in a storm",
    "a fox reading a map",
    "a glass city at dawn",
    "an old tram in the rain",
    "a dragon made of paper",
    "a quiet harbour at night",
    "a greenhouse on the moon",
    "a clockwork owl",
)


@dataclass(frozen=True)
class PlannedCommand:
    index: int
    at: float  # seconds after the first command
    member: int  # 0-based member number
    tag: str  # unique word in the prompt; how submits and posted images are traced back to the command
    options: dict[str, Any]

    @property
    def prompt(self) -> str:
        return str(self.options["prompt"])


@dataclass(frozen=True)
class PlannedFault:
    at: float
    name: FaultName
    target: str  # the Segmind target (submit, status, result, output) or the Discord route
    count: int
    params: dict[str, Any] = field(default_factory=dict)


KillStyle = Literal["mid_job", "after_ack", "during_submit", "after_channel_post"]
EDGE_STYLES: tuple[KillStyle, ...] = ("after_ack", "during_submit", "after_channel_post")


@dataclass(frozen=True)
class PlannedKill:
    """`mid_job`: while Segmind works on a job, away from the three moments below.

    The edge styles aim at those moments with a command of their own: `after_ack` kills right after the
    bot acknowledged the command; `during_submit` once Segmind accepted the submit but before its (slowed)
    answer reached the bot; `after_channel_post` right after the images of a job whose interaction token
    expired were posted in the channel.
    """

    at: float
    style: KillStyle = "mid_job"
    command: PlannedCommand | None = None


@dataclass(frozen=True)
class Plan:
    seed: int
    commands: list[PlannedCommand]
    faults: list[PlannedFault]
    kills: list[PlannedKill]

    @property
    def jobs(self) -> int:
        return len(self.commands) + sum(1 for kill in self.kills if kill.command is not None)


def make_plan(
    *,
    jobs: int,
    kills: int,
    seed: int,
    members: int = 4,
    faults: int | None = None,
    fault_names: tuple[FaultName, ...] = FAULT_NAMES,
    edge_kills: tuple[KillStyle, ...] = (),
) -> Plan:
    """`faults` defaults to about two faults for every three jobs, and at least one of every kind.

    `edge_kills` adds one kill of each style named (see PlannedKill), each with a command of its own.
    """
    rng = random.Random(seed)
    commands = _commands(rng, jobs, members, seed)
    window = max(commands[-1].at, 1.0) if commands else 1.0
    fault_count = max(len(fault_names), round(jobs * 2 / 3)) if faults is None else faults
    planned_faults = _faults(rng, fault_count, window, fault_names)
    planned_kills = _kills(rng, kills, window)
    planned_kills += _edge_kills(rng, edge_kills, window, members, seed)
    return Plan(
        seed=seed,
        commands=commands,
        faults=planned_faults,
        kills=sorted(planned_kills, key=lambda kill: kill.at),
    )


def _commands(rng: random.Random, jobs: int, members: int, seed: int) -> list[PlannedCommand]:
    """Commands come in small bursts (a few members at once), with pauses between the bursts."""
    commands: list[PlannedCommand] = []
    at = 0.0
    while len(commands) < jobs:
        for _ in range(min(rng.randint(1, 4), jobs - len(commands))):
            index = len(commands)
            commands.append(_command(rng, index, f"fs{seed}n{index:03d}", at, members))
            at += rng.uniform(0.0, 0.15)
        at += rng.uniform(0.6, 1.6)
    return commands


def _command(rng: random.Random, index: int, tag: str, at: float, members: int) -> PlannedCommand:
    size = rng.choice((512, 576, 640))
    options: dict[str, Any] = {
        "prompt": f"{rng.choice(SUBJECTS)} {tag}",
        "samples": rng.choice((1, 1, 2)),
        "steps": rng.choice((20, 25, 30)),
        "width": size,
        "height": size,
    }
    return PlannedCommand(index, round(at, 3), rng.randrange(members), tag, options)


def _faults(
    rng: random.Random, count: int, window: float, names: tuple[FaultName, ...]
) -> list[PlannedFault]:
    # Every kind once, then weighted draws; the times are spread over the commands' window.
    chosen: list[FaultName] = list(names[:count])
    weights = [FAULT_WEIGHTS[name] for name in names]
    chosen += rng.choices(names, weights=weights, k=max(0, count - len(chosen)))
    rng.shuffle(chosen)
    # Faults land while commands are still arriving, so jobs are there to meet them.
    planned = [_fault(rng, name, rng.uniform(0.0, window * 0.85)) for name in chosen]
    return sorted(planned, key=lambda fault: fault.at)


def _fault(rng: random.Random, name: FaultName, at: float) -> PlannedFault:
    at = round(at, 3)
    if name == "segmind_5xx":
        target = rng.choice(("status", "result", "output"))
        # Downloads get three attempts; status and result five.
        count = rng.randint(1, 2 if target == "output" else 3)
        return PlannedFault(at, name, target, count)
    if name == "segmind_drop":
        # aiohttp silently resends a GET once when a reused connection drops, so one drop may not be seen.
        target = rng.choice(("status", "result", "output"))
        return PlannedFault(at, name, target, 2 if target == "output" else rng.randint(2, 3))
    if name == "segmind_slow":
        target = rng.choice(("status", "result", "output"))
        return PlannedFault(at, name, target, rng.randint(1, 2), {"seconds": round(rng.uniform(1.0, 3.0), 2)})
    if name == "segmind_429_submit":
        return PlannedFault(
            at, name, "submit", rng.randint(1, 3), {"reset_after": round(rng.uniform(0.5, 2.0), 2)}
        )
    if name in HOSTILE_FAULT_NAMES:
        return _hostile_fault(rng, name, at)
    if name == "discord_429_edit":
        return PlannedFault(
            at, name, "edit_original", rng.randint(1, 3), {"retry_after": round(rng.uniform(0.3, 1.5), 2)}
        )
    if name == "discord_5xx_edit":
        return PlannedFault(
            at, name, "edit_original", rng.randint(1, 3), {"status": rng.choice((500, 502, 503))}
        )
    # One job in flight has its interaction token expire: its images must reach the channel instead.
    return PlannedFault(at, name, "interaction", 1)


ODD_RESET_VALUES = ("inf", "-1", "garbage", "99999999999")
MALFORMED_BODIES = ("not json", "[]", '{"status": "WEIRD"}')
# Paths on the other origin a redirect points at: where a client that followed it would send the key.
REDIRECT_PATHS = ("/v2/requests/moved", "/steal", "/latest/meta-data/")
HUGE_BODY_MIB = (8.0, 20.0)


def _hostile_fault(rng: random.Random, name: FaultName, at: float) -> PlannedFault:
    """The other origin's address is known only once the suite runs; it fills it in at injection."""
    if name == "segmind_foreign_urls":
        # A submit is never retried, and this one succeeds: the bot just polls the documented URLs.
        return PlannedFault(at, name, "submit", rng.randint(1, 2))
    if name == "segmind_redirect":
        target = rng.choice(("status", "result"))
        return PlannedFault(at, name, target, rng.randint(1, 2), {"path": rng.choice(REDIRECT_PATHS)})
    if name == "segmind_odd_reset":
        # A 429 on a GET waits in the paused budget without spending one of the five attempts.
        return PlannedFault(at, name, "status", rng.randint(1, 3), {"value": rng.choice(ODD_RESET_VALUES)})
    if name == "segmind_huge_body":
        # Big enough to pass the bot's 1 MiB cap on status answers many times over, small enough to be quick.
        params = {"mib": round(rng.uniform(*HUGE_BODY_MIB), 1), "content_length": rng.random() < 0.5}
        return PlannedFault(at, name, "status", rng.randint(1, 2), params)
    if name == "segmind_malformed":
        target = rng.choice(("status", "result"))
        return PlannedFault(at, name, target, rng.randint(1, 3), {"body": rng.choice(MALFORMED_BODIES)})
    if name == "segmind_odd_image":
        # Only MPO: the other odd formats make a job fail by design.
        return PlannedFault(at, name, "output", rng.randint(1, 2), {"format": "mpo"})
    # More outputs than the 1 or 2 samples any planned command asks for.
    return PlannedFault(at, name, "result", rng.randint(1, 2), {"outputs": rng.randint(3, 8)})


def _kills(rng: random.Random, count: int, window: float) -> list[PlannedKill]:
    """Spread over the middle of the window, one per slice, so restarts do not pile on each other."""
    if count <= 0:
        return []
    start, end = window * 0.15, window * 0.9
    width = (end - start) / count
    return [PlannedKill(round(start + width * (n + rng.uniform(0.1, 0.9)), 3)) for n in range(count)]


def _edge_kills(
    rng: random.Random, styles: tuple[KillStyle, ...], window: float, members: int, seed: int
) -> list[PlannedKill]:
    unknown = set(styles) - set(EDGE_STYLES)
    if unknown:
        raise ValueError(f"unknown edge kill style(s): {', '.join(sorted(unknown))}")
    kills = []
    for n, style in enumerate(styles):
        at = round(rng.uniform(0.2, 0.95) * window, 3)
        command = _command(rng, 1000 + n, f"fs{seed}e{n}", at, members)
        kills.append(PlannedKill(at, style, command))
    return kills
