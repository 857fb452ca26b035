"""Each model sees its own inputs: inside a distillation step the teacher gets the batch in its own
preprocessing contract (size, mean, std), whatever the student's is."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raykd.config import RunConfig, load_config, to_dict
from raykd.data.synthetic import make_synthetic
from raykd.data.transforms import PreprocessSpec, normalizer
from raykd.train.build import build_run
from raykd.train.prep import _prep_task, needs_teacher_prep


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher-inputs") / "data"
    return path, make_synthetic(path, num_images=40, image_size=32, seed=0)


def kd_parts(dataset, teacher_size: int, method: str = "kd", prep_dir=None):
    path, manifest = dataset
    cfg = load_config(RunConfig, None, [
        f"data.path={path}", "student.name=raykd_test_tiny_cnn", "student.image_size=32",
        "teacher.name=test_resnet", f"teacher.image_size={teacher_size}", f"distill.method={method}",
        "distill.prep_epochs=1"])
    if prep_dir is not None and needs_teacher_prep(cfg):  # sskd/ssdkd: the prep's task body, in-process
        head = _prep_task(to_dict(cfg), str(prep_dir / "head.safetensors"))
        cfg = replace(cfg, distill=replace(cfg.distill, teacher_prep_file=head))
    torch.manual_seed(0)
    return build_run(cfg, manifest)


def teacher_eval_logits(teacher, images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """The teacher's own evaluation: its mean/std at its own size (pixels resized as floats)."""
    spec = PreprocessSpec(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = images_u8.float()
    if size != images_u8.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, -1, 1, 1) * 255
    with torch.no_grad():
        return teacher.eval()((x - mean) / std)


@pytest.mark.parametrize("teacher_size", [32, 48])
def test_a_teacher_with_another_contract_gives_in_a_kd_step_the_logits_of_its_own_evaluation(dataset, teacher_size):
    parts = kd_parts(dataset, teacher_size)
    student_spec = parts.preprocess
    assert (student_spec.mean, student_spec.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # tiny CNN: [0, 1]
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = parts.teacher.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:
        parts.method.train()
        out = parts.method(normalizer(student_spec)(images), torch.zeros(6, dtype=torch.long))
    finally:
        hook.remove()
    assert torch.isfinite(out.loss)
    assert len(seen) == 1  # the KD step ran the teacher once
    expected = teacher_eval_logits(parts.teacher, images, teacher_size)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-4)


def test_a_teacher_fed_the_students_normalisation_would_give_other_logits(dataset):
    """The check above has teeth: the student's [0, 1] tensor is not what the teacher evaluates."""
    parts = kd_parts(dataset, 32)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = parts.teacher.eval()(normalizer(parts.preprocess)(images))
    assert not torch.allclose(raw, teacher_eval_logits(parts.teacher, images, 32), atol=1e-3)


def test_feature_methods_take_teacher_features_in_the_teachers_contract(dataset):
    parts = kd_parts(dataset, 48, method="rkd")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = normalizer(parts.preprocess)(images)
    torch.testing.assert_close(parts.method.teacher_features(x).logits,
                               teacher_eval_logits(parts.teacher, images, 48), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["kd", "dkd", "rkd", "fitnet", "crkd", "dkd_combo", "sskd", "ssdkd"])
def test_every_teacher_method_builds_with_a_teacher_of_another_contract(dataset, method, tmp_path):
    parts = kd_parts(dataset, 48, method=method, prep_dir=tmp_path)  # sskd/ssdkd: their teacher prep too
    assert parts.method.teacher_inputs(torch.zeros(2, 3, 32, 32)).shape[-1] == 48
