from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Tests run brokers and worker processes beside the model on a small machine: one intra-op
# thread per process avoids OpenMP oversubscription (7x slower training when cores are busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from streamrec.testing import TEST_BOOTSTRAP_ENV, test_broker
from streamrec.testing import unique_name as _unique_name

try:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a dependency
    HAS_CUDA = False


GPU_SKIP_REASON = "needs CUDA (runs on the GPU machine)"
#: set to 1 to report unexpected skips without failing (e.g. against another broker)
ALLOW_SKIPS_ENV = "STREAMREC_TEST_ALLOW_SKIPS"
_skips: list[tuple[str, str, bool]] = []  # (test id, reason, expected)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember every skip with its reason; only the GPU tests' skip (no CUDA) is expected."""
    if not report.skipped or report.when == "teardown":
        return
    if hasattr(report, "wasxfail"):
        reason = f"xfail: {report.wasxfail}"
    elif isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    else:
        reason = str(report.longrepr)
    expected = "gpu" in report.keywords and reason == GPU_SKIP_REASON and not HAS_CUDA
    _skips.append((report.nodeid, reason, expected))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the reason of every skip; say which ones fail the run."""
    if not _skips:
        return
    terminalreporter.section("skips")
    for nodeid, reason, expected in _skips:
        mark = "expected" if expected else "UNEXPECTED"
        terminalreporter.write_line(f"{mark}: {nodeid}: {reason}")
    bad = sum(not e for _, _, e in _skips)
    if bad and not os.environ.get(ALLOW_SKIPS_ENV):
        terminalreporter.write_line(
            f"{bad} unexpected skip(s) fail the run (only GPU tests may skip; "
            f"{ALLOW_SKIPS_ENV}=1 allows them)",
            red=True,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if (
        exitstatus == pytest.ExitCode.OK
        and any(not e for _, _, e in _skips)
        and not os.environ.get(ALLOW_SKIPS_ENV)
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """One broker for the whole test session: the embedded Tansu, or $STREAMREC_TEST_BOOTSTRAP."""
    with test_broker() as bootstrap:
        yield bootstrap


@pytest.fixture
def isolated_bootstrap() -> Iterator[str]:
    """A broker of the test's own: a fresh embedded Tansu, or $STREAMREC_TEST_BOOTSTRAP.

    For the restart and recovery tests: on a Tansu that earlier tests have filled with topics
    and groups, a worker restarted after a crash sometimes never resumed one partition (and a
    Faust restart lost one output), while the same tests pass every time on a fresh broker.
    """
    with test_broker() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def external_broker() -> bool:
    return bool(os.environ.get(TEST_BOOTSTRAP_ENV))


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Callable giving a unique topic or group name per call."""
    return _unique_name


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test of tiny models, even when OMP_NUM_THREADS asks for more
    than the suite's default: threads only add contention on a small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def trained_hrnn(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A checkpoint of a small HRNN trained for a second on a synthetic user log
    (``tests/streamrec/hier_stream.py``): its user path changes the scores."""
    from hier_stream import train_small_hrnn  # tests/streamrec is on sys.path for its tests

    return train_small_hrnn(tmp_path_factory.mktemp("hrnn") / "ckpt")
