"""Procedural dermoscopy-like images for the 8 ISIC 2019 classes.

The generator stands in for ISIC 2019 (Tschandl et al. HAM10000, Codella et al. ISIC 2018 and
Combalia et al. BCN20000) when the real archive is absent: CI, smoke runs and benchmarks. It keeps
the properties the rest of raykd relies on:

* the ISIC 2019 class proportions (NV 12875, MEL 4522, BCC 3323, BKL 2624, AK 867, SCC 628,
  VASC 253, DF 239 of 25,331), so class weighting and balanced accuracy behave as on real data;
* classes that differ in the cues dermatologists use (the ABCD rule: Asymmetry, Border
  irregularity, Colour variety, Diameter, plus structures such as pigment network, arborizing
  vessels, lacunae, keratin, the white scar of a dermatofibroma), each drawn from a
  class-dependent but overlapping distribution, and a share of *atypical* lesions that borrow one
  group of cues from a look-alike class (NV <-> MEL <-> BKL, BCC <-> SCC <-> AK, ...), so a
  classifier can learn them but not perfectly;
* nuisance factors shared by every class: skin tone (per patient), hair strands, the black
  vignette of a dermatoscope's round field of view, uneven lighting, focus, sensor noise, JPEG;
* 1-5 images per lesion (another rotation, zoom, crop and lighting of the same lesion) and 1-3
  lesions per patient, so splitting by image instead of by lesion leaks;
* metadata (age, sex, anatomical site) with class-dependent, overlapping distributions.

Images are rendered lazily in ``Item.load`` from seeds derived from ``(seed, lesion, view)``, so
the same seed gives byte-identical JPEGs whatever order they are loaded in, and a 25k-image job
never holds pixels in memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np

from raykd.data.manifest import Manifest
from raykd.data.schema import ISIC2019_CLASSES, ISIC2019_COUNTS, ISIC2019_MALIGNANT, Item
from raykd.data.writer import write_dataset

__all__ = ["SITES", "class_counts", "make_synthetic", "render_image", "synth_items"]

RGB = tuple[float, float, float]

#: ``anatom_site_general`` values of the ISIC 2019 metadata CSV.
SITES: tuple[str, ...] = (
    "anterior torso", "posterior torso", "lateral torso", "upper extremity",
    "lower extremity", "head/neck", "palms/soles", "oral/genital",
)
#: Colour of fair skin under a dermatoscope; lesion colours are given on this skin and applied to
#: other skin tones multiplicatively (pigment absorbs light, it does not paint over skin).
_SKIN_REF = np.array([0.87, 0.69, 0.60], np.float32)
_JPEG_QUALITY = 90


@dataclass(frozen=True)
class _Look:
    """Distribution of one class's appearance and metadata (means and spreads, all overlapping)."""

    # shape (A, B, D of the ABCD rule): radius as a fraction of the half-frame
    radius: tuple[float, float]
    irregular: float  # amplitude of high border harmonics
    elong: tuple[float, float]  # range of the major/minor axis ratio
    offset: float  # first-harmonic amplitude: lopsided shape
    edge: float  # border ramp width as a fraction of the radius (ill-defined border = large)
    # colours (C of ABCD), on reference skin
    base: RGB
    centre: RGB
    centre_w: float
    grad: RGB
    grad_w: float  # colour asymmetry across the lesion
    blotch: RGB
    blotch_w: float
    # structures
    network: float  # pigment network contrast
    net_warp: float  # irregularity of the network (atypical network)
    dots: int  # dark dots / globules
    milia: int  # white milia-like cysts (BKL) or keratin pearls
    vessels: int  # arborizing vessel trees (BCC)
    dotted: int  # dotted / glomerular vessels (AK, SCC)
    lacunae: int  # red-purple lacunae (VASC)
    # metadata
    age: tuple[float, float]
    male: float
    sites: tuple[float, ...]  # probabilities over SITES


_SHAPE = ("radius", "irregular", "elong", "offset", "edge")
_COLOUR = ("base", "centre", "centre_w", "grad", "grad_w", "blotch", "blotch_w")
_TEXTURE = ("network", "net_warp", "dots", "milia", "vessels", "dotted", "lacunae")

