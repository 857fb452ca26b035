"""Building methods, refusing incompatible models, schedules, and the methods' own behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from raykd.distill import build_method, method_params
from raykd.distill.methods.dkd import DKDParams
from raykd.distill.methods.kd import KDParams
from raykd.registry import RegistryError
from tests.distill.setups import (
    NUM_CLASSES,
    SETUPS,
    cnn_pair,
    cnn_student,
    cnn_teacher,
    make,
    make_batch,
    vit,
)

# -- building -----------------------------------------------------------------------------------


def test_build_method_rejects_unknown_keys_naming_the_valid_ones():
    s, t = cnn_pair()
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['temp'\].*'temperature'"):
        build_method("kd", s, t, {"temp": 3.0}, num_classes=NUM_CLASSES, input_size=32)


def test_build_method_rejects_out_of_range_values_with_the_range():
    s, t = cnn_pair()
    with pytest.raises(ValueError, match=r"'kd'.*temperature=50.0 is out of range \[1, 20\]"):
        build_method("kd", s, t, {"temperature": 50}, num_classes=NUM_CLASSES, input_size=32)
    with pytest.raises(ValueError, match="must be a number"):
        build_method("kd", s, t, {"alpha": "high"}, num_classes=NUM_CLASSES, input_size=32)
    with pytest.raises(ValueError, match="is not one of"):
        build_method("crkd", s, t, {"crkd_form": "l1"}, num_classes=NUM_CLASSES, input_size=64)


def test_unknown_method_names_suggest_the_closest():
    with pytest.raises(RegistryError, match="Did you mean 'fitnet'"):
        method_params("fitnett")


def test_params_coerce_integral_floats_and_ints_to_the_field_type():
    assert DKDParams(warmup_epochs=5.0).warmup_epochs == 5
    assert isinstance(KDParams(temperature=3).temperature, float)
    with pytest.raises(ValueError, match="must be an integer"):
        DKDParams(warmup_epochs=2.5)


def test_a_teacher_method_without_teacher_is_refused():
    with pytest.raises(ValueError, match="'kd' needs a teacher"):
        build_method("kd", cnn_student(), None, num_classes=NUM_CLASSES, input_size=32)


def test_models_must_predict_num_classes():
    import timm

    teacher = timm.create_model("test_resnet", num_classes=10)
    with pytest.raises(ValueError, match="the teacher predicts 10 classes, not num_classes=8"):
        build_method("kd", cnn_student(), teacher, num_classes=NUM_CLASSES, input_size=32)


def test_class_weights_need_one_entry_per_class():
    s, t = cnn_pair()
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        build_method("kd", s, t, num_classes=NUM_CLASSES, class_weights=torch.ones(3), input_size=32)


def test_a_student_sharing_weights_with_its_teacher_is_refused():
    t = cnn_teacher()
    with pytest.raises(ValueError, match="share parameters"):
        build_method("kd", t, t, num_classes=NUM_CLASSES, input_size=32)


def test_all_zero_loss_weights_are_refused():
    s, t = cnn_pair()
    with pytest.raises(ValueError, match="every loss weight is 0"):
        zeros = {"w_ce": 0, "w_rkd_d": 0, "w_rkd_a": 0}
        build_method("rkd", s, t, zeros, num_classes=NUM_CLASSES, input_size=32)


# -- combining with architectures ---------------------------------------------------------------


@pytest.mark.parametrize("student_name", ["raykd_test_hierattn", "raykd_test_tiny_cnn", "test_convnext"])
def test_crkd_maps_any_cnn_student_to_a_resnet_teacher(student_name):
    torch.manual_seed(0)
    method = build_method("crkd", make(student_name), cnn_teacher(), num_classes=NUM_CLASSES, input_size=32)
    conv = method.adapters["map"][0]
    assert (conv.in_channels, conv.out_channels) == (method.student_shapes.feature_map[0], 96)
    images, targets = make_batch(32)  # student maps (4x4, 6x6) are pooled to the teacher's 1x1
    out = method(images, targets)
    out.loss.backward()
    assert torch.isfinite(out.parts["crkd"]) and conv.weight.grad is not None


def test_crkd_and_fitnet_refuse_a_vit_naming_method_models_and_reason():
    refusal = r"'crkd' cannot train student test_vit with teacher test_resnet.*feature map"
    with pytest.raises(ValueError, match=refusal):
        build_method("crkd", vit(), cnn_teacher(), num_classes=NUM_CLASSES, input_size=32)
    with pytest.raises(ValueError, match=r"'fitnet'.*the teacher has no convolutional feature map"):
        build_method("fitnet", cnn_student(), vit(), num_classes=NUM_CLASSES, input_size=32)


def test_skindistilvit_hidden_cosine_needs_vits_and_adapts_different_widths():
    params = {"w_hidden": 1.0}
    with pytest.raises(ValueError, match="not a ViT"):
        build_method("skindistilvit", cnn_student(), vit(), params, num_classes=NUM_CLASSES, input_size=32)
    # without the hidden loss, any student learns from a ViT teacher's logits
    build_method("skindistilvit", cnn_student(), vit(), num_classes=NUM_CLASSES, input_size=32)
    narrow = lambda: vit(embed_dim=32, num_heads=2, depth=2)  # noqa: E731
    method = build_method("skindistilvit", narrow(), vit(), params, num_classes=NUM_CLASSES, input_size=32)
    adapter = method.adapters["hidden"]
    assert (adapter.in_features, adapter.out_features) == (32, 64)
    images, targets = make_batch(32)
    method(images, targets).loss.backward()
    assert adapter.weight.grad is not None
    with pytest.raises(ValueError, match="hidden_adapter=true"):
        build_method("skindistilvit", narrow(), vit(), {**params, "hidden_adapter": False},
                     num_classes=NUM_CLASSES, input_size=32)


def test_cascade_needs_a_student_one_block_shallower_than_its_teacher():
    with pytest.raises(ValueError, match="student has 2 blocks and the teacher 4"):
        build_method("cascade", vit(depth=2), vit(depth=4), num_classes=NUM_CLASSES, input_size=32)
    with pytest.raises(ValueError, match="both models must be ViTs"):
        build_method("cascade", cnn_student(), cnn_teacher(), num_classes=NUM_CLASSES, input_size=32)


def test_fcvit_methods_need_an_fcvit_student():
    with pytest.raises(ValueError, match="must be an FCViT"):
        build_method("fcvit", vit(), None, num_classes=NUM_CLASSES, input_size=32)


def test_sskd_needs_the_pretrained_teacher_head_and_square_images():
    s, t = cnn_pair()
    with pytest.raises(ValueError, match="pretrain_sskd_teacher_head"):
        build_method("sskd", s, t, num_classes=NUM_CLASSES, input_size=32)
    from raykd.distill.methods._shared import ProjectionHead

    with pytest.raises(ValueError, match="teacher's width 96"):
        wrong = ProjectionHead(5).state_dict()
        build_method("sskd", s, t, num_classes=NUM_CLASSES, input_size=32, teacher_head=wrong)
    with pytest.raises(ValueError, match="square"):
        head = ProjectionHead(96)
        build_method("sskd", s, t, num_classes=NUM_CLASSES, input_size=(3, 32, 48), teacher_head=head)


# -- behaviour ----------------------------------------------------------------------------------


def test_baseline_uses_class_weights_only_when_weighted_ce_is_on():
    w = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 0.5, 1.0, 4.0])
    images, targets = make_batch(32)
    for weighted in (True, False):
        torch.manual_seed(0)
        m = build_method("baseline", cnn_student(), None, {"weighted_ce": weighted},
                         num_classes=NUM_CLASSES, class_weights=w, input_size=32).eval()
        out = m(images, targets)
        # torch's own weighted CE (normalised by the summed weights) as the independent reference
        ref = F.cross_entropy(out.logits, targets, weight=w if weighted else None)
        assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_alpha_selects_its_parts():
    s, t = cnn_pair()
    images, targets = make_batch(32)
    m = build_method("kd", s, t, {"alpha": 1.0}, num_classes=NUM_CLASSES, input_size=32)
    assert set(m(images, targets).parts) == {"kd"}
    s, t = copy.deepcopy(s), copy.deepcopy(t)
    m = build_method("kd", s, t, {"alpha": 0.0}, num_classes=NUM_CLASSES, input_size=32)
    assert set(m(images, targets).parts) == {"ce"}


def test_dkd_warms_up_linearly_over_warmup_epochs():
    torch.manual_seed(0)
    s, t = cnn_pair()
    m = build_method("dkd", s, t, {"warmup_epochs": 4}, num_classes=NUM_CLASSES, input_size=32).eval()
    images, targets = make_batch(32)
    factors = []
    for epoch in (0, 1, 3, 10):
        m.set_epoch(epoch)
        factors.append(m(images, targets).parts["nckd"].item())
    # (e + 1) / 4 for e = 0, 1, then capped at 1
    assert [f / factors[-1] for f in factors] == pytest.approx([0.25, 0.5, 1.0, 1.0], rel=1e-5)


def test_fcvit_probs_switches_heads_on_from_the_top_down_on_its_schedule():
    torch.manual_seed(0)
    params = {"warmup_epochs": 2, "epochs_per_head": 3, "finetune_epochs": 5}
    m = build_method("fcvit_probs", make("raykd_test_fcvit"), None, params, num_classes=NUM_CLASSES)
    assert m.num_heads == 4
    enabled = []
    for epoch in range(12):
        m.set_epoch(epoch)
        enabled.append(m.enabled_heads)
    assert enabled == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert m.recommended_epochs == 2 + 3 * 3 + 5
    images, targets = make_batch(32)
    m.set_epoch(0)
    out = m(images, targets)
    assert set(out.parts) == {"ce"}
    out.loss.backward()
    assert all(p.grad is None for p in m.student.layer_heads.parameters())
    m.zero_grad(set_to_none=True)
    m.set_epoch(5)  # two heads on: the two heads just below the top learn, the lowest does not
    out = m(images, targets)
    assert set(out.parts) == {"ce", "kl"}
    out.loss.backward()
    assert m.student.layer_heads[0].fc.weight.grad is None
    assert m.student.layer_heads[1].fc.weight.grad is not None
    assert m.student.layer_heads[2].fc.weight.grad is not None


def test_fcvit_combines_every_head_linearly():
    images, targets = make_batch(32)
    losses = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        m = build_method("fcvit", make("raykd_test_fcvit"), None, {"head_reduction": reduction},
                         num_classes=NUM_CLASSES).eval()
        out = m(images, targets)
        assert set(out.parts) == {"ce_l0", "ce_l1", "ce_l2", "ce_l3"}
        losses[reduction] = out.loss.item()
    assert losses["mean"] == pytest.approx(losses["sum"] / 4, rel=1e-5)


def test_an_fcvit_student_trained_through_its_top_head_tells_ddp_about_unused_heads():
    teacher = make("raykd_test_fcvit")
    m = build_method("kd", make("raykd_test_fcvit"), teacher, num_classes=NUM_CLASSES)
    assert m.ddp_find_unused_parameters
    assert not SETUPS["kd"].build("kd").ddp_find_unused_parameters


def test_building_a_method_keeps_the_students_training_mode():
    s, t = cnn_pair()
    s.train()
    build_method("kd", s, t, num_classes=NUM_CLASSES, input_size=32)
    assert s.training and all(m.training for m in s.modules())


def test_ddp_wraps_student_and_adapters_only(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        method = SETUPS["crkd"].build("crkd")
        ddp = DDP(method)
        images, targets = make_batch(64)
        out = ddp(images, targets)
        out.loss.backward()
        assert {id(p) for p in ddp.parameters()} == {id(p) for p in method.parameters()}
        assert all(p.grad is None for p in method.teacher.parameters())
        assert method.adapters["map"][0].weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_sskd_keeps_only_rotated_views_the_teacher_ranks_correctly_when_ratio_is_zero():
    torch.manual_seed(0)
    setup = SETUPS["sskd"]
    m = build_method("sskd", *setup.pair(), {"ratio_tf": 0.0, "ratio_ss": 0.0}, num_classes=NUM_CLASSES,
                     input_size=64, **setup.kwargs())
    images, targets = make_batch(64)
    out = m(images, targets)
    assert set(out.parts) == {"ce", "kd", "tf", "ss"}
    assert all(torch.isfinite(v) for v in out.parts.values())
