"""Choosing a model by budget: the most accurate member the client can afford, or a 4xx saying
what is on offer."""

from __future__ import annotations

import math

import pytest

from raykd.serve.family import BudgetError, Family, FamilyEntry


def entry(name: str, bma: float | None, latency: float | None, size_mb: float) -> FamilyEntry:
    return FamilyEntry(name, onnx=f"/m/{name}.onnx", val_bma=bma, latency_ms=latency,
                       size_bytes=int(size_mb * 1_000_000))


@pytest.fixture
def family() -> Family:
    return Family(winner="vit", models=[
        entry("vit", 0.81, 40.0, 80.0),
        entry("hierattn", 0.74, 6.0, 4.0),
        entry("cnn", 0.63, 1.5, 0.6),
        entry("cnn_fp16", 0.62, 1.5, 0.3),
    ])


def test_the_best_bma_within_the_budget_wins(family):
    assert family.within_budget(max_latency_ms=100).name == "vit"
    assert family.within_budget(max_latency_ms=39.9).name == "hierattn"
    assert family.within_budget(max_latency_ms=6.0).name == "hierattn"  # the limit itself fits
    assert family.within_budget(max_size_mb=1).name == "cnn"
    assert family.within_budget(max_latency_ms=50, max_size_mb=5).name == "hierattn"
    assert family.within_budget(max_latency_ms=5, max_size_mb=0.5).name == "cnn_fp16"


def test_ties_on_bma_go_to_the_faster_then_the_smaller_then_the_earlier_model():
    fam = Family(winner="a", models=[entry("a", 0.7, 3.0, 2.0), entry("b", 0.7, 2.0, 2.0),
                                     entry("c", 0.7, 2.0, 1.0), entry("d", 0.7, 2.0, 1.0)])
    assert fam.within_budget(max_latency_ms=10).name == "c"
    assert fam.within_budget(max_latency_ms=10, max_size_mb=1.5).name == "c"
    assert fam.within_budget(max_latency_ms=2.5, max_size_mb=2).name == "c"


def test_a_model_without_bma_ranks_last_and_unknown_figures_never_fit():
    fam = Family(winner="x", models=[entry("x", None, 1.0, 1.0), entry("y", 0.3, 9.0, 9.0),
                                     FamilyEntry("z", onnx="/m/z.onnx", val_bma=0.9)])
    assert fam.within_budget(max_latency_ms=10).name == "y"
    assert fam.within_budget(max_latency_ms=5).name == "x"
    # z has neither latency nor size: it is never promised to fit a budget.
    with pytest.raises(BudgetError):
        fam.within_budget(max_size_mb=0.5)


def test_the_replicas_measured_latency_stands_in_for_a_missing_one():
    fam = Family(winner="slow", models=[entry("slow", 0.9, 50.0, 1.0), entry("new", 0.8, None, 1.0)])
    assert fam.budget_latency_ms(fam.get("new"), {"new": 3.25}) == 3.25
    assert fam.budget_latency_ms(fam.get("slow"), {"slow": 1.0}) == 50.0  # the recorded one rules
    assert fam.within_budget(max_latency_ms=10, measured_latency_ms={"new": 3.25}).name == "new"
    with pytest.raises(BudgetError):
        fam.within_budget(max_latency_ms=10, measured_latency_ms={"new": 12.0})
    with pytest.raises(BudgetError):
        fam.within_budget(max_latency_ms=10)  # unknown latency


def test_when_nothing_fits_the_error_names_the_budget_and_what_is_on_offer(family):
    with pytest.raises(BudgetError) as info:
        family.within_budget(max_latency_ms=1, max_size_mb=0.1)
    message = str(info.value)
    assert "max_latency_ms=1 and max_size_mb=0.1" in message
    assert "fastest model on offer takes 1.5 ms (cnn)" in message
    assert "smallest is 0.3 MB (cnn_fp16)" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "needs max_latency_ms and/or max_size_mb"),
    ({"max_latency_ms": 0}, "max_latency_ms must be a positive number, got 0"),
    ({"max_size_mb": -2}, "max_size_mb must be a positive number, got -2"),
    ({"max_size_mb": math.inf}, "max_size_mb must be a positive number, got inf"),
    ({"max_latency_ms": math.nan}, "max_latency_ms must be a positive number, got nan"),
])
def test_a_missing_or_meaningless_budget_is_refused(family, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        family.within_budget(**kwargs)
    assert not isinstance(info.value, BudgetError)
