"""The benchmark (`python -m devtools.bench --quick`) runs to the end and prints its tables.

That it works, and how repeated runs are reported: its figures are timings, which belong in the README,
not in assertions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devtools.bench.burst import BurstFigures
from devtools.bench.compare import COMPARE_HEADERS
from devtools.bench.report import FIT_HEADERS, SHUTDOWN_HEADERS, Table, header_line
from devtools.bench.run import add_burst

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_exits_zero_and_prints_every_table() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "devtools.bench", "--quick"],
        check=False,  # the exit status is asserted below, with the output
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert finished.returncode == 0, f"stdout:\n{finished.stdout}\nstderr:\n{finished.stderr[-4000:]}"
    for headers in (COMPARE_HEADERS, FIT_HEADERS, SHUTDOWN_HEADERS):
        assert header_line(headers) in finished.stdout, finished.stdout


def _burst(cpu: float, failed: int = 0) -> BurstFigures:
    return BurstFigures(
        store="SQLite",
        commands=1000,
        delivered=1000 - failed,
        failed=failed,
        ack_p50=0.002,
        ack_p99=0.02,
        ack_max=0.03,
        sent_over=1.0,
        longest_stall=0.03,
        stall_warnings=3,
        cpu_per_job=cpu,
        peak_rss=140 * 2**20,
        delivery_lag_mean=0.3,
        delivery_lag_p95=0.6,
        progress_edits_per_job=1.3,
        status_polls_per_job=5.0,
        results_per_job=1.2,
        driver_lag_max=0.01,
        driver_cpu_share=0.25,
        others_cpu_share=0.0,
    )


def test_repeated_bursts_show_the_median_run_and_list_every_run() -> None:
    table = Table("t", COMPARE_HEADERS)
    add_burst(table, [_burst(0.011), _burst(0.0095, failed=2), _burst(0.0088)], [_burst(0.012)] * 3)
    cpu = next(row for row in table.rows if row[1] == "bot CPU per job")
    assert cpu[3] == "9.5 ms" and cpu[2] == "12.0 ms"
    failed = next(row for row in table.rows if row[1] == "jobs failed")
    assert failed[3] == "2"  # the median run's own figures, not a mix of runs
    listed = next(note for note in table.notes if "median CPU per job" in note)
    assert "11.0 ms" in listed and "8.8 ms" in listed
