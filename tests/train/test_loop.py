"""The Ray-free parts of a run: schedules, checkpoints, the epoch loop and its guards."""

import logging
import math

import pytest
import torch
from torch import nn

from raykd.config import OptimConfig
from raykd.distill import build_method
from raykd.train.checkpoint import has_state, load_state, rng_state, save_state, set_rng_state
from raykd.train.loop import NonFiniteLossError, check_finite, train_epoch
from raykd.train.optim import Schedule, build_optimizer, head_parameter_names, lr_factor


def test_lr_factors_by_hand():
    # 10 steps, 2 of warm-up: warm-up climbs 1/2, 2/2; linear then falls over the other 8 steps
    assert lr_factor(0, total=10, warmup=2, schedule="linear", min_ratio=0.0) == 0.5
    assert lr_factor(1, total=10, warmup=2, schedule="linear", min_ratio=0.0) == 1.0
    assert lr_factor(6, total=10, warmup=2, schedule="linear", min_ratio=0.0) == pytest.approx(0.5)  # 1 - 4/8
    # cosine halfway: 0.5 * (1 + cos(pi/2)) = 0.5; with a floor of 0.2: 0.2 + 0.8 * 0.5 = 0.6
    assert lr_factor(6, total=10, warmup=2, schedule="cosine", min_ratio=0.2) == pytest.approx(0.6)
    assert lr_factor(10, total=10, warmup=2, schedule="cosine", min_ratio=0.0) == pytest.approx(0.0)


def test_plateau_schedule_uses_the_current_value():
    p = nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="sgd", lr=1.0, schedule="plateau", plateau_patience=0, plateau_factor=0.1)
    opt = build_optimizer([p], cfg)
    sched = Schedule(opt, cfg, epochs=3, steps_per_epoch=1, metric_mode="max")
    sched.after_step()  # no-op for plateau
    sched.after_epoch(0.5)
    sched.after_epoch(0.4)  # worse than 0.5 with patience 0: lr x 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_checkpoint_round_trip_restores_rng_and_loads_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2, "history": [{"epoch": 1}],
             "best": None, "rng": rng_state()}
    save_state(tmp_path, state)
    expected = torch.rand(3)
    loaded = load_state(tmp_path)  # torch.load(weights_only=True) inside
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["weight"], model.weight)
    assert not (tmp_path / "state.pt.tmp").exists()


def test_torn_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    save_state(tmp_path, {"epoch": 1, "w": torch.ones(64)})
    save_state(tmp_path, {"epoch": 2, "w": torch.zeros(64)})
    assert load_state(tmp_path)["epoch"] == 2
    assert (tmp_path / "state.prev.pt").is_file() and not (tmp_path / "state.pt.tmp").exists()
    latest = tmp_path / "state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # torn write
    with caplog.at_level(logging.WARNING, logger="raykd.train.checkpoint"):
        state = load_state(tmp_path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(64))
    assert "cannot be read" in caplog.text and "state.prev.pt" in caplog.text


def test_checkpoint_with_no_readable_state_names_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a raykd training checkpoint"):
        load_state(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"torn")
    (tmp_path / "state.prev.pt").write_bytes(b"also torn")
    with pytest.raises(RuntimeError, match="no readable checkpoint") as err:
        load_state(tmp_path)
    assert "state.pt:" in str(err.value) and "state.prev.pt:" in str(err.value)


def test_previous_state_is_found_when_a_save_stopped_between_its_renames(tmp_path):
    save_state(tmp_path, {"epoch": 1})
    save_state(tmp_path, {"epoch": 2})
    (tmp_path / "state.pt").unlink()  # stopped between the two renames of a save
    assert has_state(tmp_path) and load_state(tmp_path)["epoch"] == 1


def test_non_finite_loss_names_step_method_and_parts():
    with pytest.raises(NonFiniteLossError) as err:
        check_finite(torch.tensor(math.nan), {"ce": torch.tensor(1.0), "kd": torch.tensor(math.inf)},
                     step=7, epoch=0, method="kd")
    assert "step 7" in str(err.value) and "'kd'" in str(err.value) and "kd=inf" in str(err.value)


def _batches(n=3, size=32):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(4, 3, size, size, generator=g), "label": torch.randint(0, 8, (4,), generator=g)}
            for _ in range(n)]


def test_an_epoch_trains_only_the_head_while_frozen():
    import timm

    import raykd.models  # noqa: F401

    torch.manual_seed(0)
    student = timm.create_model("raykd_test_tiny_cnn", num_classes=8)
    method = build_method("baseline", student, None, num_classes=8, input_size=(3, 32, 32))
    head = {f"student.{n}" for n in head_parameter_names(student)}
    assert head, "the tiny CNN exposes its classifier"
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    frozen = {id(p) for n, p in method.named_parameters() if n not in head}
    cfg = OptimConfig(lr=0.01, schedule="constant")
    opt = build_optimizer(method.trainable_parameters(), cfg)
    stats = train_epoch(method, _batches(), opt, Schedule(opt, cfg, epochs=1, steps_per_epoch=3), epoch=0,
                        method_name="baseline", device=torch.device("cpu"), frozen=frozen)
    assert stats["train/images"] == 12 and stats["train/steps"] == 3 and math.isfinite(stats["train/loss"])
    for n, p in method.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (n in head), n
