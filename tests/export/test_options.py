"""The export's options are defined once (raykd.export.options): the CLI, run_export and a search
space's ``export:`` section all read their defaults from there."""

from __future__ import annotations

import dataclasses

import pytest

from raykd.config import ConfigError, from_dict
from raykd.export.__main__ import FLAGS, export_config, parse_args
from raykd.export.calibrate import DEFAULT_TARGET_SENSITIVITY
from raykd.export.onnx import DEFAULT_OPSET
from raykd.export.options import ExportChecks, ExportConfig, SearchExportConfig


def test_the_cli_defaults_are_the_config_defaults():
    assert export_config(parse_args(["--model", "r"])) == ExportConfig()
    assert (DEFAULT_OPSET, DEFAULT_TARGET_SENSITIVITY) == (ExportConfig().opset, ExportConfig().target_sensitivity)


def test_every_flag_sets_its_field():
    args = parse_args(["--model", "r", "--split", "test", "--fp16", "--int8", "--tolerance", "0.01",
                       "--max-images", "5", "--batch-size", "4", "--opset", "13", "--no-calibrate",
                       "--target-sensitivity", "0.9"])
    assert export_config(args) == ExportConfig(split="test", fp16=True, int8=True, tolerance=0.01, max_images=5,
                                               batch_size=4, opset=13, calibrate=False, target_sensitivity=0.9)
    # every option but latency_reps (a search space's) is a flag
    assert set(FLAGS) == {f.name for f in dataclasses.fields(ExportConfig)} - {"latency_reps"}


def test_the_search_section_keeps_its_keys_and_defaults():
    section = SearchExportConfig()
    assert {f.name for f in dataclasses.fields(SearchExportConfig)} == {
        "onnx", "tolerance", "max_images", "latency_reps", "calibrate", "target_sensitivity"}
    assert (section.onnx, section.max_images) == (True, 64)
    with pytest.raises(ConfigError, match="unknown key 'export.fp16'"):
        from_dict(SearchExportConfig, {"fp16": True}, where="s.yaml", prefix="export.")


def test_an_export_of_a_search_takes_the_sections_checks_and_the_other_defaults():
    section = SearchExportConfig(tolerance=1e-3, latency_reps=3, calibrate=False, target_sensitivity=0.8)
    cfg = ExportConfig.from_checks(section)
    assert [getattr(cfg, f.name) for f in dataclasses.fields(ExportChecks)] == [1e-3, 64, 3, False, 0.8]
    assert (cfg.split, cfg.fp16, cfg.int8, cfg.batch_size, cfg.opset) == ("val", False, False, 32, 17)
