from __future__ import annotations

import os
from collections.abc import Callable, Iterator

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


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