_LOOKS: dict[str, _Look] = {
    "MEL": _Look((0.60, 0.14), 0.20, (1.1, 1.7), 0.16, 0.10, (0.40, 0.26, 0.19), (0.16, 0.10, 0.09),
                 0.45, (0.45, 0.48, 0.58), 0.55, (0.10, 0.07, 0.08), 0.55, 0.40, 0.8, 8, 0, 0, 0, 0,
                 (60, 15), 0.56, (.15, .25, .03, .18, .20, .14, .03, .02)),
    "NV": _Look((0.46, 0.12), 0.05, (1.0, 1.3), 0.04, 0.12, (0.52, 0.35, 0.24), (0.40, 0.26, 0.18),
                0.35, (0.52, 0.35, 0.24), 0.05, (0.35, 0.22, 0.16), 0.10, 0.45, 0.15, 3, 0, 0, 0, 0,
                (42, 16), 0.50, (.20, .30, .04, .12, .22, .06, .04, .02)),
    "BCC": _Look((0.46, 0.14), 0.12, (1.0, 1.5), 0.08, 0.18, (0.78, 0.56, 0.54), (0.86, 0.80, 0.80),
                 0.30, (0.70, 0.50, 0.50), 0.15, (0.36, 0.40, 0.52), 0.45, 0.0, 0.0, 0, 0, 4, 0, 0,
                 (66, 13), 0.56, (.15, .15, .02, .10, .10, .45, .01, .02)),
    "AK": _Look((0.50, 0.15), 0.14, (1.1, 1.6), 0.10, 0.45, (0.80, 0.50, 0.46), (0.88, 0.82, 0.76),
                0.25, (0.72, 0.42, 0.40), 0.20, (0.62, 0.34, 0.32), 0.25, 0.20, 0.5, 0, 10, 0, 14, 0,
                (68, 11), 0.62, (.04, .02, .01, .25, .07, .60, .005, .005)),
    "BKL": _Look((0.55, 0.15), 0.10, (1.1, 1.6), 0.08, 0.06, (0.60, 0.44, 0.31), (0.44, 0.31, 0.22),
                 0.30, (0.50, 0.36, 0.26), 0.25, (0.30, 0.20, 0.15), 0.20, 0.10, 0.5, 6, 8, 0, 0, 0,
                 (60, 15), 0.52, (.20, .20, .03, .15, .15, .25, .01, .01)),
    "DF": _Look((0.33, 0.08), 0.05, (1.0, 1.3), 0.04, 0.30, (0.62, 0.45, 0.36), (0.90, 0.84, 0.80),
                0.80, (0.58, 0.42, 0.34), 0.05, (0.50, 0.35, 0.28), 0.05, 0.30, 0.2, 0, 0, 0, 0, 0,
                (46, 15), 0.40, (.08, .07, .02, .20, .60, .02, .005, .005)),
    "VASC": _Look((0.36, 0.10), 0.06, (1.0, 1.4), 0.05, 0.06, (0.62, 0.22, 0.28), (0.45, 0.14, 0.30),
                  0.40, (0.68, 0.30, 0.34), 0.15, (0.82, 0.72, 0.72), 0.20, 0.0, 0.0, 0, 0, 0, 0, 9,
                  (48, 20), 0.50, (.20, .15, .03, .15, .25, .15, .03, .04)),
    "SCC": _Look((0.46, 0.12), 0.12, (1.0, 1.5), 0.10, 0.18, (0.82, 0.54, 0.50), (0.92, 0.88, 0.74),
                 0.55, (0.74, 0.46, 0.44), 0.20, (0.40, 0.20, 0.18), 0.30, 0.0, 0.0, 0, 6, 0, 20, 0,
                 (70, 12), 0.62, (.06, .04, .01, .25, .19, .43, .01, .01)),
}
#: Look-alike classes an atypical lesion borrows a group of cues from.
_CONFUSERS: dict[str, tuple[str, ...]] = {
    "MEL": ("NV", "BKL"), "NV": ("MEL", "BKL", "DF"), "BCC": ("SCC", "AK", "MEL"),
    "AK": ("SCC", "BCC", "BKL"), "BKL": ("MEL", "NV", "AK"), "DF": ("NV", "BKL"),
    "VASC": ("BCC", "MEL"), "SCC": ("AK", "BCC"),
}
#: Probability that each cue group (shape, colour, texture) of a lesion comes from a look-alike.
_ATYPICAL_P = 0.22
_VIEWS_P = np.array([0.40, 0.25, 0.15, 0.12, 0.08])  # images per lesion: 1..5
_LESIONS_P = np.array([0.55, 0.30, 0.15])  # lesions per patient: 1..3


