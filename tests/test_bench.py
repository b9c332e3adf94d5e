"""The benchmark (`python -m devtools.bench --quick`) runs to the end and prints its tables.

Only that it works: its figures are timings, which belong in the README, not in assertions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devtools.bench.compare import COMPARE_HEADERS
from devtools.bench.report import FIT_HEADERS, SHUTDOWN_HEADERS, header_line

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
