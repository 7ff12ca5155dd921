"""The one decision whether a record of the clicks topic is a click to use: :func:`admit`.

The workers' pipeline (:func:`streamrec.serving.pipeline.decode_and_group`) and the archiver
(:mod:`streamrec.loop.archiver`) both call it, so the archive holds exactly the clicks the
workers apply, with the event time they use. In order:

1. decode the value (:func:`streamrec.serving.events.decode`: JSON, fields, absolute time
   bounds);
2. the Kafka key must be the key the body implies (the user id, else the session id;
   ``key_mismatch``; a record without a key only when ``config.require_key`` is off);
3. the record must be on the partition the producers' partitioner gives its key
   (``wrong_partition``; :class:`~streamrec.serving.input_topic.InputTopic`);
4. the event time (body time, else the record's CreateTime, else its arrival) must be in
   range for the partition's clock (``timestamp_out_of_range``;
   :class:`~streamrec.serving.clock.StreamClock`, which an admitted click votes in).

Why a record on the wrong partition is dead-lettered and not routed to its partition: the
state of a key lives in one partition and its events apply in offset order there. Routing
would publish the click again at a later offset of another partition, after clicks of the
key that came later on the right one (per-key order lost), and the copy and the commit of
the original are two writes a crash can separate (the copy published twice, or never),
which effectively-once state cannot tell apart without an event id. A dead letter keeps the
bytes; the producer's partitioner is the thing to fix (``topics.partitioner``).
"""

from __future__ import annotations

from streamrec.serving.clock import StreamClock
from streamrec.serving.config import CoreConfig
from streamrec.serving.events import ClickEvent, DeadLetter, decode, make_dead_letter
from streamrec.serving.input_topic import InputTopic
from streamrec.serving.records import Record
from streamrec.serving.state import state_key

#: an admitted click: the event, its state key, its event time
Admitted = tuple[ClickEvent, str, float]


def _refuse(rec: Record, reason: str, detail: str) -> DeadLetter:
    return make_dead_letter(
        rec.value,
        reason,
        detail,
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
    )


def admit(
    rec: Record,
    config: CoreConfig,
    clock: StreamClock,
    topic: InputTopic | None,
    now: float,
) -> Admitted | DeadLetter:
    """The click in ``rec`` with its state key and event time, or the dead letter that says
    why it is not one. ``now`` is the arrival of a record without ``received_at``."""
    ev = decode(
        rec.value,
        max_bytes=config.max_message_bytes,
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
    )
    if isinstance(ev, DeadLetter):
        return ev
    body_key = ev.user_id if ev.user_id is not None else ev.session_id
    if rec.key is None:
        if config.require_key:
            return _refuse(
                rec, "key_mismatch", f"message has no key; the body implies {body_key!r}"
            )
    elif rec.key != body_key.encode():
        return _refuse(rec, "key_mismatch", f"key {rec.key[:80]!r} is not the body's {body_key!r}")
    elif topic is not None:
        want = topic.partition_of(rec.key)
        if want is not None and want != rec.partition:
            return _refuse(
                rec,
                "wrong_partition",
                f"key {rec.key[:80]!r} belongs to partition {want} ({topic.partitioner} of "
                f"{topic.partitions}), not {rec.partition}",
            )
    arrival = rec.received_at if rec.received_at is not None else now
    created = rec.timestamp if rec.timestamp is not None and rec.timestamp > 0 else None
    if ev.timestamp is not None:
        t = ev.timestamp
    elif created is not None:
        t = created  # Kafka CreateTime: checked the same way
    else:
        t = arrival
    if not (t == t and abs(t) < 1e15):  # a CreateTime can be anything
        return _refuse(rec, "timestamp_out_of_range", f"record time {t!r}")
    key = state_key(ev.user_id, ev.session_id)
    why = clock.check(rec.partition, key, t, arrival, created)
    if why is not None:
        return _refuse(rec, "timestamp_out_of_range", why)
    return ev, key, t
