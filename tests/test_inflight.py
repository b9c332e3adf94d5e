"""The in-flight gate: how many requests go to Segmind at once, who goes next, and how the limit moves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from services.request import GenerationRequest
from services.segmind import Priority, RequestBudget, SegmindClient
from services.segmind.errors import BudgetExhausted
from services.segmind.inflight import InFlightGate
from services.segmind.transport import GATE_GRACE_SECONDS


async def hold(
    gate: InFlightGate, priority: Priority, order: list[str], name: str, release: asyncio.Event
) -> None:
    async with gate.slot(priority):
        order.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_more_than_the_limit_are_in_flight_at_once() -> None:
    gate = InFlightGate(3, least=1)
    release = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(hold(gate, Priority.STATUS, order, str(n), release)) for n in range(10)]
    await settle()
    assert len(order) == 3 and gate.in_flight == 3 and gate.waiting == 7
    release.set()
    await asyncio.gather(*tasks)
    assert len(order) == 10 and gate.in_flight == 0 and gate.waiting == 0


async def test_a_finished_jobs_result_goes_before_checks_and_submits_that_waited_longer() -> None:
    gate = InFlightGate(1, least=1)
    first, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []
    busy = asyncio.create_task(hold(gate, Priority.STATUS, order, "busy", first))
    await settle()
    waiting = []
    for name, priority in [
        ("submit", Priority.SUBMIT),
        ("status 1", Priority.STATUS),
        ("result", Priority.RESULT),
        ("status 2", Priority.STATUS),
        ("images", Priority.IMAGES),
    ]:
        waiting.append(asyncio.create_task(hold(gate, priority, order, name, release)))
        await settle()
    release.set()
    first.set()
    await asyncio.gather(busy, *waiting)
    assert order == ["busy", "images", "result", "status 1", "status 2", "submit"]


async def test_the_pressure_says_how_many_wait_for_each_slot() -> None:
    gate = InFlightGate(2, least=1)
    release = asyncio.Event()
    order: list[str] = []
    assert gate.pressure() == 0.0
    tasks = [asyncio.create_task(hold(gate, Priority.STATUS, order, str(n), release)) for n in range(3)]
    await settle()
    assert gate.pressure() == 0.5
    tasks += [asyncio.create_task(hold(gate, Priority.STATUS, order, str(n), release)) for n in range(3, 8)]
    await settle()
    assert gate.pressure() == 1.0
    release.set()
    await asyncio.gather(*tasks)
    assert gate.pressure() == 0.0


async def test_a_caller_that_gives_up_while_waiting_takes_no_slot() -> None:
    gate = InFlightGate(1, least=1)
    first, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []
    busy = asyncio.create_task(hold(gate, Priority.STATUS, order, "busy", first))
    await settle()
    quitter = asyncio.create_task(hold(gate, Priority.RESULT, order, "quitter", release))
    stayer = asyncio.create_task(hold(gate, Priority.SUBMIT, order, "stayer", release))
    await settle()
    quitter.cancel()
    await settle()
    assert gate.waiting == 1
    first.set()
    release.set()
    await asyncio.gather(busy, stayer)
    assert order == ["busy", "stayer"] and gate.in_flight == 0


async def test_a_caller_cancelled_as_it_is_let_in_passes_its_slot_on() -> None:
    gate = InFlightGate(1, least=1)
    first, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []
    busy = asyncio.create_task(hold(gate, Priority.STATUS, order, "busy", first))
    await settle()
    unlucky = asyncio.create_task(hold(gate, Priority.RESULT, order, "unlucky", release))
    after = asyncio.create_task(hold(gate, Priority.SUBMIT, order, "after", release))
    await settle()
    # The slot is handed to `unlucky` and, before it runs again, it is cancelled.
    first.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    unlucky.cancel()
    release.set()
    await asyncio.gather(busy, after)
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert "after" in order and gate.in_flight == 0 and gate.waiting == 0


async def test_the_limit_shrinks_once_per_stall_and_grows_back_only_when_used() -> None:
    gate = InFlightGate(20, least=4, most=30, target=0.02)
    gate.adapt(0.05)
    assert gate.limit == 16
    # The same stall, still read late for a few ticks (the lateness is smoothed): one cut is enough.
    gate.adapt(0.04)
    gate.adapt(0.03)
    assert gate.limit == 16
    for _ in range(20):  # stall after stall
        gate.adapt(0.0)
        gate.adapt(0.05)
    assert gate.limit == 4
    # On time, but nothing waits and the slots are not used: no reason to allow more.
    gate.adapt(0.0)
    assert gate.limit == 4

    release = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(hold(gate, Priority.STATUS, order, str(n), release)) for n in range(6)]
    await settle()
    assert len(order) == 4
    gate.adapt(0.0)
    await settle()
    # One more allowed, and the longest waiter let in at once.
    assert gate.limit == 5 and order == ["0", "1", "2", "3", "4"]
    for _ in range(100):
        gate.adapt(0.0)
    await settle()
    assert gate.limit == 6  # all six are in; the limit follows what is used, not what could be
    release.set()
    await asyncio.gather(*tasks)


def test_limits_that_cannot_hold_are_refused() -> None:
    for limit, least, most in [(0, 1, 4), (2, 3, 4), (5, 1, 4)]:
        with pytest.raises(ValueError, match="limits"):
            InFlightGate(limit, least=least, most=most)


async def test_a_client_sends_no_more_requests_at_once_than_its_gate_allows_over_real_sockets() -> None:
    slow = 0.3
    async with stand_in_client() as (server, client):
        # Every submit takes `slow` seconds to answer: with two allowed at once, six go in three waves.
        server.inject("slow", count=6, target="submit", seconds=slow)
        client.in_flight.limit = client.in_flight.least = 2
        requests = [GenerationRequest(prompt=f"at once {n}", img_width=512, img_height=512) for n in range(6)]
        jobs = await asyncio.gather(*(client.submit(request) for request in requests))
    assert len({job.request_id for job in jobs}) == 6
    arrivals = sorted(record.time for record in server.stats.requests_to("submit"))
    waves = [arrivals[n] - arrivals[0] for n in (1, 2, 4)]
    assert waves[0] < slow / 2 and waves[1] >= slow * 0.9 and waves[2] >= 2 * slow * 0.9, waves


@contextlib.asynccontextmanager
async def stand_in_client() -> AsyncIterator[tuple[SegmindServer, SegmindClient]]:
    """The Segmind stand-in and a client of it with a budget that never runs short."""
    server = SegmindServer(SegmindServerSettings())
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield (
                server,
                SegmindClient(session, api_key="key", base_url=server.base_url, budget=RequestBudget(10_000)),
            )
    finally:
        await server.stop()


async def hold_the_only_slot(client: SegmindClient, release: asyncio.Event) -> asyncio.Task[None]:
    """Leaves the client one slot at the gate, held (by a download, say) until `release` is set."""
    client.in_flight.limit = client.in_flight.least = 1

    async def download() -> None:
        async with client.in_flight.slot(Priority.IMAGES):
            await release.wait()

    holder = asyncio.create_task(download())
    await settle()
    return holder


async def test_a_submit_that_cannot_get_through_the_gate_in_time_is_not_sent() -> None:
    async with stand_in_client() as (server, client):
        client.in_flight.limit = client.in_flight.least = 1
        async with client.in_flight.slot(Priority.IMAGES):  # a long download holds the only slot
            with pytest.raises(BudgetExhausted) as refused:
                await client.submit(GenerationRequest(prompt="in time or not at all"), max_wait=0.3)
        # Counted for its room while it waited, and no longer once it gave up.
        assert client._sending == 0
    assert refused.value.reset_at is not None
    assert server.stats.requests_to("submit") == []


async def test_a_submit_waiting_at_the_gate_already_counts_for_the_room_its_checks_will_need() -> None:
    async with stand_in_client() as (_server, client):
        release = asyncio.Event()
        holder = await hold_the_only_slot(client, release)
        sending = asyncio.create_task(client.submit(GenerationRequest(prompt="waits at the gate")))
        await asyncio.sleep(0.1)
        assert client.budget.follow_ups() > 0  # the next submit leaves room for this one's checks
        release.set()
        job = await sending
        await holder
    assert job.request_id


async def test_a_request_that_waited_at_the_gate_is_counted_again_when_it_leaves() -> None:
    async with stand_in_client() as (_server, client):
        release = asyncio.Event()
        holder = await hold_the_only_slot(client, release)
        sending = asyncio.create_task(client.submit(GenerationRequest(prompt="late")))
        await asyncio.sleep(GATE_GRACE_SECONDS + 0.2)
        release.set()
        await sending
        await holder
    # Granted once, counted twice: at its grant, and when it finally left, as Segmind counts it.
    assert len(client.budget._sent) == 2


async def test_while_a_command_is_acknowledged_a_submit_waits_and_a_status_check_goes() -> None:
    async with stand_in_client() as (server, client):
        running = await client.submit(GenerationRequest(prompt="already at Segmind"))
        with client.in_flight.foreground():
            sending = asyncio.create_task(client.submit(GenerationRequest(prompt="sent after the ack")))
            await asyncio.sleep(0.05)
            await client.status(running)  # a free slot: the held submit does not block the check
            assert not sending.done() and len(server.stats.submits) == 1
            # Held by choice, not for want of room: the gate is under no pressure.
            assert client.in_flight.pressure() == 0
            # Past its hold the submit goes, even with the command still under way.
            job = await asyncio.wait_for(sending, 1.0)
    assert job.request_id and len(server.stats.submits) == 2
    # Held within the budget's grace: counted once, at its grant (3 requests, 3 counts).
    assert len(client.budget._sent) == 3


async def test_a_submit_goes_once_every_command_under_way_is_acknowledged() -> None:
    gate = InFlightGate(4, least=1)
    release = asyncio.Event()
    order: list[str] = []
    first, second = gate.foreground(), gate.foreground()
    first.__enter__()
    second.__enter__()
    submit = asyncio.create_task(hold(gate, Priority.SUBMIT, order, "submit", release))
    status = asyncio.create_task(hold(gate, Priority.STATUS, order, "status", release))
    await settle()
    assert order == ["status"]
    first.__exit__(None, None, None)
    await settle()
    assert order == ["status"]
    second.__exit__(None, None, None)
    await settle()
    assert order == ["status", "submit"]
    release.set()
    await asyncio.gather(submit, status)
    assert gate.in_flight == 0 and gate.waiting == 0


async def test_under_commands_that_overlap_without_a_break_a_submit_is_held_its_most_and_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.segmind.inflight.SUBMIT_HOLD_SECONDS", 0.1)
    gate = InFlightGate(4, least=1)
    release = asyncio.Event()
    order: list[str] = []

    async def command() -> None:
        with gate.foreground():
            await asyncio.sleep(0.05)

    commands = [asyncio.create_task(command())]
    await settle()
    started = time.monotonic()
    submit = asyncio.create_task(hold(gate, Priority.SUBMIT, order, "submit", release))
    async with asyncio.timeout(1):
        while not order:
            commands.append(asyncio.create_task(command()))
            await asyncio.sleep(0.02)
    # A timer may run a millisecond early (uvloop's clock counts whole milliseconds).
    assert 0.1 - 0.002 <= time.monotonic() - started < 0.2
    release.set()
    await asyncio.gather(submit, *commands)
    assert gate.in_flight == 0 and gate.waiting == 0


async def test_a_held_submit_that_gives_up_leaves_nothing_behind() -> None:
    gate = InFlightGate(4, least=1)
    release = asyncio.Event()
    order: list[str] = []
    with gate.foreground():
        submit = asyncio.create_task(hold(gate, Priority.SUBMIT, order, "gave up", release))
        await settle()
        submit.cancel()
        await settle()
        status = asyncio.create_task(hold(gate, Priority.STATUS, order, "status", release))
        await settle()
    assert order == ["status"] and gate.waiting == 0 and gate.pressure() == 0
    release.set()
    await status
    assert gate.in_flight == 0


async def test_a_hold_ending_sooner_than_the_loop_can_time_lets_every_submit_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The end of any hold: what is left of it is less than a millisecond, which uvloop cannot time.
    monkeypatch.setattr("services.segmind.inflight.SUBMIT_HOLD_SECONDS", 0.0002)
    gate = InFlightGate(4, least=1)

    async def submit(order: list[str], all_in: asyncio.Event, release: asyncio.Event) -> None:
        async with gate.slot(Priority.SUBMIT):
            order.append("submit")
            if len(order) == 3:
                all_in.set()
            await release.wait()

    for _ in range(30):
        order: list[str] = []
        all_in, release = asyncio.Event(), asyncio.Event()
        with gate.foreground():
            submits = [asyncio.create_task(submit(order, all_in, release)) for _ in range(3)]
            await asyncio.wait_for(all_in.wait(), 1)
        release.set()
        await asyncio.gather(*submits)
        assert gate.in_flight == 0 and gate.waiting == 0
