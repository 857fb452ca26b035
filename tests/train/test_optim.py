"""Optimisers and schedules the papers need beyond AdamW and SGD: Adafactor (the fusion-teacher
paper's student) and a cosine schedule with warm restarts (HierAttn)."""

import math

import pytest
import torch
from torch import nn

from raykd.config import OptimConfig, RunConfig, load_config
from raykd.train.optim import Schedule, build_optimizer, lr_factor


def _restarts(step: int) -> float:
    # 20 steps, restart at 10, 2 warm-up steps per cycle, floor 0.1
    return lr_factor(step, total=20, warmup=2, schedule="cosine_restarts", min_ratio=0.1, restarts=[10])


def test_cosine_restarts_warm_up_from_the_floor_decay_and_start_again_by_hand():
    assert _restarts(0) == pytest.approx(0.1 + 0.9 * 1 / 2)  # warm-up climbs from the floor
    assert _restarts(1) == pytest.approx(1.0)
    assert _restarts(2) == pytest.approx(1.0)  # cosine starts at the peak
    assert _restarts(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through 8 cosine steps
    assert _restarts(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 8)))
    assert _restarts(10) == pytest.approx(_restarts(0))  # the restart warms up again
    assert _restarts(11) == pytest.approx(1.0)
    assert _restarts(19) == pytest.approx(_restarts(9))  # the second cycle has the same length here
    assert _restarts(25) == pytest.approx(0.1)  # past the end: the floor


def test_cosine_restarts_follow_hierattns_epochs_in_the_schedule():
    p = nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="adamw", lr=2e-3, min_lr=2e-4, schedule="cosine_restarts", warmup_epochs=15,
                      restart_epochs=[30])
    opt = build_optimizer([p], cfg)
    sched = Schedule(opt, cfg, epochs=500, steps_per_epoch=1)
    lrs = []
    for _ in range(500):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.after_step()
    assert lrs[14] == pytest.approx(2e-3)  # the peak after 15 warm-up epochs
    assert lrs[29] == pytest.approx(2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 14 / 15)))  # near the floor
    assert lrs[30] == pytest.approx(lrs[0]) and lrs[44] == pytest.approx(2e-3)  # restart, peak at 45
    assert lrs[45] > lrs[272] > lrs[499] >= 2e-4  # then one long cosine down to the floor


@pytest.mark.parametrize(("schedule", "restarts", "match"), [
    ("cosine_restarts", [0], "increasing epochs greater than 0"),
    ("cosine_restarts", [30, 20], "increasing epochs greater than 0"),
    ("cosine", [30], "needs optim.schedule=cosine_restarts"),
])
def test_bad_restart_epochs_name_the_key_and_the_fix(schedule, restarts, match):
    p = nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(schedule=schedule, restart_epochs=restarts)
    with pytest.raises(ValueError, match=match) as err:
        Schedule(build_optimizer([p], cfg), cfg, epochs=50, steps_per_epoch=1)
    assert "optim.restart_epochs" in str(err.value)


def test_adafactor_takes_a_relative_step_scaled_by_the_parameters_rms():
    # First step: the factored second moment is g^2, the update is sign(g) with RMS 1 (not
    # clipped at d = 1), scaled by lr * RMS(param) = 2e-3 * sqrt((9 + 16) / 2).
    p = nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = build_optimizer([p], OptimConfig(name="adafactor", lr=2e-3))
    assert isinstance(opt, torch.optim.Adafactor) and opt.param_groups[0]["lr"] == 2e-3
    (p ** 2).sum().backward()
    opt.step()
    step = 2e-3 * math.sqrt(12.5)
    assert p.detach().tolist() == pytest.approx([3.0 - step, -4.0 + step], rel=1e-4)


def test_the_config_names_adafactor_and_the_restart_schedule(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {name: adafactor, lr: 2.0e-3, schedule: cosine_restarts, restart_epochs: [30]}\n")
    cfg = load_config(RunConfig, path)
    assert (cfg.optim.name, cfg.optim.schedule) == ("adafactor", "cosine_restarts")
    assert cfg.optim.restart_epochs == [30]
