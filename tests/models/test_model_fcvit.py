"""FCViT: one classifier per block, usable for FCViT (CE per head) and FCViTProbs (KL chain)."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from raykd.models import count_params, create_model, features


def _fcvit(**kw):
    torch.manual_seed(0)
    return timm.create_model("raykd_test_fcvit", num_classes=5, **kw).eval()


def test_layer_logits_bottom_to_top_and_top_is_the_prediction():
    model = _fcvit()
    x = torch.randn(2, 3, 32, 32)
    layer_logits = model.forward_layer_logits(x)
    assert len(layer_logits) == len(model.blocks) == 4
    assert all(t.shape == (2, 5) for t in layer_logits)
    torch.testing.assert_close(layer_logits[-1], model(x))
    torch.testing.assert_close(features(model, x).layer_logits[1], layer_logits[1])


def test_lower_head_reads_the_cls_token_of_its_block_through_its_own_layernorm():
    model = _fcvit()
    x = torch.randn(2, 3, 32, 32)
    f = features(model, x)
    head = model.layer_heads[1]
    cls = f.hidden_states[1][:, 0]
    normed = (cls - cls.mean(-1, keepdim=True)) / torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = (normed * head.norm.weight + head.norm.bias) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(f.layer_logits[1], expected)


def test_shared_head_variant_uses_the_top_classifier_on_every_layer():
    model = _fcvit(share_head=True)
    assert all(h.fc is None for h in model.layer_heads)
    # 3 lower heads lose their Linear(32, 5): 3 * (32*5 + 5) = 495 parameters fewer
    assert count_params(_fcvit()) - count_params(model) == 495
    f = features(model, torch.randn(2, 3, 32, 32))
    head = model.layer_heads[0]
    torch.testing.assert_close(f.layer_logits[0], model.head(head.norm(f.hidden_states[0][:, 0])))


def test_fcvit_and_fcvitprobs_losses_reach_every_head():
    model = _fcvit().train()
    y = torch.tensor([0, 3])
    f = features(model, torch.randn(2, 3, 32, 32))
    ce_every_head = sum(F.cross_entropy(t, y) for t in f.layer_logits)
    ce_every_head.backward()
    assert all(h.fc.weight.grad is not None for h in model.layer_heads)


def test_a_plain_vit_checkpoint_loads_and_only_lower_heads_start_fresh(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=4,
                            num_heads=2, mlp_ratio=2.0).eval()
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    model = create_model("raykd_test_fcvit", 5, pretrained_file=path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), vit(x))


def test_reset_classifier_resets_every_head():
    model = _fcvit()
    model.reset_classifier(3)
    assert model.head.out_features == 3
    assert all(h.fc.out_features == 3 for h in model.layer_heads)
