"""The one quality gate (streamrec.model.gate) the trainer's retrain gate and the workers'
relative gate both call."""

from __future__ import annotations

import math

import pytest

from streamrec.model.gate import gate


def test_exactly_at_the_boundary_passes_whichever_way_the_figures_round() -> None:
    # the workers' gate at ratio 0.8: 4 hits against the checkpoint's 5, on 6 predictions, is
    # exactly 0.8 of it; `4/6 >= 0.8 * (5/6)` is False in floating point
    assert gate(4 / 6, 5 / 6, tolerance=1 - 0.8).passed
    # the retrain gate at tolerance 2 %: 49 hits against 50 on 50 predictions is exactly 98 %;
    # `(49/50 - 1) >= -0.02 * 1` is False in floating point
    assert gate(49 / 50, 50 / 50, tolerance=0.02, n=50).passed
    # one hit fewer is refused, and the reason names both figures
    d = gate(3 / 6, 5 / 6, tolerance=1 - 0.8, name="holdout Recall@20", against="its own")
    assert not d.passed and d.reason is not None
    assert d.reason.startswith("holdout Recall@20 0.5000 vs its own 0.8333")


def test_chance_and_numbers_come_first_and_without_a_reference_that_is_all() -> None:
    assert not gate(math.nan, 0.5).passed
    d = gate(0.01, None, chance=0.02, name="candidate recall@20")
    assert not d.passed and d.reason is not None and "no better than chance" in d.reason
    assert gate(0.03, None, chance=0.02).passed
    assert gate(0.03, None, chance=0.02).lower is None  # nothing compared


def test_a_candidate_exactly_at_chance_is_no_better_than_chance_and_reasons_name_both() -> None:
    d = gate(0.02, None, chance=0.02)
    assert not d.passed and d.reason == "candidate 0.0200 is no better than chance (0.0200)"
    assert gate(math.inf).reason == "candidate is not a number"  # the default names
    worse = gate(0.1, 0.5).reason
    assert worse is not None and worse.startswith("candidate 0.1000 vs reference 0.5000: ")


def test_a_refusal_after_a_comparison_carries_its_bound_and_margin() -> None:
    d = gate(0.1, 0.5, tolerance=0.1)
    assert not d.passed and d.lower == pytest.approx(-0.4) and d.margin == pytest.approx(-0.05)


def test_too_few_predictions_decide_nothing() -> None:
    d = gate(0.9, 0.5, n=40, min_n=100)
    assert not d.passed and d.reason is not None and "fewer than 100" in d.reason
    assert d.lower is None
    with pytest.raises(ValueError, match="needs the number"):
        gate(0.5, 0.5, z=1.645)
