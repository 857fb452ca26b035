"""features(model, x): one pass gives logits, embedding, feature map, hidden states, layer logits."""

from __future__ import annotations

import os

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

from raykd.models import Features, features, unwrap_model

CNNS = ["test_resnet", "test_efficientnet", "test_convnext", "mobilenetv2_100"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", CNNS)
def test_timm_cnn_features_match_the_models_own_forward(name):
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    f = features(model, x)
    assert isinstance(f, Features)
    torch.testing.assert_close(f.logits, model(x))
    assert f.embedding.shape == (2, model.num_features if name != "test_convnext" else model.head_hidden_size)
    torch.testing.assert_close(model.get_classifier()(f.embedding), f.logits)
    assert f.feature_map is not None and f.feature_map.ndim == 4
    assert f.feature_map.shape[:2] == (2, model.num_features)
    assert f.hidden_states is None and f.layer_logits is None


def test_timm_vit_hidden_states_are_every_block_output_before_the_final_norm():
    model = timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    f = features(model, x)
    torch.testing.assert_close(f.logits, model(x))
    assert f.feature_map is None
    assert len(f.hidden_states) == len(model.blocks) == 6
    assert all(h.shape == (2, 1 + 16, 64) for h in f.hidden_states)
    # the last block output through the final norm is what forward_features returns
    torch.testing.assert_close(model.norm(f.hidden_states[-1]), model.forward_features(x))
    # block i+1 applied to hidden state i gives hidden state i+1
    torch.testing.assert_close(model.blocks[3](f.hidden_states[2]), f.hidden_states[3])
    assert f.embedding.shape == (2, 64)
    assert not any(h._forward_hooks for h in model.blocks), "hooks must be removed after the call"


def test_features_are_differentiable_through_every_field():
    model = timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=8)
    f = features(model, torch.randn(2, 3, 32, 32))
    (f.logits.sum() + f.hidden_states[0].sum()).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.head.weight.grad is not None


def test_dataparallel_and_compile_wrappers_are_unwrapped():
    model = timm.create_model("test_resnet", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    torch.testing.assert_close(features(wrapped, x).logits, model(x))


def test_ddp_wrapped_model_goes_through_ddp_forward_and_gets_gradients(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = timm.create_model("test_resnet", num_classes=4)
        ddp = nn.parallel.DistributedDataParallel(model)
        calls = []
        handle = ddp.register_forward_pre_hook(lambda m, a: calls.append(1))
        f = features(ddp, torch.randn(2, 3, 32, 32))
        handle.remove()
        assert calls == [1], "the pass must run through DDP's forward so gradients are synchronised"
        assert "forward" not in model.__dict__, "the temporary forward must be removed"
        f.logits.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        assert f.feature_map.shape[:2] == (2, model.num_features)
    finally:
        dist.destroy_process_group()


def test_a_model_without_the_timm_interface_is_rejected_with_the_fix():
    with pytest.raises(TypeError, match="raykd_features"):
        features(nn.Linear(3, 2), torch.randn(1, 3))
