"""The pipeline core: decode -> load states -> model step -> store -> emit. No Kafka here.

Both worker engines and the tests call :func:`process_batch` with a list of
:class:`~streamrec.serving.records.Record` and a
:class:`~streamrec.serving.state_store.StateStore` (RocksDB partitions, Faust tables or the
in-memory twin); it returns a :class:`~streamrec.serving.records.BatchResult` with one
:class:`~streamrec.serving.records.Recommendation` per click. The idle sweep
(:mod:`streamrec.serving.expiry`) ends sessions with this module's :func:`end_sessions`.

Semantics (docs/architecture.md states them as the core's contract):

* Input checks beyond decoding (each a dead letter, see README "Input contract"): the Kafka
  key must be the key the body implies (user id, else session id; ``key_mismatch``), and the
  event time must lie within the partition's bounds (``timestamp_out_of_range``, see
  :class:`~streamrec.serving.clock.StreamClock`).
* Events are grouped by their namespaced state key (``u:<user id>``, else
  ``a:<session id>``; :func:`streamrec.serving.state.state_key`) and applied in arrival (offset)
  order. The batch is cut into *rounds*: round r holds the r-th event of every key, so a key
  appears at most once per model step and its events are never reordered. A key's states
  are read from and written to the partition of its records (``BatchResult.key_partitions``),
  once each per batch.
* A click ends the key's open session when its session id differs, or when its event time is
  more than ``session_gap_seconds`` after the session's last event; a ``session_end`` event
  ends it explicitly. Ending advances the user state (``end_session``; HRNN) and deletes the
  session state.
* Effectively-once: every state records the partition/offset of the last event applied to it
  (the user state that of the event that last advanced it). An event at or below that offset
  is a duplicate (a redelivery after a crash) and is not applied again. So is an event whose
  ``event_id`` is among the last ``dedup_event_ids`` ids applied to the open session (the same
  event produced twice, at two offsets).
* Duplicates are still answered, so every click gets at least one recommendation after a
  crash: the scores come from the current state without advancing it. When the duplicate is
  the last event applied to the state (the usual case: the worker died after storing but
  before its output was committed) that is exactly the original recommendation. The output
  carries ``click_id`` and ``duplicate: true`` so consumers can drop repeats.
* Unknown items leave the hidden state unchanged (row -1 in the step API), still get a
  recommendation from the unchanged state, are appended to the session's recent items (so a
  later model that knows them re-encodes them) and are reported in ``unknown_items``.
* Arms (:mod:`streamrec.serving.arms`): with a challenger, the batch is cut into one *run*
  per arm after decoding (A/B: each key in its arm's run; shadow: every key in both, the
  challenger's under its own state keys), each run with its model; only published runs'
  answers go out.
* Live metrics (:mod:`streamrec.serving.live`): a click (not a duplicate) that continues a
  session is scored against the answer to the session's previous click, which the session
  state holds; each click's answer goes into its session state. Scoring comes last, so
  states are encoded when advanced and written once the batch is scored, answers added
  (:mod:`streamrec.serving.writes`): :func:`apply_batch` then :func:`finish_batch`.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from streamrec.serving.admission import admit
from streamrec.serving.arms import CHALLENGER, CHAMPION, SHADOW_NS, ArmModels, Models, as_arms
from streamrec.serving.clock import StreamClock
from streamrec.serving.config import DEFAULT_CONFIG, CoreConfig
from streamrec.serving.events import ClickEvent, DeadLetter
from streamrec.serving.input_topic import UNKNOWN_TOPIC, InputTopic
from streamrec.serving.live import DEPTH, KS, Evaluation, rank_at
from streamrec.serving.records import BatchResult, Recommendation, Record, event_click_id
from streamrec.serving.served_model import ServingModel
from streamrec.serving.state import (
    MAX_STATE_BYTES,
    Answer,
    SessionState,
    StateDecodeError,
    UserState,
)
from streamrec.serving.state_store import SESSIONS, USERS, StateStore
from streamrec.serving.writes import InFlightStates, StateWrite, write_states


@dataclass
class KeyStates:
    """Working copy of one key's states during a batch."""

    sess: SessionState | None
    user: UserState | None
    sess_dirty: bool = False
    sess_deleted: bool = False
    user_dirty: bool = False


