"""What a running process has used, read from /proc (Linux): the benchmark's bot is a child process."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far; 0 where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Counted after the ")" that ends the command name: utime and stime are fields 14 and 15 (man proc).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss(pid: int) -> int:
    """The largest resident set so far (VmHWM), in bytes; 0 where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has been busy (user, nice, system, irq, softirq, steal)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / CLOCK_TICKS
