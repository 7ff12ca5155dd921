"""GRU4Rec losses: values against scalar hand computations, gradients against finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    LOSSES,
    bpr,
    bpr_max,
    cross_entropy,
    get_loss,
    logq_correction,
    top1,
    top1_max,
)

S = [[1.0, 0.5, -0.5], [0.2, 0.0, 1.0]]  # B=2 rows, columns: 2 in-batch targets + 1 sample


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def negs(i: int) -> list[int]:
    return [j for j in range(3) if j != i]


def softmax_neg(i: int) -> dict[int, float]:
    e = {j: math.exp(S[i][j]) for j in negs(i)}
    z = sum(e.values())
    return {j: v / z for j, v in e.items()}


def scores(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(S, dtype=dtype)


def test_top1_value() -> None:
    # official: mean over all N columns of σ(r_j - r_i) + σ(r_j²), minus σ(r_i²)/N
    want = 0.0
    for i in range(2):
        r = S[i]
        m = sum(sig(r[j] - r[i]) + sig(r[j] ** 2) for j in range(3)) / 3
        want += m - sig(r[i] ** 2) / 3
    assert top1(scores()).item() == pytest.approx(want, rel=1e-12)


def test_bpr_value() -> None:
    want = sum(sum(-math.log(sig(S[i][i] - S[i][j])) for j in range(3)) / 3 for i in range(2))
    assert bpr(scores()).item() == pytest.approx(want, rel=1e-12)


def test_top1_max_value() -> None:
    want = 0.0
    for i in range(2):
        s = softmax_neg(i)
        want += sum(s[j] * (sig(S[i][j] - S[i][i]) + sig(S[i][j] ** 2)) for j in negs(i))
    assert top1_max(scores()).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("reg", [0.0, 1.5])
def test_bpr_max_value(reg: float) -> None:
    want = 0.0
    for i in range(2):
        s = softmax_neg(i)
        want += -math.log(sum(s[j] * sig(S[i][i] - S[i][j]) for j in negs(i)) + 1e-24)
        want += reg * sum(s[j] * S[i][j] ** 2 for j in negs(i))
    assert bpr_max(scores(), bpreg=reg).item() == pytest.approx(want, rel=1e-12)


def test_cross_entropy_value_and_logq() -> None:
    want = sum(-math.log(math.exp(S[i][i]) / sum(math.exp(x) for x in S[i])) for i in range(2))
    assert cross_entropy(scores()).item() == pytest.approx(want, rel=1e-12)
    # logQ: subtract log(count) (in-batch targets) and log(count^alpha) (samples)
    counts = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    rows = torch.tensor([0, 2, 1])  # columns -> item rows
    corr = logq_correction(counts, rows, 2, 0.5, 1.0)
    assert corr.tolist() == pytest.approx([math.log(4.0), math.log(9.0), math.log(1.0**0.5)])
    adj = [[S[i][j] - corr[j].item() for j in range(3)] for i in range(2)]
    want = sum(-math.log(math.exp(adj[i][i]) / sum(math.exp(x) for x in adj[i])) for i in range(2))
    assert cross_entropy(scores(), None, corr).item() == pytest.approx(want, rel=1e-12)


def test_valid_mask_drops_row_and_column() -> None:
    # slot 1 empty: only row 0 counts, and column 1 is no negative for it
    valid = torch.tensor([True, False])
    reduced = scores()[:1][:, [0, 2]]
    for name in ("top1", "bpr", "top1-max", "bpr-max", "cross-entropy"):
        fn = get_loss(name, bpreg=0.7)
        assert fn(scores(), valid).item() == pytest.approx(fn(reduced).item(), rel=1e-9), name


@pytest.mark.parametrize("name", ["top1", "bpr", "top1-max", "bpr-max", "cross-entropy"])
def test_gradcheck(name: str) -> None:
    fn = get_loss(name, bpreg=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: fn(s), (x,))
    valid = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda s: fn(s, valid), (x,))


def test_gradcheck_logq() -> None:
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    corr = torch.rand(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: cross_entropy(s, None, corr), (x,))


def test_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")


@pytest.mark.parametrize("name", LOSSES)
def test_no_nan_when_a_row_has_no_negative(name):
    """User-parallel batches end with a single live slot; with no extra samples its row has no
    negative at all. The max-losses used to return 0/0 = NaN there (HRNN's bpr-max/top1-max
    collapse to Recall 0); every loss must stay finite, with finite gradients."""
    scores = torch.randn(4, 4, requires_grad=True)
    valid = torch.tensor([False, True, False, False])
    loss = get_loss(name)(scores, valid)
    loss.backward()
    assert torch.isfinite(loss)
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
