"""raykd model zoo: every seed paper's teacher and student, buildable with ``timm.create_model``.

Importing this package registers the ``raykd_*`` models with timm:

- ``raykd_fcvit_*`` / ``raykd_test_fcvit``: FCViT, a head after every ViT block (SkinDistilViT, 3.2).
- ``raykd_distilvit_base_patch16_224``: the 6-block SkinDistilViT student shape; build a student
  with weights by :func:`cut_vit` (or :func:`distilvit_student`) and :func:`cascade_cut`.
- ``raykd_hierattn_xs`` / ``_s`` / ``raykd_test_hierattn``: HierAttn.
- ``raykd_fused_teacher`` / ``raykd_test_fused_teacher``: the fusion teacher.
- ``raykd_tiny_cnn`` / ``_fp16`` / ``raykd_test_tiny_cnn``: its tiny CNN student.

Plain timm models cover the rest (``PAPER_MODELS`` maps the papers' names to timm names).
:func:`features` reads logits, embedding, feature map, hidden states and per-block logits from any
of them in one pass.
"""

from raykd.models import fcvit, fused_teacher, hierattn, tiny_cnn, vit_cut  # noqa: F401  (registration)
from raykd.models.factory import PAPER_MODELS, count_params, create_model, load_weights, read_state_dict
from raykd.models.fcvit import FCViT
from raykd.models.features import Features, features, unwrap_model
from raykd.models.fused_teacher import FusedTeacher
from raykd.models.hierattn import HierAttn
from raykd.models.tiny_cnn import TinyCNN
from raykd.models.vit_cut import SKINDISTILVIT_BLOCKS, cascade_cut, cut_vit, distilvit_student


def raykd_model_names() -> list[str]:
    """Every model name this package registers with timm."""
    import timm  # lazy: timm is heavy

    return sorted(timm.list_models("raykd_*"))


__all__ = [
    "FCViT",
    "Features",
    "FusedTeacher",
    "HierAttn",
    "PAPER_MODELS",
    "SKINDISTILVIT_BLOCKS",
    "TinyCNN",
    "cascade_cut",
    "count_params",
    "create_model",
    "cut_vit",
    "distilvit_student",
    "features",
    "load_weights",
    "raykd_model_names",
    "read_state_dict",
    "unwrap_model",
]