def class_counts(num_images: int) -> dict[str, int]:
    """Split ``num_images`` over the ISIC 2019 classes in its proportions.

    Largest-remainder (Hamilton) rounding, then, when ``num_images >= 8``, each empty class takes
    one image from the largest class so every class can be trained and evaluated.

    Raises:
        ValueError: if ``num_images`` is not a positive integer.
    """
    if not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    total = sum(ISIC2019_COUNTS.values())
    quotas = {c: num_images * ISIC2019_COUNTS[c] / total for c in ISIC2019_CLASSES}
    counts = {c: int(math.floor(q)) for c, q in quotas.items()}
    # ties go to the class listed first in ISIC2019_CLASSES (sorted() is stable)
    by_remainder = sorted(ISIC2019_CLASSES, key=lambda c: counts[c] - quotas[c])
    for c in by_remainder[: num_images - sum(counts.values())]:
        counts[c] += 1
    if num_images >= len(ISIC2019_CLASSES):
        for c in ISIC2019_CLASSES:
            if counts[c] == 0:
                counts[max(counts, key=counts.__getitem__)] -= 1
                counts[c] = 1
    return counts


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], radius, angle bin (of 256) and angle, cached per size."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(c, c)
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    phi_bin = ((phi + np.pi) / (2 * np.pi) * 256).astype(np.int32) % 256
    for a in (u, v, rho, phi_bin):
        a.flags.writeable = False
    return u, v, rho, phi_bin, phi


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a ``cells`` x ``cells`` random grid upsampled bicubically."""
    grid = rng.random((cells, cells), dtype=np.float32)
    return np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)


def _atypical(look: _Look, label: str, rng: np.random.Generator, p: float = _ATYPICAL_P) -> _Look:
    """Replace each cue group with a look-alike class's, independently with probability ``p``."""
    for group in (_SHAPE, _COLOUR, _TEXTURE):
        donor = _CONFUSERS[label][int(rng.integers(len(_CONFUSERS[label])))]
        if rng.random() < p:
            look = replace(look, **{f: getattr(_LOOKS[donor], f) for f in group})
    return look


def _jitter(rgb: RGB, rng: np.random.Generator, sd: float = 0.025) -> np.ndarray:
    """A colour with random lightness (x lognormal) and a small per-channel (hue) change."""
    out = np.asarray(rgb, np.float32) * rng.lognormal(0, 0.12) + rng.normal(0, sd, 3).astype(np.float32)
    return np.clip(out, 0.02, 1.0)


def _mix(col: np.ndarray, target: np.ndarray, w: np.ndarray) -> np.ndarray:
    return col + (target - col) * w[..., None]


