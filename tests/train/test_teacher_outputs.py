"""Teacher outputs (``raykd.train.teacher_outputs``): built once by a Ray Data job, keyed by their
inputs, read by trials instead of running the teacher, and only where the method can use them."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from raykd.artifact.format import ArtifactMeta, build_model, save_artifact
from raykd.config import RunConfig, load_config
from raykd.data.manifest import Manifest
from raykd.data.memory import MemorySplit
from raykd.data.synthetic import make_synthetic
from raykd.data.transforms import PreprocessSpec, normalizer, to_chw_batch
from raykd.train.teacher_outputs import (
    StaleOutputsError,
    TeacherOutputs,
    ViewMaker,
    build_outputs,
    outputs_key,
    view_seed,
)

VIEW = PreprocessSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """60 synthetic images and a (seeded, untrained) teacher artifact at 48 px with its own mean/std."""
    root = tmp_path_factory.mktemp("teacher_outputs")
    data = root / "data"
    manifest = make_synthetic(data, num_images=60, image_size=32, seed=0)
    meta = ArtifactMeta(model_name="test_resnet", num_classes=manifest.num_classes, model_kwargs={},
                        label_names=list(manifest.label_names), malignant=list(manifest.malignant),
                        preprocess={"image_size": 48, "mean": [0.4] * 3, "std": [0.3] * 3,
                                    "crop_black_border": False, "fusion_preprocess": False})
    torch.manual_seed(0)
    teacher_dir = save_artifact(root / "teacher" / "best", build_model(meta), meta)
    return root, data, teacher_dir


@pytest.fixture(scope="module")
def built_outputs(ray_cluster, setup):
    root, data, teacher_dir = setup
    key = outputs_key(data, teacher_dir, "light", VIEW, views=3, seed=7)
    path = build_outputs(data, teacher_dir, key, batch_size=16, actors=1)
    return key, path


def test_a_view_is_a_pure_function_of_the_seed_image_and_index():
    image = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    a, b = ViewMaker(VIEW, "light", seed=7), ViewMaker(VIEW, "light", seed=7)
    assert np.array_equal(a(image, "img_1", 2), b(image, "img_1", 2))
    assert not np.array_equal(a(image, "img_1", 2), a(image, "img_1", 1))
    assert view_seed(7, "img_1", 2) == view_seed(7, "img_1", 2) != view_seed(8, "img_1", 2)


def test_the_teacher_outputs_are_built_once_with_k_teacher_passes_per_image(built_outputs, setup):
    key, path = built_outputs
    root, data, teacher_dir = setup
    record = json.loads((path / "outputs.json").read_text())
    images = sum(Manifest.load(data).counts("train"))
    assert record["teacher_forward_passes"] == record["rows"] == 3 * images
    assert record["fingerprint"] == key.fingerprint() == path.name
    before = (path / "outputs.json").stat().st_mtime_ns
    assert build_outputs(data, teacher_dir, key) == path  # reused, not rebuilt
    assert (path / "outputs.json").stat().st_mtime_ns == before


def test_the_teacher_saw_exactly_the_pixels_the_student_gets(built_outputs, setup):
    """A saved view rebuilt for the student, pushed through the teacher online, gives the saved
    outputs; the training split's batches carry the view's pixels and its saved outputs."""
    from raykd.artifact.format import load_artifact
    from raykd.data.transforms import InputBridge
    from raykd.models import features

    key, path = built_outputs
    root, data, teacher_dir = setup
    split = MemorySplit(data, "train", VIEW, train=True, seed=3)
    teacher_outputs = TeacherOutputs(path, key, split.ids)
    split.attach_outputs(teacher_outputs, ViewMaker(VIEW, key.recipe, key.seed))
    batch = next(split.batches(8, epoch=0))
    rows, views = batch["rows"].numpy(), batch["views"].numpy()

    rebuilt = to_chw_batch([ViewMaker(VIEW, "light", 7)(split.decoded[r], split.ids[r], v) for r, v in zip(rows, views)])
    assert np.array_equal(batch["image"].numpy(), rebuilt)  # the student's pixels are the saved view's

    teacher, meta = load_artifact(teacher_dir)
    x = normalizer(VIEW, torch.device("cpu"))(batch["image"])
    with torch.no_grad():
        online = features(teacher.eval(), InputBridge(VIEW, PreprocessSpec.from_dict(meta.preprocess))(x))
    torch.testing.assert_close(batch["teacher"]["logits"], online.logits, atol=2e-2, rtol=1e-2)  # saved as fp16
    torch.testing.assert_close(batch["teacher"]["embedding"], online.embedding, atol=2e-2, rtol=1e-2)


def test_teacher_outputs_built_for_other_inputs_are_never_read(built_outputs, setup):
    key, path = built_outputs
    root, data, _ = setup
    other_teacher = replace(key, teacher="0" * 64)
    with pytest.raises(StaleOutputsError, match="teacher: .* != "):
        TeacherOutputs(path, other_teacher, MemorySplit(data, "train", VIEW, train=True).ids)
    with pytest.raises(StaleOutputsError, match="recipe"):
        TeacherOutputs.check(path, replace(key, recipe="strong"))
    assert replace(key, views=4).fingerprint() != key.fingerprint()  # another K: other teacher outputs
    assert replace(key, view={**key.view, "image_size": 48}).fingerprint() != key.fingerprint()


def _cfg(data, tmp_path, teacher_dir, method, outputs_path=None, **sets):
    items = [f"data.path={data}", f"output_dir={tmp_path}", f"name={method}", "student.name=raykd_test_tiny_cnn",
             "student.image_size=32", f"teacher.checkpoint={teacher_dir.parent}", f"distill.method={method}",
             "train.epochs=1", "train.batch_size=8", "scaling.num_workers=1", "scaling.executor=local",
             *[f"{k}={v}" for k, v in sets.items()]]
    if outputs_path is not None:
        items.append(f"distill.teacher_outputs={outputs_path}")
    return load_config(RunConfig, None, items)


def count_teacher_forwards(monkeypatch) -> list:
    import raykd.distill.base as base

    calls = []
    real = base.Method.teacher_inputs
    monkeypatch.setattr(base.Method, "teacher_inputs", lambda self, x: calls.append(1) or real(self, x))
    return calls


def test_a_kd_run_reads_the_teacher_outputs_and_a_feature_map_method_keeps_the_online_teacher(
        built_outputs, setup, tmp_path, monkeypatch):
    from raykd.artifact.rundir import RunDir
    from raykd.train.driver import run_train

    root, data, teacher_dir = setup
    key, path = built_outputs
    calls = count_teacher_forwards(monkeypatch)
    cfg = _cfg(data, tmp_path, teacher_dir, "kd", path)
    with pytest.raises(StaleOutputsError, match="view"):  # VIEW is not the tiny CNN's own contract
        run_train(cfg, in_process=True)

    # Teacher outputs made in the student's own contract are read: no teacher forward pass in training.
    from raykd.train.build import build_run

    spec = build_run(replace(cfg, distill=replace(cfg.distill, teacher_outputs=None)), Manifest.load(data)).preprocess
    own = build_outputs(data, teacher_dir, outputs_key(data, teacher_dir, "light", spec, views=2, seed=0), actors=1)
    calls.clear()
    result = run_train(replace(_cfg(data, tmp_path, teacher_dir, "kd", own), name="kd-outputs"), in_process=True)
    assert calls == [] and RunDir(result.run_dir).read_summary()["teacher"] == "saved"

    result = run_train(_cfg(data, tmp_path, teacher_dir, "fitnet", own), in_process=True)
    assert calls and RunDir(result.run_dir).read_summary()["teacher"] == "online"  # feature maps: online
