import math

import pytest
import torch

from trainer.metrics import MetricAccumulator, ranks

# Row 0: target item 2 (score 0.5) ties with items 1 and 4; item 0 is strictly higher.
#   standard = 1 + 1 = 2, conservative = 1 + 3 = 4, median = 2 + (2 tied others) / 2 = 3.
# Row 1: target item 0 is the unique maximum: rank 1 in every mode.
# Row 2: target item 3 is the unique minimum of 5 items: rank 5 in every mode.
# Row 3: all 5 items tied: standard 1, conservative 5, median 3.
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.5, 0.1, 0.5],
        [2.0, 1.0, 0.0, -1.0, 1.5],
        [0.3, 0.2, 0.4, -5.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ]
)
TARGETS = torch.tensor([2, 0, 3, 4])


@pytest.mark.parametrize(
    "ties,expected",
    [
        ("standard", [2, 1, 5, 1]),
        ("conservative", [4, 1, 5, 5]),
        ("median", [3, 1, 5, 3]),
    ],
)
def test_tie_modes_on_hand_made_scores(ties: str, expected: list[float]) -> None:
    assert ranks(SCORES, TARGETS, ties).tolist() == expected


def test_median_with_an_even_number_of_ties_is_a_half() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.0]])
    assert ranks(scores, torch.tensor([0]), "median").tolist() == [1.5]


def test_unknown_tie_mode_and_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="tie mode"):
        ranks(SCORES, TARGETS, "optimistic")
    with pytest.raises(ValueError, match="targets"):
        ranks(SCORES, TARGETS[:2])


def test_nan_target_score_gets_the_worst_rank() -> None:
    scores = torch.tensor([[float("nan"), 0.0, 1.0]])
    for ties in ("standard", "conservative", "median"):
        assert ranks(scores, torch.tensor([0]), ties).tolist() == [3]


def test_accumulator_recall_and_mrr_by_hand() -> None:
    acc = MetricAccumulator(ks=(1, 3, 20))
    acc.add_ranks(torch.tensor([1.0, 2.0, 4.0]))
    acc.add_ranks(torch.tensor([25.0]))
    out = acc.result()
    assert out["n_events"] == 4
    assert out["recall@1"] == pytest.approx(1 / 4)
    assert out["mrr@1"] == pytest.approx(1 / 4)
    assert out["recall@3"] == pytest.approx(2 / 4)
    assert out["mrr@3"] == pytest.approx((1 + 1 / 2) / 4)
    assert out["recall@20"] == pytest.approx(3 / 4)
    assert out["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 4)


def test_accumulator_add_uses_ties() -> None:
    acc = MetricAccumulator(ks=(2,))
    acc.add(SCORES, TARGETS, "standard")  # ranks 2, 1, 5, 1
    out = acc.result()
    assert out["recall@2"] == pytest.approx(3 / 4)
    assert out["mrr@2"] == pytest.approx((0.5 + 1 + 1) / 4)


def test_accumulator_add_is_conservative_on_ties_by_default() -> None:
    """The README's figures count ties against the model unless told otherwise."""
    default, conservative = MetricAccumulator(ks=(2, 5)), MetricAccumulator(ks=(2, 5))
    default.add(SCORES, TARGETS)
    conservative.add_ranks(ranks(SCORES, TARGETS, "conservative"))
    assert default.result() == conservative.result()
    assert default.result() != _standard(SCORES, TARGETS, (2, 5))  # the ties matter here


def _standard(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    acc = MetricAccumulator(ks=ks)
    acc.add(scores, targets, "standard")
    return acc.result()


def test_empty_accumulator_and_bad_ks() -> None:
    out = MetricAccumulator(ks=(5,)).result()
    assert out == {"recall@5": 0.0, "mrr@5": 0.0, "n_events": 0}
    with pytest.raises(ValueError):
        MetricAccumulator(ks=(0,))


def test_random_scores_match_a_python_reference() -> None:
    g = torch.Generator().manual_seed(0)
    # few distinct values -> many ties
    scores = torch.randint(0, 4, (64, 30), generator=g).float()
    targets = torch.randint(0, 30, (64,), generator=g)
    for ties in ("standard", "conservative", "median"):
        got = ranks(scores, targets, ties).tolist()
        for b in range(64):
            row = scores[b].tolist()
            t = row[targets[b]]
            gt = sum(v > t for v in row)
            eq = sum(v == t for v in row)
            ref = {"standard": gt + 1, "conservative": gt + eq, "median": gt + 1 + (eq - 1) / 2}
            assert math.isclose(got[b], ref[ties])
