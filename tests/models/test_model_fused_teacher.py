"""Fusion teacher: frozen backbones, trainable fusion head, per-backbone normalisation."""

from __future__ import annotations

import pytest
import timm
import torch

from raykd.models import count_params, features


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return timm.create_model("raykd_test_fused_teacher", num_classes=3)


def test_backbones_are_frozen_and_only_the_fusion_head_trains(teacher):
    trainable = {n.split(".")[0] for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable == {"cnn_bn", "se", "vit_bn", "fusion", "classifier"}
    teacher.train()
    assert all(not m.training for m in teacher.backbones())
    assert teacher.fusion.training
    stats = teacher.cnn_a.bn1.running_mean.clone()
    f = features(teacher, torch.randn(4, 3, 32, 32))
    f.logits.sum().backward()
    assert all(p.grad is None for m in teacher.backbones() for p in m.parameters())
    assert teacher.classifier.weight.grad is not None and teacher.se.fc1.weight.grad is not None
    assert torch.equal(stats, teacher.cnn_a.bn1.running_mean), "frozen BN statistics must not move"


def test_unfrozen_teacher_trains_everything():
    model = timm.create_model("raykd_test_fused_teacher", num_classes=3, freeze_backbones=False)
    assert count_params(model, trainable_only=True) == count_params(model)


def test_feature_map_is_the_cnn_stream_and_embedding_the_classifier_input(teacher):
    teacher.eval()
    x = torch.randn(2, 3, 32, 32)
    f = features(teacher, x)
    c = teacher.cnn_a.num_features + teacher.cnn_b.num_features
    assert f.feature_map.shape[:2] == (2, c)
    assert f.embedding.shape == (2, 8)  # last dense layer of the test variant
    fused = teacher.forward_features(x)
    assert fused.shape == (2, c + teacher.vit.num_features)
    torch.testing.assert_close(fused[:, :c], f.feature_map.mean(dim=(2, 3)))
    torch.testing.assert_close(teacher.classifier(f.embedding), teacher(x))


def test_vit_stream_sees_its_own_normalisation(teacher):
    # Input normalised with ImageNet mean/std; the ViT was trained with mean = std = 0.5.
    # Raw pixel 0.5 in every channel: ImageNet-normalised (0.5 - m) / s; the ViT's (0.5 - 0.5) / 0.5 = 0.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((0.5 - mean) / std).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    vit_in = x * teacher.vit_scale + teacher.vit_shift
    torch.testing.assert_close(vit_in, torch.zeros(1, 3, 4, 4), atol=1e-6, rtol=0)
    # Raw pixel 1.0: ViT value (1 - 0.5) / 0.5 = 1.
    x1 = ((1.0 - mean) / std).view(1, 3, 1, 1)
    torch.testing.assert_close(x1 * teacher.vit_scale + teacher.vit_shift, torch.ones(1, 3, 1, 1))


def test_backbone_weights_load_from_local_files(tmp_path):
    torch.manual_seed(3)
    resnet = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "resnet.pt"
    torch.save(resnet.state_dict(), path)
    model = timm.create_model("raykd_test_fused_teacher", num_classes=3, backbone_files={"cnn_a": str(path)})
    src = resnet.state_dict()
    loaded = model.cnn_a.state_dict()
    assert loaded and all(torch.equal(v, src[k]) for k, v in loaded.items())
    with pytest.raises(ValueError, match="cnn_a"):
        timm.create_model("raykd_test_fused_teacher", backbone_files={"resnet": str(path)})
