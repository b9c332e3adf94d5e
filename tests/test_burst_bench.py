"""The burst benchmark runs end to end on a handful of commands, and its figures add up."""

from __future__ import annotations

import gc
import math

from devtools.bench.burst import (
    _driver_collector_paused,
    burst_table,
    measure_burst,
    measure_burst_in_a_fresh_driver,
)

QUICK_SEGMIND = {"queue_seconds": 0.2, "seconds_per_step": 0.01, "workers": 20}


async def test_a_small_burst_is_measured_whole() -> None:
    figures = await measure_burst(5, bot_env={"SEGMIND_MAX_POLL_SECONDS": "1"}, segmind=QUICK_SEGMIND)
    assert (figures.store, figures.commands, figures.delivered, figures.failed) == ("SQLite", 5, 5, 0)
    assert 0 < figures.ack_p50 <= figures.ack_p99 <= figures.ack_max
    assert figures.cpu_per_job > 0 and figures.peak_rss > 10 * 2**20
    assert math.isfinite(figures.delivery_lag_mean) and figures.delivery_lag_mean >= 0
    # Each job was checked at least once, at its status URL or (on a busy loop) at its result URL.
    assert figures.status_polls_per_job + figures.results_per_job >= 1
    table = burst_table([figures]).markdown()
    assert "| SQLite | 5 in " in table and "5 (0)" in table


async def test_a_burst_measured_in_a_driver_of_its_own_comes_back_whole() -> None:
    figures = await measure_burst_in_a_fresh_driver(
        4, bot_env={"SEGMIND_MAX_POLL_SECONDS": "1"}, segmind=QUICK_SEGMIND
    )
    assert (figures.commands, figures.delivered, figures.failed) == (4, 4, 0)
    assert 0 < figures.ack_p50 <= figures.ack_p99 and figures.cpu_per_job > 0


def test_the_driver_does_not_collect_garbage_while_a_burst_is_timed() -> None:
    assert gc.isenabled()
    with _driver_collector_paused():
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0  # what the stand-ins hold before the burst is left out
    assert gc.isenabled() and gc.get_freeze_count() == 0
