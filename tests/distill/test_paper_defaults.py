"""Each method's defaults are its paper's setting: CE weighting, loss weights, temperatures.

SkinDistilViT's methods (and DKD) train with plain CE as their authors' code does; SSD-KD's methods
weight it by the class weights. The expected task losses are computed here with
``torch.nn.functional.cross_entropy`` on logits taken from the student directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raykd.distill
from raykd.distill import METHODS, build_method
from raykd.distill.paper import paper_params
from raykd.models import features
from tests.distill.setups import NUM_CLASSES, cascade_pair, cnn_pair, make, make_batch, vit

# Very unequal class weights: weighted and plain CE differ by far more than the tolerance.
WEIGHTS = torch.tensor([50.0, 1.0, 1.0, 0.02, 1.0, 10.0, 1.0, 0.01])

PLAIN_CE = {"skindistilvit", "cascade", "fcvit", "fcvit_probs", "dkd"}
WEIGHTED_CE = {"baseline", "kd", "fitnet", "rkd", "crkd", "dkd_combo", "sskd", "ssdkd"}

# Paper values (the papers and their code; mdistiller's configs for dkd) that the defaults must keep.
PAPER = {
    "kd": {"alpha": 0.5, "temperature": 5.0},
    "skindistilvit": {"w_task": 1.0, "w_soft": 0.5, "temperature": 2.0, "w_hidden": 0.0, "w_mse": 0.0},
    "cascade": {"w_task": 1.0, "w_soft": 0.5, "temperature": 2.0, "w_hidden": 0.0, "w_mse": 0.0},
    "fcvit": {"head_reduction": "sum"},
    "fcvit_probs": {"w_kl": 50.0, "temperature": 1.0, "warmup_epochs": 5, "finetune_epochs": 5},
    "fitnet": {"w_hint": 1.0, "w_ce": 0.01},
    "rkd": {"w_ce": 3.0, "w_rkd_d": 25.0, "w_rkd_a": 50.0},
    "crkd": {"w_crkd": 1000.0, "crkd_form": "rmse", "adapter": "conv_bn_relu"},
    "dkd_combo": {"w_blkd": 1.0, "w_drkd": 1.0, "w_crkd": 1000.0, "alpha": 0.5, "temperature": 5.0,
                  "w_rkd_d": 25.0, "w_rkd_a": 50.0},
    "sskd": {"w_ce": 0.1, "w_kd": 0.9, "w_tf": 2.7, "w_ss": 10.0, "temperature": 4.0,
             "ss_temperature": 0.5, "ratio_tf": 1.0, "ratio_ss": 0.75},
    "ssdkd": {"w_sskd": 1.0, "w_drkd": 1.0, "w_crkd": 1000.0, "w_ce": 0.1, "w_kd": 0.9, "w_tf": 2.7,
              "w_ss": 10.0, "temperature": 4.0, "relational_views": "all"},
    "dkd": {"w_ce": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "temperature": 4.0, "warmup_epochs": 20},
}


def _build(name, pair, size=32):
    """Build ``name`` with its defaults on a seeded (student, teacher) pair from ``pair()``.

    Every class head of the student gets a spread-out bias, so an untrained student does not
    predict near-uniformly: its per-sample CEs differ and class weights change their mean.
    """
    torch.manual_seed(0)
    student, teacher = pair()
    with torch.no_grad():
        for mod in student.modules():
            if isinstance(mod, nn.Linear) and mod.out_features == NUM_CLASSES and mod.bias is not None:
                mod.bias.copy_(torch.linspace(-4.0, 4.0, NUM_CLASSES))
    m = build_method(name, student, teacher, None, num_classes=NUM_CLASSES, class_weights=WEIGHTS,
                     input_size=size)
    return m.eval()


def _plain_and_weighted(logits, targets):
    plain = F.cross_entropy(logits, targets)
    weighted = F.cross_entropy(logits, targets, weight=WEIGHTS)
    assert abs(plain.item() - weighted.item()) > 0.05, "test weights too mild to tell the two apart"
    return plain, weighted


# -- the paper settings -------------------------------------------------------------------------


def test_every_method_is_classified_plain_or_weighted():
    assert PLAIN_CE | WEIGHTED_CE == set(METHODS.names())
    assert not PLAIN_CE & WEIGHTED_CE


@pytest.mark.parametrize("name", METHODS.names())
def test_paper_params_are_the_defaults_and_the_papers_ce_weighting(name):
    p = paper_params(name)
    assert p == dataclasses.asdict(METHODS.get(name).Params())
    assert p["weighted_ce"] is (name in WEIGHTED_CE)
    assert p["label_smoothing"] == 0.0
    for knob, value in PAPER.get(name, {}).items():
        assert p[knob] == value, f"{name}.{knob} = {p[knob]!r}, the paper's is {value!r}"
    # declared in the method's own Params, so the shared default in base.py cannot move it
    params_cls = METHODS.get(name).Params
    owner = next(c for c in params_cls.__mro__ if "weighted_ce" in c.__dict__.get("__annotations__", {}))
    assert owner is not raykd.distill.MethodParams, f"{name} inherits weighted_ce from MethodParams"


def test_paper_params_round_trips_through_build_method_params():
    from raykd.distill.base import make_params

    for name in METHODS.names():
        cls = METHODS.get(name).Params
        assert make_params(cls, paper_params(name), name) == cls()
    with pytest.raises(KeyError):
        paper_params("no_such_method")


# -- the task loss each default builds ----------------------------------------------------------


def test_skindistilvit_default_task_loss_is_plain_ce():
    images, targets = make_batch(32)
    m = _build("skindistilvit", lambda: (vit(depth=2), vit(depth=4)))
    with torch.no_grad():
        out = m(images, targets)
        logits = m.student(images)
    plain, weighted = _plain_and_weighted(logits, targets)
    assert out.parts["ce"].item() == pytest.approx(plain.item(), rel=1e-5)  # w_task = 1
    assert out.parts["ce"].item() != pytest.approx(weighted.item(), rel=1e-3)


def test_cascade_default_task_loss_is_plain_ce():
    images, targets = make_batch(32)
    m = _build("cascade", cascade_pair)
    with torch.no_grad():
        out = m(images, targets)
        plain, _ = _plain_and_weighted(m.student(images), targets)
    assert out.parts["ce"].item() == pytest.approx(plain.item(), rel=1e-5)


def test_fcvit_default_sums_plain_ce_over_every_head():
    images, targets = make_batch(32)
    m = _build("fcvit", lambda: (make("raykd_test_fcvit"), None))
    with torch.no_grad():
        out = m(images, targets)
        heads = features(m.student, images).layer_logits
    assert len(heads) >= 2
    expected = sum(F.cross_entropy(z, targets) for z in heads)
    weighted = sum(F.cross_entropy(z, targets, weight=WEIGHTS) for z in heads)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(out.loss.item() - weighted.item()) > 0.05
    for i, z in enumerate(heads):
        assert out.parts[f"ce_l{i}"].item() == pytest.approx(F.cross_entropy(z, targets).item(), rel=1e-5)


def test_fcvit_probs_default_top_head_ce_is_plain():
    images, targets = make_batch(32)
    m = _build("fcvit_probs", lambda: (make("raykd_test_fcvit"), None))
    m.set_epoch(0)  # warm-up: the top head's CE only
    with torch.no_grad():
        out = m(images, targets)
        plain, _ = _plain_and_weighted(m.student(images), targets)
    assert set(out.parts) == {"ce"}
    assert out.loss.item() == pytest.approx(plain.item(), rel=1e-5)


def test_dkd_default_task_loss_is_plain_ce():
    images, targets = make_batch(32)
    m = _build("dkd", cnn_pair)
    with torch.no_grad():
        out = m(images, targets)
        plain, _ = _plain_and_weighted(m.student(images), targets)
    assert out.parts["ce"].item() == pytest.approx(plain.item(), rel=1e-5)  # w_ce = 1


def test_ssdkd_blkd_kd_default_still_weights_the_ce():
    images, targets = make_batch(32)
    m = _build("kd", cnn_pair)
    with torch.no_grad():
        out = m(images, targets)
        plain, weighted = _plain_and_weighted(m.student(images), targets)
    assert out.parts["ce"].item() == pytest.approx(0.5 * weighted.item(), rel=1e-5)  # 1 - alpha = 0.5
    assert out.parts["ce"].item() != pytest.approx(0.5 * plain.item(), rel=1e-3)


def test_rkd_default_weights_the_ce():
    images, targets = make_batch(32)
    m = _build("rkd", cnn_pair)
    with torch.no_grad():
        out = m(images, targets)
        _, weighted = _plain_and_weighted(m.student(images), targets)
    assert out.parts["ce"].item() == pytest.approx(3.0 * weighted.item(), rel=1e-5)


# -- METHODS.md ---------------------------------------------------------------------------------


def _paper_table() -> dict[str, list[str]]:
    doc = (Path(raykd.distill.__file__).parent / "METHODS.md").read_text(encoding="utf-8")
    section = doc.split("## Paper settings and optimisers", 1)
    assert len(section) == 2, "METHODS.md has no 'Paper settings and optimisers' section"
    body = section[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_methods_md_paper_table_names_every_method_with_its_ce_weighting():
    rows = _paper_table()
    assert set(rows) == set(METHODS.names())
    for name, cells in rows.items():
        assert len(cells) == 6, f"{name}: expected 6 columns, got {len(cells)}"
        assert cells[3] == ("weighted" if paper_params(name)["weighted_ce"] else "plain"), name
