"""The model artifact: safetensors + meta.json, atomic, found from a run folder."""

from __future__ import annotations

import json

import pytest
import torch

from raykd.artifact.format import (
    ArtifactMeta,
    build_model,
    count_params,
    find_artifact,
    load_artifact,
    read_meta,
    save_artifact,
)
from tests.export.helpers import LABELS, make_artifact


def _meta(**kw) -> ArtifactMeta:
    base = dict(model_name="raykd_test_tiny_cnn", num_classes=4, model_kwargs={}, label_names=list(LABELS),
                malignant=["MEL"], preprocess={"image_size": 32}, version="t1")
    base.update(kw)
    return ArtifactMeta(**base)


def test_saved_artifact_loads_back_with_identical_outputs_and_meta(tmp_path):
    meta = _meta()
    torch.manual_seed(0)
    model = build_model(meta).eval()
    path = save_artifact(tmp_path / "run" / "best", model, meta)

    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors"]
    loaded, meta2 = load_artifact(tmp_path / "run")
    assert meta2 == meta
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_weights_are_stored_as_safetensors_not_pickles(tmp_path):
    path = make_artifact(tmp_path / "a", "raykd_test_tiny_cnn", {}, image_size=32)
    raw = (path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, then JSON
    header = json.loads(raw[8 : 8 + header_len])
    assert all("dtype" in v for k, v in header.items() if k != "__metadata__")


def test_saving_again_replaces_the_artifact_and_leaves_no_temporary_folders(tmp_path):
    meta = _meta()
    torch.manual_seed(0)
    save_artifact(tmp_path / "best", build_model(meta), meta)
    save_artifact(tmp_path / "best", build_model(meta), _meta(version="t2"))
    assert read_meta(tmp_path / "best").version == "t2"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_find_artifact_accepts_run_folder_artifact_folder_and_its_files(tmp_path):
    path = make_artifact(tmp_path / "run" / "best", "raykd_test_tiny_cnn", {}, image_size=32)
    assert find_artifact(tmp_path / "run") == path
    assert find_artifact(path) == path
    assert find_artifact(path / "meta.json") == path
    with pytest.raises(FileNotFoundError, match="best/model.safetensors"):
        find_artifact(tmp_path)


def test_meta_with_wrong_label_count_or_unknown_malignant_name_is_refused():
    with pytest.raises(ValueError, match="one name per class"):
        _meta(num_classes=3)
    with pytest.raises(ValueError, match="SCC"):
        _meta(malignant=["SCC"])


def test_weights_that_do_not_fit_the_named_model_are_refused(tmp_path):
    path = make_artifact(tmp_path / "a", "raykd_test_tiny_cnn", {}, image_size=32)
    data = json.loads((path / "meta.json").read_text())
    data["model_name"] = "test_resnet"
    (path / "meta.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match test_resnet"):
        load_artifact(path)


def test_unknown_model_name_is_a_clear_error(tmp_path):
    path = make_artifact(tmp_path / "a", "raykd_test_tiny_cnn", {}, image_size=32)
    data = json.loads((path / "meta.json").read_text())
    data["model_name"] = "raykd_no_such_model"
    (path / "meta.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a timm or raykd model"):
        load_artifact(path)


def test_count_params_reads_the_header_and_skips_norm_statistics(tmp_path):
    path = make_artifact(tmp_path / "a", "test_resnet", {}, image_size=32)
    model, _ = load_artifact(path)
    assert count_params(path) == sum(p.numel() for p in model.parameters())
