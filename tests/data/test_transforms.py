"""Decoding, the preprocessing contract and the albumentations train/eval pipelines."""

from __future__ import annotations

import json
import logging
import pickle

import cv2
import numpy as np
import pytest
import timm
import torch
from torch import nn

from raykd.data.preprocess import CropBlackBorder, FusionPreprocess
from raykd.data.synthetic import render_image
from raykd.data.transforms import (
    RECIPES,
    PreprocessSpec,
    build_eval_transform,
    build_train_transform,
    decode_image,
    normalize_chw,
    spec_from_model,
    to_chw_batch,
)

SMALL = PreprocessSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _image(h: int = 48, w: int = 64) -> np.ndarray:
    return render_image("NV", max(h, w), seed=0, lesion=1)[:h, :w].copy()


def _encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


# --- PreprocessSpec ---------------------------------------------------------------------------

def test_the_default_spec_is_imagenet_at_224():
    spec = PreprocessSpec()
    assert spec.image_size == 224
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert spec.std == pytest.approx((0.229, 0.224, 0.225))
    assert not spec.crop_black_border and not spec.fusion_preprocess


def test_spec_round_trips_through_json():
    spec = PreprocessSpec(image_size=64, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), crop_black_border=True)
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert PreprocessSpec.from_dict({}) == PreprocessSpec()


def test_spec_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="img_size"):
        PreprocessSpec.from_dict({"img_size": 64})
    with pytest.raises(ValueError, match="std"):
        PreprocessSpec(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="mean"):
        PreprocessSpec(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="image_size"):
        PreprocessSpec(image_size=0)


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_spec_comes_from_the_timm_pretrained_cfg(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    spec = spec_from_model(model)
    # timm's test_* models declare input_size (3, 160, 160) and mean = std = 0.5
    assert spec.image_size == 160
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert spec_from_model(model, image_size=32, crop_black_border=True) == PreprocessSpec(
        image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_black_border=True)


def test_spec_from_a_wrapped_model_or_a_plain_module():
    class Wrapper(nn.Module):  # what DDP looks like from outside
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    assert spec_from_model(Wrapper(timm.create_model("test_resnet"))).image_size == 160


def test_a_model_without_cfg_gets_the_defaults_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="raykd.data.transforms"):
        spec = spec_from_model(nn.Linear(2, 2))
    assert spec == PreprocessSpec()
    assert "pretrained_cfg" in caplog.text


def test_unknown_overrides_are_refused():
    with pytest.raises(ValueError, match="size"):
        spec_from_model(timm.create_model("test_resnet"), size=32)


# --- decode_image -----------------------------------------------------------------------------

def test_jpeg_and_png_decode_to_rgb_uint8():
    img = _image()
    png = decode_image(_encode(img, ".png"))
    assert png.dtype == np.uint8 and np.array_equal(png, img)  # lossless and in RGB order
    jpg = decode_image(_encode(img, ".jpg"))
    assert jpg.shape == img.shape and np.abs(jpg.astype(int) - img).mean() < 8


def test_grey_images_decode_to_three_channels():
    grey = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    out = decode_image(cv2.imencode(".png", grey)[1].tobytes())
    assert out.shape == (48, 64, 3) and np.array_equal(out[..., 1], grey)


@pytest.mark.parametrize("data", [b"", b"garbage bytes, not an image", b"\xff\xd8\xff\xe0"])
def test_garbage_is_not_a_decodable_image(data):
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(data)


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_jpegs_are_not_decodable(keep):
    data = _encode(_image(), ".jpg")
    cut = data[:keep] if isinstance(keep, int) else data[: int(len(data) * keep)]
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(cut)


