"""Rendering and measuring one synthetic lesion crop (the image half of `training/data/synthetic.py`).

A crop is 15 mm across (as the ISIC 2024 tiles), so ``image_size / 15`` pixels per mm:

1. `render_lesion`: the lesion body. An ellipse whose radius is modulated by random harmonics (orders 1-3:
   asymmetry, orders 4-16: jagged border) with a soft edge; inside, melanin-like pigment absorbs light
   (``skin * exp(-density * absorption)``) with a low-frequency texture and an optional blue-grey patch,
   on skin of varied tone under a lighting gradient.
2. `measure_lesion`: the ISIC 2024 measurement columns (``clin_size_long_diam_mm`` and ``tbp_lv_*``),
   computed from the lesion body: the mask (``alpha >= 0.5``) gives area, perimeter (Crofton estimate),
   Feret diameter, moments and mirror symmetry; CIELAB colours inside the lesion and in a ring of skin
   around it give the colour columns.
3. `draw_cues`: dermoscopic structures drawn *after* the measurements: peripheral dots and globules,
   blue-white veil, regression (white scar-like area with grey peppering), atypical streaks and arborizing
   vessels. The TBP vendor's software measures lesions on the 3D avatar's texture, coarser than the crop, so
   these fine structures are in the image only: the measured columns do not summarise them.
4. `add_artefacts`: hair (dark curves), blur, sensor noise; then `encode_jpeg`.
"""

from __future__ import annotations

import dataclasses
import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FIELD_OF_VIEW_MM = 15.0
NUM_HARMONICS = 16

# Per-channel (R, G, B) optical absorption of the pigments, and the colours of skin, hair and the
# dermoscopic structures (sRGB in [0, 1]).
BROWN = np.array([0.55, 0.85, 1.15])       # epidermal melanin absorbs short wavelengths most
RED = np.array([0.15, 0.95, 0.75])         # haemoglobin-like: absorbs green
BLUE_GREY = np.array([0.95, 0.80, 0.62])   # deep melanin (Tyndall effect) looks blue-grey
LIGHT_SKIN = np.array([0.94, 0.80, 0.71])
DARK_SKIN = np.array([0.42, 0.28, 0.20])
HAIR_COLOUR = np.array([0.12, 0.09, 0.07])
VEIL_COLOUR = np.array([0.52, 0.60, 0.74])      # blue-white veil: blue-grey with a white haze
SCAR_COLOUR = np.array([0.93, 0.86, 0.85])      # regression: white, scar-like depigmentation
VESSEL_COLOUR = np.array([0.78, 0.16, 0.20])    # arborizing vessels: bright red
# The dermoscopic structures `draw_cues` knows, in drawing order.
CUES = ("regression", "veil", "vessels", "globules", "streaks")


@dataclasses.dataclass(frozen=True)
class Traits:
    """Latent traits of a lesion; a patient's phenotype is the mean traits of their lesions."""

    log_diameter: float  # log of the long diameter in mm
    density: float       # pigment optical density (darkness)
    redness: float       # share of red (vascular) pigment, in [0, 1)
    blue_patch: float    # strength of a localised blue-grey patch, in [0, 1)
    irregularity: float  # amplitude of border harmonics 4..16 (jagged border)
    asymmetry: float     # amplitude of border harmonics 1..3 (asymmetric outline)
    variegation: float   # amplitude of the within-lesion pigment texture
    aspect: float        # minor / major axis ratio, in (0, 1]


@dataclasses.dataclass
class Rendering:
    """A rendered lesion body: ``clean`` (S, S, 3) sRGB in [0, 1], ``alpha`` (S, S) lesion coverage,
    ``rel`` (S, S) each pixel's radius relative to the outline at its angle (< 1 inside; inf far outside),
    ``theta`` (S, S) the angle in the lesion's frame (NaN far outside), and ``semi_major`` in mm."""

    clean: np.ndarray
    alpha: np.ndarray
    rel: np.ndarray
    theta: np.ndarray
    semi_major: float


