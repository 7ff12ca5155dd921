"""Per-session and per-user serving state with a compact binary encoding.

Layout (little endian): a fixed ``struct`` header, then length-prefixed UTF-8 strings,
then the float32 vector bytes. No JSON floats, no pickles.

Both states are stored under a namespaced *state key* (:func:`state_key`): ``u:<user id>``
for users (their open session and their user state), ``a:<session id>`` for anonymous
sessions, so an anonymous session whose id equals a user id never touches that user's
states. A user's one open session and the user state live in the same partition (the Kafka
key is the user id).

Every encoded state is capped at ``max_bytes`` (:data:`MAX_STATE_BYTES` by default): the
oldest recent items (sessions: also the oldest remembered event ids; users: the oldest
session summaries first) are dropped until it fits, so no state record exceeds the
producer's message size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from streamrec.errors import StreamrecError

#: S4: the hidden state, then the incarnation of the position, then the last answer.
#: S3 (the answer, no incarnation), S2 (recent event ids) and S1 states still decode, with an
#: unknown incarnation and, before S3, no answer
_SESSION_MAGIC = b"S4"
_SESSION_MAGIC_V3 = b"S3"
_SESSION_MAGIC_V2 = b"S2"
_SESSION_MAGIC_V1 = b"S1"
#: U2 adds the incarnation of the position (after the context); U1 still decodes
_USER_MAGIC = b"U2"
_USER_MAGIC_V1 = b"U1"
#: Layout of state keys (namespaces) in stores and changelogs; stores written under an
#: older layout are refused (:class:`StateLayoutError`).
STATE_LAYOUT = 2
USER_NS = "u:"
ANON_NS = "a:"
#: prefix of the states a shadow challenger keeps of its own: ``cu:<user>``, ``ca:<session>``
SHADOW_NS = "c"
#: Default cap on one encoded state (the producer's default message.max.bytes is 1 MB).
MAX_STATE_BYTES = 512 * 1024


def state_key(user_id: str | None, session_id: str) -> str:
    """The namespaced key of a click's states: ``u:<user id>``, else ``a:<session id>``."""
    return USER_NS + user_id if user_id is not None else ANON_NS + session_id


class StateTooLarge(StreamrecError, ValueError):
    """A state does not fit ``max_bytes`` even with every droppable list emptied."""


class StateLayoutError(StreamrecError, RuntimeError):
    """A state database or changelog written under another state key layout."""


def layout_refused(where: str, found: str) -> StateLayoutError:
    """The error for state of layout ``found`` met in ``where``, saying what to do."""
    return StateLayoutError(
        f"{where} holds state of layout {found}; this streamrec writes layout {STATE_LAYOUT} "
        "(users under u:<user id>, anonymous sessions under a:<session id>) and does not "
        "read older layouts. Start from empty state: delete the state directory and the "
        "changelog topic, or use a new worker.app_id (open sessions restart; user histories "
        "are lost)."
    )


# magic, partition, offset, last_time, start_time, n_events, n_unknown, dim
_SESSION_HDR = struct.Struct("<2siqddIII")
# magic, partition, offset, last_time, n_sessions, dim
_USER_HDR = struct.Struct("<2siqdII")
_LEN = struct.Struct("<H")

#: Both encodings begin with the same fields (magic, partition, offset, last_time), so the
#: last event time sits at this byte offset in every state: the last-activity indexes of both
#: engines read it without decoding the state (:func:`encoded_last_time`).
LAST_TIME_AT = struct.calcsize("<2siq")
_LAST_TIME = struct.Struct("<d")
assert _SESSION_HDR.format[:6] == _USER_HDR.format[:6] == "<2siqd"  # the shared prefix


def encoded_last_time(value: bytes) -> float | None:
    """The last event time of an encoded session or user state (as stored, possibly not
    finite), without decoding it; None if ``value`` is too short to hold one."""
    if len(value) < LAST_TIME_AT + _LAST_TIME.size:
        return None
    (t,) = _LAST_TIME.unpack_from(value, LAST_TIME_AT)
    return float(t)


class StateDecodeError(StreamrecError, ValueError):
    """Stored bytes are not a valid state."""


_NONE = _LEN.pack(0xFFFF)  # the length that marks a None string

