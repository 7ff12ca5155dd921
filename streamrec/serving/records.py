"""The record types of the serving path: what comes in (:class:`Record`), what goes out
(:class:`Recommendation`, one per click), and what a batch or a sweep returns
(:class:`BatchResult`, :class:`SweepResult`).

A :class:`Recommendation` is written to the recommendations topic as JSON
(:meth:`Recommendation.to_json`, the bytes of ``json.dumps`` of its fields in declaration
order) and read back by every consumer of that topic through :meth:`Recommendation.from_json`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from streamrec.serving.events import DeadLetter
from streamrec.serving.live import Evaluation


@dataclass
class Record:
    """One consumed message. ``timestamp``/``received_at`` are epoch seconds."""

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = 0
    offset: int = -1
    timestamp: float | None = None
    received_at: float | None = None


def _make_json_encoder() -> Callable[[Any, int], Sequence[str]]:
    """json.dumps' own C encoder with its default settings, built once: json.dumps builds
    one per call. No circular-reference check (a recommendation holds no containers of its
    own). Falls back to json.dumps where the C accelerator is missing."""
    from json import encoder as je

    # CPython always has the C accelerator; typeshed does not declare c_make_encoder
    if je.c_make_encoder is None:  # type: ignore[attr-defined]  # pragma: no cover
        return lambda obj, _level: (json.dumps(obj),)
    d = json.JSONEncoder()
    return je.c_make_encoder(  # type: ignore[attr-defined]  # not in typeshed, as above
        None, d.default, je.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )


#: obj, 0 -> the chunks of ``json.dumps(obj)``
_json_chunks = _make_json_encoder()


def event_click_id(state_key: str, event_id: str) -> str:
    """The ``click_id`` of a click that carries an ``event_id``: its state key (``u:<user
    id>``, ``a:<session id>``; ``%`` and ``/`` percent-escaped), ``/``, the event id. Unique
    per key: two users sending the same event id get two click ids (a consumer that drops
    repeats by click id keeps both), and no key can forge another's (the first ``/`` ends
    the key)."""
    return state_key.replace("%", "%25").replace("/", "%2F") + "/" + event_id


@dataclass(slots=True)
class Recommendation:
    """The answer to one click, as published on the recommendations topic.

    ``items``/``scores`` are the top-k (empty until scored); ``model_version`` and ``arm``
    (``champion`` or ``challenger``) name the model that answered; ``produced_at`` is the click's
    Kafka timestamp, ``received_at`` when the worker read it, ``emitted_at`` when the answer
    was handed to the producer (epoch seconds). ``duplicate``: the click was applied before
    (a redelivery), answered from the unchanged state.
    """

    click_id: str
    topic: str
    partition: int
    offset: int
    user_id: str | None
    session_id: str
    item_id: str | None
    items: list[str]
    scores: list[float]
    model_version: str
    arm: str
    event_time: float
    produced_at: float | None
    received_at: float | None
    emitted_at: float
    duplicate: bool
    unknown_item: bool

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, in declaration order (the order of the JSON object)."""
        # spelt out: about twice as fast as dataclasses.asdict or a loop over fields()
        return {
            "click_id": self.click_id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "item_id": self.item_id,
            "items": self.items,
            "scores": self.scores,
            "model_version": self.model_version,
            "arm": self.arm,
            "event_time": self.event_time,
            "produced_at": self.produced_at,
            "received_at": self.received_at,
            "emitted_at": self.emitted_at,
            "duplicate": self.duplicate,
            "unknown_item": self.unknown_item,
        }

    def key(self) -> bytes:
        """The Kafka key of the answer: the click's (user id, else session id)."""
        return (self.user_id or self.session_id).encode()

    def to_json(self) -> bytes:
        """The published value: the bytes of ``json.dumps(self.as_dict())``."""
        return "".join(_json_chunks(self.as_dict(), 0)).encode()

    @classmethod
    def from_json(cls, value: bytes | str) -> Recommendation:
        """A recommendation read back from the topic. Raises ValueError on anything that is
        not one (not JSON, not an object, a field missing or unknown). Records written before
        answers named their arm read as the champion's."""
        obj = json.loads(value)
        if isinstance(obj, dict) and obj.keys() == _FIELDS_WITHOUT_ARM:
            obj["arm"] = "champion"
        if not isinstance(obj, dict) or obj.keys() != _FIELDS:
            raise ValueError(f"not a recommendation: {str(value)[:120]}")
        return cls(**obj)


_FIELDS = frozenset(f.name for f in fields(Recommendation))
_FIELDS_WITHOUT_ARM = _FIELDS - {"arm"}


@dataclass
class BatchResult:
    recommendations: list[Recommendation] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: (item_id, click_id) of clicks on items the model does not know.
    unknown_items: list[tuple[str, str]] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    model_seconds: float = 0.0
    model_version: str = ""
    #: the partition of each state key touched: that of the records of its events, where its
    #: states are read from and written to (the one rule for a key's partition)
    key_partitions: dict[str, int] = field(default_factory=dict)
    #: answers of the shadow arm (``--shadow``): scored and measured, never published
    shadow: list[Recommendation] = field(default_factory=list)
    #: clicks scored against the answer to their session's previous click (live metrics)
    evaluations: list[Evaluation] = field(default_factory=list)
    #: the last offset of each input partition in the batch
    last_offsets: dict[int, int] = field(default_factory=dict)

    def latencies(self) -> list[float]:
        """Click-to-recommendation seconds of first answers (Kafka timestamp to emitted)."""
        return [
            r.emitted_at - r.produced_at
            for r in self.recommendations
            if r.produced_at and not r.duplicate
        ]

    def recommendation_values(self) -> list[tuple[bytes, bytes]]:
        """(key, JSON value) pairs ready to publish: ``r.key()``, ``r.to_json()`` of each,
        inlined (once per click on the hot path)."""
        enc = _json_chunks
        return [
            ((r.user_id or r.session_id).encode(), "".join(enc(r.as_dict(), 0)).encode())
            for r in self.recommendations
        ]


@dataclass
class SweepResult:
    sessions_ended: int = 0
    users_expired: int = 0
    sessions_left: int = 0
    users_left: int = 0
    #: whether sessions_left / users_left were counted (the full sweep only)
    counted: bool = True
