"""Progress under load: ticks share one allowance for the whole process, state changes wait for it only
while the loop runs behind; jobs begin one at a time, in order."""

from __future__ import annotations

import asyncio

import pytest

from cogs import delivery
from cogs.delivery import ProgressMessage, StartLine, TickAllowance
from services.jobs import Progress, ProgressKind

INTERVAL = 0.05


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Edits:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def __call__(self, text: str) -> None:
        self.texts.append(text)


def test_the_allowance_grants_per_second_and_saves_up_one_second_at_most() -> None:
    clock = FakeClock()
    allowance = TickAllowance(3, clock=clock)
    assert [allowance.take() for _ in range(5)] == [True, True, True, False, False]
    clock.now = 1 / 3
    assert allowance.take() and not allowance.take()
    clock.now = 100.0  # a long quiet spell saves up one second's worth, not a hundred
    assert sum(allowance.take() for _ in range(10)) == 3


async def test_ticks_of_many_messages_share_the_allowance_and_every_state_change_is_shown() -> None:
    clock = FakeClock()  # frozen: the allowance never refills during the test
    allowance = TickAllowance(5, clock=clock)
    edits = [Edits() for _ in range(20)]
    messages = [ProgressMessage(edit, interval=INTERVAL, ticks=allowance) for edit in edits]
    for second in range(1, 6):
        for message in messages:
            message.update(Progress(ProgressKind.GENERATING, elapsed=float(second), request_id="r"))
        await asyncio.sleep(INTERVAL * 3)
    for message in messages:
        message.update(Progress(ProgressKind.RATE_LIMITED, retry_at=1.0e10))
    await asyncio.sleep(INTERVAL * 3)
    for message in messages:
        await message.finish()
    shown = [text for edit in edits for text in edit.texts]
    # Each message's first line and its last change of state, whatever the allowance says...
    assert all(edit.texts and "Generating" in edit.texts[0] for edit in edits), shown
    assert all("Segmind is busy" in edit.texts[-1] for edit in edits), shown
    # ...and between them, ticks: five in all, the allowance's one second.
    ticks = sum(len(edit.texts) - 2 for edit in edits)
    assert ticks == 5, shown


async def test_without_an_allowance_every_tick_is_shown() -> None:
    edits = Edits()
    message = ProgressMessage(edits, interval=INTERVAL)
    for second in range(1, 4):
        message.update(Progress(ProgressKind.GENERATING, elapsed=float(second), request_id="r"))
        await asyncio.sleep(INTERVAL * 3)
    await message.finish()
    assert len(edits.texts) == 3, edits.texts


async def test_a_moving_place_in_line_only_ticks() -> None:
    clock = FakeClock()
    allowance = TickAllowance(1, clock=clock)
    allowance.take()  # spent
    edits = Edits()
    message = ProgressMessage(edits, interval=INTERVAL, ticks=allowance)
    for position in (9, 8, 7, 6):
        message.update(Progress(ProgressKind.WAITING_FOR_SLOT, position=position))
        await asyncio.sleep(INTERVAL * 3)
    message.update(Progress(ProgressKind.QUEUED, request_id="r"))
    await asyncio.sleep(INTERVAL * 3)
    await message.finish()
    assert len(edits.texts) == 2, edits.texts  # waiting (its first place), then queued
    assert "9th" in edits.texts[0] and "Queued" in edits.texts[1]


async def test_a_loop_running_behind_holds_state_changes_for_the_allowance_and_loses_none() -> None:
    clock = FakeClock()
    behind = {"now": True}
    allowance = TickAllowance(1, clock=clock, loop_behind=lambda: behind["now"])
    allowance.take()  # spent, and frozen: nothing refills while the loop is behind
    edits = Edits()
    message = ProgressMessage(edits, interval=INTERVAL, ticks=allowance)
    message.update(Progress(ProgressKind.QUEUED, request_id="r"))
    await asyncio.sleep(INTERVAL * 4)
    assert edits.texts == []  # held: the loop's time goes to results
    message.update(Progress(ProgressKind.GENERATING, elapsed=1.0, request_id="r"))
    behind["now"] = False
    await asyncio.sleep(INTERVAL * 4)
    await message.finish()
    # Caught up: the latest state is shown, once; the one it replaced needs no edit any more.
    assert len(edits.texts) == 1 and "Generating" in edits.texts[0], edits.texts


async def test_a_job_that_finishes_while_its_change_is_held_costs_no_progress_edit() -> None:
    clock = FakeClock()
    allowance = TickAllowance(1, clock=clock, loop_behind=lambda: True)
    allowance.take()
    edits = Edits()
    message = ProgressMessage(edits, interval=INTERVAL, ticks=allowance)
    message.update(Progress(ProgressKind.GENERATING, elapsed=1.0, request_id="r"))
    await asyncio.sleep(INTERVAL * 3)
    await message.finish()
    assert edits.texts == []


async def test_jobs_begin_one_at_a_time_in_the_order_they_were_started() -> None:
    line = StartLine()
    began: list[int] = []

    async def job(number: int) -> None:
        await line.turn()
        began.append(number)

    tasks = [asyncio.create_task(job(number)) for number in range(50)]
    tasks[10].cancel()  # stopped while waiting: its turn goes to the next one
    await asyncio.gather(*tasks, return_exceptions=True)
    assert began == [number for number in range(50) if number != 10]


async def test_no_job_begins_while_commands_are_being_acknowledged() -> None:
    under_way = True
    line = StartLine(lambda: under_way)
    began = asyncio.Event()

    async def job() -> None:
        await line.turn()
        began.set()

    task = asyncio.create_task(job())
    await asyncio.sleep(0.2)
    assert not began.is_set()
    under_way = False  # the last command is acknowledged
    await asyncio.wait_for(began.wait(), 1.0)
    await task


async def test_under_commands_that_never_stop_a_job_begins_after_its_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery, "COMMANDS_FIRST_SECONDS", 0.3)
    line = StartLine(lambda: True)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    await asyncio.wait_for(line.turn(), 5.0)
    assert loop.time() - asked >= 0.3
