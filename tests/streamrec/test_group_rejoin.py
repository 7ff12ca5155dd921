"""A fresh worker joins a group whose last two workers stopped leader last (issue 19, 15).

On the embedded broker a leader that leaves while its group re-forms stays the group's
leader, and no later member ever gets partitions (``streamrec.kafka.tansu``,
``release_departed_leader``). In the issue a worker frozen past its session timeout lost the
lead to the other one, which was then stopped second; without the freeze the leader stopped
first and a fresh worker joined in 6 s. Here SIGSTOP/SIGCONT order the two stops
deterministically: the leader is frozen while the other worker stops (the group re-forms,
waiting for it), then stopped as it resumes, so it leaves before rejoining. A fresh worker
must then answer clicks on every partition.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_worker_e2e import N_ITEMS, PARTITIONS, Service, click_ids

from streamrec.testing import click
from streamrec.tools.launch import WorkerProcess

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, layers=[16]), seed=1)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    return save_checkpoint(path, model, "gru4rec", [f"i{j}" for j in range(N_ITEMS)]).path


def _wait_log(w: WorkerProcess, pattern: str, timeout: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        text = w.log_path.read_text() if w.log_path.exists() else ""
        m = re.search(pattern, text)
        if m is not None:
            return m
        assert w.proc.poll() is None, text[-3000:]
        assert time.monotonic() < deadline, f"no {pattern!r} in\n{text[-3000:]}"
        time.sleep(0.2)


def test_a_fresh_worker_gets_partitions_after_the_leader_stopped_last(
    isolated_bootstrap: str,
    unique_name: Callable[[str], str],
    checkpoint: Path,
    tmp_path: Path,
    external_broker: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMREC_TEST_WORKER_LOGLEVEL", "INFO")  # the "ready:" lines
    with Service(isolated_bootstrap, unique_name, checkpoint, tmp_path) as svc:
        leader = svc.start_worker()  # the first member of the group leads it
        _wait_log(leader, r"ready: \S+ partitions \[0, 1, 2\]")
        other = svc.start_worker()
        _wait_log(other, r"ready: \S+ partitions \[\d")
        os.kill(leader.pid, signal.SIGSTOP)
        try:
            assert other.stop() == 0  # leaves: the group re-forms, waiting for the leader
        finally:  # the leader wakes to a SIGTERM: it leaves before it rejoins
            os.kill(leader.pid, signal.SIGTERM)
            os.kill(leader.pid, signal.SIGCONT)
        assert leader.proc.wait(60) == 0
        fresh = svc.start_worker()
        # one click per partition: the fresh worker must own them all
        values = [(f"k{j}", click(f"k{j}", f"i{j}", t=time.time())) for j in range(30)]
        svc.produce(values)
        assert {r.partition for r in svc.clicks_in_log()} == set(range(PARTITIONS))
        svc.wait_answered(click_ids(svc), timeout=150)
        if not external_broker:  # the departed leader was there, and was released
            _wait_log(fresh, r"had left while the group re-formed", timeout=5)
