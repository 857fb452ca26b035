"""Contract tests over every registered method: the loop can rely on these for any method."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.distill import METHODS, MethodOutput, method_params
from tests.distill.setups import NUM_CLASSES, SETUPS, make_batch

ALL = METHODS.names()
WEIGHTS = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 0.5, 1.0, 4.0])


def test_every_registered_method_has_a_contract_setup():
    assert sorted(SETUPS) == ALL
    assert {"baseline", "kd", "skindistilvit", "fitnet", "rkd", "crkd", "sskd", "ssdkd", "dkd_combo",
            "fcvit", "fcvit_probs", "cascade", "dkd"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_every_knob_has_a_default_inside_its_range_or_choices(name):
    import dataclasses

    params_cls = method_params(name)
    assert dataclasses.is_dataclass(params_cls) and params_cls.__dataclass_params__.frozen
    for f in dataclasses.fields(params_cls):
        meta = f.metadata
        assert ("range" in meta) != ("choices" in meta), f"{name}.{f.name} needs a range or choices"
        if "range" in meta:
            lo, hi = meta["range"]
            assert lo <= f.default <= hi
        else:
            assert f.default in meta["choices"]
    params_cls()  # defaults validate


@pytest.mark.parametrize("name", ALL)
def test_method_contract(name):
    setup = SETUPS[name]
    method = setup.build(name, class_weights=WEIGHTS)
    method.train()
    teacher = method.teacher
    images, targets = make_batch(setup.size)

    out = method(images, targets)

    assert isinstance(out, MethodOutput)
    assert out.loss.ndim == 0 and math.isfinite(out.loss.item())
    assert out.logits.shape == (len(targets), NUM_CLASSES)
    assert out.parts and all(p.ndim == 0 and math.isfinite(p.item()) for p in out.parts.values())
    assert sum(out.parts.values()).item() == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-6)

    out.loss.backward()
    trainable = list(method.trainable_parameters())
    assert trainable
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient in {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable)
    for n, p in method.adapters.named_parameters():
        assert p.grad is not None, f"{name}: adapter {n} got no gradient"

    if method.needs_teacher:
        assert teacher is not None
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        teacher_ids = {id(p) for p in teacher.parameters()}
        assert not teacher_ids & {id(p) for p in method.parameters()}
    assert all(k.split(".")[0] in {"student", "adapters"} for k in method.state_dict())

    method.eval()
    with torch.no_grad():
        assert method.predict(images).shape == (len(targets), NUM_CLASSES)


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).needs_teacher])
def test_teacher_stays_frozen_in_eval_mode_and_follows_the_method(name):
    setup = SETUPS[name]
    method = setup.build(name)
    method.train()
    assert not method.teacher.training
    method.teacher.train()  # even if someone flips it, the next forward runs it in eval mode
    images, targets = make_batch(setup.size)
    method(images, targets)
    assert not method.teacher.training
    method.double()
    assert all(p.dtype == torch.float64 for p in method.teacher.parameters())
