"""The departed-leader repair (streamrec.kafka.tansu.JoinWatch) is an embedded-broker
workaround: on Apache Kafka its probe would only cost the group one more rebalance."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.loop.archiver import Archiver


@pytest.mark.parametrize("broker", ["kafka", "embedded"])
def test_the_archiver_watches_its_group_on_the_embedded_broker_only(
    broker: str, tmp_path: Path
) -> None:
    # nothing listens there: the consumer is built, never connected
    conf = {"bootstrap.servers": "127.0.0.1:9", "streamrec:broker": broker}
    archiver = Archiver(conf, "clicks", str(tmp_path))
    try:
        watch = archiver.join_watch
        assert watch.enabled == (broker == "embedded")
        if not watch.enabled:  # however long it waits, no repair starts
            watch.after_s = 0.0
            watch.waiting()
            watch.check()
            assert watch._thread is None and not watch.released
    finally:
        archiver.consumer.close()
