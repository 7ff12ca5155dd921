"""A minimal Faust worker for the foundation tests: sums values per key in a RocksDB table.

Run as a process: python tests/streamrec/apps/faust_counter.py, configured by environment variables.
Uses the settings the broker notes say Tansu needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import faust

from streamrec.engines.faust import compat as faust_compat
from streamrec.kafka.clients import end_reader

faust_compat.install(end_reader({"bootstrap.servers": os.environ["COUNTER_BOOTSTRAP"]}))

app = faust.App(
    os.environ["COUNTER_APP_ID"],
    broker=f"kafka://{os.environ['COUNTER_BOOTSTRAP']}",
    store="rocksdb://",
    datadir=Path(os.environ["COUNTER_DATA_DIR"]),
    processing_guarantee="at_least_once",
    topic_partitions=2,
    topic_replication_factor=1,
    broker_session_timeout=6,
    broker_heartbeat_interval=1,
    recovery_consistency_check=False,
    consumer_auto_offset_reset="earliest",
    broker_commit_interval=0.5,
    web_enabled=False,
)

# faust decodes value_type=int (serializers.Registry._prepare_payload); its annotation omits it
source = app.topic(
    os.environ["COUNTER_IN"],
    key_type=str,
    value_type=int,  # type: ignore[arg-type]  # see above
    partitions=2,
)
sink = app.topic(
    os.environ["COUNTER_OUT"],
    key_type=str,
    value_type=int,  # type: ignore[arg-type]  # see above
    partitions=2,
)
#: key -> [total, offset of the last input applied]. The offset makes the count idempotent:
#: at-least-once delivery redelivers inputs after a rebalance or a restart, and a redelivered
#: input must not be counted twice (the same rule as streamrec's session states).
totals = app.Table("totals", default=lambda: [0, -1], partitions=2)


@app.agent(source)
async def count(stream: faust.StreamT) -> None:
    async for event in stream.events():
        key, value, offset = event.key, event.value, event.message.offset
        total, last = totals[key]
        if offset > last:  # a key's inputs all live in one partition
            total += value
            totals[key] = [total, offset]
        await sink.send(key=key, value=total)


if __name__ == "__main__":
    faust.Worker(app, loglevel="WARNING").execute_from_commandline()