def _blend_mask(col: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Paint ``colour`` where the uint8 ``mask`` (0..255, antialiased cv2 drawing) is set."""
    return _mix(col, colour, mask.astype(np.float32) * (1 / 255))


def _shape(look: _Look, rng: np.random.Generator, size: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Lesion radius, opacity and depth (1 at the centre, 0 at the border) maps.

    The border is a Fourier series in the angle: first harmonic = lopsidedness, second =
    elongation, higher ones = irregularity (A, B and D of the ABCD rule).
    """
    _, _, rho, phi_bin, _ = _grid(size)
    radius = float(np.clip(rng.normal(*look.radius), 0.15, 0.85))
    ks = np.arange(1, 25, dtype=np.float32)
    amp = look.irregular * rng.lognormal(0, 0.35) * rng.normal(0, 1, 24).astype(np.float32) / ks
    amp[0] = look.offset * rng.random()
    elong = rng.uniform(*look.elong)
    amp[1] = (elong - 1) / (elong + 1)
    phase = rng.uniform(0, 2 * np.pi, (24, 1))
    theta = (np.arange(256, dtype=np.float32) + 0.5) / 256 * 2 * np.pi - np.pi
    table = radius * (1 + (amp[:, None] * np.cos(ks[:, None] * theta[None] + phase)).sum(0))
    r = np.maximum(table.astype(np.float32), 0.05)[phi_bin]
    edge = max(look.edge * radius * rng.lognormal(0, 0.3), 1.5 / size)
    return radius, np.clip((r - rho) / edge + 0.5, 0, 1), np.clip(1 - rho / r, 0, 1)


def _colours(look: _Look, rng: np.random.Generator, radius: float, depth: np.ndarray) -> np.ndarray:
    """Colour map of the lesion: base, centre, asymmetric ramp, blotches, pigment network."""
    size = depth.shape[0]
    u, v, _, _, _ = _grid(size)
    col = np.broadcast_to(_jitter(look.base, rng), (size, size, 3)).astype(np.float32)
    centre_w = look.centre_w * rng.uniform(0.6, 1.2) * depth ** rng.uniform(0.8, 2.5)
    col = _mix(col, _jitter(look.centre, rng), centre_w)
    beta = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (u * math.cos(beta) + v * math.sin(beta)) / (2 * radius), 0, 1)
    col = _mix(col, _jitter(look.grad, rng), look.grad_w * rng.uniform(0.5, 1.2) * ramp)
    if look.blotch_w > 0:
        noise = _smooth_noise(rng, size, int(rng.integers(4, 8)))
        patches = np.clip((noise - rng.uniform(0.45, 0.7)) * 6, 0, 1) * (depth > 0.05)
        col = _mix(col, _jitter(look.blotch, rng, 0.015), look.blotch_w * patches)
    if look.network > 0:  # dark lines of a (warped) lattice, fading towards the border
        freq = rng.uniform(5, 9) * math.pi
        warp = look.net_warp * (_smooth_noise(rng, size, 5) - 0.5)
        su, sv = np.sin(freq * (u + warp)), np.sin(freq * (v - warp))
        lines = np.exp(-np.minimum(su * su, sv * sv) * 12)
        col = col * (1 - look.network * rng.uniform(0.6, 1.2) * lines * np.sqrt(depth))[..., None]
    return col


def _structures(look: _Look, rng: np.random.Generator, radius: float, col: np.ndarray) -> np.ndarray:
    """Dots, milia, dotted vessels, lacunae and arborizing vessels, drawn antialiased inside the lesion.

    cv2 draws with 4 fractional bits (coordinates x 16).
    """
    size = col.shape[0]
    half = size / 2

    def inside(n: int, reach: float) -> np.ndarray:
        ang, rr = rng.uniform(-np.pi, np.pi, n), reach * radius * np.sqrt(rng.random(n))
        return np.stack([half + half * rr * np.cos(ang), half + half * rr * np.sin(ang)], 1)

    def count(mean: int) -> int:
        return int(rng.poisson(mean)) if mean > 0 else 0

    dot = max(1, round(size / 90))
    specs = (  # (number, colour, radius in px, reach as a fraction of the lesion radius)
        (count(look.dots), (0.18, 0.11, 0.09), dot, 1.0),  # dots / globules
        (count(look.milia), (0.96, 0.93, 0.84), dot, 0.75),  # milia-like cysts / keratin
        (count(look.dotted), (0.72, 0.12, 0.16), max(1, dot - 1), 0.85),  # dotted vessels
        (count(look.lacunae), (0.42, 0.07, 0.20), 3 * dot, 0.65),  # lacunae
    )
    for n, colour, rad, reach in specs:
        if n:
            mask = np.zeros((size, size), np.uint8)
            for x, y in inside(n, reach) * 16:
                r16 = int(rad * rng.uniform(0.7, 1.5) * 16)
                cv2.circle(mask, (int(x), int(y)), r16, 255, -1, cv2.LINE_AA, 4)
            col = _blend_mask(col, mask, _jitter(colour, rng, 0.015))
    trees = count(look.vessels)
    if trees:  # arborizing vessels: a wandering trunk with thinner side branches
        mask = np.zeros((size, size), np.uint8)
        step = half * radius * 16
        for start in inside(trees, 0.7) * 16:
            pts, ang = [start], rng.uniform(-np.pi, np.pi)
            for _ in range(int(rng.integers(3, 6))):
                ang += rng.normal(0, 0.5)
                pts.append(pts[-1] + 0.25 * step * np.array([math.cos(ang), math.sin(ang)]))
                if rng.random() < 0.5:
                    tip = pts[-1] + 0.2 * step * np.array([math.cos(ang + 1.0), math.sin(ang + 1.0)])
                    cv2.line(mask, tuple(pts[-1].astype(int)), tuple(tip.astype(int)), 200, 1, cv2.LINE_AA, 4)
            trunk = np.array(pts).astype(np.int32)
            cv2.polylines(mask, [trunk], False, 255, max(1, round(size / 110)), cv2.LINE_AA, 4)
        col = _blend_mask(col, mask, _jitter((0.70, 0.10, 0.16), rng, 0.015))
    return col


