import itertools

import numpy as np
import pandas as pd
import pytest

from streamrec.data.clicklog import sessionize
from streamrec.data.synthetic import generate_clicks
from trainer.data import preprocess


def _sessions(df: pd.DataFrame) -> list[np.ndarray]:
    df = df.sort_values(["SessionId", "Time"], kind="stable")
    return [g.to_numpy(dtype=np.int64) for _, g in df.groupby("SessionId", sort=False)["ItemId"]]


def _recall20(scores_for_prev, sessions: list[np.ndarray], n_items: int) -> float:
    """Recall@20 with conservative ties over every transition of ``sessions``."""
    hits = n = 0
    for s in sessions:
        for prev, nxt in itertools.pairwise(s):
            sc = scores_for_prev(prev)
            rank = int((sc >= sc[nxt]).sum())
            hits += rank <= 20
            n += 1
    return hits / n


def test_shape_types_and_ids() -> None:
    df = generate_clicks(n_sessions=300, n_items=50, n_topics=5, seed=1)
    assert list(df.columns) == ["SessionId", "ItemId", "Time"]
    assert df["SessionId"].nunique() == 300
    assert df["Time"].dtype == np.float64
    assert all(isinstance(v, str) for v in df["ItemId"].head(20))
    items = df["ItemId"].astype(int)
    assert items.min() >= 0 and items.max() < 50
    assert df.groupby("SessionId").size().min() >= 2
    assert df["Time"].is_monotonic_increasing  # a click stream, in time order
    assert df["Time"].min() > 1.6e9  # real-looking epoch seconds


def test_deterministic_for_a_seed() -> None:
    a = generate_clicks(n_sessions=200, n_items=40, n_users=20, seed=7)
    b = generate_clicks(n_sessions=200, n_items=40, n_users=20, seed=7)
    c = generate_clicks(n_sessions=200, n_items=40, n_users=20, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["ItemId"].equals(c["ItemId"])


def test_no_consecutive_repeats() -> None:
    df = generate_clicks(n_sessions=500, n_items=30, n_topics=3, seed=2)
    assert len(preprocess(df, min_item_support=1, min_session_length=1)) == len(df)


def test_markov_counter_beats_popularity_clearly() -> None:
    n_items = 300
    df = generate_clicks(n_sessions=4000, n_items=n_items, n_topics=10, seed=3)
    sessions = _sessions(df)
    train, test = sessions[:3200], sessions[3200:]
    pop = np.bincount(np.concatenate(train), minlength=n_items).astype(float)
    counts = np.zeros((n_items, n_items))
    for s in train:
        np.add.at(counts, (s[:-1], s[1:]), 1.0)
    # Markov scores; popularity (scaled below 1 count) only breaks ties among equal counts
    pop_tb = pop / (pop.max() + 1)
    r_pop = _recall20(lambda prev: pop, test, n_items)
    r_markov = _recall20(lambda prev: counts[prev] + pop_tb, test, n_items)
    assert r_markov > r_pop + 0.25, (r_markov, r_pop)
    assert r_markov > 0.6


def test_popularity_is_skewed() -> None:
    df = generate_clicks(n_sessions=3000, n_items=200, n_topics=4, seed=4)
    freq = df["ItemId"].value_counts().to_numpy()
    # top 10% of items take far more than 10% of the clicks
    assert freq[: len(freq) // 10].sum() > 0.3 * freq.sum()


def test_users_have_persistent_topic_preferences() -> None:
    n_topics = 8
    df = generate_clicks(n_sessions=3000, n_items=160, n_users=150, n_topics=n_topics, seed=5)
    assert df["UserId"].nunique() == 150
    per_user = df.groupby("UserId")["SessionId"].nunique()
    assert per_user.min() >= 2 and per_user.mean() == pytest.approx(20)
    df = df.assign(topic=df["ItemId"].astype(int) % n_topics)
    first = df.sort_values("Time").groupby("SessionId").first()  # first click of each session
    first = first.sort_values("Time")
    hit = tot = 0
    for _, g in first.groupby("UserId"):
        history, last = g["topic"].iloc[:-1], g["topic"].iloc[-1]
        hit += int(history.value_counts().idxmax() == last)
        tot += 1
    global_best = first["topic"].value_counts(normalize=True).iloc[0]
    # a user's favourite topic predicts their next session far better than the global one
    assert hit / tot > max(2 * global_best, 0.4), (hit / tot, global_best)


def test_user_sessions_are_separated_in_time() -> None:
    df = generate_clicks(n_sessions=400, n_items=50, n_users=40, seed=6)
    rebuilt = sessionize(df.drop(columns="SessionId"), gap_seconds=1800)
    # the 30-minute gap rule recovers exactly the generated sessions
    pairs = pd.DataFrame({"a": df["SessionId"], "b": rebuilt["SessionId"]}).drop_duplicates()
    assert len(pairs) == df["SessionId"].nunique() == rebuilt["SessionId"].nunique()


def test_large_log_keeps_its_invariants() -> None:
    # speed is a benchmark matter, not a timed test; this checks size and invariants at scale
    df = generate_clicks(n_sessions=20000, n_items=2000, n_users=500, seed=0)
    assert len(df) > 100_000
    assert df["SessionId"].nunique() == 20000 and df["UserId"].nunique() == 500
    assert df["ItemId"].astype(int).between(0, 1999).all()
    assert df.groupby("SessionId")["UserId"].nunique().max() == 1


def test_user_favourites_planted_and_off_by_default():
    kw = dict(n_sessions=600, n_items=200, n_users=40, seed=3)
    base = generate_clicks(**kw)
    assert base.equals(generate_clicks(**kw, p_user_favourite=0.0))
    fav = generate_clicks(**kw, p_user_favourite=0.4, n_user_favourites=5)

    def share_of_top5(df):
        def top5(x):
            return x.value_counts().iloc[:5].sum() / len(x)

        return df.groupby("UserId")["ItemId"].agg(top5).mean()

    # a user's five most clicked items take a much larger share with planted favourites
    assert share_of_top5(fav) > share_of_top5(base) + 0.05
