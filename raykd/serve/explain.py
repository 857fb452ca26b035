"""Why did the model say that: class heatmaps over the image the model actually saw.

Two class-specific methods, one per model family; both use the explained class score's gradient
and keep only evidence *for* the class:

- **CNNs** (tiny CNN, HierAttn, the fused teacher's CNN stream, timm CNNs): Grad-CAM, Selvaraju et
  al., ICCV 2017 (arXiv 1610.02391), on the last convolutional feature map ``A`` (read through
  :func:`raykd.models.features`, one differentiable pass)::

      w_c = mean_{i,j} d y_t / d A_c[i, j]        cam[i, j] = ReLU(sum_c w_c * A_c[i, j])

- **ViTs** (timm ``VisionTransformer``, raykd's cut ViTs and FCViT): gradient-weighted attention
  rollout, Chefer, Gur, Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
  Encoder-Decoder Transformers", ICCV 2021 (arXiv 2103.15679), eq. 5-6. With ``A_b`` the attention
  probabilities of block ``b`` (heads h)::

      R = I;  for each block b:  R = R + E_h[(dy_t/dA_b * A_b)^+] @ R
      relevance of patch j = R[CLS, j]   (the mean over patch rows for an average-pooled ViT)

  Why not Grad-CAM on the last block's tokens: with CLS pooling the head reads only the CLS token
  of the last block's output, so the patch tokens there have zero gradient; one block lower
  (``blocks[-1].norm1``, the ``pytorch-grad-cam`` recipe) the map was inverted on half of our
  seeds for a tiny FCViT trained to find a bright blob (mean heat in the blob 0.5x the heat
  outside), while the rollout above put 3-15x more heat in the blob on every seed (see
  ``tests/serve/test_explain.py``). The attention probabilities are read from each block's
  ``attn.attn_drop`` with timm's fused attention switched off for the call (same numbers, slower).

The map is divided by its maximum (0 stays "no evidence"; an all-zero map stays zero) and resized
bilinearly to the model's input size. Everything runs on the evaluation transform's output
(:func:`input_view`), so the overlay shows exactly the crop and resize the model was fed.

Torch, numpy and OpenCV only (no Ray), so it is tested in seconds; the Serve app calls
:func:`explain` in a worker thread (``POST /explain``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from raykd.artifact.format import ArtifactMeta
from raykd.artifact.predict import softmax
from raykd.data.transforms import PreprocessSpec, build_eval_transform, normalizer, to_chw_batch
from raykd.models.features import features, unwrap_model

__all__ = ["Explanation", "encode_png", "explain", "input_view", "is_vit", "overlay"]


@dataclass
class Explanation:
    """One explained prediction.

    Attributes:
        heatmap: ``(S, S)`` float32 in [0, 1] over the model input (S = ``image_size``).
        probabilities: ``(C,)`` float32 class probabilities (the artifact's temperature applied,
            as the predictors do).
        target: Index of the explained class (the top class unless one was asked for).
        view: ``(S, S, 3)`` uint8 RGB: the image after the evaluation crop and resize.
        method: ``"grad-cam"`` (CNNs) or ``"attention-rollout:grad-weighted"`` (ViTs).
    """

    heatmap: np.ndarray
    probabilities: np.ndarray
    target: int
    view: np.ndarray
    method: str


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a ViT-like token model (``patch_embed`` and a sequence of ``blocks``)."""
    blocks = getattr(model, "blocks", None)
    return hasattr(model, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList) \
        and len(blocks) > 0


def input_view(meta: ArtifactMeta, image: np.ndarray) -> np.ndarray:
    """The evaluation transform of ``meta`` without normalisation: what the model sees, as uint8 RGB."""
    spec = PreprocessSpec.from_dict(meta.preprocess)
    return build_eval_transform(spec, normalize=False)(image=image)["image"]


def _model_input(meta: ArtifactMeta, view: np.ndarray, device: torch.device) -> torch.Tensor:
    spec = PreprocessSpec.from_dict(meta.preprocess)
    x = torch.from_numpy(to_chw_batch([view])).to(device)
    return normalizer(spec, device)(x)


_ATTENTION_SWITCH = threading.Lock()


