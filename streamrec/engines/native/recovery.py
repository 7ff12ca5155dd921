"""Changelog recovery of the native worker's partitions.

State follows partitions through the changelog topic ``{app_id}-state-changelog`` (one
partition per clicks partition, keys ``s/<key>`` and ``u/<key>``, deletes as tombstones): a
newly assigned partition replays the changelog from the offset its local database holds
(everything, after a lost disk) to the end.

The changelog is input like any other: a record whose key is no state key of this layout is
skipped and counted (``RecoveryTally``; the worker dead-letters the first of them,
``changelog_record``), and recovery goes on; only a changelog of the old
layout and nothing else, replayed into an empty partition, is refused (a real layout-1
store). A record's state is not checked here: its position is judged where it could do harm,
when a click meets it (``streamrec.serving.input_topic``: incarnation and end bound).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import TopicPartition

from streamrec.engines.native.store import RocksDBPartition
from streamrec.kafka import clients
from streamrec.serving.state_store import ChangelogRecord
from streamrec.settings import Settings

RECOVERY_MAX_S = 600.0


def changelog_topic(settings: Settings) -> str:
    return f"{settings.worker.app_id}-state-changelog"


def recovery_group(settings: Settings) -> str:
    """The changelog reader's group (of its own, never committed)."""
    return f"{settings.worker.app_id}-recovery"


def recover(
    conf: Mapping[str, Any], group: str, changelog: str, partitions: Iterable[RocksDBPartition]
) -> int:
    """Replay each partition's changelog from the offset its database holds to the end;
    returns the number of records applied (each partition's ``tally`` has the skipped ones).
    ``conf`` is the worker's client configuration. Raises ``StateLayoutError`` for a
    changelog of the old layout only."""
    by_partition = {s.partition: s for s in partitions}
    total = _replay(conf, group, changelog, by_partition)
    for state in by_partition.values():
        where = f"{changelog} partition {state.partition}"
        state.tally.check_layout(where, state.held_state)
    return total


def _replay(
    conf: Mapping[str, Any], group: str, changelog: str, by_partition: dict[int, RocksDBPartition]
) -> int:
    reader = clients.consumer(
        conf,
        group,
        fixed={"enable.auto.commit": False},
        site={"fetch.wait.max.ms": 10, "log_level": 3},
    )
    try:
        reader.list_topics(changelog, timeout=30)  # connect before timing anything
        assign, ends = [], {}
        for p, state in by_partition.items():
            low, high = reader.get_watermark_offsets(TopicPartition(changelog, p), timeout=30)
            if high <= 0:
                continue  # empty changelog partition
            start = max(state.changelog_offset + 1, low)
            assign.append(TopicPartition(changelog, p, start))
            ends[p] = high
        if not assign:
            return 0
        # the reported ends can be short of the log's end on the embedded broker
        true_ends = clients.true_end_offsets(conf, {(changelog, p): e for p, e in ends.items()})
        ends = {p: true_ends[(changelog, p)] for p in ends}
        reader.assign(assign)
        reached = {tp.partition: tp.offset >= ends[tp.partition] for tp in assign}
        total = 0
        t0 = time.monotonic()
        while not all(reached.values()):
            if time.monotonic() - t0 > RECOVERY_MAX_S:
                raise TimeoutError(f"changelog recovery took over {RECOVERY_MAX_S} s")
            batch: dict[int, list[ChangelogRecord]] = defaultdict(list)
            for m in reader.consume(10_000, 0.1):
                if m.error() is not None:
                    continue
                part, offset = m.partition(), m.offset()
                assert part is not None and offset is not None  # set on consumed records
                batch[part].append((m.key(), m.value(), offset))
            for p, records in batch.items():
                total += by_partition[p].recover(records)
                reached[p] = reached[p] or records[-1][2] + 1 >= ends[p]
        return total
    finally:
        reader.close()
