"""CPU time and resident memory of a process, for the benchmarks (psutil does the reading).

Used by the scripts in this folder as ``from procstats import ...`` (a script's own folder is
first on ``sys.path``)."""

from __future__ import annotations

import psutil


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of ``pid`` (this process if None); NaN once it has gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return float("nan")
    return float(t.user + t.system)


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of ``pid`` (this process if None) in MiB; NaN once it has gone."""
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return float("nan")
