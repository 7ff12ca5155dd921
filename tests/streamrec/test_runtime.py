"""ServingModel on real GRU4Rec checkpoints: loading, device choice, hot swap and its gate."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamrec.model.device import DeviceError, resolve_device
from streamrec.serving.served_model import (
    ModelHolder,
    ModelLoadError,
    ServingModel,
)

N = 30


def _save(path: Path, seed: int, *, nan: bool = False, holdout: list | None = None) -> Path:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=N, layers=[8]), seed=seed)
    if nan:
        with torch.no_grad():
            model.Wy.fill_(float("nan"))
    stats = {"holdout_sessions": holdout} if holdout is not None else None
    return save_checkpoint(
        path, model, "gru4rec", [f"i{j}" for j in range(N)], data_stats=stats
    ).path


def _newer(path: Path, than: Path) -> None:
    """Give ``path`` a checkpoint.json newer than ``than``'s (file systems with coarse mtimes
    would otherwise tie two checkpoints written in a row)."""
    t = (than / "checkpoint.json").stat().st_mtime + 1
    os.utime(path / "checkpoint.json", (t, t))


def test_device_choice() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            resolve_device("cuda")


def test_load_step_topk(tmp_path: Path) -> None:
    m = ServingModel.from_checkpoint(_save(tmp_path / "a", 1), "cpu", top_k=5)
    assert (m.n_items, m.state_dim, m.user_state_dim) == (N, 8, 0)
    rows = m.rows(["i1", "nope", "i3"])
    assert rows.tolist() == [1, -1, 3]
    st = m.initial_states(None, 3)
    out = m.step(rows, st, None)
    assert out.top_rows.shape == (3, 5) and np.isfinite(out.top_scores).all()
    assert np.array_equal(out.states[1], st[1])  # unknown item: state unchanged
    assert m.validate() is None


def test_hot_swap_from_watched_dir_and_rejections(tmp_path: Path) -> None:
    watch = tmp_path / "ckpts"
    first = ServingModel.from_checkpoint(_save(watch / "v1", 1), "cpu")
    holder = ModelHolder(first, watch_dir=watch, device="cpu")
    assert not holder.maybe_reload()  # nothing newer
    _newer(_save(watch / "v2", 2), than=watch / "v1")
    assert holder.maybe_reload() and holder.current.version != first.version
    v2 = holder.current.version
    # a checkpoint with NaN weights fails the finite-scores gate and is never swapped in
    _newer(_save(watch / "v3", 3, nan=True), than=watch / "v2")
    assert not holder.maybe_reload() and holder.current.version == v2
    assert not holder.maybe_reload()  # remembered as rejected
    # a truncated tensor file fails to load
    bad = _save(tmp_path / "other" / "v4", 4)
    tensors = bad / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    os.utime(bad / "checkpoint.json")
    assert not holder.load_and_swap(bad) and holder.current.version == v2


def _brute_force_recall20(path: Path, sessions: list[list[str]]) -> float:
    """Recall@20 by hand: the raw module, full score vectors, rank = items scored higher."""
    from streamrec.model.checkpoint import load_checkpoint

    ck = load_checkpoint(path, "cpu")
    net: Any = ck.model  # the step API (docs/architecture.md)
    hits = n = 0
    with torch.inference_mode():
        for sess in sessions:
            state = net.initial_state(None, 1)
            for cur, nxt in itertools.pairwise(sess):
                state, scores = net.step(torch.tensor([ck.item_index[cur]]), state, None)
                target = scores[0, ck.item_index[nxt]]
                hits += int((scores[0] > target).sum().item() < 20)
                n += 1
    return hits / n


def test_quality_gate_on_holdout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sessions = [[f"i{j}" for j in rng.integers(0, N, 6)] for _ in range(40)]
    path = _save(tmp_path / "a", 1)
    m = ServingModel.from_checkpoint(path, "cpu")
    recall = m.validate(sessions)
    expected = _brute_force_recall20(path, sessions)
    assert recall == pytest.approx(expected) and 0.0 < expected < 1.0
    # the gate passes at exactly the model's recall and rejects just above it
    assert m.validate(sessions, min_recall=expected) == pytest.approx(expected)
    with pytest.raises(ModelLoadError, match="quality gate"):
        m.validate(sessions, min_recall=expected + 1e-6)
    holder = ModelHolder(m, device="cpu")
    assert holder.load_and_swap(_save(tmp_path / "b", 2, holdout=sessions))


def test_deferred_scoring_equals_per_round_step(tmp_path: Path) -> None:
    import json

    from streamrec.serving.pipeline import process_batch
    from streamrec.serving.records import Record
    from streamrec.serving.state_store import StateStore

    fast = ServingModel.from_checkpoint(_save(tmp_path / "a", 5), "cpu", top_k=7)
    slow = ServingModel.from_checkpoint(tmp_path / "a", "cpu", top_k=7)
    slow.split = False
    assert fast.split
    vals = [("s1", "i1"), ("s2", "i2"), ("s1", "i3"), ("s1", "zz"), ("s2", "i4"), ("s1", "i5")]
    recs = [
        Record(
            json.dumps({"session_id": s, "item_id": i, "timestamp": 1.7e9}).encode(),
            None,
            "c",
            0,
            n,
        )
        for n, (s, i) in enumerate(vals)
    ]
    a, b = StateStore(), StateStore()
    started = time.perf_counter()
    done = process_batch(recs, a, fast)
    # the model's share of the batch: within the batch's own time (not a timing check: a bound)
    assert 0 < done.model_seconds <= time.perf_counter() - started
    ra = done.recommendations
    rb = process_batch(recs, b, slow).recommendations
    assert [r.items for r in ra] == [r.items for r in rb]
    np.testing.assert_allclose([r.scores for r in ra], [r.scores for r in rb], atol=1e-5)
    for key in a.sessions:
        sa, sb = a.get_session(key), b.get_session(key)
        assert sa is not None and sb is not None and sa.same_as(sb)


def test_hrnn_checkpoint_serves_with_user_state(tmp_path: Path) -> None:
    import json

    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.hrnn import HRNN
    from streamrec.serving.pipeline import process_batch
    from streamrec.serving.records import Record
    from streamrec.serving.state_store import StateStore

    torch.manual_seed(0)
    hrnn = HRNN(N, layers=[8], user_layers=[6], variant="all")
    path = save_checkpoint(tmp_path / "h", hrnn, "hrnn", [f"i{j}" for j in range(N)]).path
    m = ServingModel.from_checkpoint(path, "cpu", top_k=5)
    assert m.user_state_dim > 0 and not m.split
    clicks = [("a", "i1"), ("a", "i2"), ("b", "i3"), ("b", "i4")]
    recs = [
        Record(
            json.dumps(
                {"session_id": s, "item_id": i, "user_id": "u", "timestamp": 1.7e9 + n}
            ).encode(),
            b"u",
            "c",
            0,
            n,
        )
        for n, (s, i) in enumerate(clicks)
    ]
    from streamrec.serving.config import CoreConfig

    store = StateStore()
    out = process_batch(recs, store, m, CoreConfig(top_k=5)).recommendations
    # offline: session a from the empty user, session b from the user after a
    u0 = m.initial_user_states(1)
    st = m.initial_states(u0, 1)
    ref = []
    for it in ("i1", "i2"):
        o = m.step(m.rows([it]), st, u0)
        st = o.states
        ref.append(o.top_rows[0])
    u1 = m.end_session(u0, st)
    st = m.initial_states(u1, 1)
    for it in ("i3", "i4"):
        o = m.step(m.rows([it]), st, u1)
        st = o.states
        ref.append(o.top_rows[0])
    assert [r.items for r in out] == [m.ids(x).tolist() for x in ref]
    user = store.get_user("u:u")
    assert user is not None and user.sessions == [["i1", "i2"]]
    np.testing.assert_allclose(user.context, u1[0], atol=1e-6)


def test_metrics_are_served_over_http() -> None:
    import urllib.request

    from streamrec.kafka.embedded import free_port
    from streamrec.metrics import Metrics

    m = Metrics()
    m.observe_batch(10, {"clicks": 8, "dead_letter:invalid": 2, "unknown_items": 1}, [0.01], 0.002)
    m.set_model("gru4rec", "v1", "cpu")
    port = free_port()
    server = m.serve(port, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'streamrec_dead_letters_total{reason="invalid"} 2.0' in text
    assert "streamrec_click_to_recommendation_seconds_bucket" in text
    assert 'streamrec_model_info{device="cpu",name="gru4rec",version="v1"} 1.0' in text
    assert "streamrec_events_total 10.0" in text


@pytest.mark.parametrize("n", [4096, 5000, 17_319])
@pytest.mark.parametrize("k", [1, 20, 50])
def test_block_topk_equals_torch_topk(n: int, k: int) -> None:
    from streamrec.model.topk import blocked_topk as block_topk

    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(33, n, generator=g)
    scores[0, :] = scores[0, 0]  # ties everywhere: values must still match
    scores[1, -k:] += 100.0  # the best items in the last (padded) block
    got_v, got_i = block_topk(scores, k)
    want_v, want_i = torch.topk(scores, k, dim=1)
    assert torch.equal(got_v, want_v)
    assert torch.equal(got_i[1:], want_i[1:])
    assert torch.equal(scores.gather(1, got_i), got_v)  # indices point at those values
    empty_v, empty_i = block_topk(scores[:0], k)  # no rows: empty results, as torch.topk
    assert empty_v.shape == empty_i.shape == (0, k)


@pytest.mark.parametrize("n_items", [300, 5000])
def test_bfloat16_scoring_agrees_with_float32(
    n_items: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamrec.serving.served_model as rt
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: True)  # bf16 math even where emulated

    model = GRU4Rec(GRU4RecConfig(n_items=n_items, layers=[32]), seed=3)
    ids = [f"i{j}" for j in range(n_items)]
    fp32 = ServingModel(model, ids, "v", device="cpu", score_dtype="float32")
    bf16 = ServingModel(model, ids, "v", device="cpu", score_dtype="bfloat16")
    states = np.random.default_rng(0).uniform(-1, 1, (64, 32)).astype(np.float32)
    rows32, scores32 = fp32.score(states, 20)
    rows16, scores16 = bf16.score(states, 20)
    assert scores16.dtype == np.float32 and rows16.shape == rows32.shape
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(rows32, rows16, strict=True)])
    assert overlap >= 0.9, overlap
    # bf16 keeps 8 bits of mantissa: scores agree to about 1% of their scale
    scale = np.abs(scores32).max()
    assert np.abs(np.sort(scores16, 1) - np.sort(scores32, 1)).max() <= 0.02 * scale
    assert not np.array_equal(scores16, scores32)  # it really scored in bf16
    with pytest.raises(ValueError, match="score_dtype"):
        ServingModel(model, ids, "v", device="cpu", score_dtype="float16")


def _save_weights(path: Path, seed: int, edit: str, **kw: Any) -> Path:
    from streamrec.model.checkpoint import save_checkpoint
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    model = GRU4Rec(GRU4RecConfig(n_items=N, layers=[8]), seed=seed)
    with torch.no_grad():
        if edit == "nan_row":  # NaN in one input row only (the last, past the first few)
            for p in model.parameters():
                if p.dim() == 2 and p.shape[0] == N:
                    p[N - 1, 0] = float("nan")
                    break
        elif edit == "zero":
            for p in model.parameters():
                p.zero_()
    return save_checkpoint(path, model, "gru4rec", [f"i{j}" for j in range(N)], **kw).path


def test_weights_must_be_finite_and_every_row_is_validated(tmp_path: Path) -> None:
    good = ServingModel.from_checkpoint(_save(tmp_path / "a", 1), "cpu")
    holder = ModelHolder(good, device="cpu")
    assert not holder.load_and_swap(_save_weights(tmp_path / "nan", 2, "nan_row"))
    assert "NaN" in next(iter(holder.rejected.values()))
    # an all-zero model scores every item the same: refused even without a holdout
    assert not holder.load_and_swap(_save_weights(tmp_path / "zero", 3, "zero"))
    assert "same" in list(holder.rejected.values())[-1]
    assert holder.current is good


def test_gate_is_relative_to_the_checkpoints_own_holdout_metric(tmp_path: Path) -> None:
    sessions = [[f"i{j}", f"i{(j * 7 + 3) % N}", f"i{(j * 11 + 5) % N}"] for j in range(N)]
    probe = ServingModel.from_checkpoint(_save(tmp_path / "p", 4, holdout=sessions), "cpu")
    live = probe.validate(sessions)
    assert live is not None
    holder = ModelHolder(probe, device="cpu", gate_ratio=0.8)
    # the checkpoint claims an offline recall far above what it reaches live: refused
    claim = _save_weights(
        tmp_path / "claim",
        4,
        "",
        data_stats={"holdout_sessions": sessions},
        metrics={"holdout_recall@20": (live + 0.01) / 0.5},
    )
    assert not holder.load_and_swap(claim)
    assert any("quality gate" in v for v in holder.rejected.values())
    honest = _save_weights(
        tmp_path / "honest",
        4,
        "",
        data_stats={"holdout_sessions": sessions},
        metrics={"holdout_recall@20": live},
    )
    assert holder.load_and_swap(honest)


def test_a_checkpoint_rejected_half_written_is_retried_once_it_changes(tmp_path: Path) -> None:
    watch = tmp_path / "ckpts"
    first = ServingModel.from_checkpoint(_save(watch / "v1", 1), "cpu")
    holder = ModelHolder(first, watch_dir=watch, device="cpu")
    time.sleep(0.01)
    full = _save(tmp_path / "staging", 2)
    target = watch / "v2"
    target.mkdir()
    (target / "checkpoint.json").write_bytes((full / "checkpoint.json").read_bytes())
    blob = (full / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # seen half-written
    assert not holder.maybe_reload() and holder.current is first
    assert not holder.maybe_reload()  # unchanged: not tried again
    time.sleep(0.01)
    (target / "model.safetensors").write_bytes(blob)  # the write completes
    assert holder.maybe_reload() and holder.current.version != first.version


def test_bfloat16_falls_back_to_float32_on_a_cpu_without_bf16(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import streamrec.serving.served_model as rt
    from streamrec.model.gru4rec import GRU4Rec, GRU4RecConfig

    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: False)
    model = GRU4Rec(GRU4RecConfig(n_items=N, layers=[8]), seed=1)
    ids = [f"i{j}" for j in range(N)]
    m = ServingModel(model, ids, "v", device="cpu", score_dtype="bfloat16")
    assert m.score_dtype == "float32" and "no bfloat16 instructions" in caplog.text
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: True)
    assert ServingModel(model, ids, "v", device="cpu", score_dtype="bfloat16").score_dtype == (
        "bfloat16"
    )
