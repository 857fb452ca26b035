"""The driver's choices for small runs: which executor trains them, and the same run built twice
gives the same initial models."""

from __future__ import annotations

import pytest
import torch

from raykd.config import RunConfig, load_config
from raykd.data.synthetic import make_synthetic
from raykd.train.driver import prepare, uses_local


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver-local") / "data"
    make_synthetic(path, num_images=40, image_size=32, seed=0)
    return path


def cfg(data, *sets):
    return load_config(RunConfig, None, [f"data.path={data}", "student.name=raykd_test_tiny_cnn",
                                         "student.image_size=32", *sets])


def test_a_single_worker_run_on_small_data_trains_in_one_process(data):
    assert uses_local(cfg(data, "scaling.num_workers=1"))
    assert not uses_local(cfg(data, "scaling.num_workers=2"))  # DDP: a Ray Train worker group
    assert not uses_local(cfg(data, "scaling.num_workers=1", "scaling.executor=trainer"))
    assert uses_local(cfg(data, "scaling.num_workers=1", "scaling.executor=local"))


def test_the_same_run_config_builds_the_same_initial_weights(data):
    first = prepare(cfg(data, "train.seed=3"))[2].student.state_dict()
    torch.manual_seed(123)  # whatever ran before
    second = prepare(cfg(data, "train.seed=3"))[2].student.state_dict()
    other = prepare(cfg(data, "train.seed=4"))[2].student.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_raykd_train_runs_a_methods_teacher_prep_once_into_the_run_folder(ray_cluster, data, tmp_path):
    """``raykd train`` with sskd: SSKD's teacher prep runs first (a Ray task) into RUN_DIR/prep, the
    run builds from it, and a resumed run reuses it."""
    from raykd.artifact.rundir import RunDir
    from raykd.train.driver import run_train

    run = cfg(data, f"output_dir={tmp_path}", "name=sskd", "teacher.name=test_resnet", "teacher.image_size=32",
              "distill.method=sskd", "distill.prep_epochs=1", "train.epochs=1", "train.batch_size=8")
    result = run_train(run, in_process=True)
    head = RunDir(result.run_dir).prep_file("sskd_head-e1")
    assert head.is_file() and RunDir(result.run_dir).finished()
    made = head.stat().st_mtime_ns
    run_train(run, in_process=True, resume=True)
    assert head.stat().st_mtime_ns == made
