"""The knobs of the serving pipeline (:class:`CoreConfig`), built from ``Settings`` by the
engines; the tests and benchmarks build it directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamrec.serving.events import MAX_MESSAGE_BYTES
from streamrec.serving.state import MAX_STATE_BYTES


@dataclass(frozen=True)
class CoreConfig:
    """Knobs of the core (built from ``Settings`` by the worker)."""

    session_gap_seconds: float = 1800.0
    recent_items: int = 50
    recent_sessions: int = 10
    top_k: int = 20
    max_message_bytes: int = MAX_MESSAGE_BYTES
    #: Drop user states idle longer than this in the sweep (None: keep forever).
    user_ttl_seconds: float | None = 90 * 24 * 3600.0
    #: Cap on one encoded state (oldest items dropped to fit).
    max_state_bytes: int = MAX_STATE_BYTES
    #: Event ids remembered per open session for duplicate detection (0: offsets only).
    dedup_event_ids: int = 32
    #: An event time more than this ahead of the record's arrival is out of range.
    max_ahead_seconds: float = 3600.0
    #: An event time whose skew (event time - arrival time) is more than this behind its
    #: partition's clock (the median of its keys' skews) is out of range.
    max_skew_seconds: float = 30 * 24 * 3600.0
    #: Recently active keys per partition whose skews make the clock (one vote per key).
    clock_window: int = 1001
    #: A partition's clock is trusted (for checks and the sweep) once this many keys vote.
    clock_min_keys: int = 8
    #: A record without a Kafka key is a ``key_mismatch`` (the engines; the core's tests feed
    #: records without keys).
    require_key: bool = False
    #: Score each click against the answer to its session's previous click (live metrics):
    #: the answer's top ``streamrec.serving.live.DEPTH`` items are kept in the session state.
    live_metrics: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> CoreConfig:
        st = settings.state
        return cls(
            session_gap_seconds=st.session_gap_seconds,
            recent_items=st.recent_items,
            recent_sessions=st.recent_sessions,
            top_k=settings.model.top_k,
            user_ttl_seconds=st.user_ttl_seconds,
            max_state_bytes=st.max_state_bytes,
            dedup_event_ids=st.dedup_event_ids,
            max_ahead_seconds=st.max_ahead_seconds,
            max_skew_seconds=st.max_skew_seconds,
            clock_window=st.clock_window,
            clock_min_keys=st.clock_min_keys,
            require_key=True,
            live_metrics=settings.worker.live_metrics,
        )


#: the defaults (a frozen instance, shared as the default argument of the pipeline's functions)
DEFAULT_CONFIG = CoreConfig()