@lru_cache(maxsize=8)
def _grid_mm(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm from the image centre: x (1, S) and y (S, 1), float32."""
    g = ((np.arange(image_size) + 0.5 - image_size / 2) * (FIELD_OF_VIEW_MM / image_size)).astype(np.float32)
    return g[None, :], g[:, None]


def render_lesion(traits: Traits, skin: np.ndarray, rng: np.random.Generator, image_size: int,
                  tile_type: str) -> Rendering:
    """Render a lesion body, without dermoscopic structures or artefacts."""
    f32 = np.float32
    cx, cy = rng.normal(0.0, 0.5, size=2).tolist()
    rotation = rng.uniform(0, np.pi)
    semi_major = math.exp(traits.log_diameter) / 2
    # Outline r(theta) = 1 + sum_k amp_k cos(k theta + phase_k), tabulated on 360 angles.
    k = np.arange(1, NUM_HARMONICS + 1)
    amp = np.where(k <= 3, traits.asymmetry, traits.irregularity * 4.0 / k)
    amp = amp * rng.uniform(0.5, 1.5, NUM_HARMONICS)
    phase = rng.uniform(0, 2 * np.pi, NUM_HARMONICS)
    angles = np.linspace(-np.pi, np.pi, 361)
    outline = np.maximum(1 + (amp * np.cos(k * angles[:, None] + phase)).sum(1), 0.35).astype(f32)

    # The lesion and its surrounding ring (rel < 2.2) lie in a window around the centre: compute only there.
    x_mm, y_mm = _grid_mm(image_size)
    reach = 2.3 * semi_major * float(outline.max())
    cols = slice(*np.searchsorted(x_mm[0], [cx - reach, cx + reach]))
    rows = slice(*np.searchsorted(y_mm[:, 0], [cy - reach, cy + reach]))
    u, v = x_mm[:, cols] - cx, y_mm[rows] - cy
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    xn = (u * cos_r + v * sin_r) / semi_major                                           # (h, w)
    yn = (v * cos_r - u * sin_r) / (semi_major * traits.aspect)
    theta = np.full((image_size, image_size), np.nan, dtype=f32)
    theta[rows, cols] = np.arctan2(yn, xn)
    rel = np.full((image_size, image_size), np.inf, dtype=f32)
    rel[rows, cols] = np.hypot(xn, yn) / outline[np.rint((theta[rows, cols] + np.pi) * (180 / np.pi)).astype(np.intp)]
    edge = rng.uniform(0.15, 0.35) / semi_major  # soft edge width, in outline units
    alpha = np.clip((1 - rel) / edge + 0.5, 0.0, 1.0)                                    # (S, S)

    # Pigment: density with a blotchy texture (smooth value noise), darker centre, optional blue-grey patch.
    texture = _value_noise(rng, image_size, 6) / 0.85
    density = traits.density * (0.85 if tile_type == "3D: white" else 1.0)
    centre_darker = 1 - 0.3 * np.minimum(rel[rows, cols], 1) ** 2
    density = density * np.exp(traits.variegation * texture[rows, cols]) * centre_darker   # (h, w)
    px, py = rng.uniform(-0.5, 0.5, size=2).tolist()
    patch = traits.blue_patch * np.exp(-((xn - px) ** 2 + (yn - py) ** 2) / 0.25)          # (h, w)
    absorption = ((1 - traits.redness) * BROWN + traits.redness * RED).astype(f32)       # (3,)
    absorption = absorption + (BLUE_GREY.astype(f32) - absorption) * patch[..., None]    # (h, w, 3)

    # Skin under a lighting gradient (the white-light tiles are a little brighter), pigment absorbs it.
    direction, gradient = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.3) / FIELD_OF_VIEW_MM
    gain = (1.05 if tile_type == "3D: white" else 0.95) * rng.uniform(0.92, 1.05)
    light = gain * (1 + gradient * (math.cos(direction) * x_mm + math.sin(direction) * y_mm))  # (S, S)
    clean = skin.astype(f32) * light[..., None]                                          # (S, S, 3)
    clean[rows, cols] *= np.exp(-(alpha[rows, cols] * density)[..., None] * absorption)
    return Rendering(np.clip(clean, 0.0, 1.0), alpha, rel, theta, semi_major)


def _value_noise(rng: np.random.Generator, image_size: int, cells: int) -> np.ndarray:
    """Smooth noise (S, S), about unit variance: a `cells` x `cells` Gaussian grid upsampled bicubically."""
    grid = rng.normal(size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((image_size,) * 2, Image.BICUBIC))


# ----- dermoscopic structures (image only) -----

def draw_cues(rendering: Rendering, cues: tuple[str, ...], key: list[int]) -> np.ndarray:
    """The clean image with the named structures (`CUES`) drawn in; returns a new (S, S, 3) array.

    Structure ``CUES[i]`` draws from ``numpy.random.default_rng(key + [i])``, so whether one structure is
    drawn never changes the shape of another.
    """
    unknown = set(cues) - set(CUES)
    if unknown:
        raise ValueError(f"unknown dermoscopic structure(s) {sorted(unknown)}; known: {CUES}")
    image = rendering.clean.copy()
    if (rendering.alpha >= 0.5).sum() < 4:
        return image
    px_per_mm = image.shape[0] / FIELD_OF_VIEW_MM
    for index, cue in enumerate(CUES):
        if cue in cues:
            coverage, colour = _CUE_DRAWERS[cue](rendering, np.random.default_rng([*key, index]), px_per_mm)
            image = image + (colour - image) * coverage[..., None]                        # (S, S, 3)
    return np.clip(image, 0.0, 1.0)


def _sector(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(S, S) bool: the pixels whose lesion-frame angle lies in a random sector (a third to two thirds of
    the circle): atypical structures sit unevenly around a melanoma."""
    centre, half_width = rng.uniform(-np.pi, np.pi), rng.uniform(np.pi / 3, 2 * np.pi / 3)
    return np.abs(np.angle(np.exp(1j * (np.nan_to_num(theta, nan=10.0) - centre)))) < half_width


def _disc_coverage(size: int, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(S, S) coverage in [0, 1] of soft discs at pixel ``centres`` (n, 2) (row, col) with ``radii`` (n,) px."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    coverage = np.zeros((size, size), dtype=np.float32)
    for (r, c), radius in zip(centres, radii):
        distance = np.hypot(rows - r, cols - c)
        coverage = np.maximum(coverage, np.clip(radius + 0.5 - distance, 0.0, 1.0))
    return coverage


def _pick_pixels(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` (row, col) picks among the True pixels of ``candidates`` (S, S) (the centre if none)."""
    points = np.argwhere(candidates).astype(np.float32)
    if len(points) == 0:
        points = np.array([[candidates.shape[0] / 2] * 2], dtype=np.float32)
    picks = rng.integers(0, len(points), size=count)
    return points[picks] + rng.uniform(-0.5, 0.5, size=(count, 2)).astype(np.float32)


def _globules(rendering: Rendering, rng: np.random.Generator, px_per_mm: float):
    """Dark brown dots and globules (0.15-0.35 mm) crowded near the border in one sector."""
    size = rendering.alpha.shape[0]
    band = (rendering.rel > 0.6) & (rendering.rel < 1.0) & _sector(rendering.theta, rng)
    count = 6 + int(rng.integers(0, 10))
    centres = _pick_pixels(band, 15, rng)[:count]
    radii = rng.uniform(0.15, 0.35, size=15)[:count] * px_per_mm
    darkness = rng.uniform(0.55, 0.8)
    return _disc_coverage(size, centres, radii) * darkness, np.array([0.16, 0.09, 0.06], dtype=np.float32)


def _veil(rendering: Rendering, rng: np.random.Generator, px_per_mm: float):
    """A structureless blue-white area over a third to a half of the lesion, off-centre."""
    size = rendering.alpha.shape[0]
    blob = _value_noise(rng, size, 4)
    threshold = _area_threshold(blob, rendering.rel < 0.9, rng.uniform(0.33, 0.5))
    opacity = rng.uniform(0.45, 0.7)
    coverage = np.clip((blob - threshold) * 3.0, 0.0, 1.0) * np.clip((1.0 - rendering.rel) * 4.0, 0.0, 1.0)
    return coverage * opacity, VEIL_COLOUR.astype(np.float32)


def _area_threshold(blob: np.ndarray, region: np.ndarray, share: float) -> float:
    """The level above which ``share`` of the ``region`` pixels of ``blob`` lie (a blob covering that share)."""
    values = blob[region]
    return float(np.quantile(values, 1.0 - share)) if values.size else float(blob.max())


def _regression(rendering: Rendering, rng: np.random.Generator, px_per_mm: float):
    """White scar-like depigmentation with blue-grey peppering (fine granules) inside it."""
    size = rendering.alpha.shape[0]
    blob = _value_noise(rng, size, 5)
    threshold = _area_threshold(blob, rendering.rel < 0.85, rng.uniform(0.2, 0.4))
    area = np.clip((blob - threshold) * 3.0, 0.0, 1.0) * np.clip((0.95 - rendering.rel) * 4.0, 0.0, 1.0)
    pepper = (rng.random((size, size)) < 0.12).astype(np.float32) * (area > 0.5)
    colour = np.where(pepper[..., None] > 0, np.float32([0.42, 0.45, 0.52]), SCAR_COLOUR.astype(np.float32))
    return np.maximum(area * rng.uniform(0.7, 0.9), pepper * 0.8), colour


def _streaks(rendering: Rendering, rng: np.random.Generator, px_per_mm: float):
    """Atypical streaks (pseudopods): dark radial lines crossing the border in one sector."""
    size = rendering.alpha.shape[0]
    start_band = (rendering.rel > 0.7) & (rendering.rel < 0.95) & _sector(rendering.theta, rng)
    count = 5 + int(rng.integers(0, 8))
    starts = _pick_pixels(start_band, 12, rng)[:count]                                    # (n, 2) (row, col)
    lengths = rng.uniform(0.6, 1.3, size=12)[:count] * px_per_mm
    bends = rng.normal(0.0, 0.25, size=12)[:count]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    inside = np.argwhere(rendering.alpha >= 0.5)
    centre = inside.mean(0) if len(inside) else np.array([size / 2, size / 2])
    width = max(1, int(round(0.14 * px_per_mm)))
    for start, length, bend in zip(starts, lengths, bends):
        direction = start - centre
        direction = direction / (np.linalg.norm(direction) + 1e-6)
        direction = np.array([direction[0] * math.cos(bend) - direction[1] * math.sin(bend),
                              direction[0] * math.sin(bend) + direction[1] * math.cos(bend)])
        end = start + direction * length
        draw.line([(float(start[1]), float(start[0])), (float(end[1]), float(end[0]))], fill=255, width=width)
    coverage = np.asarray(mask, dtype=np.float32) / 255.0 * rng.uniform(0.6, 0.85)
    return coverage, np.array([0.14, 0.08, 0.06], dtype=np.float32)


def _vessels(rendering: Rendering, rng: np.random.Generator, px_per_mm: float):
    """Arborizing vessels: thin bright-red branching lines over the lesion (basal cell carcinoma)."""
    size = rendering.alpha.shape[0]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    starts = _pick_pixels(rendering.rel < 0.6, 3, rng)
    step = 0.35 * px_per_mm
    width = max(1, int(round(0.15 * px_per_mm)))
    for start in starts:
        heading = rng.uniform(0, 2 * np.pi)
        for _branch in range(3):
            point, angle = start.copy(), heading + rng.normal(0.0, 0.8)
            for _ in range(6):
                angle += rng.normal(0.0, 0.45)
                nxt = point + step * np.array([math.sin(angle), math.cos(angle)])
                draw.line([(float(point[1]), float(point[0])), (float(nxt[1]), float(nxt[0]))], fill=255, width=width)
                point = nxt
    coverage = np.asarray(mask, dtype=np.float32) / 255.0
    coverage = coverage * np.clip((1.05 - rendering.rel) * 4.0, 0.0, 1.0) * rng.uniform(0.7, 0.9)
    return coverage, VESSEL_COLOUR.astype(np.float32)


_CUE_DRAWERS = {"globules": _globules, "veil": _veil, "regression": _regression, "streaks": _streaks,
                "vessels": _vessels}


# ----- artefacts and encoding -----

def add_artefacts(clean: np.ndarray, rng: np.random.Generator, hairiness: float) -> np.ndarray:
    """Hair (dark curves), blur and noise on a clean (S, S, 3) image; returns (S, S, 3) uint8."""
    size = clean.shape[0]
    hair = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(hair)
    t = np.linspace(0.0, 1.0, 8)[:, None]
    for _ in range(rng.poisson(hairiness)):
        start = rng.uniform(-0.2, 1.2, size=2) * size
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.2) * size
        along, across = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
        bend = rng.normal(0.0, 0.3) * length
        points = start + t * length * along + (t * t - t) * bend * across                # (8, 2)
        width = max(1, int(round(rng.uniform(0.6, 1.8) * size / 128)))
        draw.line([tuple(p) for p in points], fill=int(rng.uniform(150, 255)), width=width)
    coverage = np.asarray(hair, dtype=np.float32)[..., None] / 255.0
    image = clean + (HAIR_COLOUR.astype(np.float32) - clean) * coverage
    pil = Image.fromarray(np.rint(image * 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8) * size / 128))
    noise = rng.standard_normal(size=(size, size, 1), dtype=np.float32) * rng.uniform(1.0, 5.0)  # luminance
    return np.clip(np.asarray(pil, dtype=np.float32) + noise, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """(S, S, 3) uint8 -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ----- measurements -----

def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1], shape (..., 3) -> CIELAB (D65), shape (..., 3)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805],
                             [0.2126, 0.7152, 0.0722],
                             [0.0193, 0.1192, 0.9505]]).T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _crofton_perimeter(mask: np.ndarray) -> float:
    """Perimeter in pixels of a (S, S) boolean mask, from its edge crossings in 4 directions (Crofton)."""
    m = np.pad(mask, 1).astype(np.int8)
    n0 = np.abs(np.diff(m, axis=1)).sum()
    n90 = np.abs(np.diff(m, axis=0)).sum()
    n45 = np.abs(m[1:, 1:] - m[:-1, :-1]).sum() + np.abs(m[1:, :-1] - m[:-1, 1:]).sum()
    return float(np.pi / 8 * (n0 + n90 + n45 / np.sqrt(2)))


def _max_feret(mask: np.ndarray) -> float:
    """Longest distance in pixels across a (S, S) boolean mask (between boundary pixel edges)."""
    m = np.pad(mask, 1)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    points = np.argwhere(mask & ~interior).astype(float)                                 # (B, 2)
    points = points[:: max(1, len(points) // 400)]
    distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).max() if len(points) > 1 else 0.0
    return float(distance + 1.0)


def _mirror_asymmetry(mask: np.ndarray) -> tuple[float, float]:
    """(symm_2axis, symm_2axis_angle) of a (S, S) boolean mask.

    Asymmetry about an axis = share of lesion pixels whose mirror image across the axis (through the
    centroid) falls outside the lesion. The most symmetric axis is found over 0..170 degrees; the score is
    the asymmetry about the axis perpendicular to it.
    """
    points = np.argwhere(mask).astype(float)                                              # (P, 2) as (row, col)
    points = points[:: max(1, len(points) // 300)]
    centroid = points.mean(0)
    p = points - centroid
    angles = np.deg2rad(np.arange(0, 180, 10))
    d = np.stack([np.sin(angles), np.cos(angles)], 1)                                    # (18, 2) (row, col)
    mirrored = 2 * (p @ d.T)[..., None] * d[None] - p[:, None]                           # (P, 18, 2)
    idx = np.rint(mirrored + centroid).astype(np.intp)
    shape = np.array(mask.shape)
    inside = (idx >= 0).all(-1) & (idx < shape).all(-1)
    idx = np.clip(idx, 0, shape - 1)
    hit = inside & mask[idx[..., 0], idx[..., 1]]
    asymmetry = 1 - hit.mean(0)                                                          # (18,)
    best = int(np.argmin(asymmetry))
    return float(asymmetry[(best + 9) % 18]), float(np.rad2deg(angles[best]))


def _colour_measurements(clean: np.ndarray, mask: np.ndarray, rel: np.ndarray) -> dict:
    """CIELAB colour columns from a clean (S, S, 3) image, the (S, S) lesion mask and ``rel`` (S, S)."""
    ring = (rel > 1.3) & (rel < 2.2)  # the skin around the lesion
    if ring.sum() < 20:
        ring = ~mask
    lab_in, lab_out = srgb_to_lab(clean[mask]), srgb_to_lab(clean[ring])                  # (Pin, 3), (Pout, 3)
    (l_in, a_in, b_in), (l_out, a_out, b_out) = lab_in.mean(0), lab_out.mean(0)
    rings = np.minimum((rel[mask] * 4).astype(np.intp), 3)  # 4 concentric rings inside the lesion
    radial_std = max((lab_in[rings == r].std(0).mean() for r in range(4) if (rings == r).sum() >= 5), default=0.0)
    return {
        "tbp_lv_A": a_in, "tbp_lv_Aext": a_out, "tbp_lv_B": b_in, "tbp_lv_Bext": b_out,
        "tbp_lv_C": math.hypot(a_in, b_in), "tbp_lv_Cext": math.hypot(a_out, b_out),
        "tbp_lv_H": math.degrees(math.atan2(b_in, a_in)), "tbp_lv_Hext": math.degrees(math.atan2(b_out, a_out)),
        "tbp_lv_L": l_in, "tbp_lv_Lext": l_out, "tbp_lv_color_std_mean": lab_in.std(0).mean(),
        "tbp_lv_deltaA": a_in - a_out, "tbp_lv_deltaB": b_in - b_out, "tbp_lv_deltaL": l_in - l_out,
        "tbp_lv_deltaLB": math.hypot(l_in - l_out, b_in - b_out),
        "tbp_lv_deltaLBnorm": math.dist((l_in, a_in, b_in), (l_out, a_out, b_out)),
        "tbp_lv_radial_color_std_max": radial_std,
        "tbp_lv_stdL": lab_in[:, 0].std(), "tbp_lv_stdLExt": lab_out[:, 0].std(),
    }


def _shape_measurements(mask: np.ndarray, px_per_mm: float) -> dict:
    """Geometry columns of a boolean lesion mask (any shape; its bounding box suffices)."""
    area = mask.sum() / px_per_mm**2
    perimeter = _crofton_perimeter(mask) / px_per_mm
    rows_cols = np.argwhere(mask).astype(float)
    eigen = np.linalg.eigvalsh(np.cov(rows_cols.T)) if len(rows_cols) > 2 else np.ones(2)  # ascending
    symmetry, symmetry_angle = _mirror_asymmetry(mask)
    return {
        "clin_size_long_diam_mm": _max_feret(mask) / px_per_mm,
        "tbp_lv_areaMM2": area, "tbp_lv_area_perim_ratio": perimeter**2 / area,
        "tbp_lv_eccentricity": math.sqrt(max(0.0, 1 - eigen[0] / eigen[1])),
        "tbp_lv_minorAxisMM": 4 * math.sqrt(max(eigen[0], 0.0)) / px_per_mm,  # ellipse fit: 4 sd
        "tbp_lv_perimeterMM": perimeter, "tbp_lv_symm_2axis": symmetry, "tbp_lv_symm_2axis_angle": symmetry_angle,
    }


def measure_lesion(rendering: Rendering, rng: np.random.Generator, columns: list[str]) -> dict:
    """The ISIC 2024 measurement ``columns`` of a rendered lesion body.

    The lesion is ``alpha >= 0.5``. Colour columns are CIELAB means (L, A, B), chroma C and hue angle H
    (degrees) inside the lesion and in a ring of skin around it (``*ext``); ``delta*`` = inside - outside;
    ``deltaLBnorm`` is the CIE76 colour difference. ``norm_border`` and ``norm_color`` (0-10) combine the
    jaggedness with the asymmetry, and the radial with the overall colour spread. ``rng`` only adds the
    noise of the nevus-confidence "classifier", a function of the other measurements.
    """
    clean, alpha, rel = rendering.clean, rendering.alpha, rendering.rel
    px_per_mm = clean.shape[0] / FIELD_OF_VIEW_MM
    # Never empty: a lesion smaller than a pixel is the pixel nearest its centre.
    mask = alpha >= min(0.5, alpha.max()) if alpha.max() > 0 else rel <= rel.min()
    values = _colour_measurements(clean, mask, rel)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    values.update(_shape_measurements(mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1], px_per_mm))
    jaggedness = values["tbp_lv_area_perim_ratio"] / (4 * math.pi) - 1  # 0 for a disc
    border = 5 * (min(1.0, max(0.0, jaggedness) / 0.8) + min(1.0, values["tbp_lv_symm_2axis"] / 0.4))
    color = 5 * (min(1.0, values["tbp_lv_radial_color_std_max"] / 12)
                 + min(1.0, values["tbp_lv_color_std_mean"] / 12))
    nevus_logit = (3.0 - 0.3 * border - 0.3 * color - 0.25 * (values["clin_size_long_diam_mm"] - 4)
                   + rng.normal(0, 0.7))
    values.update({"tbp_lv_norm_border": border, "tbp_lv_norm_color": color,
                   "tbp_lv_nevi_confidence": 100 / (1 + math.exp(-nevus_logit))})
    return {name: round(float(values[name]), 4) for name in columns}
