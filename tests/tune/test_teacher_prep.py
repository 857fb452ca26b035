"""Stage 1 of a search: a teacher not clearly above chance is refused with a message that says so,
before any trial distils from it; a method's teacher prep (SSKD's head) runs once per teacher as a Ray
Train run, each rank streaming its own share of the shards, and every trial reads its saved output."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from raykd.data.manifest import Manifest
from raykd.data.synthetic import make_synthetic
from raykd.tune.plan import absolute_paths
from raykd.tune.space_file import load_space
from raykd.tune.teachers import TeacherTooWeakError, chance_level, train_teachers


def space_with_trained_teacher(tmp_path, best: float, margin=0.1, methods=None, base=None):
    data = tmp_path / "data"
    make_synthetic(data, num_images=60, image_size=32, seed=0)
    doc = {
        "name": "weak", "output_dir": str(tmp_path / "out"),
        "base": {"data": {"path": str(data)}, "student": {"image_size": 32}, **(base or {})},
        "teachers": {"cnn": {"model": {"name": "test_resnet", "image_size": 32}}},
        "students": ["raykd_test_tiny_cnn"],
        "methods": methods or {"kd": {}},
        "search": {"teacher_margin": margin},
    }
    path = tmp_path / "weak.yaml"
    path.write_text(yaml.safe_dump(doc))
    space = absolute_paths(load_space(path))
    run_dir = tmp_path / "out" / "weak" / "teachers" / "cnn"  # a finished teacher run: no training again
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"best": best, "best_epoch": 3, "epochs": 3, "val": {}}))
    return space, tmp_path / "out" / "weak"


def test_bma_chance_is_one_over_the_classes():
    assert chance_level("bma", 8) == pytest.approx(0.125)


def test_stage_one_refuses_a_chance_level_teacher_naming_it_and_the_fix(tmp_path):
    space, exp = space_with_trained_teacher(tmp_path, best=0.14)
    with pytest.raises(TeacherTooWeakError) as info:
        train_teachers(space, exp)
    msg = str(info.value)
    assert "teacher 'cnn'" in msg and "0.1400" in msg and "not clearly above chance" in msg
    assert "search.teacher_margin" in msg and "teachers.cnn" in msg


def test_stage_one_accepts_a_teacher_above_chance_and_the_margin_can_be_turned_off(tmp_path):
    space, exp = space_with_trained_teacher(tmp_path / "a", best=0.55)
    assert train_teachers(space, exp) == {"cnn": str(exp / "teachers" / "cnn")}
    space, exp = space_with_trained_teacher(tmp_path / "b", best=0.13, margin=None)
    assert "cnn" in train_teachers(space, exp)


def save_teacher_artifact(run_dir, data):
    """The finished teacher run's best model: an untrained (seeded) test_resnet for the dataset."""
    import torch

    from raykd.artifact.format import ArtifactMeta, build_model, save_artifact
    from raykd.artifact.rundir import RunDir
    from raykd.data.manifest import Manifest

    m = Manifest.load(data)
    meta = ArtifactMeta(model_name="test_resnet", num_classes=m.num_classes, model_kwargs={},
                        label_names=list(m.label_names), malignant=list(m.malignant),
                        preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                                    "crop_black_border": False, "fusion_preprocess": False})
    torch.manual_seed(0)
    save_artifact(RunDir(run_dir).best_dir, build_model(meta), meta)


def test_a_teacher_prep_runs_once_and_every_trial_reads_its_output(ray_cluster, tmp_path):
    from raykd.train.driver import prepare
    from raykd.train.prep import prep_record
    from raykd.tune.plan import TrialPlan
    from raykd.tune.teachers import run_teacher_preps

    space, exp = space_with_trained_teacher(tmp_path, best=0.6, methods={"sskd": {}, "ssdkd": {}},
                                            base={"distill": {"prep_epochs": 1}, "scaling": {"num_workers": 1}})
    save_teacher_artifact(exp / "teachers" / "cnn", tmp_path / "data")
    teachers = train_teachers(space, exp)
    preps = run_teacher_preps(space, exp, teachers)
    (head,) = preps.values()  # sskd and ssdkd share the one head of teacher cnn
    assert head == str(exp / "teachers" / "cnn" / "prep" / "sskd_head-e1.safetensors")
    assert prep_record(head)["world_size"] == 1  # the default search's one worker on 2 cores
    made = Path(head).stat().st_mtime_ns

    plan = TrialPlan(space, exp, teachers, preps)
    for i, method in enumerate(["sskd", "sskd", "ssdkd"]):  # the trials of a search
        cfg = plan.run_config({"method": method}, f"trial{i}")
        assert cfg.distill.teacher_prep_file == head
        cfg, _, parts, run_dir = prepare(cfg)  # builds with the saved head; runs no prep of its own
        assert not (run_dir / "prep").exists()
        assert parts.method.frozen("teacher_head") is not None

    assert run_teacher_preps(space, exp, teachers) == preps  # a resumed search reuses it
    assert Path(head).stat().st_mtime_ns == made
    assert sorted(p.name for p in exp.rglob("*.safetensors") if "prep" in p.parts) == ["sskd_head-e1.safetensors"]


