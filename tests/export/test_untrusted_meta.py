"""A saved model's meta.json is not trusted: only architecture kwargs reach ``timm.create_model``."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch

from raykd.artifact.format import ALLOWED_MODEL_KWARGS, build_model, load_artifact, read_meta, save_artifact
from raykd.artifact.onnx_meta import META_KEY, meta_from_props
from tests.export.helpers import make_artifact


def _edit(path, **changes) -> None:
    """Rewrite ``path/meta.json`` with ``changes`` merged into it (``model_kwargs`` merged key by key)."""
    meta_file = path / "meta.json"
    data = json.loads(meta_file.read_text())
    data["model_kwargs"] = {**data["model_kwargs"], **changes.pop("model_kwargs", {})}
    data.update(changes)
    meta_file.write_text(json.dumps(data))


@pytest.fixture()
def tiny(tmp_path):
    return make_artifact(tmp_path / "a", "raykd_test_tiny_cnn", {}, image_size=32)


@pytest.fixture()
def no_create(monkeypatch):
    """Fail the test if anything reaches ``timm.create_model``."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"timm.create_model reached with {args} {kwargs}")

    monkeypatch.setattr(timm, "create_model", refuse)


@pytest.mark.parametrize("key, value", [
    ("checkpoint_path", "/etc/passwd"),
    ("pretrained", True),
    ("pretrained_cfg_overlay", {"file": "/etc/passwd", "hf_hub_id": None}),
    ("pretrained_cfg", {"url": "https://example.invalid/w.pth"}),
    ("features_only", True),
    ("pretrained_backbones", True),
    ("num_classes", 1000),
])
def test_a_loader_or_output_kwarg_in_meta_json_is_refused_naming_file_and_key(tiny, no_create, key, value):
    _edit(tiny, model_kwargs={key: value})
    for load in (load_artifact, read_meta):
        with pytest.raises(ValueError) as err:
            load(tiny)
        msg = str(err.value)
        assert str(tiny / "meta.json") in msg and repr(key) in msg
        assert "allowed:" in msg and "drop_path_rate" in msg


def test_an_allowed_kwarg_still_loads(tmp_path, tiny):
    _edit(tiny, model_kwargs={"drop_rate": 0.25})
    model, meta = load_artifact(tiny)
    assert meta.model_kwargs == {"drop_rate": 0.25} and model.drop_rate == 0.25
    vit = make_artifact(tmp_path / "vit", "test_vit", {"img_size": 64, "drop_path_rate": 0.1}, image_size=64)
    assert load_artifact(vit)[1].model_kwargs == {"img_size": 64, "drop_path_rate": 0.1}
    assert {"depth", "embed_dim", "patch_size", "num_heads", "img_size", "cnn_names"} <= ALLOWED_MODEL_KWARGS


def test_a_dict_value_of_an_allowed_key_is_refused(tiny, no_create):
    _edit(tiny, model_kwargs={"drop_rate": {"file": "/etc/passwd"}})
    with pytest.raises(ValueError, match=r"model_kwargs\.drop_rate must be a JSON scalar or a list of scalars"):
        load_artifact(tiny)


@pytest.mark.parametrize("name", ["hf-hub:someone/model", "local-dir:/etc", "raykd_no_such_model"])
def test_a_model_name_that_is_not_registered_is_refused_before_timm_sees_it(tiny, no_create, name):
    _edit(tiny, model_name=name)
    with pytest.raises(ValueError, match="not a timm or raykd model") as err:
        load_artifact(tiny)
    assert str(tiny / "meta.json") in str(err.value)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("fused") / "best", "raykd_test_fused_teacher", {}, image_size=32)


def test_fused_teacher_backbone_files_are_ignored_and_the_weights_come_from_the_artifact(fused, caplog):
    model, _ = load_artifact(fused)
    meta_file = fused / "meta.json"
    original = meta_file.read_text()
    _edit(fused, model_kwargs={"backbone_files": {"cnn_a": "/nonexistent/cnn_a.safetensors"}})
    with caplog.at_level(logging.WARNING, logger="raykd.artifact.format"):
        loaded, meta = load_artifact(fused)
    meta_file.write_text(original)
    assert "backbone_files" not in meta.model_kwargs
    assert "ignoring model_kwargs ['backbone_files']" in caplog.text
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"backbone_kwargs": {"vit": {"checkpoint_path": "/etc/passwd"}}}, "backbone_kwargs.vit keys ['checkpoint_path']"),
    ({"backbone_kwargs": {"vit": {"pretrained_cfg_overlay": {"file": "/x"}}}}, "pretrained_cfg_overlay"),
    ({"backbone_kwargs": {"resnet": {"depth": 2}}}, "backbone_kwargs keys ['resnet']"),
    ({"backbone_kwargs": {"vit": {"patch_size": {"a": 1}}}}, "backbone_kwargs.vit.patch_size must be a JSON scalar"),
    ({"cnn_names": ["hf-hub:someone/evil", "test_convnext"]}, "cnn_names[0] 'hf-hub:someone/evil'"),
    ({"vit_name": "hf-hub:someone/evil"}, "vit_name 'hf-hub:someone/evil'"),
])
def test_fused_teacher_nested_kwargs_and_backbone_names_are_checked(fused, no_create, kwargs, fragment):
    meta_file = fused / "meta.json"
    original = meta_file.read_text()
    try:
        _edit(fused, model_kwargs=kwargs)
        with pytest.raises(ValueError) as err:
            read_meta(fused)
        assert fragment in str(err.value)
    finally:
        meta_file.write_text(original)


def test_saving_leaves_weight_sources_out_and_refuses_what_loading_would(tmp_path, tiny):
    _, meta = load_artifact(tiny)
    model = build_model(meta)
    meta.model_kwargs = {"drop_rate": 0.0, "pretrained_cfg_overlay": {"url": "https://example.invalid/w.pth"}}
    saved = save_artifact(tmp_path / "saved", model, meta)
    assert json.loads((saved / "meta.json").read_text())["model_kwargs"] == {"drop_rate": 0.0}
    meta.model_kwargs = {"checkpoint_path": "/etc/passwd"}
    with pytest.raises(ValueError, match="'checkpoint_path'"):
        save_artifact(tmp_path / "refused", model, meta)
    assert not (tmp_path / "refused").exists()


def test_onnx_metadata_kwargs_never_reach_timm_unchecked(tiny, no_create):
    """An ONNX file's embedded meta is used for preprocessing and labels only; building a model
    from it still goes through the same check."""
    data = json.loads((tiny / "meta.json").read_text())
    data["model_kwargs"] = {"checkpoint_path": "/etc/passwd"}
    meta = meta_from_props({META_KEY: json.dumps(data)}, source="crafted.onnx")
    with pytest.raises(ValueError, match="'checkpoint_path'"):
        build_model(meta)
