"""Deterministic preprocessing of dermoscopy images, as numpy functions and albumentations transforms.

* :func:`crop_black_border` - the black vignette crop of SkinDistilViT (Arnold et al., ICANN 2023,
  arXiv 2308.08669; ``data/crop_black_outline.py`` of its code) also used before HierAttn
  (Dai et al., IEEE JBHI 2024): threshold the grey image, keep the bounding box of the largest
  external contour.
* :func:`fusion_preprocess` - the six-stage pipeline of Islam et al., "fusion teacher -> tiny CNN"
  (arXiv 2406.17051, Sec. 3.2): morphological closing (hair removal, 5x5 element), bilateral
  filter, Otsu lesion highlight blended with alpha = 1.14, unsharp mask (sigma 2, k 1.2),
  rescale to [0, 1], resize.

All functions take RGB (or grey) uint8 HWC arrays. The transforms are ``ImageOnlyTransform``s for
albumentations 2.0, so they sit at the head of the pipelines of :mod:`raykd.data.transforms` and
run in the Ray Data workers.
"""

from __future__ import annotations

from typing import Any

import albumentations as A  # raykd/__init__ turned off its PyPI version check
import cv2
import numpy as np
from pydantic import Field

__all__ = [
    "CropBlackBorder", "FusionPreprocess", "bilateral", "crop_black_border", "highlight_lesion",
    "fusion_preprocess", "remove_hair", "unsharp_mask",
]

#: the fusion paper's constants (arXiv 2406.17051, Sec. 3.2.1-3.2.4).
HAIR_KERNEL = 5
HIGHLIGHT_ALPHA = 1.14
UNSHARP_SIGMA = 2.0
UNSHARP_K = 1.2
#: The paper gives no bilateral-filter parameters; these are OpenCV's customary d=9, sigma 75/75.
BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE = 9, 75.0, 75.0


def _check_uint8(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3) or img.size == 0:
        got = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
        raise ValueError(f"{name} expects a non-empty uint8 HW or HWC image, got {got}; "
                         "decode with raykd.data.transforms.decode_image and run it before Normalize")


def _grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2 or img.shape[2] == 1:
        return img.reshape(img.shape[:2])
    return cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2GRAY)  # 0.299 R + 0.587 G + 0.114 B