def _lesion_layer(look: _Look, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one lesion centred in a ``size`` frame as ``alpha * (tint - 1)``, HWC float32.

    Multiplying skin by ``1 + layer`` applies the lesion; the layer is zero outside it, so views
    warp it with a zero border.
    """
    radius, alpha, depth = _shape(look, rng, size)
    col = _structures(look, rng, radius, _colours(look, rng, radius, depth))
    return (alpha[..., None] * (col / _SKIN_REF - 1)).astype(np.float32)


def _skin_tone(patient_rng: np.random.Generator) -> np.ndarray:
    """Per-patient skin colour, mostly fair as in ISIC, sometimes darker."""
    t = patient_rng.beta(1.3, 4.0)
    fair, dark = np.array([0.93, 0.76, 0.67], np.float32), np.array([0.48, 0.32, 0.24], np.float32)
    return fair + (dark - fair) * t + patient_rng.normal(0, 0.02, 3).astype(np.float32)


def _hair(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-13 dark quadratic strands crossing the image, about 1 px wide at 128 px."""
    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    t = np.linspace(0, 1, 12, dtype=np.float32)[:, None]
    for _ in range(int(rng.integers(1, 14))):
        p0, p1, p2 = rng.uniform(-0.1, 1.1, (3, 2)) * size
        curve = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t * t * p2) * 16
        width = max(1, round(size / 128 * rng.uniform(0.6, 1.4)))
        cv2.polylines(mask, [curve.astype(np.int32)], False, 255, width, cv2.LINE_AA, 4)
    return _blend_mask(img, mask, np.array([0.16, 0.11, 0.09], np.float32) * rng.uniform(0.4, 1.6))


