"""Under ``ray job submit --working-dir``, relative data and output paths are refused before Ray
work starts, naming each path and the fix (they would resolve in the job's temporary copy)."""

from __future__ import annotations

import json

import pytest

from raykd.cluster import job_working_dir
from raykd.config import ConfigError
from raykd.tune.search import prepare_search
from raykd.tune.space_file import load_space

SMOKE = "search_spaces/smoke.yaml"


@pytest.fixture
def in_a_job(monkeypatch):
    runtime_env = {"working_dir": "gcs://_ray_pkg_0123abcd.zip", "env_vars": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_outside_a_job_there_is_no_working_dir(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_working_dir() is None


def test_a_job_with_relative_paths_is_refused_naming_them_and_the_fix(in_a_job):
    assert job_working_dir() == "gcs://_ray_pkg_0123abcd.zip"
    with pytest.raises(ConfigError) as info:
        prepare_search(load_space(SMOKE))
    msg = str(info.value)
    assert "base.data.path='data/synthetic-32'" in msg and "output_dir='runs'" in msg
    assert "--set base.data.path=/shared/" in msg and "temporary copy" in msg


def test_a_job_with_absolute_paths_goes_on(in_a_job, tmp_path):
    space = load_space(SMOKE, [f"output_dir={tmp_path / 'runs'}", f"base.data.path={tmp_path / 'data'}"])
    prepared = prepare_search(space)  # generates the data, checks every pair: no error about paths
    assert prepared.base_config.data.path == str(tmp_path / "data")