# These run for every state read and written (once per event): plain loops over a bytes
# object, one helper call per run of strings rather than one per string.


def _put_each(out: list[bytes], strs: Iterable[str | None]) -> None:
    """Length-prefixed strings (None as the length 0xFFFF), no count."""
    pack = _LEN.pack
    for s in strs:
        if s is None:
            out.append(_NONE)
            continue
        b = s.encode()[:0xFFFE]
        out.append(pack(len(b)))
        out.append(b)


def _get_each(buf: bytes, pos: int, n: int, none: str | None) -> tuple[list[str | None], int]:
    """``n`` strings written by :func:`_put_each`; a None reads back as ``none``."""
    unpack = _LEN.unpack_from
    out: list[str | None] = []
    for _ in range(n):
        (m,) = unpack(buf, pos)
        pos += 2
        if m == 0xFFFF:
            out.append(none)
        else:
            out.append(buf[pos : pos + m].decode())
            pos += m
    return out, pos


def _put_strs(out: list[bytes], items: Iterable[str]) -> None:
    if not isinstance(items, list):
        items = list(items)
    out.append(_LEN.pack(len(items)))
    _put_each(out, items)


def _get_strs(buf: bytes, pos: int) -> tuple[list[str], int]:
    (n,) = _LEN.unpack_from(buf, pos)
    return _get_each(buf, pos + 2, n, "")  # type: ignore[return-value]  # none="" : no None comes back


def _as_bytes(data: bytes) -> bytes:
    """Slices of bytes decode faster than those of a memoryview (any buffer is accepted)."""
    return data if type(data) is bytes else bytes(memoryview(data))


_F4 = np.dtype("<f4")

#: the arms a model serves in; an answer remembers the one that made it (by index)
ARMS = ("champion", "challenger")
_ARM_INDEX = {a: i for i, a in enumerate(ARMS)}
#: the answer section of an encoded session state: none, or an answer whose item ids are
#: joined by :data:`_SEP` (one join and one decode instead of a length per id), or, when an
#: id holds that character, length-prefixed
_NO_ANSWER, _ANSWER_JOINED, _ANSWER_LISTED = 0, 1, 2
_SEP = "\x1f"  # the ASCII unit separator
_ANSWER_HDR = struct.Struct("<BBH")  # kind, arm, number of items
_ANSWER_HDR_VERSION = struct.Struct("<BBHH")  # the same, and the version's length after it
_NO_ANSWER_SECTION = bytes((_NO_ANSWER,))