def _lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, colour cast, a linear gradient, fall-off towards the edges and maybe a vignette."""
    u, v, rho, _, _ = _grid(img.shape[0])
    gdir = rng.uniform(0, 2 * np.pi)
    gain = rng.uniform(0.8, 1.12) * (1 + rng.uniform(0, 0.15) * (u * math.cos(gdir) + v * math.sin(gdir)))
    gain = gain * (1 - rng.uniform(0, 0.25) * rho * rho)
    img = img * gain[..., None] * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    if rng.random() < 0.3:  # dermatoscope vignette: black outside a round field of view
        centre = rng.normal(0, 0.04, 2)
        dist = np.sqrt((u - centre[0]) ** 2 + (v - centre[1]) ** 2)
        img = img * np.clip((rng.uniform(1.0, 1.35) - dist) * img.shape[0] / 3, 0.02, 1)[..., None]
    return img


def render_image(label_name: str, image_size: int = 128, *, seed: int = 0, lesion: int = 0,
                 view: int = 0, patient: int = 0, atypical: float = _ATYPICAL_P) -> np.ndarray:
    """Render one view of one synthetic lesion as an RGB uint8 HWC array.

    The lesion's look depends on ``(seed, lesion)`` only, the skin tone on ``(seed, patient)``,
    and the view (rotation, zoom, crop, lighting, hair, vignette, focus, noise) on
    ``(seed, lesion, view)``: the same arguments always give the same pixels. ``atypical`` is the
    probability that each cue group (shape, colour, texture) comes from a look-alike class: the
    difficulty of the set (0: every lesion typical of its class).

    Raises:
        ValueError: on an unknown ``label_name``, ``image_size < 16`` or negative indices.
    """
    if label_name not in _LOOKS:
        raise ValueError(f"label_name {label_name!r} is not an ISIC 2019 class; use one of "
                         f"{ISIC2019_CLASSES}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if min(seed, lesion, view, patient) < 0:
        raise ValueError(f"seed, lesion, view and patient must be >= 0, got {(seed, lesion, view, patient)}")
    size = int(image_size)
    lesion_rng = np.random.default_rng([seed, 1, lesion])
    layer = _lesion_layer(_atypical(_LOOKS[label_name], label_name, lesion_rng, atypical), lesion_rng, size)
    skin = _skin_tone(np.random.default_rng([seed, 2, patient]))
    rng = np.random.default_rng([seed, 3, lesion, view])
    # view: rotation, zoom and off-centre crop of the same lesion
    m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(0, 360), rng.uniform(0.85, 1.2))
    m[:, 2] += rng.normal(0, 0.07 * size, 2)
    layer = cv2.warpAffine(layer, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    texture = 1 + 0.10 * (_smooth_noise(rng, size, 6) - 0.5)  # blotchy skin
    texture += 0.04 * (_smooth_noise(rng, size, size // 4) - 0.5)  # pores, fine grain
    img = skin * texture[..., None] * (1 + layer)
    if rng.random() < 0.4:
        img = _hair(img, rng)
    img = _lighting(img, rng)
    if rng.random() < 0.2:  # out of focus
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2) * size / 128)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.004, 0.02))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _load_jpeg(label_name: str, image_size: int, seed: int, lesion: int, view: int, patient: int,
               atypical: float = _ATYPICAL_P) -> bytes:
    """``Item.load`` of a synthetic image: render, then JPEG-encode (module level so it pickles)."""
    rgb = render_image(label_name, image_size, seed=seed, lesion=lesion, view=view, patient=patient,
                       atypical=atypical)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    assert ok, "cv2.imencode failed on a uint8 RGB image"
    return buf.tobytes()


def _age(look: _Look, rng: np.random.Generator) -> float:
    return float(np.clip(round(rng.normal(*look.age) / 5) * 5, 5, 85))


def _check_synth_args(image_size: int, seed: int, atypical: float) -> None:
    """Reject a too-small ``image_size``, a negative ``seed`` or an ``atypical`` outside [0, 1]."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= atypical <= 1.0:
        raise ValueError(f"atypical must be a probability in [0, 1], got {atypical}")


def _draw_lesions(counts: dict[str, int], rng: np.random.Generator) -> list[tuple[str, int]]:
    """Group each class's images into lesions of 1-5 views; returns shuffled ``(class, views)``."""
    lesions: list[tuple[str, int]] = []
    for label in ISIC2019_CLASSES:
        left = counts[label]
        while left > 0:
            k = min(int(rng.choice(5, p=_VIEWS_P)) + 1, left)
            lesions.append((label, k))
            left -= k
    return [lesions[i] for i in rng.permutation(len(lesions))]


def _draw_patients(num_lesions: int, rng: np.random.Generator) -> list[int]:
    """Patient number of each lesion: consecutive runs of 1-3 lesions share a patient.

    The list may run past ``num_lesions`` (the last patient's run is not cut); callers zip it.
    """
    patient_of: list[int] = []
    while len(patient_of) < num_lesions:
        patient = patient_of[-1] + 1 if patient_of else 0
        patient_of.extend([patient] * (int(rng.choice(3, p=_LESIONS_P)) + 1))
    return patient_of


_View = tuple[str, int, int, int, float | None, str | None, str | None]


