"""Seeded synthetic click logs with planted structure a sequence model can learn.

- Items belong to topics (item ``i`` is in topic ``i % n_topics``); within a topic, popularity is
  Zipf-like (weight ``1 / rank**zipf_a``, ranks shuffled per topic).
- Next-item transitions are sparse and first-order: every item has ``n_successors`` likely
  successors (mostly in its own topic) with decreasing probabilities. With probability
  ``p_follow`` the next click is one of the current item's successors; otherwise it is drawn from
  the session's topic by popularity, and with probability ``p_switch_topic`` the session first
  moves to a random other topic.
- Without users, a session's topic is drawn from a global Zipf-like topic distribution. With
  ``n_users``, each user has a persistent Dirichlet preference over topics that decides the topic
  of each of their sessions, and their sessions follow each other in time with gaps of at least
  ``min_session_gap`` seconds (longer than any gap inside a session), so ``sessionize`` with a
  30-minute gap recovers the sessions.

Times are real-looking epoch seconds starting at ``start_time``. Rows are sorted by Time, as a
click stream would arrive. Ids are strings (``ItemId`` "0".."n_items-1", ``SessionId`` numbered
by start time, ``UserId`` "u0"...).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

START_TIME = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _topic_sampler(
    item_topic: np.ndarray, weights: np.ndarray, n_topics: int
) -> tuple[np.ndarray, np.ndarray]:
    """Items sorted by topic and keys ``topic + cdf within topic`` for vectorised sampling."""
    order = np.lexsort((np.arange(len(item_topic)), item_topic))
    t = item_topic[order]
    w = weights[order]
    cum = np.cumsum(w)
    topic_start = np.searchsorted(t, np.arange(n_topics), side="left")
    topic_end = np.searchsorted(t, np.arange(n_topics), side="right")
    base = np.where(topic_start > 0, cum[np.maximum(topic_start - 1, 0)], 0.0)
    total = cum[topic_end - 1] - base
    cdf = (cum - base[t]) / total[t]
    cdf[topic_end - 1] = 1.0  # exact ends so a key never spills into the next topic
    return order, t + cdf


def _sample_in_topic(
    rng: np.random.Generator, topics: np.ndarray, order: np.ndarray, keys: np.ndarray
) -> np.ndarray:
    q = topics + rng.random(len(topics))
    pos = np.searchsorted(keys, q, side="right")
    return order[np.minimum(pos, len(order) - 1)]


def generate_clicks(
    n_sessions: int = 1000,
    n_items: int = 200,
    n_users: int | None = None,
    n_topics: int = 10,
    seed: int = 0,
    *,
    mean_session_length: float = 6.0,
    max_session_length: int = 40,
    n_successors: int = 3,
    p_follow: float = 0.7,
    p_switch_topic: float = 0.05,
    p_successor_in_topic: float = 0.9,
    zipf_a: float = 1.0,
    user_concentration: float = 0.3,
    start_time: float = START_TIME,
    span_days: float = 30.0,
    mean_click_gap: float = 40.0,
    min_session_gap: float = 3 * 3600.0,
    p_user_favourite: float = 0.0,
    n_user_favourites: int = 10,
) -> pd.DataFrame:
    """Generate a click log ``SessionId, ItemId, Time[, UserId]`` (see the module docstring).

    Deterministic for a seed. A session has 2 + a geometric number of clicks (mean
    ``mean_session_length`` in all), capped at ``max_session_length``; clicks within a session
    are ``1 + Exp(mean_click_gap)`` seconds apart (the exponential part capped at 20 minutes).

    ``p_user_favourite`` (with ``n_users``): every user also has ``n_user_favourites`` persistent
    favourite items (drawn uniformly from their preferred topics); each next click is one of
    them with this probability. This is a taste a session-only model cannot know at a
    session's start, while a model with a user state can carry it over from earlier sessions.
    It draws from its own random stream, so 0 (the default) leaves every other output of a
    seed unchanged.
    """
    if n_sessions < 1 or n_items < 2 or n_topics < 1:
        raise ValueError("need n_sessions >= 1, n_items >= 2, n_topics >= 1")
    n_topics = min(n_topics, n_items)
    if n_users is not None and not 1 <= n_users <= n_sessions:
        raise ValueError(f"n_users must be between 1 and n_sessions ({n_sessions})")
    if max_session_length < 2 or mean_session_length < 2:
        raise ValueError("sessions have at least 2 clicks")
    rng = np.random.default_rng(seed)

    # --- items: topics, popularity, successors
    item_topic = np.arange(n_items) % n_topics
    rank_in_topic = np.empty(n_items, dtype=np.int64)
    for topic_id in range(n_topics):  # n_topics is small; per-topic shuffle of popularity ranks
        members = np.flatnonzero(item_topic == topic_id)
        rank_in_topic[members] = rng.permutation(len(members))
    pop = 1.0 / (1.0 + rank_in_topic) ** zipf_a
    order, keys = _topic_sampler(item_topic, pop, n_topics)
    topic_pop = 1.0 / (1.0 + rng.permutation(n_topics)) ** 0.7
    topic_pop /= topic_pop.sum()

    n_succ = max(1, min(n_successors, n_items - 1))
    same = rng.random((n_items, n_succ)) < p_successor_in_topic
    succ_topic = np.where(same, item_topic[:, None], rng.integers(0, n_topics, (n_items, n_succ)))
    successors = _sample_in_topic(rng, succ_topic.ravel(), order, keys).reshape(n_items, n_succ)
    # no self-loops: shift a self-successor to the next item of the same topic
    self_loop = successors == np.arange(n_items)[:, None]
    shift = n_topics if n_topics < n_items else 1
    successors[self_loop] = (successors[self_loop] + shift) % n_items
    succ_p = 0.5 ** np.arange(n_succ)
    succ_cdf = np.cumsum(succ_p / succ_p.sum())
    succ_cdf[-1] = 1.0

    # --- sessions: users, topics, lengths
    if n_users is None:
        users = None
        sess_topic = rng.choice(n_topics, size=n_sessions, p=topic_pop)
    else:
        m = min(2, n_sessions // n_users)
        counts = m + rng.multinomial(n_sessions - m * n_users, np.full(n_users, 1.0 / n_users))
        users = np.repeat(np.arange(n_users), counts)
        pref = rng.dirichlet(np.full(n_topics, user_concentration), size=n_users)
        pref = 0.9 * pref + 0.1 * topic_pop  # a little of the global taste
        cdf = np.cumsum(pref, axis=1)
        cdf[:, -1] = 1.0
        u = rng.random(n_sessions)
        sess_topic = (u[:, None] >= cdf[users]).sum(axis=1)
    # geometric extra length: a heavy-ish tail like real sessions
    extra = rng.geometric(1.0 / (mean_session_length - 1.0), size=n_sessions) - 1
    lengths = 2 + extra
    lengths = np.minimum(lengths, max_session_length)

    favs = None
    if users is not None and p_user_favourite > 0:
        fav_rng = np.random.default_rng([seed, 1])
        k = max(1, int(n_user_favourites))
        u_topics = (fav_rng.random((len(cdf), k, 1)) >= cdf[:, None, :]).sum(axis=2)
        # uniform within the topic, not by popularity: a popular item of the session's topic is
        # no favourite, so the taste is not readable from the session's own clicks
        in_topic = (n_items - u_topics + n_topics - 1) // n_topics
        favs = u_topics + n_topics * (fav_rng.random(u_topics.shape) * in_topic).astype(np.int64)

    # --- the clicks, one time step for all live sessions at once
    max_len = int(lengths.max())
    items = np.full((n_sessions, max_len), -1, dtype=np.int64)
    topic = sess_topic.copy()
    cur = _sample_in_topic(rng, topic, order, keys)
    items[:, 0] = cur
    for step in range(1, max_len):
        live = np.flatnonzero(lengths > step)
        if len(live) == 0:
            break
        c = cur[live]
        follow = rng.random(len(live)) < p_follow
        col = np.searchsorted(succ_cdf, rng.random(len(live)), side="right")
        via_succ = successors[c, np.minimum(col, n_succ - 1)]
        t = topic[live]
        switch = rng.random(len(live)) < p_switch_topic
        t = np.where(switch, rng.integers(0, n_topics, len(live)), t)
        topic[live] = t
        via_topic = _sample_in_topic(rng, t, order, keys)
        # a topic draw equal to the current item would be a repeat: take its first successor
        via_topic = np.where(via_topic == c, successors[c, 0], via_topic)
        nxt = np.where(follow, via_succ, via_topic)
        if favs is not None and users is not None:
            fav = fav_rng.random(len(live)) < p_user_favourite
            pick = favs[users[live], fav_rng.integers(0, favs.shape[1], len(live))]
            nxt = np.where(fav & (pick != c), pick, nxt)
        cur[live] = nxt
        items[live, step] = nxt

    # --- times
    gaps = 1.0 + np.minimum(rng.exponential(mean_click_gap, (n_sessions, max_len)), 1200.0)
    gaps[:, 0] = 0.0
    offsets = np.cumsum(gaps, axis=1)
    duration = offsets[np.arange(n_sessions), lengths - 1]
    span = span_days * 86400.0
    if users is None:
        starts = np.sort(rng.random(n_sessions)) * span
    else:
        # a user's sessions follow each other: start_{k+1} = end_k + gap
        assert n_users is not None  # users are drawn only with n_users
        per_user = np.bincount(users, minlength=n_users)
        mean_gap = max(span / max(per_user.mean(), 1.0) - min_session_gap, 60.0)
        between = min_session_gap + rng.exponential(mean_gap, n_sessions)
        first = np.ones(n_sessions, dtype=bool)
        first[1:] = users[1:] != users[:-1]
        prev_duration = np.concatenate([[0.0], duration[:-1]])
        inc = np.where(first, rng.random(n_sessions) * span * 0.2, prev_duration + between)
        cs = np.cumsum(inc)
        # subtract the running total before each user's first session (cs is non-decreasing)
        base = np.maximum.accumulate(np.where(first, cs - inc, 0.0))
        starts = cs - base

    # session ids numbered by start time
    sess_order = np.lexsort((np.arange(n_sessions), starts))
    sess_rank = np.empty(n_sessions, dtype=np.int64)
    sess_rank[sess_order] = np.arange(n_sessions)

    mask = np.arange(max_len)[None, :] < lengths[:, None]
    rows, cols = np.nonzero(mask)
    time = np.round(start_time + starts[rows] + offsets[rows, cols], 3)
    out = {
        "SessionId": sess_rank[rows].astype(str),
        "ItemId": items[rows, cols].astype(str),
        "Time": time,
    }
    if users is not None:
        out["UserId"] = np.char.add("u", users[rows].astype(str))
    df = pd.DataFrame(out)
    order_rows = np.lexsort((cols, sess_rank[rows], time))
    df = df.iloc[order_rows].reset_index(drop=True)
    for name in ("SessionId", "ItemId", "UserId"):
        if name in df.columns:
            df[name] = df[name].astype(str)
    df["Time"] = df["Time"].astype(np.float64)
    return df