@contextmanager
def _catch_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect every block's attention probabilities ``(B, heads, N, N)`` for this thread's calls.

    timm's fused attention never materialises the probabilities, so it is switched off while the
    context is active (under a lock, so two explanations cannot restore each other's switch). A
    Serve replica may meanwhile run ``/predict`` batches through the same module in another
    thread: they compute the same numbers on the unfused path and are not caught.
    """
    attns = [getattr(block, "attn", None) for block in model.blocks]
    if not all(isinstance(getattr(a, "attn_drop", None), nn.Module) and hasattr(a, "fused_attn")
               for a in attns):
        raise TypeError(f"{type(model).__name__}: explanations of token models need timm attention "
                        "blocks (block.attn with attn_drop and fused_attn)")
    caught: list[torch.Tensor] = []
    me = threading.get_ident()

    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        if threading.get_ident() == me:
            caught.append(out)

    with _ATTENTION_SWITCH:
        fused = [a.fused_attn for a in attns]
        handles = [a.attn_drop.register_forward_hook(hook) for a in attns]
        for a in attns:
            a.fused_attn = False
        try:
            yield caught
        finally:
            for a, was in zip(attns, fused, strict=True):
                a.fused_attn = was
            for h in handles:
                h.remove()


def _token_grid(model: nn.Module, n_patches: int, x: torch.Tensor) -> tuple[int, int]:
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == n_patches:
        return int(grid[0]), int(grid[1])
    patch = getattr(model.patch_embed, "patch_size", None)
    if patch is not None:  # a model built with dynamic_img_size
        gh, gw = x.shape[-2] // int(patch[0]), x.shape[-1] // int(patch[1])
        if gh * gw == n_patches:
            return gh, gw
    raise TypeError(f"cannot arrange {n_patches} patch tokens of {type(model).__name__} on its patch grid")


def _cnn_cam(model: nn.Module, x: torch.Tensor, target: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Grad-CAM on the last feature map: ``(cam (h, w), logits (C,), target)``."""
    f = features(model, x)
    if f.feature_map is None:
        raise TypeError(f"explanations need a convolutional feature map or ViT attention; "
                        f"{type(model).__name__} has neither")
    logits = f.logits[0]
    t = int(torch.argmax(logits)) if target is None else target
    (grads,) = torch.autograd.grad(logits[t], f.feature_map)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = torch.relu((f.feature_map.detach().float() * weights).sum(dim=1))[0]
    return cam.cpu().numpy(), logits.detach().float().cpu().numpy(), t


def _vit_relevance(model: nn.Module, x: torch.Tensor,
                   target: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Gradient-weighted attention rollout: ``(relevance (gh, gw), logits (C,), target)``."""
    with _catch_attention(model) as attns:
        logits = model(x)[0]
    if len(attns) != len(model.blocks):
        raise TypeError(f"{type(model).__name__}: caught {len(attns)} attention maps for "
                        f"{len(model.blocks)} blocks")
    t = int(torch.argmax(logits)) if target is None else target
    grads = torch.autograd.grad(logits[t], attns)
    n = attns[0].shape[-1]
    eye = torch.eye(n, device=x.device)
    rel = eye.clone()
    for attn, grad in zip(attns, grads, strict=True):
        weighted = (grad[0].float() * attn[0].detach().float()).clamp(min=0).mean(dim=0)  # (N, N)
        rel = rel + weighted @ rel
    rel = rel - eye  # a token's relevance to itself is not evidence
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if prefix and getattr(model, "global_pool", "token") == "token":
        patches = rel[0, prefix:]
    else:
        patches = rel[prefix:, prefix:].mean(dim=0)
    gh, gw = _token_grid(model, patches.numel(), x)
    return patches.reshape(gh, gw).cpu().numpy(), logits.detach().float().cpu().numpy(), t


def explain(model: nn.Module, meta: ArtifactMeta, image: np.ndarray, *,
            target: int | None = None) -> Explanation:
    """Explain the model's answer for one decoded RGB uint8 HWC image (see the module doc).

    Args:
        model: The torch model of the artifact, in eval mode (a training-mode model would update
            its batch-norm statistics, and the heatmap would not explain the served model).
        meta: Its artifact metadata (preprocessing contract, temperature).
        image: Decoded RGB uint8 image of any size (as ``raykd.data.transforms.decode_image`` gives).
        target: Class index to explain; default the top class.

    Raises:
        ValueError: a model in training mode, or a target outside ``[0, num_classes)``.
        TypeError: a model with neither a convolutional feature map nor timm ViT attention.
    """
    model = unwrap_model(model)
    if model.training:
        raise ValueError("explain() needs the model in eval mode (call model.eval() first)")
    if target is not None and not 0 <= target < meta.num_classes:
        raise ValueError(f"target class {target} is outside [0, {meta.num_classes})")
    view = input_view(meta, image)
    x = _model_input(meta, view, next(model.parameters()).device)
    with torch.enable_grad():
        x.requires_grad_(True)  # keeps a graph even when every parameter is frozen
        if is_vit(model):
            cam, logits, t = _vit_relevance(model, x, target)
            method = "attention-rollout:grad-weighted"
        else:
            cam, logits, t = _cnn_cam(model, x, target)
            method = "grad-cam"
    probs = softmax(logits[None] / meta.temperature)[0]
    top = float(cam.max())
    cam = cam / top if top > 0 else np.zeros_like(cam)
    size = view.shape[:2]
    heat = cv2.resize(cam.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return Explanation(np.clip(heat, 0.0, 1.0), probs.astype(np.float32), t, view, method)


def overlay(view: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap in the JET colour map blended over ``view`` (both RGB uint8 HWC)."""
    if heatmap.shape != view.shape[:2]:
        raise ValueError(f"heatmap {heatmap.shape} does not match the image {view.shape[:2]}")
    colour = cv2.applyColorMap(np.uint8(np.round(255 * np.clip(heatmap, 0, 1))), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(view, 1.0 - alpha, colour, alpha, 0.0)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 HWC image."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the explanation as PNG")
    return buf.tobytes()
