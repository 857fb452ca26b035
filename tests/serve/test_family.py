"""The served family file: written by the tune job, read by the Serve app, or built from --model paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from raykd.artifact.format import load_artifact
from raykd.export.onnx import export_onnx
from raykd.serve.family import Family, FamilyEntry, family_from_paths, load_family, write_family
from tests.export.helpers import make_artifact


@pytest.fixture
def experiment(tmp_path):
    root = tmp_path / "exp"
    a = make_artifact(root / "trial_a" / "best", "raykd_test_tiny_cnn", {}, image_size=32, version="a")
    b = make_artifact(root / "trial_b" / "best", "raykd_test_tiny_cnn", {}, image_size=32, version="b")
    model, meta = load_artifact(b)
    onnx = export_onnx(model, meta, b / "model.onnx")
    return root, a, b, onnx


def test_family_file_round_trips_with_paths_relative_to_its_folder(experiment, tmp_path):
    root, a, b, onnx = experiment
    entries = [FamilyEntry("a", "a", str(a), None, 1308, 6160, 0.5, 1.0),
               {"name": "b", "version": "b", "artifact": str(b), "onnx": str(onnx), "val_bma": 0.6}]
    path = write_family(root / "family.json", entries, winner="b")
    raw = json.loads(path.read_text())
    assert raw["winner"] == "b"
    assert raw["models"][1]["onnx"] == "trial_b/best/model.onnx"

    moved = tmp_path / "elsewhere"
    shutil.move(str(root), moved)
    family = load_family(moved / "family.json")
    assert family.get(None).name == "b"
    assert family.get("b").onnx == str((moved / "trial_b" / "best" / "model.onnx").resolve())
    assert family.get("a").params == 1308 and family.get("a").latency_ms == 1.0


def test_the_family_file_records_the_sha256_and_size_of_every_served_file(experiment):
    root, a, b, onnx = experiment
    path = write_family(root / "family.json", [FamilyEntry("a", artifact=str(a)),
                                               FamilyEntry("b", artifact=str(b), onnx=str(onnx))], winner="b")
    files = json.loads(path.read_text())["models"][1]["files"]
    assert set(files) == {f"trial_b/best/{name}" for name in os.listdir(b)}  # weights, meta.json, model.onnx
    for rel, record in files.items():
        data = (root / rel).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert load_family(path).get("b").files == files
    with pytest.raises(FileNotFoundError, match="names onnx .*gone.onnx'"):
        write_family(root / "f.json", [FamilyEntry("c", onnx=str(root / "gone.onnx"))], winner="c")
    with pytest.raises(ValueError, match="file 'x' needs"):
        FamilyEntry("c", artifact="x", files={"x": {"sha256": "abc", "size": 1}})


def test_a_family_file_written_before_hashes_were_recorded_still_loads(experiment):
    root, _, _, _ = experiment
    (root / "old.json").write_text(json.dumps({"winner": "b", "models": [
        {"name": "b", "version": "b", "artifact": "trial_b/best", "onnx": "trial_b/best/model.onnx"}]}))
    family = load_family(root / "old.json")
    assert family.get("b").files is None and family.get("b").onnx == str(root / "trial_b/best/model.onnx")


def test_family_errors_name_the_problem(experiment):
    root, a, _, _ = experiment
    with pytest.raises(ValueError, match="winner 'zz'"):
        write_family(root / "f.json", [FamilyEntry("a", artifact=str(a))], winner="zz")
    with pytest.raises(ValueError, match="appears twice"):
        Family("a", [FamilyEntry("a", artifact="x"), FamilyEntry("a", artifact="y")])
    with pytest.raises(ValueError, match="give 'artifact' or 'onnx'"):
        FamilyEntry("a")
    with pytest.raises(KeyError, match="Did you mean"):
        Family("alpha", [FamilyEntry("alpha", artifact="x")]).get("alpah")
    (root / "bad.json").write_text(json.dumps({"winner": "a", "models": [{"name": "a", "artifact": "nope"}]}))
    with pytest.raises(FileNotFoundError, match="'nope'"):
        load_family(root / "bad.json")
    (root / "typo.json").write_text(json.dumps({"winner": "a", "models": [{"name": "a", "artefact": "x"}]}))
    with pytest.raises(ValueError, match="artefact"):
        load_family(root / "typo.json")


def test_family_from_model_paths_names_runs_and_onnx_files(experiment):
    root, a, b, onnx = experiment
    family = family_from_paths([str(root / "trial_a"), str(onnx), f"custom={a}"])
    assert family.names == ["trial_a", "trial_b", "custom"]
    assert family.winner == "trial_a"
    first, second, third = family.models
    assert first.artifact == str(a) and first.onnx is None and first.params == 1308
    assert second.onnx == str(onnx) and second.artifact is None and second.params == 1308
    assert third.artifact == str(a)
    assert family_from_paths([str(b), str(b)]).names == ["trial_b", "trial_b-2"]
    assert family_from_paths([str(b)]).models[0].onnx == str(onnx)  # found next to the weights
