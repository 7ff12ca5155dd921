"""A pytest plugin for ``make mutation``: mutmut 3.7 (the last release that accepts the click
that faust-streaming pins) reads ``item._nodeid``, which pytest 9 no longer sets."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not hasattr(item, "_nodeid"):
            item._nodeid = item.nodeid  # type: ignore[attr-defined]  # what mutmut 3.7 reads
