"""The leaderboard without Ray: ranking, Pareto front, files, cascade table, model cost."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from raykd.artifact.measure import measure_latency, model_cost
from raykd.tune.leaderboard import Leaderboard, Row, cascade_markdown, pareto_front


def row(run, bma, status="ok", latency=None, params=None, error=None, **kw):
    return Row(trial_id=run, run=run, status=status, method=kw.pop("method", "kd"), student="s",
               val={"bma": bma, "accuracy": 0.5} if bma is not None else {}, latency_ms=latency,
               params=params, error=error, **kw)


def test_pareto_front_keeps_rows_no_other_row_beats_on_bma_and_latency():
    # a (0.80, 5 ms) and b (0.70, 2 ms) trade off; c (0.60, 3 ms) is beaten by b on both;
    # d (0.80, 6 ms) ties a on BMA and is slower, so a dominates it; e has no latency.
    a, b = row("a", 0.8, latency=5.0), row("b", 0.7, latency=2.0)
    c, d = row("c", 0.6, latency=3.0), row("d", 0.8, latency=6.0)
    e = row("e", 0.9)
    assert pareto_front([a, b, c, d, e], "bma", ["latency_ms"]) == [a, b]


def test_pareto_front_minimises_the_loss_metric():
    # for "loss" lower is better: x (0.5, 10 ms) and y (0.9, 1 ms) trade off, z (0.9, 2 ms) loses to y
    x, y, z = (Row(trial_id=n, run=n, status="ok", method="kd", student="s", val={"loss": v}, latency_ms=t)
               for n, v, t in (("x", 0.5, 10.0), ("y", 0.9, 1.0), ("z", 0.9, 2.0)))
    assert pareto_front([x, y, z], "loss", ["latency_ms"]) == [x, y]


def test_rows_are_ranked_by_val_bma_with_failed_trials_last_and_the_winner_finished():
    rows = [row("low", 0.3), row("failed", None, status="failed", error="WorkerGroupError: boom\nexit 1"),
            row("stopped", 0.9, status="stopped"), row("high", 0.6)]
    board = Leaderboard(rows=rows)
    assert [r.run for r in board.ranked()] == ["stopped", "high", "low", "failed"]
    assert board.winner().run == "high"  # ASHA stopped the best one early: it was never tested
    assert board.family() == [board.winner()]


def test_the_family_is_the_winner_then_the_pareto_front_in_multi_objective_mode():
    rows = [row("fast", 0.5, latency=1.0), row("best", 0.8, latency=9.0), row("mid", 0.6, latency=4.0),
            row("bad", 0.4, latency=5.0)]
    board = Leaderboard(rows=rows, objectives=["latency_ms"])
    assert [r.run for r in board.family()] == ["best", "mid", "fast"]


def test_the_leaderboard_is_written_as_csv_json_and_markdown_with_the_cascade_table(tmp_path):
    steps = [{"depth": 4, "run": None, "parent": True, "params": 42240.0, "val": {"bma": 0.30}},
             {"depth": 3, "run": "c-d3", "params": 33000.0, "val": {"bma": 0.28}, "test": {"bma": 0.27}},
             {"depth": 2, "run": "c-d2", "params": 24000.0, "val": {"bma": 0.21}, "test": {"bma": 0.20}}]
    rows = [row("t1", 0.42, params=1344, latency=0.2, hparams={"optim.lr": 0.003, "temperature": 4.0}),
            row("c-d3", 0.28, depth=3, method="cascade"),
            row("t2", None, status="failed", error="ValueError: non-finite | loss")]
    board = Leaderboard(rows=rows, cascades={"c": steps})
    paths = board.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["run"] for r in data["rows"]] == ["t1", "c-d3", "t2"] and data["rows"][0]["rank"] == 1
    with paths["csv"].open() as fh:
        table = list(csv.DictReader(fh))
    assert (table[0]["val_bma"], table[0]["hp_optim.lr"], table[0]["params"]) == ("0.42", "0.003", "1344")
    assert table[2]["status"] == "failed" and "non-finite" in table[2]["error"]
    md = paths["md"].read_text()
    assert md.splitlines()[0].startswith("| # | trial | method | student | val bma |")
    assert "| 1 | t1 | kd | s | 0.4200 |" in md and "optim.lr=0.0030, temperature=4.0000" in md
    assert "failed: ValueError: non-finite / loss" in md  # the error, with the table's pipe escaped
    assert "| 3 | c-d3 | 33.0k | 0.2800 | 0.2700 |" in md
    assert "| 4 | parent (teacher) | 42.2k | 0.3000 | - |" in md
    assert paths["cascade_c"].is_file() and paths["cascade_c"].stat().st_size > 1000


def test_the_cascade_table_lists_depths_from_the_parent_down():
    text = cascade_markdown("c", [{"depth": 2, "run": "c-d2", "val": {"bma": 0.1}},
                                  {"depth": 3, "run": "c-d3", "val": {"bma": 0.2}}])
    lines = text.splitlines()
    assert lines[4].startswith("| 3 | c-d3") and lines[5].startswith("| 2 | c-d2")


def test_model_cost_counts_parameters_and_bytes():
    # Linear(3, 2): 3*2 weights + 2 biases = 8 parameters; BatchNorm1d(2): 2 weights + 2 biases = 4
    # parameters and 2 + 2 running statistics + 1 int64 counter as buffers.
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    cost = model_cost(model)
    assert cost["params"] == 12
    assert cost["size_mb"] == pytest.approx((12 * 4 + 4 * 4 + 8) / 1e6)  # float32 = 4 bytes, int64 = 8


def test_latency_is_measured_on_one_thread_and_restores_the_model_and_thread_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).train()
    threads = torch.get_num_threads()
    ms = measure_latency(model, 16, reps=5, warmup=1)
    assert 0 < ms < 1000
    assert model.training and torch.get_num_threads() == threads


def test_a_failed_trial_is_summarised_by_its_innermost_error_line():
    from raykd.tune.errors import summarize_error

    wrapped = "\n".join([
        "ray.exceptions.RayTaskError(WorkerGroupError): \x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=9416)",
        '  File "/site-packages/ray/train/v2/api/data_parallel_trainer.py", line 195, in fit',
        "    raise result.error",
        "ray.train.WorkerGroupError: Training failed due to worker errors:",
        "[Rank 0 Error Snippet]:",
        "A worker health check failed.",
        "Worker info: Worker(",
        "  actor=Actor(RayTrainWorker, bd85),",
    ])
    assert summarize_error(wrapped) == ("WorkerGroupError: Training failed due to worker errors: "
                                        "[Rank 0 Error Snippet]: A worker health check failed.")
    assert summarize_error(ValueError("lr too high")) == "ValueError: lr too high"
