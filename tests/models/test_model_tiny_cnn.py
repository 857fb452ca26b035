"""Tiny CNN student of the fusion paper and its float16 export variant."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from raykd.models import count_params


def test_parameter_count_by_hand():
    # conv 3->32: 3*32*9 + 32 = 896; 32->64: 32*64*9 + 64 = 18,496; 64->128: 64*128*9 + 128 = 73,856
    # dense 128->256: 33,024; 256->128: 32,896; 128->32: 4,128; classifier 32->8: 264. Sum 163,560.
    assert count_params(timm.create_model("raykd_tiny_cnn", num_classes=8)) == 163_560
    # with the paper's 2 classes: 163,560 - 264 + 66 = 163,362 ("0.16 million")
    assert count_params(timm.create_model("raykd_tiny_cnn", num_classes=2)) == 163_362


def test_embedding_is_dense_stack_over_global_max_pool():
    torch.manual_seed(0)
    model = timm.create_model("raykd_test_tiny_cnn", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    fmap = model.forward_features(x)
    assert fmap.shape == (2, 8, 4, 4)  # 32 -> 16 -> 8 -> 4 with "same" convolutions
    pooled = fmap.flatten(2).max(dim=2).values
    h = pooled
    for lin in (model.dense[0], model.dense[2]):
        h = F.selu(h @ lin.weight.T + lin.bias)
    torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), h)
    torch.testing.assert_close(model(x), h @ model.classifier.weight.T + model.classifier.bias)


def test_fp16_variant_halves_the_weights_and_runs_in_float16():
    model = timm.create_model("raykd_tiny_cnn_fp16", num_classes=2).eval()
    assert all(p.dtype == torch.float16 for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size == 163_362 * 2  # 326,724 bytes (paper: 469.77 KB as a TFLite file)
    out = model(torch.rand(1, 3, 32, 32))  # float32 input is cast
    assert out.dtype == torch.float16 and out.shape == (1, 2)