def test_truncated_pngs_are_not_decodable():
    data = _encode(_image(), ".png")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(data[: len(data) // 2])


# --- pipelines --------------------------------------------------------------------------------

def test_eval_normalises_with_the_spec_mean_and_std():
    flat = np.full((20, 30, 3), 51, np.uint8)
    out = build_eval_transform(SMALL)(image=flat)["image"]
    # 51 / 255 = 0.2; (0.2 - 0.5) / 0.25 = -1.2
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, -1.2, atol=1e-5)


def test_uint8_pipelines_normalised_on_the_device_equal_the_normalising_pipelines():
    """Ray Data ships uint8 (normalize=False) and normalize_chw finishes on the device; serving
    runs the albumentations pipeline that ends in Normalize. Both must feed the model the same."""
    img = _image(50, 70)
    raw = build_eval_transform(SMALL, normalize=False)(image=img)["image"]
    assert raw.dtype == np.uint8 and raw.shape == (32, 32, 3)
    batch = to_chw_batch([raw, raw])
    assert batch.dtype == np.uint8 and batch.shape == (2, 3, 32, 32)
    ours = normalize_chw(torch.from_numpy(batch), SMALL).numpy()
    ref = to_chw_batch([build_eval_transform(SMALL)(image=img)["image"]] * 2)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    aug = build_train_transform(SMALL, "ssdkd", seed=5, normalize=False)(image=img)["image"]
    assert aug.dtype == np.uint8
    with pytest.raises(TypeError, match="uint8"):
        normalize_chw(torch.from_numpy(ref), SMALL)


def test_eval_is_deterministic_and_resizes_any_shape():
    img = _image(50, 70)
    first = build_eval_transform(SMALL)(image=img)["image"]
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, build_eval_transform(SMALL)(image=img)["image"])
    assert np.array_equal(first, pickle.loads(pickle.dumps(build_eval_transform(SMALL)))(image=img)["image"])


def test_eval_runs_the_optional_preprocessing_first():
    spec = PreprocessSpec(image_size=32, crop_black_border=True, fusion_preprocess=True)
    pipe = build_eval_transform(spec)
    assert [type(t) for t in pipe.transforms[:2]] == [CropBlackBorder, FusionPreprocess]
    assert pipe(image=_image())["image"].shape == (32, 32, 3)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("size", [24, 40])
def test_every_recipe_gives_normalised_float_images_of_the_spec_size(recipe, size):
    spec = PreprocessSpec(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    pipe = build_train_transform(spec, recipe, seed=0)
    for h, w in [(48, 64), (90, 60)]:
        out = pipe(image=_image(h, w))["image"]
        assert out.shape == (size, size, 3) and out.dtype == np.float32
        # pixel 0 -> (0 - 0.5) / 0.25 = -2, pixel 255 -> (1 - 0.5) / 0.25 = 2
        assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_seeded_recipe_is_reproducible_and_random(recipe):
    img = _image()
    first = build_train_transform(SMALL, recipe, seed=3)(image=img)["image"]
    pipe, again = build_train_transform(SMALL, recipe, seed=3), build_train_transform(SMALL, recipe, seed=3)
    outs = [pipe(image=img)["image"] for _ in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(outs, [again(image=img)["image"] for _ in range(6)]))
    assert np.array_equal(first, outs[0])
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_recipes_run_after_the_optional_preprocessing():
    spec = PreprocessSpec(image_size=32, crop_black_border=True, fusion_preprocess=True)
    pipe = build_train_transform(spec, "skindistilvit", seed=0)
    assert isinstance(pipe.transforms[0], CropBlackBorder) and isinstance(pipe.transforms[1], FusionPreprocess)
    assert pipe(image=_image())["image"].shape == (32, 32, 3)


def test_an_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError, match="skindistilvit"):
        build_train_transform(SMALL, "randaugment")


# --- batching ---------------------------------------------------------------------------------

def test_to_chw_batch_transposes_lists_and_arrays():
    rng = np.random.default_rng(0)
    images = [rng.random((4, 5, 3), dtype=np.float32) for _ in range(2)]
    batch = to_chw_batch(images)
    assert batch.shape == (2, 3, 4, 5) and batch.dtype == np.float32 and batch.flags.c_contiguous
    assert batch[1, 2, 3, 4] == images[1][3, 4, 2]
    assert np.array_equal(to_chw_batch(np.stack(images)), batch)


def test_to_chw_batch_refuses_empty_or_ragged_input():
    with pytest.raises(ValueError, match="empty"):
        to_chw_batch([])
    with pytest.raises(ValueError, match="one shape"):
        to_chw_batch([np.zeros((4, 4, 3), np.float32), np.zeros((5, 4, 3), np.float32)])


def test_decode_then_eval_feeds_a_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=8).eval()
    spec = spec_from_model(model, image_size=32)
    pipe = build_eval_transform(spec)
    images = [pipe(image=decode_image(_encode(_image(), ".jpg")))["image"] for _ in range(2)]
    with torch.no_grad():
        logits = model(torch.from_numpy(to_chw_batch(images)))
    assert logits.shape == (2, 8)
