"""Parts of GRU4Rec training checked against a plain re-derivation: the popularity^alpha
sampler, Adagrad with (Nesterov) momentum on dense and sparse parameters, and the logQ
correction inside the training loop itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from trainer.optim import IndexedAdagradM
from trainer.sampling import SampleBuffer


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_samples_follow_popularity_to_the_alpha(alpha: float) -> None:
    counts = torch.tensor([1.0, 0.0, 4.0, 9.0, 2.0])
    buf = SampleBuffer(counts, n_sample=1000, alpha=alpha, device="cpu", seed=3, max_size=40_000)
    drawn = torch.cat([buf.get() for _ in range(60)])  # 60 > 40 rows: the buffer refills
    assert buf.n_batches == 40 and drawn.shape == (60_000,)
    freq = np.bincount(drawn.numpy(), minlength=5) / drawn.numel()
    p = counts.numpy() ** alpha
    p[counts.numpy() == 0] = 0.0  # 0**0 == 1, but an item never seen has no weight
    if alpha == 0.0:
        p = np.where(counts.numpy() >= 0, 1.0, 0.0)  # alpha 0: uniform over all items
    p = p / p.sum()
    # 60k draws: the standard error of each frequency is below 0.002
    np.testing.assert_allclose(freq, p, atol=0.01)
    if alpha > 0:
        assert freq[1] == 0.0  # an item with count 0 is never drawn
    # same seed, same samples; another seed, others
    again = SampleBuffer(counts, 1000, alpha, "cpu", seed=3, max_size=40_000)
    assert torch.equal(torch.cat([again.get() for _ in range(60)]), drawn)
    other = SampleBuffer(counts, 1000, alpha, "cpu", seed=4, max_size=40_000)
    assert not torch.equal(torch.cat([other.get() for _ in range(60)]), drawn)


def _reference_adagrad(
    p0: np.ndarray, grads: list[np.ndarray], lr: float, m: float, nesterov: bool
) -> np.ndarray:
    """The update of trainer/optim.py's docstring, step by step in numpy (float64)."""
    p, acc, v = p0.astype(np.float64), np.zeros_like(p0, np.float64), np.zeros_like(p0, np.float64)
    for g in grads:
        acc += g * g
        d = -lr * g / np.sqrt(acc + 1e-6)
        if m == 0:
            p += d
        else:
            v = m * v + d
            p += m * v + d if nesterov else v
    return p


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.5, False), (0.5, True)])
def test_adagrad_momentum_and_nesterov_dense_and_sparse(momentum: float, nesterov: bool) -> None:
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(6, 3)).astype(np.float32)
    grads = [rng.normal(size=(6, 3)).astype(np.float32) for _ in range(4)]
    want = _reference_adagrad(p0, grads, 0.1, momentum, nesterov)
    dense = torch.nn.Parameter(torch.tensor(p0))
    sparse = torch.nn.Parameter(torch.tensor(p0))
    opt = IndexedAdagradM([dense], [sparse], lr=0.1, momentum=momentum, nesterov=nesterov)
    for g in grads:
        dense.grad = torch.tensor(g)
        # the same gradient as row-sparse parts, rows repeated and split (they must be summed)
        rows = torch.tensor([0, 1, 2, 3, 4, 5, 2, 5])
        parts = torch.tensor(np.concatenate([g, np.zeros((2, 3), np.float32)]))
        parts[2] = parts[6] = torch.tensor(g[2] / 2)
        parts[5] = parts[7] = torch.tensor(g[5] / 2)
        opt.step([(sparse, rows, parts)])
    np.testing.assert_allclose(dense.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sparse.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    if nesterov:  # and Nesterov is not plain momentum
        plain = _reference_adagrad(p0, grads, 0.1, momentum, False)
        assert np.abs(plain - want).max() > 1e-3


def test_training_loop_applies_the_logq_correction(monkeypatch: pytest.MonkeyPatch) -> None:
    """With cross-entropy and logq > 0, every step's loss gets the logQ term: logq * log of
    the training count of each in-batch target and logq * alpha * log count of each sample."""
    import trainer.train
    from streamrec.data.synthetic import generate_clicks

    df = generate_clicks(n_sessions=60, n_items=20, seed=1)
    counts = df["ItemId"].value_counts()
    real_get_loss = trainer.train.get_loss
    seen: list[torch.Tensor | None] = []

    def get_loss(name: str, bpreg: float = 1.0) -> Any:
        fn = real_get_loss(name, bpreg)

        def loss(scores: torch.Tensor, valid: torch.Tensor, *rest: Any) -> torch.Tensor:
            seen.append(rest[0].detach().clone() if rest else None)
            return fn(scores, valid, *rest)

        return loss

    monkeypatch.setattr(trainer.train, "get_loss", get_loss)
    logq, alpha, b, n_sample = 0.7, 0.5, 8, 5
    params = {"loss": "cross-entropy", "logq": logq, "sample_alpha": alpha, "batch_size": b,
              "n_sample": n_sample, "layers": [8], "n_epochs": 1, "device": "cpu"}  # fmt: skip
    trainer.train.train_gru4rec(df, params, progress=False)
    assert seen and all(c is not None for c in seen)
    logc = np.log(counts.to_numpy(dtype=np.float64))
    for c in seen:
        assert c is not None and c.shape == (b + n_sample,)
        in_batch = c[:b].numpy() / logq
        sampled = c[b:].numpy() / (logq * alpha)
        assert (np.abs(in_batch[:, None] - logc[None, :]).min(axis=1) < 1e-4).all()
        assert (np.abs(sampled[:, None] - logc[None, :]).min(axis=1) < 1e-4).all()
    # and without logq no term at all
    seen.clear()
    trainer.train.train_gru4rec(df, {**params, "logq": 0.0}, progress=False)
    assert seen and all(c is None for c in seen)


def test_the_progress_bar_ends_on_the_summarys_events_per_second(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bar's rate is the run's (not the last few steps'), and its last figure is the one
    ``trainer train`` prints and records (``train_events_per_s``)."""
    import re

    from streamrec.data.synthetic import generate_clicks
    from trainer.train import train_gru4rec

    params = {"layers": 8, "n_epochs": 2, "batch_size": 16, "n_sample": 0, "device": "cpu"}
    _, _, stats = train_gru4rec(generate_clicks(200, 40, seed=1), params, log_every=5)
    shown = re.findall(r"([\d,]+) ev/s", capsys.readouterr().err)
    assert shown, "no progress bar"
    assert shown[-1] == f"{stats['train_events_per_s']:,.0f}"
