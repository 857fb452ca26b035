"""Stage 1 of a search: a teacher not clearly above chance is refused with a message that says so,
before any trial distils from it."""

from __future__ import annotations

import json

import pytest
import yaml

from raykd.data.synth import make_synthetic
from raykd.tune.plan import TeacherTooWeakError, absolute_paths, chance_level, train_teachers
from raykd.tune.space import load_space


def space_with_trained_teacher(tmp_path, best: float, margin=0.1):
    data = tmp_path / "data"
    make_synthetic(data, num_images=60, image_size=32, seed=0)
    doc = {
        "name": "weak", "output_dir": str(tmp_path / "out"),
        "base": {"data": {"path": str(data)}, "student": {"image_size": 32}},
        "teachers": {"cnn": {"model": {"name": "test_resnet", "image_size": 32}}},
        "students": ["raykd_test_tiny_cnn"],
        "methods": {"kd": {}},
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
