"""The driver's choices for small runs: which executor trains them, and the same run built twice
gives the same initial models."""

from __future__ import annotations

import pytest
import torch

from raykd.config import RunConfig, load_config
from raykd.data.synth import make_synthetic
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