def _click_id(key: str, ev: ClickEvent, rec: Record) -> str:
    if ev.event_id is not None:
        return event_click_id(key, ev.event_id)
    return f"{rec.topic}:{rec.partition}:{rec.offset}"


#: where an event was applied: (partition, offset, incarnation of the topic)
Position = tuple[int, int, str]


def migrate_states(ks: Sequence[KeyStates], model: ServingModel, stats: Counter[str]) -> None:
    """Re-encode the states made under other weights, batched: the users first (advance
    only, no scoring), then the sessions from their (new) user contexts."""
    old_users = [
        (k, k.user)
        for k in ks
        if k.user is not None
        and (k.user.version != model.version or k.user.context.size != model.user_state_dim)
    ]
    if old_users:
        ctxs = model.encode_users([u.sessions for _, u in old_users])
        for (k, u), ctx in zip(old_users, ctxs, strict=True):
            u.context = ctx.copy()
            u.version = model.version
            k.user_dirty = True
        stats["users_migrated"] += len(old_users)
    old_sess = [
        (k, k.sess)
        for k in ks
        if k.sess is not None
        and (k.sess.version != model.version or k.sess.hidden.size != model.state_dim)
    ]
    if old_sess:
        users = _user_ctx([k for k, _ in old_sess], model) if model.user_state_dim else None
        hidden = model.encode_sessions([s.recent_items for _, s in old_sess], users)
        for (k, s), h in zip(old_sess, hidden, strict=True):
            s.hidden = h.copy()
            s.version = model.version
            k.sess_dirty = True
        stats["sessions_migrated"] += len(old_sess)


def _user_ctx(keys: Sequence[KeyStates], model: ServingModel) -> np.ndarray:
    out = np.zeros((len(keys), model.user_state_dim), dtype=np.float32)
    if model.user_state_dim == 0:
        return out
    missing = [i for i, k in enumerate(keys) if k.user is None]
    if missing:
        out[missing] = model.initial_user_states(len(missing))
    for i, k in enumerate(keys):
        if k.user is not None:
            out[i] = k.user.context
    return out


def end_sessions(
    ks: Sequence[tuple[str, KeyStates]],
    model: ServingModel,
    config: CoreConfig,
    positions: Sequence[Position],
    stats: Counter[str],
) -> None:
    """End the open session of each key: advance/record the user state (its position: that
    of the event that ended the session), delete the session."""
    if not ks:
        return
    keys = [k for _, k in ks]
    finals = np.stack([cast(SessionState, k.sess).hidden for k in keys]).astype(
        np.float32, copy=False
    )
    users = model.end_session(_user_ctx(keys, model), finals)
    for i, (key, k) in enumerate(ks):
        s = k.sess
        assert s is not None
        if s.user_id is not None:
            if k.user is None:
                k.user = UserState(s.user_id, users[i], model.version)
            k.user.context = users[i].copy()
            k.user.version = model.version
            k.user.push_session(s.recent_items, config.recent_sessions)
            part, off, incarnation = positions[i]
            same_log = part == k.user.partition and incarnation == k.user.incarnation
            if same_log or k.user.offset < 0:
                k.user.offset = max(k.user.offset, off)
            else:
                k.user.offset = off
            k.user.partition, k.user.incarnation = part, incarnation
            k.user.last_time = max(k.user.last_time, s.last_time)
            k.user_dirty = True
        del key
        k.sess = None
        k.sess_deleted = True
        k.sess_dirty = False
        stats["sessions_ended"] += 1


@dataclass
class Click:
    """One decoded event of a batch: the record it came in, the event, its event time."""

    record: Record
    event: ClickEvent
    time: float


@dataclass
class RoundClick:
    """A click of one round, and whether it is a redelivery of an event already applied."""

    key: str
    click: Click
    duplicate: bool