def crop_black_border(img: np.ndarray, threshold: int = 20, min_fraction: float = 0.1) -> np.ndarray:
    """Crop the black vignette of a dermatoscope's round field of view.

    As SkinDistilViT's code: pixels with grey value > ``threshold`` form the foreground, the
    bounding box of its largest external contour (by area) is kept. The image is returned
    unchanged when nothing is brighter than the threshold or when the box would be narrower than
    ``min_fraction`` of a side (a speck on an all-dark image is not a field of view).

    Args:
        img: uint8 HWC RGB (or HW grey) image.
        threshold: grey level above which a pixel belongs to the field of view.
        min_fraction: smallest accepted box side as a fraction of the image side.

    Returns:
        A view of ``img`` cropped to the box (same dtype and channels).
    """
    _check_uint8(img, "crop_black_border")
    mask = (_grey(img) > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return img
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    if w < min_fraction * img.shape[1] or h < min_fraction * img.shape[0]:
        return img
    return img[y:y + h, x:x + w]


def remove_hair(img: np.ndarray, kernel: int = HAIR_KERNEL) -> np.ndarray:
    """Remove hair strands by morphological closing (dilation then erosion) with a square element.

    The fusion paper, Sec. 3.2.1: ``I . B = (I (+) B) (-) B`` with a 5x5 ``B``. Closing removes dark
    structures thinner than the element (hair on lighter skin) and keeps larger ones (the lesion).
    """
    _check_uint8(img, "remove_hair")
    if kernel < 1:
        raise ValueError(f"remove_hair kernel must be >= 1, got {kernel}")
    return cv2.morphologyEx(img, cv2.MORPH_CLOSE, np.ones((kernel, kernel), np.uint8))


def bilateral(img: np.ndarray, d: int = BILATERAL_D, sigma_color: float = BILATERAL_SIGMA_COLOR,
              sigma_space: float = BILATERAL_SIGMA_SPACE) -> np.ndarray:
    """Edge-preserving denoising (Islam et al. fusion paper, Sec. 3.2.2, Eq. 2)."""
    _check_uint8(img, "bilateral")
    return cv2.bilateralFilter(img, d, sigma_color, sigma_space)


def highlight_lesion(img: np.ndarray, alpha: float = HIGHLIGHT_ALPHA) -> np.ndarray:
    """Highlight the lesion: ``I_h = I + alpha * I_s`` with ``I_s`` the Otsu segmentation.

    The fusion paper, Sec. 3.2.3, Eqs. 3-8: grey = 0.299 R + 0.587 G + 0.114 B, Otsu threshold ``t``,
    ``I_s = 1`` on the upper class. Eq. 7 writes ``grey >= t`` but Eqs. 5-6 put level ``t`` in
    the lower class (``omega_0`` sums levels ``0..t``), as OpenCV does; we follow Eqs. 5-6, else a
    two-level image would be all "upper". The mask is taken at the image's full scale (255, as
    ``cv2.threshold`` returns it): a 0/1 mask added to a 0-255 image would change nothing. So the
    brighter class (skin) saturates towards white while the darker class (lesion) is kept, which is
    the highlighted lesion of the paper's Fig. 3.
    """
    _check_uint8(img, "highlight_lesion")
    _, seg = cv2.threshold(_grey(img), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)  # 255 where grey > t
    seg = seg.astype(np.float32)
    if img.ndim == 3:
        seg = seg[..., None]
    return np.clip(img.astype(np.float32) + alpha * seg, 0, 255).astype(np.uint8)


def unsharp_mask(img: np.ndarray, sigma: float = UNSHARP_SIGMA, k: float = UNSHARP_K) -> np.ndarray:
    """Sharpen: ``I_um = I + k (I - G_sigma * I)`` (Islam et al. fusion paper, Sec. 3.2.4, Eqs. 9-11)."""
    _check_uint8(img, "unsharp_mask")
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return cv2.addWeighted(img, 1.0 + k, blurred, -k, 0)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fusion_preprocess(img: np.ndarray, size: int, rescale: bool = True) -> np.ndarray:
    """The six-stage preprocessing of the fusion paper (arXiv 2406.17051, Sec. 3.2, Fig. 2).

    Closing (5x5) -> bilateral filter -> Otsu highlight (alpha 1.14) -> unsharp mask (sigma 2,
    k 1.2) -> rescale ``I / 255`` -> resize to ``size`` x ``size`` (the paper resizes to 224).

    Args:
        img: uint8 RGB HWC image.
        size: output side in pixels.
        rescale: divide by 255 (stage 5) and return float32 in [0, 1]; ``False`` keeps uint8 so
            that later augmentations and ``A.Normalize`` (which divides by 255 itself) follow.

    Returns:
        ``size`` x ``size`` image, float32 in [0, 1] or uint8, same channel count as ``img``.
    """
    if size < 1:
        raise ValueError(f"fusion_preprocess size must be >= 1, got {size}")
    out = unsharp_mask(highlight_lesion(bilateral(remove_hair(img))))
    if rescale:
        return np.clip(_resize(out.astype(np.float32) / 255.0, size), 0.0, 1.0)
    return _resize(out, size)


class CropBlackBorder(A.ImageOnlyTransform):
    """Albumentations wrapper of :func:`crop_black_border` (changes the image size)."""

    class InitSchema(A.ImageOnlyTransform.InitSchema):
        threshold: int = Field(ge=0, le=254)
        min_fraction: float = Field(gt=0, le=1)

    def __init__(self, threshold: int = 20, min_fraction: float = 0.1, p: float = 1.0):
        super().__init__(p=p)
        self.threshold = threshold
        self.min_fraction = min_fraction

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.ascontiguousarray(crop_black_border(img, self.threshold, self.min_fraction))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("threshold", "min_fraction")


class FusionPreprocess(A.ImageOnlyTransform):
    """Albumentations wrapper of :func:`fusion_preprocess`.

    ``rescale`` defaults to ``False`` here: inside a pipeline the division by 255 (stage 5) is done
    by the final ``A.Normalize``.
    """

    class InitSchema(A.ImageOnlyTransform.InitSchema):
        size: int = Field(ge=1)
        rescale: bool

    def __init__(self, size: int = 224, rescale: bool = False, p: float = 1.0):
        super().__init__(p=p)
        self.size = size
        self.rescale = rescale

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return fusion_preprocess(img, self.size, self.rescale)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "rescale")
