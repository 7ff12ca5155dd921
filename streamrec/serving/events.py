"""Click events: validation of raw Kafka values and dead-letter records.

`decode()` never raises on bad input: it returns either a `ClickEvent` or a
`DeadLetter` that carries the reason and the original bytes (base64).
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_MESSAGE_BYTES = 16 * 1024
MAX_ID_LEN = 256
#: Earliest accepted event time: the epoch. Any finite, non-negative time is accepted, so a
#: log of any age replays (MovieLens-100k is from 1997); a time far from its partition's
#: clock is refused there (``streamrec.serving.clock``), not here.
MIN_TIMESTAMP = 0.0
#: How far in the future (relative to the wall clock) an event time may lie.
MAX_FUTURE_SECONDS = 24 * 3600.0

#: Dead-letter reasons (the input contract; README "Input contract" lists them).
REASONS = (
    "empty",  # no value, or only whitespace
    "type",  # the value is not bytes
    "oversized",  # more than max_message_bytes
    "unparseable",  # not JSON (or not UTF-8)
    "not_an_object",  # JSON, but not an object
    "invalid",  # an object that is not a click (missing/wrong fields, ids too long, ...)
    "timestamp_out_of_range",  # negative, NaN/inf, overflowing, or far from the partition's
    "key_mismatch",  # the Kafka key is not the key the body implies (see admission.py)
    "wrong_partition",  # the key's partition under topics.partitioner is another one
    "output_too_large",  # (engines) a recommendation the broker refused as too large
    "changelog_record",  # (native recovery) a changelog record holding no state of this layout
    "error",  # anything unexpected (a bug): never seen on the hostile corpus
)


def _time_error(msg: str) -> PydanticCustomError:
    return PydanticCustomError("timestamp_out_of_range", msg)


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN, strict=True)]


class ClickEvent(BaseModel):
    """One click (or an explicit end of a session) as published on the clicks topic."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session_id: Id
    item_id: Id | None = None
    user_id: Id | None = None
    timestamp: float | None = None
    event_id: Id | None = None
    type: Literal["click", "session_end"] = "click"

    @field_validator("timestamp", mode="before")
    @classmethod
    def _parse_time(cls, v: Any) -> float | None:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError("timestamp must be epoch seconds or an ISO 8601 string")
        if isinstance(v, int | float):
            try:
                t = float(v)
            except OverflowError:
                raise _time_error("timestamp does not fit a float (overflow)") from None
        elif isinstance(v, str) and len(v) <= 64:
            try:
                t = float(v)
            except ValueError:
                try:
                    dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
                except ValueError as exc:
                    raise ValueError(f"unparseable timestamp {v[:40]!r}") from exc
                if dt.tzinfo is None:  # naive ISO times are taken as UTC
                    dt = dt.replace(tzinfo=UTC)
                t = dt.timestamp()
        else:
            raise ValueError("timestamp must be epoch seconds or an ISO 8601 string")
        if t != t or t < MIN_TIMESTAMP or t == float("inf"):
            raise _time_error(f"timestamp {t!r} is negative or not a finite number")
        if t > time.time() + MAX_FUTURE_SECONDS:
            raise _time_error(f"timestamp {t!r} is too far in the future")
        return t

    @model_validator(mode="after")
    def _click_needs_item(self) -> ClickEvent:
        if self.type == "click" and self.item_id is None:
            raise ValueError("a click needs item_id")
        return self

    @property
    def key(self) -> str:
        """Partition key: the user id when present, else the session id."""
        return self.user_id if self.user_id is not None else self.session_id


class DeadLetter(BaseModel):
    """A message that could not be used, with why and where it came from."""

    reason: str
    detail: str = ""
    original_b64: str
    original_size: int
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    key_b64: str | None = None
    received_at: float = Field(default_factory=time.time)

    @property
    def original(self) -> bytes:
        return base64.b64decode(self.original_b64)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


#: ClickEvent.model_validate_json without its Python wrapper (called once per event)
_validate_json = ClickEvent.__pydantic_validator__.validate_json


def make_dead_letter(
    raw: bytes | None,
    reason: str,
    detail: str = "",
    *,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    key: bytes | None = None,
    keep_bytes: int = MAX_MESSAGE_BYTES * 4,
) -> DeadLetter:
    """Build a dead-letter record; originals above `keep_bytes` are truncated (size kept)."""
    raw = raw or b""
    return DeadLetter(
        reason=reason,
        detail=detail[:1000],
        original_b64=base64.b64encode(raw[:keep_bytes]).decode(),
        original_size=len(raw),
        topic=topic,
        partition=partition,
        offset=offset,
        key_b64=base64.b64encode(key).decode() if key else None,
    )


def decode(
    raw: bytes | str | None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    key: bytes | None = None,
) -> ClickEvent | DeadLetter:
    """Validate one raw message. Never raises."""
    # Fast path: pydantic parses and validates the JSON bytes in one call, with no dict in
    # between. Its parser is stricter than json.loads (it rejects BOMs, UTF-16, control
    # characters, deep nesting, encoded surrogates), so whatever it refuses goes the old way
    # below, which alone decides the dead-letter reason and detail: reports do not change.
    if type(raw) is bytes and 0 < len(raw) <= max_bytes:
        try:
            return _validate_json(raw)
        except Exception:
            pass  # reported by the slow path
    return _decode_slow(
        raw, max_bytes=max_bytes, topic=topic, partition=partition, offset=offset, key=key
    )


class _Where(TypedDict):
    topic: str | None
    partition: int | None
    offset: int | None
    key: bytes | None


def _decode_slow(
    raw: bytes | str | None,
    *,
    max_bytes: int,
    topic: str | None,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
) -> ClickEvent | DeadLetter:
    where: _Where = {"topic": topic, "partition": partition, "offset": offset, "key": key}
    try:
        if raw is None:
            return make_dead_letter(b"", "empty", "message has no value", **where)
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        if not isinstance(raw, bytes | bytearray | memoryview):
            return make_dead_letter(b"", "type", f"value is {type(raw).__name__}", **where)
        raw = bytes(raw)
        if len(raw) > max_bytes:
            return make_dead_letter(raw, "oversized", f"{len(raw)} > {max_bytes} bytes", **where)
        if not raw.strip():
            return make_dead_letter(raw, "empty", "message is empty", **where)
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return make_dead_letter(raw, "unparseable", str(exc), **where)
        if not isinstance(obj, dict):
            return make_dead_letter(raw, "not_an_object", type(obj).__name__, **where)
        try:
            return ClickEvent.model_validate(obj)
        except ValidationError as exc:
            errs = exc.errors(include_url=False, include_input=False)
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs)
            timed = any(e["type"] == "timestamp_out_of_range" for e in errs)
            reason = "timestamp_out_of_range" if timed else "invalid"
            return make_dead_letter(raw, reason, detail, **where)
    except Exception as exc:  # defensive: bad input must never stop a worker
        data = raw if isinstance(raw, bytes) else b""
        return make_dead_letter(data, "error", f"{type(exc).__name__}: {exc}", **where)


def encode(event: ClickEvent) -> bytes:
    """Serialise an event as the JSON value published on the clicks topic."""
    return event.model_dump_json(exclude_none=True).encode()