def decode_and_group(
    records: Sequence[Record],
    res: BatchResult,
    config: CoreConfig,
    clock: StreamClock | None,
    now: float,
    topic: InputTopic = UNKNOWN_TOPIC,
) -> tuple[dict[str, deque[Click]], set[str]]:
    """Phase 1: admit every record (:func:`streamrec.serving.admission.admit`: decode, key,
    partition, event time; the others become dead letters in ``res``) and queue the clicks by
    state key in arrival order. Also returns the state keys that are users'."""
    queues: dict[str, deque[Click]] = {}
    user_keys: set[str] = set()  # only these have user states: no lookup for anonymous keys
    if clock is None:  # the checks still run, against this batch alone
        clock = StreamClock.from_config(config)
    last = res.last_offsets
    for rec in records:
        last[rec.partition] = rec.offset
        topic.note(rec.partition, rec.offset)
        got = admit(rec, config, clock, topic, now)
        if isinstance(got, DeadLetter):
            res.dead_letters.append(got)
            res.stats[f"dead_letter:{got.reason}"] += 1
            continue
        ev, key, t = got
        q = queues.get(key)
        if q is None:
            q = queues[key] = deque()
        q.append(Click(rec, ev, t))
        res.key_partitions[key] = rec.partition
        if ev.user_id is not None:
            user_keys.add(key)
    res.stats["dead_letters"] += len(res.dead_letters)
    return queues, user_keys


def load_states(
    keys: Iterable[str],
    user_keys: set[str],
    partitions: Mapping[str, int],
    store: StateStore,
    model: ServingModel,
    stats: Counter[str],
    in_flight: InFlightStates | None = None,
) -> dict[str, KeyStates]:
    """Phase 2: each key's states, read once from the key's partition (or, for a key that a
    batch still being scored has changed, from ``in_flight``); those made under other weights
    re-encoded (all of the batch's at once)."""
    work: dict[str, KeyStates] = {}
    for key in keys:
        p = partitions[key]
        if in_flight is not None and len(in_flight):
            sess = _in_flight_session(in_flight, store, key, p)
            user = _in_flight_user(in_flight, store, key, p) if key in user_keys else None
        else:
            sess = store.get_session(key, p)
            user = store.get_user(key, p) if key in user_keys else None
        work[key] = KeyStates(sess, user)
    migrate_states(list(work.values()), model, stats)
    return work


def _in_flight_session(
    in_flight: InFlightStates, store: StateStore, key: str, partition: int
) -> SessionState | None:
    w = in_flight.get(SESSIONS, key, partition)
    if w is None:
        return store.get_session(key, partition)
    if w.value is None:
        return None
    try:
        s = SessionState.from_bytes(w.value)
    except StateDecodeError:  # not possible for bytes this process encoded; as the store does
        store.corrupt += 1
        return None
    if w.answer is not None:  # the answer the batch in flight is scoring
        s.answer = w.answer
    return s


def _in_flight_user(
    in_flight: InFlightStates, store: StateStore, key: str, partition: int
) -> UserState | None:
    w = in_flight.get(USERS, key, partition)
    if w is None:
        return store.get_user(key, partition)
    try:
        return None if w.value is None else UserState.from_bytes(w.value)
    except StateDecodeError:
        store.corrupt += 1
        return None


def plan_round(
    batch: Sequence[tuple[str, Click]],
    work: dict[str, KeyStates],
    config: CoreConfig,
    stats: Counter[str],
    topic: InputTopic = UNKNOWN_TOPIC,
) -> tuple[list[tuple[str, KeyStates]], list[Position], list[RoundClick]]:
    """Phase 3a: for one round (each key at most once), the sessions to end first (with the
    position of the event that ends each) and the clicks to step. Whether a click was applied
    already is :meth:`InputTopic.applied` of the state's position."""
    to_end: list[tuple[str, KeyStates]] = []
    end_pos: list[Position] = []
    clicks: list[RoundClick] = []
    incarnation = topic.incarnation
    applied = topic.applied
    for key, c in batch:
        k = work[key]
        s, u, rec, ev = k.sess, k.user, c.record, c.event
        if s is not None:
            dup = applied(s.incarnation, s.partition, s.offset, rec.partition, rec.offset)
        elif u is not None:
            dup = applied(u.incarnation, u.partition, u.offset, rec.partition, rec.offset)
        else:
            dup = False
        if (
            not dup
            and s is not None
            and ev.event_id is not None
            and s.session_id == ev.session_id
            and ev.event_id in s.event_ids
        ):
            dup = True  # the same event produced again (at another offset)
            stats["duplicate_event_ids"] += 1
        if ev.type == "session_end":
            stats["session_end_events"] += 1
            if dup:
                stats["duplicates"] += 1
            elif s is not None and s.session_id == ev.session_id:
                to_end.append((key, k))
                end_pos.append((rec.partition, rec.offset, incarnation))
            continue
        if dup:
            stats["duplicates"] += 1
        elif s is not None and (
            s.session_id != ev.session_id or c.time - s.last_time > config.session_gap_seconds
        ):
            stats["sessions_ended_by_id" if s.session_id != ev.session_id else "gap_ends"] += 1
            to_end.append((key, k))
            end_pos.append((rec.partition, rec.offset, incarnation))
        clicks.append(RoundClick(key, c, dup))
    return to_end, end_pos, clicks


