"""bench/models.py prints one Markdown row per model (smoke test on tiny models)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "models.py"


def test_bench_prints_a_markdown_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_models", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = str(torch.get_num_threads())  # keep the session's thread count
    module.main(["--models", "raykd_test_tiny_cnn", "test_vit", "--seconds", "0", "--threads", threads])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| model | role | params (M)")
    rows = lines[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["`raykd_test_tiny_cnn`", "`test_vit`"]
    assert rows[1].rstrip().endswith("1.00× |")  # test_vit is the reference of a quick run
