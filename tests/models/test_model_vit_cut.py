"""cut_vit / cascade_cut / distilvit_student: SkinDistilViT students made from a teacher's blocks."""

from __future__ import annotations

import pytest
import timm
import torch

from raykd.models import cascade_cut, create_model, cut_vit, distilvit_student

KEEP = (0, 2, 5)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=8, img_size=32, patch_size=8).eval()


def test_cut_student_blocks_are_bit_identical_to_the_chosen_teacher_blocks(teacher):
    student = cut_vit(teacher, keep_blocks=KEEP)
    assert len(student.blocks) == 3 and len(teacher.blocks) == 6
    for j, i in enumerate(KEEP):
        s_sd, t_sd = student.blocks[j].state_dict(), teacher.blocks[i].state_dict()
        assert s_sd.keys() == t_sd.keys()
        assert all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)


def test_every_non_block_parameter_is_copied(teacher):
    student = cut_vit(teacher, keep_blocks=KEEP)
    t_sd = teacher.state_dict()
    non_block = {k: v for k, v in student.state_dict().items() if not k.startswith("blocks.")}
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"}
    assert expected <= set(non_block)
    assert all(torch.equal(v, t_sd[k]) for k, v in non_block.items())
    assert student.state_dict()["cls_token"].data_ptr() != t_sd["cls_token"].data_ptr(), "a copy, not a view"


def test_student_computes_the_teacher_with_only_the_kept_blocks(teacher):
    student = cut_vit(teacher, keep_blocks=KEEP)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = teacher.norm_pre(teacher.patch_drop(teacher._pos_embed(teacher.patch_embed(x))))
        for i in KEEP:
            h = teacher.blocks[i](h)
        expected = teacher.forward_head(teacher.norm(h))
        torch.testing.assert_close(student(x), expected)


def test_student_of_a_frozen_teacher_is_trainable_and_teacher_is_untouched(teacher):
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = cut_vit(teacher, keep_blocks=KEEP).train()
    assert all(p.requires_grad for p in student.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert len(teacher.blocks) == 6


def test_default_blocks_need_a_twelve_block_teacher(teacher):
    with pytest.raises(ValueError, match="keep_blocks"):
        cut_vit(teacher)  # test_vit has 6 blocks; block 7 does not exist


@pytest.mark.parametrize("keep", [(), (2, 1), (0, 0), (-1, 2), (6,)])
def test_bad_keep_blocks_are_rejected(teacher, keep):
    with pytest.raises(ValueError, match="keep_blocks"):
        cut_vit(teacher, keep_blocks=keep)


def test_cut_student_rebuilds_by_name_with_depth(teacher, tmp_path):
    student = cut_vit(teacher, keep_blocks=KEEP)
    path = tmp_path / "student.pt"
    torch.save(student.state_dict(), path)
    rebuilt = create_model("test_vit", 8, pretrained_file=path, depth=3, img_size=32, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), student.eval()(x))


def test_cascade_cut_drops_the_top_block_down_to_one(teacher):
    model = teacher
    for depth in range(5, 0, -1):
        model = cascade_cut(model)
        assert len(model.blocks) == depth
        for j in range(depth):
            assert torch.equal(model.blocks[j].mlp.fc1.weight, teacher.blocks[j].mlp.fc1.weight)
        assert torch.equal(model.head.weight, teacher.head.weight)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        cascade_cut(model)


def test_cascade_cut_of_fcvit_keeps_the_lower_heads_of_kept_blocks():
    torch.manual_seed(0)
    fcvit = timm.create_model("raykd_test_fcvit", num_classes=5)  # 4 blocks, 3 lower heads
    student = cascade_cut(fcvit)
    assert len(student.blocks) == 3 and len(student.layer_heads) == 2
    for j in range(2):
        assert torch.equal(student.layer_heads[j].fc.weight, fcvit.layer_heads[j].fc.weight)
    assert torch.equal(student.head.weight, fcvit.head.weight)
    f = student.raykd_features(torch.randn(2, 3, 32, 32))
    assert len(f.layer_logits) == 3


def test_initialisation_variants(teacher, tmp_path):
    torch.manual_seed(1)
    imagenet = timm.create_model("test_vit", num_classes=1000, img_size=32, patch_size=8)
    path = tmp_path / "imagenet.safetensors"
    from safetensors.torch import save_file

    save_file(imagenet.state_dict(), str(path))
    kw = dict(model_name="test_vit", keep_blocks=KEEP, img_size=32, patch_size=8)

    copied = distilvit_student("teacher", teacher=teacher, keep_blocks=KEEP)
    assert torch.equal(copied.blocks[2].attn.qkv.weight, teacher.blocks[5].attn.qkv.weight)

    fi = distilvit_student("imagenet", num_classes=8, pretrained_file=path, **kw)
    assert torch.equal(fi.blocks[1].attn.qkv.weight, imagenet.blocks[2].attn.qkv.weight)
    assert fi.head.out_features == 8  # fresh 8-class head, the 1000-class one is skipped

    fs = distilvit_student("scratch", teacher=teacher, **kw)
    assert len(fs.blocks) == 3 and fs.num_classes == 8
    assert not torch.equal(fs.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)

    with pytest.raises(ValueError, match="pretrained_file"):
        distilvit_student("imagenet", num_classes=8, **kw)
    with pytest.raises(ValueError, match="init="):
        distilvit_student("bogus", num_classes=8)