@dataclass
class RoundStep:
    """Phase 3b's result: the new state of each click, and its answer where already scored."""

    states: np.ndarray  # [n, state_dim]
    unknown: list[bool]  # the clicked item is not in the model
    top_ids: list[list[str]] | None = None  # None: scored later, with the whole batch
    top_scores: list[list[float]] | None = None
    top_packed: bytes = b""  # the answers' scores as float32 bytes (_packed_scores)


@dataclass
class ArmRun:
    """One arm's part of a batch: its model, its answers (published or not), the answers to
    fill when scored, and the clicks to score against earlier answers (live metrics)."""

    arm: str
    model: ServingModel
    published: bool
    stats: Counter[str]
    recommendations: list[Recommendation] = field(default_factory=list)
    #: per recommendation, the answer its session state keeps (None: a duplicate's)
    answers: list[Answer | None] = field(default_factory=list)
    #: split step: the states of every round's clicks, scored with the whole batch
    unscored: list[np.ndarray] = field(default_factory=list)
    #: the item row each of them stepped on (-1: unknown), for the successor candidates
    unscored_rows: list[np.ndarray] = field(default_factory=list)
    #: (partition, offset, the previous answer, the clicked item) of each click to score
    pending: list[tuple[int, int, Answer, str]] = field(default_factory=list)
    model_seconds: float = 0.0


def answer_depth(config: CoreConfig) -> int:
    """Items scored per click: the published top-k, and with live metrics at least the
    answer kept for the next click (:data:`streamrec.serving.live.DEPTH`)."""
    return max(config.top_k, DEPTH) if config.live_metrics else config.top_k


def advance_round(
    clicks: Sequence[RoundClick],
    ks: Sequence[KeyStates],
    model: ServingModel,
    config: CoreConfig,
    pending: list[np.ndarray],
    pending_rows: list[np.ndarray] | None = None,
) -> RoundStep:
    """Phase 3b: one model step for the round's clicks. A split-step model only advances
    here (its states are queued in ``pending`` and scored with the whole batch); others
    step and score at once."""
    # sessions to start: clicks (not duplicates) with no open session, and duplicates of
    # already-ended sessions (answered from a fresh state, never stored)
    fresh = [i for i, k in enumerate(ks) if k.sess is None]
    users = _user_ctx(ks, model)
    states = np.empty((len(clicks), model.state_dim), dtype=np.float32)
    if fresh:
        states[fresh] = model.initial_states(users[fresh], len(fresh))
    for i, k in enumerate(ks):  # (a row copy each is faster than np.stack of them)
        if k.sess is not None:
            states[i] = k.sess.hidden
    rows = model.rows([c.click.event.item_id for c in clicks])
    # an existing state's duplicate must not advance: ask for scores only
    held = [i for i, c in enumerate(clicks) if c.duplicate and ks[i].sess is not None]
    step_rows = rows
    if held:
        step_rows = rows.copy()
        step_rows[held] = -1
    unknown = (rows < 0).tolist()
    if model.split:
        new_states = model.advance(step_rows, states)
        pending.append(new_states)
        if pending_rows is not None:  # the clicked rows, for the successor candidates
            pending_rows.append(rows)
        return RoundStep(new_states, unknown)
    depth = answer_depth(config)
    out = model.step(step_rows, states, users if model.user_state_dim else None, depth)
    scores = out.top_scores
    packed = _packed_scores(scores) if config.live_metrics else b""
    return RoundStep(out.states, unknown, model.ids(out.top_rows).tolist(), scores.tolist(), packed)


