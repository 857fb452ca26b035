"""Every shipped run config loads, names registered models and methods, and valid parameters."""

from pathlib import Path

import pytest
import timm

import raykd.models  # noqa: F401  (registers raykd models with timm)
from raykd.config import RunConfig, load_config
from raykd.distill import METHODS
from raykd.distill.base import make_params

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg = load_config(RunConfig, path)
    method = METHODS.get(cfg.distill.method)
    make_params(method.Params, cfg.distill.params, cfg.distill.method)
    if cfg.student.cut_blocks:
        assert cfg.teacher is not None
    elif not cfg.student.checkpoint:
        assert timm.is_model(cfg.student.name), cfg.student.name
    if method.needs_teacher:
        assert cfg.teacher is not None, f"{cfg.distill.method} needs a teacher"
    if cfg.teacher is not None and not cfg.teacher.checkpoint:
        assert timm.is_model(cfg.teacher.name)


def test_train_cli_reports_a_bad_key_with_the_file_and_exits_2(tmp_path, capsys):
    from raykd.train.__main__ import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochz: 3}\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "train.epochz" in err and "Did you mean 'train.epochs'" in err


def test_list_methods_prints_every_method_with_defaults_and_ranges(capsys):
    from raykd.train.__main__ import main

    assert main(["--list-methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS.names():
        assert f"\n{name}" in f"\n{out}"
    assert "temperature" in out and "range [" in out and "choices [" in out
