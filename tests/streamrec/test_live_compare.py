"""Comparing the arms from the live metrics topic's records (intervals, the difference, whether
the data tell the arms apart) and the rollback guard's decisions in a registry (no broker)."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest

from streamrec.loop import guard, registry
from streamrec.loop.live_report import compare, difference, format_comparison, interval, to_json
from streamrec.model.checkpoint import save_checkpoint
from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig
from streamrec.serving.live import LiveCounts, LiveRecord


def _counts(ranks: list[float]) -> LiveCounts:
    c = LiveCounts()
    for r in ranks:
        c.add_rank(r)
    return c


def _ranks(n: int, p_hit: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.randint(1, 20)) if rng.random() < p_hit else math.inf for _ in range(n)]


def _record(
    partition: int, after: int, counts: dict[tuple[str, str], LiveCounts], t: float
) -> LiveRecord:
    n = sum(c.n for c in counts.values())
    return LiveRecord("app", partition, after, after + n, t, "w", counts)


def test_intervals_are_the_textbook_ones() -> None:
    c = _counts([1.0] * 30 + [math.inf] * 70)  # Recall@20 = 0.3 over 100
    r = interval(c, "recall", 20, 0.95)
    # sample variance of 30 ones and 70 zeros: 0.3 * 0.7 * 100 / 99
    half = 1.959964 * math.sqrt(0.3 * 0.7 / 99)
    assert r.value == pytest.approx(0.3)
    assert (r.low, r.high) == (
        pytest.approx(0.3 - half, abs=1e-6),
        pytest.approx(0.3 + half, abs=1e-6),
    )
    m = interval(_counts([1.0, 2.0, 4.0, math.inf]), "mrr", 20, 0.95)
    xs = [1.0, 0.5, 0.25, 0.0]
    mean = sum(xs) / 4
    var = sum((x - mean) ** 2 for x in xs) / 3
    assert m.value == pytest.approx(mean)
    assert m.high - m.value == pytest.approx(1.959964 * math.sqrt(var / 4), abs=1e-6)
    d = difference(c, _counts([math.inf] * 100), "recall", 20, 0.95)
    assert d.value == pytest.approx(0.3) and d.low > 0  # a real difference is seen
    with pytest.raises(ValueError):
        interval(c, "recall", 20, 1.5)


def test_compare_tells_the_arms_apart_only_when_the_data_can() -> None:
    t = time.time()
    far = {
        ("champion", "v1"): _counts(_ranks(4000, 0.30, 1)),
        ("challenger", "v2"): _counts(_ranks(4000, 0.10, 2)),
    }
    near = {
        ("champion", "v1"): _counts(_ranks(200, 0.30, 3)),
        ("challenger", "v2"): _counts(_ranks(200, 0.29, 4)),
    }
    apart = compare([_record(0, -1, far, t)])
    assert apart["difference"]["distinguishable"] == {"recall@20": True, "mrr@20": True}
    assert apart["difference"]["recall@20"].high < 0
    assert [r["predictions"] for r in apart["arms"]] == [4000, 4000]
    together = compare([_record(0, -1, near, t)])
    assert together["difference"]["distinguishable"]["recall@20"] is False
    text = format_comparison(together)
    assert "cannot tell them apart yet" in text and "challenger v2 - champion v1" in text
    assert to_json(together)["difference"]["recall@20"]["low"] < 0
    # records written twice (a producer's retry) count once; one arm: nothing to compare
    only = {("champion", "v1"): _counts([1.0, math.inf])}
    one = compare([_record(0, -1, only, t), _record(0, -1, only, t)])
    assert one["arms"][0]["predictions"] == 2 and "difference" not in one


def _registry(tmp_path: Path) -> tuple[Path, str, str]:
    models = tmp_path / "models"
    vs = []
    for seed in (1, 2):
        model = GRU4Rec(GRU4RecConfig(n_items=5, layers=[4]), seed=seed)
        ckpt = save_checkpoint(
            registry.staging_dir(models, str(seed)), model, "gru4rec", [f"i{j}" for j in range(5)]
        )
        vs.append(registry.add_version(models, ckpt))
    registry.publish(models, vs[0], by="test")
    return models, vs[0], vs[1]


def test_the_guard_rolls_back_a_worse_champion_once_it_has_enough_predictions(
    tmp_path: Path,
) -> None:
    models, v1, v2 = _registry(tmp_path)
    cfg = guard.GuardConfig(min_predictions=300, max_predictions=2000, window_s=600)
    t0 = time.time()
    before = [_record(0, -1, {("champion", v1): _counts(_ranks(1000, 0.3, 5))}, t0 - 60)]
    assert guard.check(models, before, cfg) is None  # v1 replaced nothing: nothing to judge
    registry.publish(models, v2, by="retrain")
    after = 999
    records = list(before)
    # the old champion's counts from before the window do not count as its recent figure
    old = [_record(1, -1, {("champion", v1): _counts([1.0] * 500)}, t0 - 10_000)]
    v = guard.check(models, old + records, cfg)
    assert v is not None and v.action == "wait" and "0 of 300" in v.reason
    assert v.figures["previous_predictions"] == 1000
    for j in range(3):  # 100 predictions at a time: judged from the 300th on
        c = {("champion", v2): _counts(_ranks(100, 0.02, 10 + j))}
        records.append(_record(0, after, c, time.time()))
        after += 100
        v = guard.check(models, records, cfg)
        assert v is not None
        assert v.action == ("rollback" if j == 2 else "wait"), v.reason
    assert registry.alias_version(models) == v1
    last = registry.champion_changes(models)[-1]
    assert (last["version"], last["previous"], last["by"]) == (v1, v2, "guard")
    assert "worse beyond the tolerance" in last["reason"]
    # judged once: the rollback itself is not judged again
    assert guard.check(models, records, cfg) is None


def test_the_guard_keeps_a_champion_not_worse(tmp_path: Path) -> None:
    models, v1, v2 = _registry(tmp_path)
    cfg = guard.GuardConfig(min_predictions=100, max_predictions=400, window_s=600)
    t0 = time.time()
    records = [_record(0, -1, {("champion", v1): _counts(_ranks(1000, 0.3, 5))}, t0 - 60)]
    registry.set_alias(models, "challenger", v2)
    registry.promote(models)
    # a little worse (a point estimate below), but the data cannot say it is: kept
    c = {("champion", v2): _counts(_ranks(400, 0.27, 6))}
    v = guard.check(models, [*records, _record(1, -1, c, time.time())], cfg)
    assert v is not None and v.action == "keep"
    assert registry.alias_version(models) == v2
    assert guard.pending_change(models) is None  # kept: no longer watched