def emit_round(
    clicks: Sequence[RoundClick],
    ks: Sequence[KeyStates],
    step: RoundStep,
    run: ArmRun,
    res: BatchResult,
    config: CoreConfig,
    incarnation: str = "",
) -> None:
    """Phase 3c: write the new session states into the working copies (their position: the
    click's, in the topic's ``incarnation``), note each click that
    continues a session with an answer (live metrics) and give the session its new answer,
    and add one recommendation per click to the run."""
    stats = run.stats
    version, arm, limit = run.model.version, run.arm, config.recent_items
    live = config.live_metrics
    add, add_answer = run.recommendations.append, run.answers.append
    first = len(run.recommendations)
    for i, rc in enumerate(clicks):
        k = ks[i]
        rec, ev, t, dup = rc.click.record, rc.click.event, rc.click.time, rc.duplicate
        unknown = step.unknown[i]
        cid = _click_id(rc.key, ev, rec)
        if unknown and not dup and run.published:
            stats["unknown_items"] += 1
            res.unknown_items.append((ev.item_id or "", cid))
        answer = None
        if not dup:
            s = k.sess
            if s is None:
                s = k.sess = SessionState(
                    ev.session_id, step.states[i], version, ev.user_id, start_time=t
                )
                stats["sessions_started"] += 1
            else:
                s.hidden = step.states[i]
                if live and s.answer is not None:  # scored once the batch is
                    run.pending.append((rec.partition, rec.offset, s.answer, ev.item_id or ""))
            s.push_item(ev.item_id or "", limit)
            if ev.event_id is not None and config.dedup_event_ids > 0:
                s.push_event_id(ev.event_id, config.dedup_event_ids)
            s.partition, s.offset, s.incarnation = rec.partition, rec.offset, incarnation
            s.last_time = max(s.last_time, t)
            s.n_events += 1
            s.n_unknown += int(unknown)
            answer = s.answer = Answer(version, arm) if live else None
            k.sess_dirty = True
        add_answer(answer)
        add(
            Recommendation(
                cid,
                rec.topic,
                rec.partition,
                rec.offset,
                ev.user_id,
                ev.session_id,
                ev.item_id,
                [],  # items and scores: filled in when scored
                [],
                version,
                arm,
                t,
                rec.timestamp,
                rec.received_at,
                0.0,  # emitted_at: stamped when the batch is scored
                dup,
                unknown,
            )
        )
    if step.top_ids is not None and step.top_scores is not None:
        _fill_answers(
            run.recommendations[first:],
            run.answers[first:],
            step.top_ids,
            step.top_scores,
            config.top_k,
            stats,
            step.top_packed,
        )


def _packed_scores(scores: np.ndarray) -> bytes:
    """The first :data:`DEPTH` scores of each row as little-endian float32 bytes, the form
    a session state stores them in: one conversion per batch, not one per answer."""
    return np.ascontiguousarray(scores[:, :DEPTH], dtype="<f4").tobytes()


def _fill_answers(
    recs: Sequence[Recommendation],
    answers: Sequence[Answer | None],
    ids: Sequence[list[str]],
    scores: Sequence[list[float]],
    top_k: int,
    stats: Counter[str],
    packed: bytes = b"",
) -> None:
    """Put the top-k into the recommendations, and the top :data:`DEPTH` into the answers the
    session states keep; a non-finite score never reaches either: its item is left out and
    counted (``nonfinite_scores``). ``packed``: the rows' scores as :func:`_packed_scores`
    gives them (b"": none)."""
    width = len(packed) // len(ids) if packed else 0
    at = -width
    for r, a, row_ids, row_scores in zip(recs, answers, ids, scores, strict=True):
        at += width
        row_packed: bytes | None = packed[at : at + width] if width else None
        if not all(map(math.isfinite, row_scores)):
            row_packed = None
            keep = [i for i, x in enumerate(row_scores) if math.isfinite(x)]
            stats["nonfinite_scores"] += len(row_scores) - len(keep)
            stats["nonfinite_answers"] += 1
            row_ids = [row_ids[i] for i in keep]
            row_scores = [row_scores[i] for i in keep]
        if len(row_ids) > top_k:
            r.items, r.scores = row_ids[:top_k], row_scores[:top_k]
        else:
            r.items, r.scores = row_ids, row_scores
        if a is None:
            continue
        if len(row_ids) > DEPTH:
            a.fill(row_ids[:DEPTH], row_scores[:DEPTH], row_packed)
        else:  # (shared with the recommendation when it has them all: neither is changed)
            a.fill(row_ids, row_scores, row_packed)