def test_a_teacher_prep_streams_the_shards_a_batch_at_a_time(tmp_path, monkeypatch):
    """No split is decoded whole: the first batch costs one batch of decodes."""
    from raykd.data.transforms import PreprocessSpec
    from raykd.train import prep

    data = tmp_path / "data"
    manifest = make_synthetic(data, num_images=120, image_size=32, seed=0)
    decoded = []
    real = prep.decode_image
    monkeypatch.setattr(prep, "decode_image", lambda blob: decoded.append(1) or real(blob))
    batches = prep.ShardBatches(data, "train", PreprocessSpec(image_size=32), batch_size=8)
    first = next(iter(batches))
    assert first.shape == (8, 3, 32, 32) and len(decoded) <= 8 < sum(manifest.counts("train"))
    assert sum(b.shape[0] for b in batches) == sum(manifest.counts("train"))  # re-iterable: every epoch


def split_blobs(data, split: str) -> list[bytes]:
    import pyarrow.dataset as pads

    ds = pads.dataset(Manifest.load(data).shard_paths(data), format="parquet")
    return ds.to_table(columns=["image"], filter=pads.field("split") == split).column("image").to_pylist()


@pytest.mark.parametrize(("world", "batch_size"), [(2, 8), (3, 5), (5, 7)])
def test_each_rank_reads_a_disjoint_share_of_the_split_and_every_rank_steps_alike(tmp_path, monkeypatch, world,
                                                                                 batch_size):
    """(5, 7): 36 training rows give shares of 8, 7, 7, 7, 7; rank 0's eighth row joins its one batch
    rather than opening a second one that the other ranks' DDP steps would never match."""
    from raykd.data.transforms import PreprocessSpec
    from raykd.train import prep

    data = tmp_path / "data"
    make_synthetic(data, num_images=60, image_size=32, seed=0)
    blobs = split_blobs(data, "train")
    assert len(blobs) == 36 and len(set(blobs)) == len(blobs)  # the rows can be told apart by their bytes
    decoded: list[bytes] = []
    real = prep.decode_image
    monkeypatch.setattr(prep, "decode_image", lambda blob: decoded.append(blob) or real(blob))
    shares, steps = [], []
    for rank in range(world):
        decoded.clear()
        batches = prep.ShardBatches(data, "train", PreprocessSpec(image_size=32), batch_size, rank=rank, world=world)
        sizes = [b.shape[0] for b in batches]
        assert len(sizes) == len(batches) and sum(sizes) == batches.rows == len(decoded)
        shares.append(list(decoded))
        steps.append(len(sizes))
    assert len(set(steps)) == 1  # the same number of steps on every rank
    assert sorted(b for share in shares for b in share) == sorted(blobs)  # disjoint, and together the split
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_prep_is_a_ray_train_run_over_two_ranks_and_its_head_loads_into_sskd(ray_cluster, tmp_path):
    import torch
    from safetensors.torch import load_file

    from raykd.config import RunConfig, load_config
    from raykd.train.build import build_run
    from raykd.train.prep import prep_record, run_teacher_prep

    data = tmp_path / "data"
    manifest = make_synthetic(data, num_images=60, image_size=32, seed=0)
    cfg = load_config(RunConfig, None, [
        f"data.path={data}", f"output_dir={tmp_path / 'out'}", "student.name=raykd_test_tiny_cnn",
        "student.image_size=32", "teacher.name=test_resnet", "teacher.image_size=32", "distill.method=sskd",
        "distill.prep_epochs=2", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "train.batch_size=8"])
    out = tmp_path / "prep" / "sskd_head-e2.safetensors"
    cfg = run_teacher_prep(cfg, out)

    assert cfg.distill.teacher_prep_file == str(out.resolve())
    record = prep_record(out)
    assert record["world_size"] == 2  # two Ray Train ranks, each with half the training rows
    assert sum(record["rows_per_rank"]) == sum(manifest.counts("train")) and record["rows_per_rank"] == [18, 18]
    assert record["batches_per_rank"] == [3, 3]
    state = load_file(str(out))
    assert state and not any(k.startswith("module.") for k in state)  # DDP's wrapper is not saved
    parts = build_run(cfg, manifest)  # the saved head loads into sskd as its frozen teacher head
    head = parts.method.frozen("teacher_head")
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, state[k])
    images, targets = torch.rand(4, 3, 32, 32), torch.arange(4) % manifest.num_classes
    out_ = parts.method(images, targets)
    assert torch.isfinite(out_.loss) and "ss" in out_.parts


def test_stage_one_builds_the_teacher_outputs_once_per_teacher_and_student_for_every_trial(ray_cluster, tmp_path, caplog):
    import logging

    from raykd.tune.plan import TrialPlan
    from raykd.tune.teachers import build_teacher_outputs

    space, exp = space_with_trained_teacher(tmp_path, best=0.6, methods={"kd": {}, "dkd": {}, "fitnet": {}})
    space = replace(space, search=replace(space.search, teacher_output_views=2))
    save_teacher_artifact(exp / "teachers" / "cnn", tmp_path / "data")
    teachers = train_teachers(space, exp)
    with caplog.at_level(logging.INFO, logger="raykd.tune.teachers"):
        built = build_teacher_outputs(space, exp, teachers)
    (outputs,) = built.values()  # kd, dkd and fitnet share the teacher outputs of (cnn, the student)
    images = sum(Manifest.load(tmp_path / "data").counts("train"))
    record = json.loads((Path(outputs) / "outputs.json").read_text())
    assert record["teacher_forward_passes"] == 2 * images
    assert any(f"{2 * images} teacher forward passes = 2 views x {images} training images" in r.getMessage()
               for r in caplog.records)
    plan = TrialPlan(space, exp, teachers, {}, built)
    assert {plan.run_config({"method": m}, f"t-{m}").distill.teacher_outputs for m in ("kd", "dkd", "fitnet")} == {outputs}
    assert build_teacher_outputs(space, exp, teachers) == built  # a resumed search reuses them
