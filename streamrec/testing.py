"""Helpers for tests of streamrec and of code built on it (shipped inside the package)."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from streamrec.broker import EmbeddedBroker

TEST_BOOTSTRAP_ENV = "STREAMREC_TEST_BOOTSTRAP"

_counter = itertools.count()


def unique_name(prefix: str = "t") -> str:
    """A topic/group name no other test (or earlier run against the same broker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}-{next(_counter)}"


@contextmanager
def test_broker() -> Iterator[str]:
    """Bootstrap address of the broker named by STREAMREC_TEST_BOOTSTRAP, else an embedded one."""
    external = os.environ.get(TEST_BOOTSTRAP_ENV)
    if external:
        yield external
        return
    with EmbeddedBroker(port=0) as broker:
        yield broker.bootstrap