def _draw_views(lesions: list[tuple[str, int]], patient_of: list[int],
                rng: np.random.Generator) -> list[_View]:
    """One ``(label, lesion, view, patient, age, sex, site)`` per image, with patient-level metadata.

    A patient's age and sex come from their first lesion's class; each lesion adds 0 or 5 years
    and draws its own site. A few values are missing (None), per lesion, as in the ISIC 2019 CSV.
    """
    meta: dict[int, tuple[float, str]] = {}  # patient -> (age, sex), from their first lesion's class
    images: list[_View] = []
    for lesion, ((label, views), patient) in enumerate(zip(lesions, patient_of)):
        look = _LOOKS[label]
        if patient not in meta:
            meta[patient] = (_age(look, rng), "male" if rng.random() < look.male else "female")
        age, sex = meta[patient]
        age = min(85.0, age + 5 * int(rng.integers(0, 2)))
        site = SITES[int(rng.choice(len(SITES), p=np.asarray(look.sites) / sum(look.sites)))]
        missing = rng.random(3) < (0.02, 0.015, 0.05)
        for view in range(views):
            images.append((label, lesion, view, patient, None if missing[0] else age,
                           None if missing[1] else sex, None if missing[2] else site))
    return images


def synth_items(num_images: int, image_size: int = 128, seed: int = 0, atypical: float = _ATYPICAL_P) -> list[Item]:
    """Describe a synthetic ISIC-2019-like dataset of ``num_images`` JPEG images.

    Class counts follow :func:`class_counts`. Each class's images are grouped into lesions of 1-5
    views, lesions are shuffled and grouped into patients of 1-3 lesions (a patient may have
    lesions of different classes, shares one skin tone, sex and age give or take a few years).
    Metadata follow class-dependent, overlapping distributions with a few missing values as in
    the ISIC 2019 CSV. Pixels are rendered only when ``Item.load()`` is called (the writer's
    progress bar counts the images as they are rendered).

    Args:
        num_images: number of images (>= 1).
        image_size: side of the square images in pixels (>= 16).
        seed: non-negative seed; the same seed gives the same items and byte-identical images.
        atypical: probability that a cue group of a lesion comes from a look-alike class (difficulty).

    Returns:
        Items ordered by ``image_id`` (``SYN_0000000``...), ``origin="synthetic"``.

    Raises:
        ValueError: on a non-positive ``num_images``, ``image_size < 16`` or a negative seed.
    """
    counts = class_counts(num_images)
    _check_synth_args(image_size, seed, atypical)
    rng = np.random.default_rng([seed, 0])
    lesions = _draw_lesions(counts, rng)
    images = _draw_views(lesions, _draw_patients(len(lesions), rng), rng)
    order = rng.permutation(len(images))
    items = []
    for number, idx in enumerate(order):
        label, lesion, view, patient, age, sex, site = images[idx]
        items.append(Item(
            image_id=f"SYN_{number:07d}", label_name=label,
            load=functools.partial(_load_jpeg, label, int(image_size), int(seed), lesion, view, patient,
                                   float(atypical)),
            lesion_id=f"L_{lesion:07d}", patient_id=f"P_{patient:07d}", age=age, sex=sex, site=site,
            origin=f"synthetic seed={seed} lesion={lesion} view={view}",
        ))
    return items


assert all(len(look.sites) == len(SITES) for look in _LOOKS.values())
assert set(_LOOKS) == set(ISIC2019_CLASSES) and set(_CONFUSERS) == set(ISIC2019_CLASSES)
assert {f.name for f in fields(_Look)} >= set(_SHAPE + _COLOUR + _TEXTURE)


def make_synthetic(
    out: str | Path,
    *,
    num_images: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    atypical: float | None = None,
    fractions: dict[str, float] | None = None,
    split_seed: int = 42,
    shard_mb: float = 64.0,
    overwrite: bool = False,
) -> Manifest:
    """Generate ``num_images`` images and write them as raykd shards, as ``ingest`` does."""
    kw = {} if atypical is None else {"atypical": atypical}
    items = synth_items(num_images, image_size=image_size, seed=seed, **kw)
    return write_dataset(
        items,
        out,
        source="synthetic",
        label_names=ISIC2019_CLASSES,
        malignant=ISIC2019_MALIGNANT,
        fractions=fractions or {"train": 0.7, "val": 0.15, "test": 0.15},
        split_seed=split_seed,
        shard_mb=shard_mb,
        source_dir=f"synthetic(seed={seed}, size={image_size}" + ("" if atypical is None else f", atypical={atypical}") + ")",
        overwrite=overwrite,
    )
