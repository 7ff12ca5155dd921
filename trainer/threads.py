"""How many torch threads training uses on the CPU.

torch's own default is one thread per core. On cores that other processes keep busy its
threads wait for each other at every small GRU step: on a busy 2-core machine `trainer train`
ran 16-19x slower with 2 threads than with 1 (bench/results/train-threads.md). The default
(``auto``) therefore takes only the cores the load average leaves idle, at least one and at
most torch's own default; an explicit ``--threads`` or ``OMP_NUM_THREADS`` wins.
"""

from __future__ import annotations

import math
import os

import torch


def idle_cores(load1: float | None = None) -> int:
    """The cores the 1-minute load average leaves idle (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if load1 is None else load1
    return max(1, math.floor((cores or 1) - load + 0.5))


def choose_threads(requested: int | None, load1: float | None = None) -> int:
    """``requested`` if given; torch's own choice if ``OMP_NUM_THREADS`` is set; else the
    idle cores, capped at torch's default."""
    if requested is not None:
        return max(1, requested)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return min(torch.get_num_threads(), idle_cores(load1))


def use_threads(requested: int | None) -> int:
    """Set torch's intra-op threads for this process (see :func:`choose_threads`)."""
    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n