def state_writes(
    work: dict[str, KeyStates],
    partitions: Mapping[str, int],
    max_bytes: int = MAX_STATE_BYTES,
) -> list[StateWrite]:
    """Phase 4: one write (or delete) per changed key, for its partition, each encoded and
    capped at ``max_bytes``; a session's answer is added when the batch is scored."""
    writes: list[StateWrite] = []
    add = writes.append
    for key, k in work.items():
        p = partitions[key]
        s = k.sess
        if s is not None and k.sess_dirty:
            answer = s.answer if s.answer is not None and not s.answer.scored else None
            add(StateWrite(SESSIONS, key, p, s.to_bytes(max_bytes), answer))
        elif s is None and k.sess_deleted:
            add(StateWrite(SESSIONS, key, p, None))
        if k.user is not None and k.user_dirty:
            add(StateWrite(USERS, key, p, k.user.to_bytes(max_bytes)))
    return writes


@dataclass
class AppliedBatch:
    """A batch whose states are advanced (:func:`apply_batch`) and not yet scored or stored
    (:func:`finish_batch`)."""

    result: BatchResult
    runs: list[ArmRun]
    writes: list[StateWrite]


def split_arms(
    queues: dict[str, deque[Click]], user_keys: set[str], models: ArmModels, res: BatchResult
) -> list[tuple[ArmRun, dict[str, deque[Click]]]]:
    """The runs of a batch: the champion's, and the challenger's when one is loaded (A/B: the
    keys of its arm; shadow: every key again, under its shadow state key, unpublished)."""
    champion = ArmRun(CHAMPION, models.champion, True, res.stats)
    challenger = models.challenger
    if challenger is None or not (models.shadow or models.ab):
        return [(champion, queues)]
    if models.shadow:
        shadow = ArmRun(CHALLENGER, challenger, False, Counter())
        copies = {SHADOW_NS + key: deque(q) for key, q in queues.items()}
        for key in queues:
            res.key_partitions[SHADOW_NS + key] = res.key_partitions[key]
        user_keys.update([SHADOW_NS + key for key in user_keys])
        return [(champion, queues), (shadow, copies)]
    mine: dict[str, deque[Click]] = {}
    theirs: dict[str, deque[Click]] = {}
    for key, q in queues.items():
        (mine if models.arm_of_state_key(key) == CHAMPION else theirs)[key] = q
    return [(champion, mine), (ArmRun(CHALLENGER, challenger, True, res.stats), theirs)]


def apply_run(
    run: ArmRun,
    queues: dict[str, deque[Click]],
    user_keys: set[str],
    res: BatchResult,
    store: StateStore,
    config: CoreConfig,
    in_flight: InFlightStates | None,
    topic: InputTopic = UNKNOWN_TOPIC,
) -> list[StateWrite]:
    """Phases 2-4 for one arm's clicks: load, rounds of (end sessions, advance, emit), and
    the state writes. ``topic``: what the engine knows of the clicks topic
    (:mod:`streamrec.serving.input_topic`)."""
    stats, model = run.stats, run.model
    work = load_states(queues, user_keys, res.key_partitions, store, model, stats, in_flight)
    # rounds: round r holds the r-th event of every key, so a key is stepped at most once
    model_s = 0.0
    while queues:
        batch = [(key, q.popleft()) for key, q in queues.items()]
        queues = {key: q for key, q in queues.items() if q}
        stats["events"] += len(batch)
        to_end, end_pos, clicks = plan_round(batch, work, config, stats, topic)
        t0 = time.perf_counter()
        end_sessions(to_end, model, config, end_pos, stats)
        if not clicks:
            model_s += time.perf_counter() - t0
            continue
        stats["clicks"] += len(clicks)
        ks = [work[c.key] for c in clicks]
        step = advance_round(clicks, ks, model, config, run.unscored, run.unscored_rows)
        model_s += time.perf_counter() - t0
        emit_round(clicks, ks, step, run, res, config, topic.incarnation)
    run.model_seconds = model_s
    return state_writes(work, res.key_partitions, config.max_state_bytes)


