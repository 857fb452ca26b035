"""Full-size runs (marked ``slow``; ``pytest -m slow``): one distillation step of each paper's
teacher/student pair at the paper's resolution, on the CPU, with random weights (no hub here).

Each step must give a finite loss, move every trainable student parameter group, and leave the
frozen teacher untouched: what the tiny-model tests show for the real architectures.
"""

from __future__ import annotations

import pytest
import torch

from raykd.distill import build_method
from raykd.models import PAPER_MODELS, create_model, cut_vit

pytestmark = pytest.mark.slow
NUM_CLASSES = 8

PAIRS = [  # (teacher, student, method): SSD-KD, SkinDistilViT, the fusion paper, HierAttn's KD setting
    ("resnet50", "mobilenetv2", "ssdkd"),
    ("vit_b16", None, "skindistilvit"),
    ("fused_teacher", "tiny_cnn", "kd"),
    ("resnet50", "hierattn_xs", "dkd"),
]


@pytest.mark.parametrize(("teacher_key", "student_key", "method"), PAIRS)
def test_a_paper_pair_takes_a_distillation_step_at_full_size(teacher_key, student_key, method):
    torch.manual_seed(0)
    teacher = create_model(PAPER_MODELS[teacher_key], num_classes=NUM_CLASSES).eval()
    student = (cut_vit(teacher, keep_blocks=[0, 2, 4, 7, 9, 11]) if student_key is None
               else create_model(PAPER_MODELS[student_key], num_classes=NUM_CLASSES))
    size = 224
    extra = {}
    if method == "ssdkd":  # its teacher prep's output: an untrained head of the right shape is enough here
        from raykd.distill.methods.sskd import SSKDHeadPrep

        extra["teacher_head"] = SSKDHeadPrep().placeholder(teacher, (3, size, size))
    m = build_method(method, student, teacher, num_classes=NUM_CLASSES, input_size=(3, size, size), **extra)
    before_t = [p.detach().clone() for p in teacher.parameters()][:4]
    before_s = [p.detach().clone() for p in m.trainable_parameters()][:4]
    images, targets = torch.randn(2, 3, size, size), torch.tensor([0, 3])
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)

    out = m(images, targets)
    out.loss.backward()
    opt.step()

    assert torch.isfinite(out.loss) and out.logits.shape == (2, NUM_CLASSES)
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_s, m.trainable_parameters()))