class Answer:
    """The top of the answer to a session's last click, kept in the session state so that
    the next click can be scored against it (live metrics, :mod:`streamrec.serving.live`).

    ``version`` and ``arm`` are the model and arm that made it; ``items``/``scores`` (best
    first, finite scores only) are None until the answer is scored (the pipeline scores a
    batch after advancing its states: :meth:`fill`).

    An answer read from a state is decoded lazily: its ids stay one joined string and its
    scores the stored float32 bytes until ``items``/``scores`` are asked for. Scoring the
    next click needs neither (:meth:`position` finds the clicked id as a whole token of the
    joined string, and only a hit unpacks the scores), and the state written after that click
    holds the new answer: most stored answers are never split nor unpacked."""

    __slots__ = ("_items", "_joined", "_n", "_packed", "_scores", "arm", "version")

    def __init__(
        self,
        version: str,
        arm: str = ARMS[0],
        items: list[str] | None = None,
        scores: list[float] | None = None,
    ) -> None:
        self.version = version
        self.arm = arm
        self._items = items
        self._scores = scores
        #: an answer read from a state, not split yet: its ids joined by _SEP (n of them)
        self._joined: str | None = None
        self._n = 0
        #: the scores as little-endian float32 bytes, where known (read, or given to fill)
        self._packed: bytes | None = None

    @property
    def scored(self) -> bool:
        """Whether the answer has its items (one read from a state always has)."""
        return self._items is not None or self._joined is not None

    @property
    def n_items(self) -> int:
        """How many items the answer has (0: none, or not scored)."""
        return self._n if self._joined is not None else len(self._items or ())

    @property
    def items(self) -> list[str] | None:
        if self._items is None and self._joined is not None:
            self._items = self._joined.split(_SEP) if self._n else []
        return self._items

    @items.setter
    def items(self, items: list[str] | None) -> None:
        self._as_lists()
        self._items = items

    @property
    def scores(self) -> list[float] | None:
        if self._scores is None and self._packed is not None:
            self._scores = list(_floats(self._n).unpack(self._packed))
        return self._scores

    @scores.setter
    def scores(self, scores: list[float] | None) -> None:
        self._as_lists()
        self._scores = scores

    def fill(self, items: list[str], scores: list[float], packed: bytes | None = None) -> None:
        """The answer scored: its items and their scores, best first; ``packed``: the same
        scores as little-endian float32 bytes, where the caller has them (the pipeline
        converts a batch's scores at once instead of packing each answer's)."""
        self._items, self._scores, self._joined, self._packed = items, scores, None, packed

    def _as_lists(self) -> None:
        """Items and scores as lists only (before either is replaced)."""
        self._items, self._scores = self.items, self.scores
        self._joined = self._packed = None

    def position(self, target: str) -> int:
        """Where ``target`` is among the items (-1: not there, or not scored). An answer read
        from a state is searched for ``target`` as a whole id of its joined ids (no id of a
        joined answer holds the separator), not split."""
        joined = self._joined
        if joined is None:
            items = self._items
            if not items:
                return -1
            try:
                return items.index(target)
            except ValueError:
                return -1
        if not self._n or _SEP in target:  # (such a target could match across two ids)
            return -1
        find, size, end_all = joined.find, len(target), len(joined)
        at = find(target)
        while at >= 0:
            end = at + size
            if (at == 0 or joined[at - 1] == _SEP) and (end == end_all or joined[end] == _SEP):
                return joined.count(_SEP, 0, at)
            at = find(target, at + 1)
        return -1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Answer):
            return NotImplemented
        return (self.version, self.arm, self.items, self.scores) == (
            other.version,
            other.arm,
            other.items,
            other.scores,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return (
            f"Answer(version={self.version!r}, arm={self.arm!r}, items={self.items!r}, "
            f"scores={self.scores!r})"
        )


_FLOATS: dict[int, struct.Struct] = {}


def _floats(n: int) -> struct.Struct:
    """The layout of ``n`` little-endian float32 values."""
    layout = _FLOATS.get(n)
    if layout is None:
        layout = _FLOATS[n] = struct.Struct(f"<{n}f")
    return layout


_VERSION_BLOCKS: dict[str, bytes] = {}


def _version_block(version: str) -> bytes:
    """An answer's version as encoded (a handful of versions is live at a time)."""
    block = _VERSION_BLOCKS.get(version)
    if block is None:
        if len(_VERSION_BLOCKS) >= 64:
            _VERSION_BLOCKS.clear()
        out: list[bytes] = []
        _put_each(out, (version,))
        block = _VERSION_BLOCKS[version] = b"".join(out)
    return block


def encode_answer(answer: Answer | None) -> bytes:
    """The answer section that ends an encoded session state (one byte for none, or an
    answer not scored yet). An answer read from a state is written back from its joined ids
    and packed scores, as it was read."""
    if answer is None:
        return _NO_ANSWER_SECTION
    joined, packed = answer._joined, answer._packed
    if joined is None:
        items, scores = answer._items, answer._scores
        if items is None or scores is None:
            return _NO_ANSWER_SECTION
        n = len(items)
        joined = _SEP.join(items)
        if joined.count(_SEP) != max(n - 1, 0):  # an id holds the separator
            return _encode_listed(answer, items, scores)
        if packed is None:
            packed = _floats(len(scores)).pack(*scores)
    else:
        n = answer._n
        assert packed is not None  # read with its ids
    ids = joined.encode()
    if len(ids) > 0xFFFE:
        ids = ids[:0xFFFE]  # (as every string of a state is capped)
    version = _VERSION_BLOCKS.get(answer.version) or _version_block(answer.version)
    return b"".join(
        (
            _ANSWER_HDR.pack(_ANSWER_JOINED, _ARM_INDEX.get(answer.arm, 0), n),
            version,
            _LEN.pack(len(ids)),
            ids,
            packed,
        )
    )


def _encode_listed(answer: Answer, items: list[str], scores: list[float]) -> bytes:
    """An answer with an id that holds the separator: each id length-prefixed."""
    out = [_ANSWER_HDR.pack(_ANSWER_LISTED, _ARM_INDEX.get(answer.arm, 0), len(items))]
    out.append(_version_block(answer.version))
    _put_each(out, items)
    out.append(_floats(len(scores)).pack(*scores))
    return b"".join(out)


def _decode_answer(buf: bytes, pos: int) -> tuple[Answer | None, int]:
    """The answer section at ``pos``, checked as strictly as when it was split at once
    (counts, lengths, UTF-8); a joined one is kept joined, its scores packed
    (:class:`Answer`)."""
    kind = buf[pos]
    if kind == _NO_ANSWER:
        return None, pos + 1
    if kind != _ANSWER_JOINED:
        return _decode_listed(buf, pos)
    _, arm, n, m = _ANSWER_HDR_VERSION.unpack_from(buf, pos)
    if arm >= len(ARMS):
        raise StateDecodeError("answer of an unknown arm")
    pos += _ANSWER_HDR_VERSION.size
    version = ""
    if m != 0xFFFF:  # (0xFFFF: a None version, read as "")
        version = buf[pos : pos + m].decode()
        pos += m
    (m,) = _LEN.unpack_from(buf, pos)
    pos += 2
    joined = ""
    if m != 0xFFFF:
        joined = buf[pos : pos + m].decode()
        pos += m
    if n and joined.count(_SEP) != n - 1:
        raise StateDecodeError("answer items do not match their count")
    end = pos + 4 * n
    if end > len(buf):
        raise StateDecodeError("answer scores cut short")
    answer = Answer.__new__(Answer)  # (no __init__: every field is set here)
    answer.version, answer.arm, answer._items, answer._scores = version, ARMS[arm], None, None
    # (a count of 0 reads back no items, whatever the joined string: as when it was split)
    answer._joined, answer._n, answer._packed = joined if n else "", n, buf[pos:end]
    return answer, end


def _decode_listed(buf: bytes, pos: int) -> tuple[Answer, int]:
    kind, arm, n = _ANSWER_HDR.unpack_from(buf, pos)
    if kind != _ANSWER_LISTED:
        raise StateDecodeError(f"unknown answer kind {kind}")
    if arm >= len(ARMS):
        raise StateDecodeError("answer of an unknown arm")
    (version,), pos = _get_each(buf, pos + _ANSWER_HDR.size, 1, "")
    items, pos = _get_strs_n(buf, pos, n)
    scores = list(struct.unpack_from(f"<{n}f", buf, pos))
    return Answer(version or "", ARMS[arm], items, scores), pos + 4 * n


def _get_strs_n(buf: bytes, pos: int, n: int) -> tuple[list[str], int]:
    """``n`` strings, none of them None."""
    return _get_each(buf, pos, n, "")  # type: ignore[return-value]  # none="": no None comes back


def with_answer(data: bytes, answer: Answer) -> bytes:
    """An encoded session state that has no answer yet, with ``answer`` added (the pipeline
    encodes a state when it advances it and adds the answer once the batch is scored)."""
    if data[-1:] != bytes((_NO_ANSWER,)):
        raise ValueError("the state holds an answer already")
    return data[:-1] + encode_answer(answer)


def _vector_and_tail(buf: bytes, pos: int, dim: int, has_tail: bool) -> tuple[np.ndarray, str]:
    """The float32 vector of ``dim`` values at ``pos`` and, in the layouts that have it, the
    incarnation string after it; the vector must end the buffer, or the string must."""
    end = pos + 4 * dim
    incarnation = ""
    if has_tail:
        (value,), tail_end = _get_each(buf, end, 1, "")
        incarnation = value or ""
        if tail_end != len(buf):
            raise StateDecodeError("state length mismatch")
    elif end != len(buf):
        raise StateDecodeError("state vector length mismatch")
    if end > len(buf):
        raise StateDecodeError("state vector length mismatch")
    return np.frombuffer(buf, dtype=_F4, count=dim, offset=pos).copy(), incarnation


def _vec(x: np.ndarray | None) -> np.ndarray:
    """float32 values to write with ``.tobytes()`` (which flattens in C order, copying only
    where the array is not already float32 and contiguous)."""
    if x is None:
        return np.zeros(0, dtype=np.float32)
    return np.asarray(x, dtype=np.float32)


@dataclass
class SessionState:
    """The open session of one key: hidden state and where it came from."""

    session_id: str
    hidden: np.ndarray
    version: str
    user_id: str | None = None
    recent_items: list[str] = field(default_factory=list)
    partition: int = -1
    offset: int = -1
    last_time: float = 0.0
    start_time: float = 0.0
    n_events: int = 0
    n_unknown: int = 0
    #: ids of the last events applied (bounded): a redelivery at another offset is a duplicate
    event_ids: list[str] = field(default_factory=list)
    #: the answer to the last click applied (the click at ``offset``), for live metrics
    answer: Answer | None = None
    #: the incarnation (topic id) of the topic ``partition``/``offset`` belong to; "" unknown
    #: (streamrec.serving.input_topic)
    incarnation: str = ""

    def push_item(self, item_id: str, limit: int) -> None:
        self.recent_items.append(item_id)
        if len(self.recent_items) > limit:
            del self.recent_items[: len(self.recent_items) - limit]

    def push_event_id(self, event_id: str, limit: int) -> None:
        self.event_ids.append(event_id)
        if len(self.event_ids) > limit:
            del self.event_ids[: len(self.event_ids) - limit]

    def to_bytes(self, max_bytes: int = MAX_STATE_BYTES) -> bytes:
        """The encoded state; over ``max_bytes``, the oldest event ids and recent items are
        dropped (from this object too) until it fits, then the answer."""
        data = self._encode()
        if len(data) <= max_bytes:
            return data
        excess = len(data) - max_bytes
        for lst in (self.event_ids, self.recent_items):
            drop = 0
            while excess > 0 and drop < len(lst):
                excess -= 2 + len(lst[drop].encode()[:0xFFFE])
                drop += 1
            del lst[:drop]
        if excess > 0 and self.answer is not None:
            excess -= len(encode_answer(self.answer)) - 1
            self.answer = None
        if excess > 0:
            raise StateTooLarge(f"session state of {len(data)} bytes cannot fit {max_bytes}")
        return self._encode()

    def _encode(self) -> bytes:
        h = _vec(self.hidden)
        out = [
            _SESSION_HDR.pack(
                _SESSION_MAGIC,
                self.partition,
                self.offset,
                self.last_time,
                self.start_time,
                self.n_events,
                self.n_unknown,
                h.size,
            )
        ]
        _put_each(out, (self.version, self.session_id, self.user_id))
        _put_strs(out, self.recent_items)
        _put_strs(out, self.event_ids)
        out.append(h.tobytes())
        _put_each(out, (self.incarnation,))
        out.append(encode_answer(self.answer))  # last: with_answer replaces its one byte
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionState:
        try:
            buf = _as_bytes(data)
            magic, part, off, last, start, n, nu, dim = _SESSION_HDR.unpack_from(buf, 0)
            if magic not in (
                _SESSION_MAGIC,
                _SESSION_MAGIC_V3,
                _SESSION_MAGIC_V2,
                _SESSION_MAGIC_V1,
            ):
                raise StateDecodeError(f"not a session state (magic {magic!r})")
            pos = _SESSION_HDR.size
            (version, sid, uid), pos = _get_each(buf, pos, 3, None)
            items, pos = _get_strs(buf, pos)
            event_ids: list[str] = []
            if magic != _SESSION_MAGIC_V1:
                event_ids, pos = _get_strs(buf, pos)
            answer, incarnation = None, ""
            if magic in (_SESSION_MAGIC, _SESSION_MAGIC_V3):  # the hidden state, then ...
                after = pos + 4 * dim
                if len(buf) <= after:
                    raise StateDecodeError("hidden state length mismatch")
                if magic == _SESSION_MAGIC:  # ... the incarnation, then the answer
                    (value,), after = _get_each(buf, after, 1, "")
                    incarnation = value or ""
                answer, after = _decode_answer(buf, after)
                if after != len(buf):
                    raise StateDecodeError("trailing bytes after the answer")
            elif len(buf) - pos != 4 * dim:
                raise StateDecodeError("hidden state length mismatch")
            hidden = np.frombuffer(buf, dtype=_F4, count=dim, offset=pos).copy()
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise StateDecodeError(str(exc)) from exc
        return cls(
            sid or "", hidden, version or "", uid, items, part, off, last, start, n, nu, event_ids,
            answer=answer, incarnation=incarnation,
        )  # fmt: skip

    def same_as(self, other: SessionState, atol: float = 1e-5) -> bool:
        """Equal up to float tolerance on the hidden state and the answer's scores (tests)."""
        a, b = vars(self).copy(), vars(other).copy()
        ha, hb = a.pop("hidden"), b.pop("hidden")
        aa, ab = a.pop("answer"), b.pop("answer")
        if (aa is None) != (ab is None):
            return False
        if aa is not None and ab is not None:
            if (aa.version, aa.arm, aa.items) != (ab.version, ab.arm, ab.items):
                return False
            if (aa.scores is None) != (ab.scores is None) or not np.allclose(
                aa.scores or [], ab.scores or [], atol=atol
            ):
                return False
        return a == b and ha.shape == hb.shape and bool(np.allclose(ha, hb, atol=atol))


@dataclass
class UserState:
    """HRNN user context and the user's recent session summaries (item ids per session).

    ``partition``/``offset`` are the position of the last event that advanced it (a session
    end), so a replayed session end is not applied twice.
    """

    user_id: str
    context: np.ndarray
    version: str
    sessions: list[list[str]] = field(default_factory=list)
    partition: int = -1
    offset: int = -1
    last_time: float = 0.0
    #: the incarnation (topic id) of the position's topic; "" unknown
    incarnation: str = ""

    def push_session(self, items: list[str], limit: int) -> None:
        if limit <= 0:
            self.sessions.clear()
            return
        self.sessions.append(list(items))
        if len(self.sessions) > limit:
            del self.sessions[: len(self.sessions) - limit]

    def to_bytes(self, max_bytes: int = MAX_STATE_BYTES) -> bytes:
        """The encoded state; over ``max_bytes``, the oldest session summaries are dropped
        (from this object too), then the oldest items of the last one, until it fits."""
        data = self._encode()
        if len(data) <= max_bytes:
            return data
        excess = len(data) - max_bytes
        while excess > 0 and len(self.sessions) > 1:
            first = self.sessions.pop(0)
            excess -= 2 + sum(2 + len(i.encode()[:0xFFFE]) for i in first)
        if excess > 0 and self.sessions:
            last, drop = self.sessions[0], 0
            while excess > 0 and drop < len(last):
                excess -= 2 + len(last[drop].encode()[:0xFFFE])
                drop += 1
            del last[:drop]
        if excess > 0:
            raise StateTooLarge(f"user state of {len(data)} bytes cannot fit {max_bytes}")
        return self._encode()

    def _encode(self) -> bytes:
        c = _vec(self.context)
        out = [
            _USER_HDR.pack(
                _USER_MAGIC, self.partition, self.offset, self.last_time, len(self.sessions), c.size
            )
        ]
        _put_each(out, (self.version, self.user_id))
        for s in self.sessions:
            _put_strs(out, s)
        out.append(c.tobytes())
        _put_each(out, (self.incarnation,))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        try:
            buf = _as_bytes(data)
            magic, part, off, last, ns, dim = _USER_HDR.unpack_from(buf, 0)
            if magic != _USER_MAGIC and magic != _USER_MAGIC_V1:
                raise StateDecodeError(f"not a user state (magic {magic!r})")
            pos = _USER_HDR.size
            (version, uid), pos = _get_each(buf, pos, 2, None)
            sessions = []
            for _ in range(ns):
                s, pos = _get_strs(buf, pos)
                sessions.append(s)
            ctx, incarnation = _vector_and_tail(buf, pos, dim, magic == _USER_MAGIC)
        except (struct.error, UnicodeDecodeError) as exc:
            raise StateDecodeError(str(exc)) from exc
        return cls(uid or "", ctx, version or "", sessions, part, off, last, incarnation)
