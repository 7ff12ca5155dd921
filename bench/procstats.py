"""What a benchmark records about its run: CPU time and resident memory of a process (psutil
does the reading), and the machine/date/load line its results file starts with.

Used by the scripts in this folder as ``from procstats import ...`` (a script's own folder is
first on ``sys.path``)."""

from __future__ import annotations

import os
import time

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


def machine_line(
    load_start: tuple[float, float, float] | None = None,
    load_end: tuple[float, float, float] | None = None,
) -> str:
    """``Machine: ... Date: ... Load average ...`` for a results file, from this machine (CPU
    count, accelerator, torch version) and the load average at the start and the end of the
    run (end: now unless given): how busy the host was is measured, not assumed."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    end = load_end if load_end is not None else os.getloadavg()
    load = f"at end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}"
    if load_start is not None:
        s = load_start
        load = f"at start {s[0]:.1f}/{s[1]:.1f}/{s[2]:.1f}, {load}"
    return (
        f"Machine: {os.cpu_count()}-vCPU {os.uname().machine}, {device}, torch "
        f"{torch.__version__}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Load average (1/5/15 min) {load}"
    )


def append_run(
    path: os.PathLike[str] | str | None,
    record: dict[str, object],
    load_start: tuple[float, float, float],
) -> None:
    """Add the machine line and the date to ``record``, print it, and append it to the JSON
    Lines file ``path`` (when one is given): one run, one line."""
    import json

    record = {
        **record,
        "machine": machine_line(load_start),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(record))
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
