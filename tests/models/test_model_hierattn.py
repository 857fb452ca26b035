"""HierAttn blocks: same-channel attention, branch attention assembling, CTH block."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from raykd.models.hierattn import CTHBlock, SameChannelAttention


def test_same_channel_attention_scales_each_channel_by_sigmoid_of_its_mean():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 3.0], [1.0, 3.0]])  # mean 2 -> scale sigmoid(2) = 0.880797
    x[0, 1] = -4.0  # mean -4 -> scale sigmoid(-4) = 0.017986
    out = SameChannelAttention()(x)
    s0, s1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(4.0))
    torch.testing.assert_close(out[0, 0], x[0, 0] * s0)
    torch.testing.assert_close(out[0, 1], torch.full((2, 2), -4.0 * s1))
    assert not list(SameChannelAttention().parameters())


def test_branch_attention_assembles_1x1_1x1_3x3_5x5_into_6x6():
    model = timm.create_model("raykd_test_hierattn", num_classes=4).eval()
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 24, 2, 2)]
    out = model.branch_attention(feats)
    assert out.shape == (2, 56, 6, 6)
    flat = out.flatten(2)
    gap = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)
    torch.testing.assert_close(flat[:, :, 0], gap)  # 1x1 pool, twice
    torch.testing.assert_close(flat[:, :, 1], gap)
    # position 2 is the top-left cell of the 3x3 pool of each branch
    torch.testing.assert_close(flat[:, :16, 2], feats[0][:, :, :3, :3].mean(dim=(2, 3)))


def test_position_shuffle_does_not_change_outputs():
    torch.manual_seed(0)
    a = timm.create_model("raykd_test_hierattn", num_classes=4, drop_rate=0.0, drop_path_rate=0.0).train()
    b = timm.create_model("raykd_test_hierattn", num_classes=4, drop_rate=0.0, drop_path_rate=0.0,
                          shuffle_positions=False).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("side", [64, 96])
def test_any_multiple_of_32_input_works(side):
    model = timm.create_model("raykd_test_hierattn", num_classes=3).eval()
    assert model(torch.randn(1, 3, side, side)).shape == (1, 3)


def test_cth_block_keeps_shape_and_mixes_all_positions():
    torch.manual_seed(0)
    block = CTHBlock(channels=8, dim=8, ffn_dim=16, depth=1, heads=2, drop=0.0).eval()
    x = torch.randn(1, 8, 4, 6)
    y = block(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[0, :, 3, 5] += 1.0  # change one far corner: attention carries it to the opposite corner
    assert not torch.allclose(block(x2)[0, :, 0, 0], y[0, :, 0, 0])


def test_input_size_and_normalisation_follow_the_paper():
    cfg = timm.create_model("raykd_hierattn_xs", num_classes=8).pretrained_cfg
    assert cfg["input_size"] == (3, 256, 256)
    assert cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)
