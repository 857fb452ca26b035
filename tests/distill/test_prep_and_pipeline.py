"""Methods that train more than the student alone: SSKD's teacher prep (its projection-head
pre-training) and the cascade's pipeline of runs."""

from __future__ import annotations

import logging

import pytest
import torch

from raykd.distill import METHODS, build_method, pretrain_sskd_teacher_head, sskd_head_loss
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


def test_the_cascade_pipeline_cuts_and_distils_down_to_one_block():
    """Each step's student is the first k blocks of the previous step's model and distils from it."""
    from raykd.models import cut_vit

    torch.manual_seed(0)
    model = make("raykd_test_fcvit")  # 4 blocks
    images, targets = make_batch(32)
    parent_step, *steps = METHODS.get("cascade").pipeline(model, image_size=32)

    assert parent_step.suffix is None and parent_step.info == {"depth": 4}
    assert [s.info["depth"] for s in steps] == [3, 2, 1]
    assert [s.suffix for s in steps] == ["d3", "d2", "d1"]
    parent, seen = model, []
    for step in steps:
        assert step.student == {"cut_blocks": list(range(step.info["depth"])), "image_size": 32}
        student = cut_vit(parent, keep_blocks=step.student["cut_blocks"])
        method = build_method("cascade", student, parent, num_classes=NUM_CLASSES)
        opt = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
        method(images, targets).loss.backward()
        opt.step()
        assert len(method.student.blocks) == step.info["depth"]
        assert not any(p.requires_grad for p in method.teacher.parameters())
        seen.append(method)
        parent = method.student
    assert seen[0].teacher is model
    for prev, child in zip(seen, seen[1:]):
        assert child.teacher is prev.student  # each trained student teaches the next cut


def test_the_cascade_pipeline_honours_min_blocks_and_rejects_impossible_depths():
    model = make("raykd_test_fcvit")
    cascade = METHODS.get("cascade")
    assert [s.info["depth"] for s in cascade.pipeline(model, image_size=None, min_blocks=2)] == [4, 3, 2]
    with pytest.raises(ValueError, match=r"min_blocks=4 must be in \[1, 3\]"):
        cascade.pipeline(model, image_size=None, min_blocks=4)
    with pytest.raises(ValueError, match="ViT-like"):
        cascade.pipeline(make("raykd_test_tiny_cnn"), image_size=None)
    assert METHODS.get("kd").pipeline(model, image_size=None) is None  # every other method is one run
