"""Contract over every registered raykd model: data contract, shapes, features, gradients, sizes."""

from __future__ import annotations

import pytest
import timm
import torch

from raykd.models import count_params, features, raykd_model_names

# Parameter counts with 8 classes, built on the meta device (nothing allocated).
# Paper numbers: SkinDistilViT student 43,277,576 (= ViT-B/16 85,804,808 - 6 blocks x 7,087,872);
# HierAttn xs/s: the authors' code gives 1,079,928 / 2,135,224 (Table I: 1.08 M / 2.14 M);
# tiny CNN: 163,560 (arithmetic in test_model_tiny_cnn.py, paper "0.16 M").
# FCViT-B: ViT-B/16 + 11 lower heads x (LayerNorm 2*768 + Linear 768*8 + 8) = 85,804,808 + 11*7,688.
# FCViT-S: ViT-S/16 with 8 classes 21,668,744 + 11 x (2*384 + 384*8 + 8) = 21,668,744 + 11*3,848.
EXPECTED_PARAMS = {
    "raykd_distilvit_base_patch16_224": 43_277_576,
    "raykd_fcvit_base_patch16_224": 85_804_808 + 11 * 7_688,
    "raykd_fcvit_small_patch16_224": 21_668_744 + 11 * 3_848,
    "raykd_hierattn_xs": 1_079_928,
    "raykd_hierattn_s": 2_135_224,
    "raykd_tiny_cnn": 163_560,
    "raykd_tiny_cnn_fp16": 163_560,
}
# Input side used for the forward contract (small: parameters do not depend on it).
FORWARD_SIZE = {
    "raykd_test_fcvit": 32,
    "raykd_test_fused_teacher": 32,
    "raykd_test_hierattn": 64,
    "raykd_test_tiny_cnn": 32,
    "raykd_tiny_cnn": 32,
    "raykd_hierattn_xs": 64,
    "raykd_hierattn_s": 64,
}
# Too big for a default-test forward (ViT-B, fusion teacher): checked on the meta device only.
META_ONLY = {
    "raykd_distilvit_base_patch16_224",
    "raykd_fcvit_base_patch16_224",
    "raykd_fcvit_small_patch16_224",
    "raykd_fused_teacher",
}
NAMES = raykd_model_names()


def test_every_family_has_a_registered_test_variant():
    for family in ("fcvit", "hierattn", "fused_teacher", "tiny_cnn"):
        assert f"raykd_test_{family}" in NAMES
    covered = set(FORWARD_SIZE) | META_ONLY | {"raykd_tiny_cnn_fp16"}
    assert set(NAMES) == covered, "a new model needs a contract entry"


@pytest.mark.parametrize("name", NAMES)
def test_model_carries_its_data_contract(name):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=8)
    cfg = model.pretrained_cfg
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3 and len(cfg["input_size"]) == 3
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == cfg["input_size"]
    for attr in ("forward_features", "forward_head", "get_classifier", "reset_classifier"):
        assert callable(getattr(model, attr)), attr


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count_matches_the_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=8)
    assert count_params(model) == EXPECTED_PARAMS[name]


def _all_outputs(f) -> list[torch.Tensor]:
    out = [f.logits, f.embedding]
    out += [f.feature_map] if f.feature_map is not None else []
    return out + list(f.hidden_states or []) + list(f.layer_logits or [])


@pytest.mark.parametrize("name", sorted(FORWARD_SIZE))
def test_forward_shapes_features_and_gradients(name):
    torch.manual_seed(0)
    kwargs = {"drop_path_rate": 0.0, "drop_rate": 0.0} if "hierattn" in name else {}
    if "fused" in name:
        kwargs["freeze_backbones"] = False  # so every parameter should receive a gradient
        # timm's ResNet zero-initialises each block's last BN, which zeroes the first step's gradient
        # of the convolutions before it; a non-zero init lets the test see every gradient.
        kwargs["backbone_kwargs"] = {"cnn_a": {"zero_init_last": False}, "vit": {"patch_size": 8}}
    model = timm.create_model(name, num_classes=8, **kwargs).train()
    s = FORWARD_SIZE[name]
    x = torch.randn(2, 3, s, s)

    out = model(x)
    assert out.shape == (2, 8)
    fmap = model.forward_features(x)
    assert model.forward_head(fmap).shape == (2, 8)

    f = features(model, x)
    assert f.logits.shape == (2, 8)
    assert f.embedding.shape == (2, model.head_hidden_size)
    if "fcvit" in name:
        assert f.feature_map is None
        assert len(f.hidden_states) == len(f.layer_logits) == len(model.blocks)
        assert all(h.shape[0] == 2 and h.ndim == 3 for h in f.hidden_states)
    else:
        assert f.feature_map.ndim == 4 and f.feature_map.shape[0] == 2
        assert f.hidden_states is None and f.layer_logits is None

    loss = sum(t.float().square().mean() for t in _all_outputs(f))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"


@pytest.mark.parametrize("name", sorted(FORWARD_SIZE))
def test_eval_features_logits_equal_forward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=8).eval()
    s = FORWARD_SIZE[name]
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        torch.testing.assert_close(features(model, x).logits, model(x))


@pytest.mark.parametrize("name", sorted(META_ONLY))
def test_big_models_build_on_meta_with_a_classifier_for_the_classes(name):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=8)
    assert model.get_classifier().out_features == 8
    assert model.num_classes == 8
