"""Black-border crop and the fusion paper's preprocessing on small hand-made images."""

from __future__ import annotations

import pickle

import albumentations as A
import cv2
import numpy as np
import pytest

from raykd.data.preprocess import (
    CropBlackBorder,
    FusionPreprocess,
    bilateral,
    crop_black_border,
    fusion_preprocess,
    highlight_lesion,
    remove_hair,
    unsharp_mask,
)


def _boxed() -> np.ndarray:
    """60x80 black image with dim noise (<= 15, under the threshold) and a bright 40x55 box."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 16, (60, 80, 3), dtype=np.uint8)
    img[10:50, 15:70] = rng.integers(100, 200, (40, 55, 3), dtype=np.uint8)
    return img


def test_a_black_bordered_image_crops_to_the_bright_box():
    img = _boxed()
    out = crop_black_border(img)
    assert out.shape == (40, 55, 3) and out.dtype == np.uint8
    assert np.array_equal(out, img[10:50, 15:70])


def test_a_round_field_of_view_crops_to_the_bounding_box_of_the_circle():
    img = np.zeros((60, 80, 3), np.uint8)
    cv2.circle(img, (40, 30), 20, (180, 150, 120), -1)  # spans x 20..60, y 10..50 inclusive
    assert crop_black_border(img).shape == (41, 41, 3)


def test_the_largest_bright_region_wins_over_specks():
    img = _boxed()
    img[2:4, 2:4] = 255  # a bright speck in the border
    assert crop_black_border(img).shape == (40, 55, 3)


def test_images_without_a_border_or_without_anything_bright_are_kept():
    flat = np.full((20, 30, 3), 120, np.uint8)
    assert crop_black_border(flat).shape == (20, 30, 3)
    black = np.zeros((20, 30, 3), np.uint8)
    assert crop_black_border(black).shape == (20, 30, 3)


def test_grey_images_crop_too():
    assert crop_black_border(_boxed()[..., 0]).shape == (40, 55)


def test_hair_strands_on_a_flat_image_are_removed():
    img = np.full((48, 48, 3), 180, np.uint8)
    # strands that do not cross, 1-3 px wide (cv2 thickness 2 draws 3 rows), thinner than 5x5
    cv2.line(img, (0, 8), (47, 22), (30, 25, 20), 2, cv2.LINE_AA)
    cv2.line(img, (0, 32), (47, 32), (40, 30, 30), 2)
    cv2.line(img, (40, 38), (44, 47), (20, 20, 20), 1)
    assert (img < 180).any()
    out = remove_hair(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out, np.full_like(img, 180))


def test_hair_removal_keeps_structures_larger_than_the_element():
    img = np.full((48, 48, 3), 180, np.uint8)
    cv2.circle(img, (24, 24), 10, (60, 40, 30), -1)
    out = remove_hair(img)
    assert np.array_equal(out[24, 24], [60, 40, 30])


def test_highlight_whitens_the_brighter_otsu_class_and_keeps_the_lesion():
    img = np.full((32, 32, 3), 200, np.uint8)
    img[8:24, 8:24] = 60
    out = highlight_lesion(img)
    # skin: 200 + 1.14 * 255 = 490.7 -> clipped to 255; lesion (<= Otsu threshold): 60 + 0 = 60
    assert np.all(out[0, 0] == 255) and np.all(out[16, 16] == 60)


def test_unsharp_mask_leaves_flat_areas_and_overshoots_at_edges():
    img = np.full((32, 32, 3), 100, np.uint8)
    assert np.array_equal(unsharp_mask(img), img)
    img[:, 16:] = 150
    out = unsharp_mask(img)
    # I + 1.2 (I - blur): just right of the step the blur is below 150, so the output exceeds it
    assert out[16, 16, 0] > 150 and out[16, 15, 0] < 100


@pytest.mark.parametrize("fn", [remove_hair, bilateral, highlight_lesion, unsharp_mask])
def test_each_stage_preserves_shape_and_dtype(fn):
    img = np.random.default_rng(1).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    out = fn(img)
    assert out.shape == img.shape and out.dtype == np.uint8


def test_the_six_stage_pipeline_rescales_and_resizes():
    img = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = fusion_preprocess(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    kept = fusion_preprocess(img, 16, rescale=False)
    assert kept.shape == (16, 16, 3) and kept.dtype == np.uint8


def test_non_uint8_input_is_refused_with_the_function_name():
    with pytest.raises(ValueError, match="remove_hair"):
        remove_hair(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="crop_black_border"):
        crop_black_border(np.zeros((0, 8, 3), np.uint8))


def test_the_albumentations_wrappers_compose_and_pickle():
    pipe = A.Compose([CropBlackBorder(), FusionPreprocess(size=24)])
    out = pipe(image=_boxed())["image"]
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    again = pickle.loads(pickle.dumps(pipe))(image=_boxed())["image"]
    assert np.array_equal(out, again)
    assert A.Compose([CropBlackBorder()])(image=_boxed())["image"].shape == (40, 55, 3)


def test_wrapper_arguments_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        CropBlackBorder(threshold=300)
    with pytest.raises(ValueError, match="size"):
        FusionPreprocess(size=0)
