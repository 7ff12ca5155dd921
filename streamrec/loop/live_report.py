"""What the live metrics topic says: every worker's counts, added up per arm and version.

The workers publish :class:`~streamrec.serving.live.LiveRecord` s (``streamrec.engines.live``);
this module reads them back (a fresh read from offset 0, the reliable way on the embedded
broker) and adds them up, each record once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from streamrec.kafka.clients import read_topic
from streamrec.serving.live import LiveCounts, LiveRecord, aggregate

log = logging.getLogger(__name__)


def read_live_records(
    conf: dict[str, Any], topic: str, *, app_id: str | None = None, idle_timeout: float = 1.0
) -> list[LiveRecord]:
    """Every live metrics record on ``topic`` (of ``app_id`` when given), in publication
    order per partition; records that do not parse are logged and left out."""
    out = []
    for msg in read_topic(conf, topic, idle_timeout=idle_timeout):
        try:
            rec = LiveRecord.from_json(msg.value())
        except ValueError as exc:
            log.warning("%s:%d:%d: %s", topic, msg.partition(), msg.offset(), exc)
            continue
        if app_id is None or rec.app_id == app_id:
            out.append(rec)
    return out


def live_totals(records: Iterable[LiveRecord]) -> dict[tuple[str, str], LiveCounts]:
    """The counts by (arm, model version), each record once."""
    return aggregate(records)


def counted_through(records: Iterable[LiveRecord]) -> dict[int, int]:
    """Per input partition, the last offset whose clicks are counted."""
    out: dict[int, int] = {}
    for r in records:
        out[r.partition] = max(out.get(r.partition, -1), r.through)
    return out


def wait_counted(
    conf: dict[str, Any],
    topic: str,
    last_offsets: Mapping[int, int],
    *,
    app_id: str | None = None,
    timeout: float = 60.0,
) -> list[LiveRecord]:
    """The records once every input partition is counted up to its offset in
    ``last_offsets`` (the last click sent there); TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_live_records(conf, topic, app_id=app_id)
        through = counted_through(records)
        behind = {p: o for p, o in last_offsets.items() if through.get(p, -1) < o}
        if not behind:
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{topic}: partitions {sorted(behind)} not counted up to {behind} within "
                f"{timeout:.0f} s (counted up to {through})"
            )
        time.sleep(0.5)
