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