def apply_batch(
    records: Sequence[Record],
    store: StateStore,
    models: Models,
    config: CoreConfig = DEFAULT_CONFIG,
    *,
    clock: StreamClock | None = None,
    now: float | None = None,
    in_flight: InFlightStates | None = None,
    seq: int = 0,
    topic: InputTopic = UNKNOWN_TOPIC,
) -> AppliedBatch:
    """Phases 1-4: decode and group, then per arm: load (and migrate) states, rounds of (end
    sessions, advance, emit), encode the changed states. Nothing is stored or scored yet
    (:func:`finish_batch`). ``in_flight``: the states of batches applied and not yet stored
    (the native worker's pipeline), which this batch's writes join as batch ``seq``."""
    arms = as_arms(models)
    now = time.time() if now is None else now
    res = BatchResult(model_version=arms.champion.version)
    res.stats["records"] += len(records)
    if in_flight is not None:
        in_flight.prune()
    queues, user_keys = decode_and_group(records, res, config, clock, now, topic)
    runs: list[ArmRun] = []
    writes: list[StateWrite] = []
    if queues:
        for run, run_queues in split_arms(queues, user_keys, arms, res):
            writes += apply_run(run, run_queues, user_keys, res, store, config, in_flight, topic)
            runs.append(run)
            (res.recommendations if run.published else res.shadow).extend(run.recommendations)
            if not run.published:
                res.stats.update({f"shadow_{k}": n for k, n in run.stats.items()})
    res.stats["recommendations"] += len(res.recommendations)
    if in_flight is not None:
        in_flight.add(seq, writes)
    return AppliedBatch(res, runs, writes)


def finish_batch(
    batch: AppliedBatch, store: StateStore, config: CoreConfig = DEFAULT_CONFIG
) -> BatchResult:
    """Phases 5-6: score (one matmul + top-k per arm for a split-step model), score each click
    that continues a session against the previous answer (live metrics), store the batch's
    states with their answers; stamps ``emitted_at``."""
    res = batch.result
    depth = answer_depth(config)
    for run in batch.runs:
        if run.unscored:
            t0 = time.perf_counter()
            clicked = np.concatenate(run.unscored_rows) if run.unscored_rows else None
            top_rows, scores = run.model.score(np.concatenate(run.unscored), depth, clicked)
            ids = run.model.ids(top_rows)
            run.model_seconds += time.perf_counter() - t0
            packed = _packed_scores(scores) if config.live_metrics else b""
            _fill_answers(
                run.recommendations, run.answers, ids.tolist(), scores.tolist(), config.top_k,
                run.stats, packed,
            )  # fmt: skip
            run.unscored, run.unscored_rows = [], []
        res.model_seconds += run.model_seconds
    for run in batch.runs:
        res.evaluations += evaluate(run.pending, run.stats)
    write_states(batch.writes, store, config.max_state_bytes, res.stats)
    emitted_at = time.time()
    for r in res.recommendations:
        r.emitted_at = emitted_at
    return res


def evaluate(
    pending: Iterable[tuple[int, int, Answer, str]], stats: Counter[str]
) -> list[Evaluation]:
    """Each click scored against its session's previous answer (scored by now: in this
    batch, or in one before it): the conservative rank up to the largest cut-off."""
    out: list[Evaluation] = []
    k_max = KS[-1]
    inf = math.inf
    for partition, offset, prev, target in pending:
        if not prev.scored:  # not possible: every answer is scored before a later batch
            stats["live_unscored_answers"] += 1
            continue
        # (live_rank, without splitting a stored answer's ids: most targets are not there)
        pos = prev.position(target)
        scores = prev.scores if pos >= 0 else None
        rank = inf if scores is None else rank_at(pos, scores, prev.n_items, k_max)
        out.append(Evaluation(partition, offset, prev.arm, prev.version, rank))
    return out


def process_batch(
    records: Sequence[Record],
    store: StateStore,
    model: Models,
    config: CoreConfig = DEFAULT_CONFIG,
    *,
    clock: StreamClock | None = None,
    now: float | None = None,
    topic: InputTopic = UNKNOWN_TOPIC,
) -> BatchResult:
    """Apply a batch of raw click records to the states and return what to publish:
    :func:`apply_batch` then :func:`finish_batch` (the native worker runs the two in
    different threads, so that batch N is scored while batch N+1 is applied). ``topic`` is
    what the engine knows of the clicks topic (incarnation, partitions and partitioner, how
    far each partition reaches: :mod:`streamrec.serving.input_topic`)."""
    applied = apply_batch(records, store, model, config, clock=clock, now=now, topic=topic)
    return finish_batch(applied, store, config)
