"""The multi-stage parts: SSKD's teacher-head pre-training and the cascading-distillation driver."""

from __future__ import annotations

import logging

import pytest
import torch

from raykd.distill import build_method, pretrain_sskd_teacher_head, run_cascade, sskd_head_loss
from raykd.distill.methods._shared import ProjectionHead
from tests.distill.setups import NUM_CLASSES, cnn_student, cnn_teacher, make, make_batch


def tiny_batches(n: int = 3, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=g), torch.arange(4)) for _ in range(n)]


def test_sskd_teacher_head_learns_the_rotation_task_and_plugs_into_sskd():
    torch.manual_seed(0)
    teacher = cnn_teacher()
    batches = tiny_batches()
    head = ProjectionHead(96)
    with torch.no_grad():
        before = sum(float(sskd_head_loss(teacher.eval(), head, x)) for x, _ in batches)
    state = pretrain_sskd_teacher_head(teacher, batches, epochs=8, lr=0.05, head=head)
    trained = ProjectionHead(96)
    trained.load_state_dict(state)
    with torch.no_grad():
        after = sum(float(sskd_head_loss(teacher, trained, x)) for x, _ in batches)
    assert after < before
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher's flags are restored

    method = build_method(
        "sskd", cnn_student(), teacher, num_classes=NUM_CLASSES, input_size=32, teacher_head=state
    )
    images, targets = make_batch(32)
    out = method(images, targets)
    assert torch.isfinite(out.loss) and "ss" in out.parts
    assert method.frozen("teacher_head").training is False
    assert all(not p.requires_grad for p in method.frozen("teacher_head").parameters())


def test_sskd_head_pretraining_stops_early_without_validation_progress(caplog):
    torch.manual_seed(0)
    teacher = cnn_teacher()
    batches = tiny_batches(1)
    with caplog.at_level(logging.INFO, logger="raykd.distill.methods.sskd"):
        pretrain_sskd_teacher_head(teacher, batches, epochs=30, lr=0.0, val_batches=batches, patience=2)
    epochs_run = [r for r in caplog.records if "sskd head epoch" in r.getMessage()]
    assert len(epochs_run) == 3  # epoch 1 sets the best, 2 and 3 do not improve (lr 0) -> stop
    assert any("early stop" in r.getMessage() for r in caplog.records)


def test_run_cascade_cuts_and_distils_down_to_one_block():
    torch.manual_seed(0)
    model = make("raykd_test_fcvit")  # 4 blocks
    images, targets = make_batch(32)
    seen = []

    def train_step(method, depth):
        opt = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
        out = method(images, targets)
        out.loss.backward()
        opt.step()
        seen.append(method)
        return {"bma": 0.1 * depth, "blocks": len(method.student.blocks), "loss": out.loss.item()}

    results = run_cascade(model, train_step)  # num_classes read from the model

    assert [d for d, _ in results] == [3, 2, 1]
    assert [m["blocks"] for _, m in results] == [3, 2, 1]
    assert seen[0].teacher is model
    for parent, child in zip(seen, seen[1:]):
        assert child.teacher is parent.student  # each trained student teaches the next cut
        assert not any(p.requires_grad for p in child.teacher.parameters())
    assert all(p.requires_grad for p in seen[-1].student.parameters())


def test_run_cascade_honours_min_blocks_and_rejects_impossible_depths():
    model = make("raykd_test_fcvit")
    results = run_cascade(
        model, lambda method, depth: {"depth": depth}, min_blocks=2, num_classes=NUM_CLASSES
    )
    assert results == [(3, {"depth": 3}), (2, {"depth": 2})]
    with pytest.raises(ValueError, match=r"min_blocks=4 must be in \[1, 3\]"):
        run_cascade(model, lambda m, d: {}, min_blocks=4, num_classes=NUM_CLASSES)
