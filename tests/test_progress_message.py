"""The progress line: a change shows within one edit interval, edits keep their pace, the result is not held."""

from __future__ import annotations

import asyncio
import itertools

from cogs.delivery import PROGRESS_TICK_SECONDS, ProgressMessage
from services.jobs import Progress, ProgressKind

INTERVAL = 0.3


class RecordedEdits:
    """Stands in for the message edit: records each text with when it started and when it ended."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.started: list[tuple[float, str]] = []
        self.ended: list[str] = []
        self._edit_started = asyncio.Condition()

    async def __call__(self, text: str) -> None:
        async with self._edit_started:
            self.started.append((asyncio.get_running_loop().time(), text))
            self._edit_started.notify_all()
        await asyncio.sleep(self.seconds)
        self.ended.append(text)

    async def wait_for(self, count: int, timeout: float) -> float:
        """Waits until `count` edits have started; returns when the last of them did."""
        async with asyncio.timeout(timeout), self._edit_started:
            await self._edit_started.wait_for(lambda: len(self.started) >= count)
        return self.started[count - 1][0]


async def test_a_change_shows_within_one_interval_even_while_the_ticker_waits() -> None:
    edits = RecordedEdits()
    progress = ProgressMessage(edits, interval=INTERVAL)
    progress.update(Progress(ProgressKind.QUEUED, request_id="r1"))
    await edits.wait_for(1, timeout=1)
    # Past the interval, the line waits for the ticker (every few seconds) or the next change.
    await asyncio.sleep(INTERVAL * 2)
    changed_at = asyncio.get_running_loop().time()
    progress.update(Progress(ProgressKind.GENERATING, elapsed=1.0, request_id="r1"))
    shown_at = await edits.wait_for(2, timeout=PROGRESS_TICK_SECONDS)
    await progress.finish()
    # Within the interval (plus room for a loaded machine), where the ticker alone waits 5 s.
    assert shown_at - changed_at <= INTERVAL * 3, shown_at - changed_at
    assert "Generating" in edits.started[1][1] or "🎨" in edits.started[1][1], edits.started


async def test_the_line_the_acknowledgement_showed_costs_no_edit_and_the_next_change_keeps_the_pace() -> None:
    acknowledged = Progress(ProgressKind.QUEUED, ready_at=1.0e10)
    edits = RecordedEdits()
    loop = asyncio.get_running_loop()
    shown_at = loop.time()
    progress = ProgressMessage(edits, interval=INTERVAL, shown=acknowledged)
    progress.update(Progress(ProgressKind.QUEUED, request_id="r1", ready_at=1.0e10))  # the submit
    await asyncio.sleep(INTERVAL * 2)
    assert edits.started == []  # the message shows that line already
    progress.update(Progress(ProgressKind.GENERATING, elapsed=1.0, request_id="r1"))
    generating_at = await edits.wait_for(1, timeout=1)
    await progress.finish()
    assert "Generating" in edits.started[0][1]
    assert generating_at - shown_at >= INTERVAL * 0.95


async def test_a_change_right_after_the_acknowledgement_waits_out_one_interval_from_it() -> None:
    edits = RecordedEdits()
    loop = asyncio.get_running_loop()
    shown_at = loop.time()
    progress = ProgressMessage(edits, interval=INTERVAL, shown=Progress(ProgressKind.QUEUED))
    progress.update(Progress(ProgressKind.GENERATING, elapsed=0.0, request_id="r1"))
    edited_at = await edits.wait_for(1, timeout=1)
    await progress.finish()
    # The acknowledgement counts as the message's last edit: at most one per interval.
    assert INTERVAL * 0.95 <= edited_at - shown_at <= INTERVAL * 3


async def test_edits_keep_one_interval_apart_however_fast_changes_come() -> None:
    edits = RecordedEdits()
    progress = ProgressMessage(edits, interval=INTERVAL)
    loop = asyncio.get_running_loop()
    until = loop.time() + INTERVAL * 5
    elapsed = 0.0
    while loop.time() < until:
        elapsed += 1.0  # a new whole second each time, so every update is a different text
        progress.update(Progress(ProgressKind.GENERATING, elapsed=elapsed, request_id="r1"))
        await asyncio.sleep(0.01)
    await progress.finish()
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(edits.started)]
    assert len(gaps) >= 3, edits.started
    assert min(gaps) >= INTERVAL * 0.95, gaps


async def test_finish_does_not_wait_out_the_interval() -> None:
    edits = RecordedEdits()
    progress = ProgressMessage(edits, interval=2.0)
    progress.update(Progress(ProgressKind.QUEUED, request_id="r1"))
    await edits.wait_for(1, timeout=1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await progress.finish()
    assert loop.time() - began < 1.0  # waiting out the interval would take the rest of its 2 s


async def test_finish_lets_an_edit_on_its_way_land_first() -> None:
    edits = RecordedEdits(seconds=0.2)
    progress = ProgressMessage(edits, interval=INTERVAL)
    progress.update(Progress(ProgressKind.QUEUED, request_id="r1"))
    await edits.wait_for(1, timeout=1)
    await progress.finish()
    # Cut off, that edit might reach Discord after the result and overwrite it.
    assert edits.ended == [edits.started[0][1]]
    progress.update(Progress(ProgressKind.GENERATING, request_id="r1"))
    await asyncio.sleep(INTERVAL * 2)
    assert len(edits.started) == 1


async def test_an_edit_slower_than_the_interval_still_lands_before_the_result() -> None:
    edits = RecordedEdits(seconds=INTERVAL * 3)
    progress = ProgressMessage(edits, interval=INTERVAL)
    progress.update(Progress(ProgressKind.QUEUED, request_id="r1"))
    await edits.wait_for(1, timeout=1)
    await progress.finish()
    assert edits.ended == [edits.started[0][1]]


class FailingEdits(RecordedEdits):
    async def __call__(self, text: str) -> None:
        await super().__call__(text)
        raise OSError("connection reset by peer")


async def test_a_network_error_on_a_progress_edit_does_not_end_the_job() -> None:
    edits = FailingEdits(seconds=0.05)
    progress = ProgressMessage(edits, interval=INTERVAL)
    progress.update(Progress(ProgressKind.QUEUED, request_id="r1"))
    await edits.wait_for(1, timeout=1)
    progress.update(Progress(ProgressKind.GENERATING, request_id="r1"))
    await edits.wait_for(2, timeout=2)
    await progress.finish()  # raises nothing: the job goes on to its result
