"""create_model / load_weights: local weight files, no network."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from raykd.models import create_model, load_weights, read_state_dict


@pytest.fixture
def source():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=5)


def _same_except_head(a, b, head="fc."):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items() if not k.startswith(head))


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "nested", "ddp"])
def test_weights_load_from_local_files_in_every_format(source, tmp_path, fmt):
    sd = source.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        obj = {"model": sd, "epoch": 3} if fmt == "nested" else sd
        if fmt == "ddp":
            obj = {f"module.{k}": v for k, v in sd.items()}
        torch.save(obj, path)
    model = create_model("test_resnet", 5, pretrained_file=path)
    assert _same_except_head(model, source, head="none")


def test_a_classifier_for_other_classes_is_skipped(source, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    model = create_model("test_resnet", 8, pretrained_file=path)
    assert model.fc.out_features == 8
    assert _same_except_head(model, source)


def test_timm_file_overlay_path_works_offline_for_raykd_models(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("raykd_test_hierattn", num_classes=8)
    path = tmp_path / "h.pt"
    torch.save(src.state_dict(), path)
    model = timm.create_model("raykd_test_hierattn", num_classes=3, pretrained=True,
                              pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(model.stem[0].weight, src.stem[0].weight)
    assert model.classifier.out_features == 3


def test_a_file_of_another_architecture_is_rejected_with_the_fix(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    with pytest.raises(ValueError, match="does not (fit|match)"):
        create_model("test_resnet", 5, pretrained_file=path)
    model = timm.create_model("test_resnet", num_classes=5)
    with pytest.raises(ValueError, match="strict=False"):
        load_weights(model, _partial_file(tmp_path))


def _partial_file(tmp_path):
    sd = timm.create_model("test_resnet", num_classes=5).state_dict()
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4")}, path)
    return path


def test_non_strict_loading_keeps_what_fits(tmp_path, caplog):
    # a file without layer4 and with a key the model lacks; every tensor in it differs from any init
    file_sd = {k: v + 1 if v.is_floating_point() else v
               for k, v in timm.create_model("test_resnet", num_classes=5).state_dict().items()
               if not k.startswith("layer4")}
    file_sd["extra.weight"] = torch.ones(3)
    path = tmp_path / "partial_extra.pt"
    torch.save(file_sd, path)
    model = timm.create_model("test_resnet", num_classes=5)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    with caplog.at_level(logging.INFO, logger="raykd.models.factory"):
        assert load_weights(model, path, strict=False) is model

    own = model.state_dict()
    assert "extra.weight" not in own  # the unexpected key is ignored, not added
    for k, v in own.items():
        expected = init[k] if k.startswith("layer4") else file_sd[k]  # missing keys keep their init
        assert torch.equal(v, expected), k
    assert any(k.startswith("layer4") for k in own)
    assert "layer4.0.conv1.weight" in caplog.text and "extra.weight" in caplog.text  # both reported


def test_user_errors_name_the_input():
    with pytest.raises(ValueError, match="test_resnt"):
        create_model("test_resnt", 5)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_model("test_resnet", 5, pretrained_file="missing.pt")
    with pytest.raises(ValueError, match="pretrained_file"):
        create_model("test_resnet", 5, pretrained_file="x.pt", pretrained=True)


def test_a_file_without_tensors_is_rejected(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(path)
