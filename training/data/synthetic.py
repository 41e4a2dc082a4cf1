"""Synthetic SLICE-3D-like (ISIC 2024) data: patients, lesion images and measurements.

The embedded default dataset of SLIMP (pre-training on a laptop CPU in minutes, and tests). It has the
ISIC 2024 column names and the Kaggle file layout, a real image-metadata correspondence and a
patient-level structure in which patient context carries signal.

Generative model
----------------
1. **Patient**: age, sex (about two thirds male, as in ISIC 2024), clinic (``attribution``), skin tone,
   hairiness, and two lesion **phenotypes**, the mean latent traits (`Traits`: long diameter, pigment
   density, redness, blue-grey patch, border irregularity, asymmetry, colour variegation, aspect ratio)
   of the patient's naevi and of their lentigines / seborrhoeic keratoses. Phenotypes vary a lot between
   patients. What dermatology knows about the patient level is built in (`lesion_counts`, `site_weights`):
   the number of naevi peaks in mid-life; lentigines and seborrhoeic keratoses, larger, lighter and more
   irregular than naevi, accumulate with age; lesions sit more on the trunk and back in men and on the
   legs in women; the melanoma risk rises with age. Counts are heavy-tailed (a few patients have hundreds).
2. **Lesion**: traits drawn close to its kind's phenotype. A lesion is malignant with probability
   ``malignant_rate``, rising with age. A malignant lesion is an **ugly duckling**: each trait is pushed
   away from the patient's naevus phenotype (larger, darker, redder or bluer, more irregular, asymmetric
   and variegated) by a step that is large next to the within-patient spread but small next to the
   between-patient spread. Its absolute traits thus overlap the benign population, while next to the
   same patient's other lesions it stands out, though less so in patients with many keratoses (the
   classic melanoma mimics).
3. **Image**: the lesion outline is an ellipse whose radius is modulated by random harmonics (orders 1-3:
   asymmetry, orders 4-16: jagged border) with a soft edge; inside, melanin-like pigment absorbs light
   (``skin * exp(-density * absorption)``) with a low-frequency texture and an optional blue-grey patch;
   skin of varied tone under a lighting gradient. Then hair (dark curves), blur, noise, JPEG. Field of
   view 15 mm, as ISIC 2024 crops, so ``image_size / 15`` pixels per mm.
4. **Measurements** (``clin_size_long_diam_mm`` and ``tbp_lv_*``) are computed from the rendered image
   before hair, blur and noise: the lesion mask (``alpha >= 0.5``) gives area, perimeter (Crofton
   estimate), Feret diameter, moments (eccentricity, minor axis) and mirror symmetry; CIELAB pixel colours
   inside the lesion and in a ring of skin around it give the colour columns.
5. **Missing values** like the real data: a few patients without age or sex, lesions without body site,
   and now and then a missing measurement.

Determinism: patient ``i`` draws from ``numpy.random.default_rng([seed, i, stream])``, so a dataset of
N patients is the prefix of one of N + 1 patients, and the same seed gives identical rows and JPEG bytes.

CLI::

    python -m training.data.synthetic kaggle --output-dir data/synthetic --patients 400 --seed 0
    python -m training.data.synthetic report --patients 400 --seed 0 --output report.md
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from modeling_slimp import schema_slimp as contract

FIELD_OF_VIEW_MM = 15.0

BODY_POSITION = ["tbp_lv_x", "tbp_lv_y", "tbp_lv_z"]
SYNTHETIC_LESION_NUMERICAL = list(contract.ISIC2024_LESION_NUMERICAL)  # the generator fills every release column
MEASURED_COLUMNS = [c for c in SYNTHETIC_LESION_NUMERICAL if c not in BODY_POSITION]  # computed from the image
TBP_MEASUREMENTS = [c for c in MEASURED_COLUMNS if c.startswith("tbp_lv_")]
SYNTHETIC_LESION_CATEGORICAL = list(contract.ISIC2024_LESION_CATEGORICAL)
SYNTHETIC_PATIENT_NUMERICAL = list(contract.ISIC2024_PATIENT_NUMERICAL)
SYNTHETIC_PATIENT_CATEGORICAL = list(contract.ISIC2024_PATIENT_CATEGORICAL)

# The release columns this generator does not fill (finer diagnoses, the mitotic index, the DNN confidence).
NOT_GENERATED = ("iddx_2", "iddx_3", "iddx_4", "iddx_5", "mel_mitotic_index", "tbp_lv_dnn_lesion_confidence")
# Column order of the Kaggle ISIC 2024 train-metadata.csv (the columns this generator fills).
CSV_COLUMNS = [column for column in contract.ISIC2024_CSV_COLUMNS if column not in NOT_GENERATED]

SITES = list(contract.ISIC2024_LESION_CATEGORICAL["anatom_site_general"])
# Body-site shares (SITES order): naevi in men favour the trunk and back, in women the legs; keratoses
# favour the trunk and the sun-exposed head and neck.
NEVUS_SITE_WEIGHTS = {"male": [0.08, 0.14, 0.14, 0.26, 0.38], "female": [0.08, 0.16, 0.38, 0.18, 0.20]}
KERATOSIS_SITE_WEIGHTS = {"male": [0.22, 0.12, 0.08, 0.24, 0.34], "female": [0.22, 0.14, 0.20, 0.22, 0.22]}
SITE_HAIR = {"head/neck": 1.5, "upper extremity": 1.2, "lower extremity": 1.2, "anterior torso": 0.7,
             "posterior torso": 0.5}
CLINICS = ["Northbridge Dermatology Clinic", "Harbor Skin Cancer Centre", "Lakeside University Hospital",
           "Alpine Dermatology Group", "Coastal Skin Imaging Unit", "Riverside Melanoma Institute"]
CLINIC_WEIGHTS = [0.28, 0.22, 0.18, 0.14, 0.10, 0.08]
MALIGNANT_DIAGNOSES = [
    "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive",
    "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma in situ",
    "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma",
    "Malignant::Malignant epidermal proliferations::Squamous cell carcinoma in situ",
]

# Per-channel (R, G, B) optical absorption of the pigments, and the colours of skin and hair (sRGB in [0, 1]).
BROWN = np.array([0.55, 0.85, 1.15])       # epidermal melanin absorbs short wavelengths most
RED = np.array([0.15, 0.95, 0.75])         # haemoglobin-like: absorbs green
BLUE_GREY = np.array([0.95, 0.80, 0.62])   # deep melanin (Tyndall effect) looks blue-grey
LIGHT_SKIN = np.array([0.94, 0.80, 0.71])
DARK_SKIN = np.array([0.42, 0.28, 0.20])
HAIR_COLOUR = np.array([0.12, 0.09, 0.07])
NUM_HARMONICS = 16


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


@dataclasses.dataclass(frozen=True)
class Patient:
    """Patient-level draws; naevi are drawn from ``phenotype``, keratoses from ``keratosis_phenotype``."""

    index: int
    patient_id: str
    age: float           # true age (drives the lesion counts and the malignancy risk)
    age_approx: float    # reported age: rounded to 5 years, NaN when missing
    sex: str | None      # None when missing
    attribution: str
    skin: np.ndarray     # (3,) sRGB skin colour
    hairiness: float     # mean number of hairs per image
    phenotype: Traits    # of the naevi (and the reference of the ugly-duckling step)
    keratosis_phenotype: Traits
    num_nevi: int
    num_keratoses: int
    true_sex: str        # the sex that drives the site distribution (reported or not)

    @property
    def num_lesions(self) -> int:
        return self.num_nevi + self.num_keratoses


def sample_phenotype(rng: np.random.Generator) -> Traits:
    """A patient's nevus phenotype; the spread here is the between-patient variation."""
    return Traits(
        log_diameter=rng.normal(math.log(3.4), 0.45),
        density=rng.lognormal(math.log(0.9), 0.4),
        redness=rng.beta(1.2, 4.0),
        blue_patch=rng.beta(0.8, 6.0),
        irregularity=rng.lognormal(math.log(0.02), 0.8),
        asymmetry=rng.lognormal(math.log(0.05), 0.75),
        variegation=rng.lognormal(math.log(0.12), 0.8),
        aspect=rng.uniform(0.5, 0.97),
    )


def keratosis_phenotype(rng: np.random.Generator, nevus: Traits) -> Traits:
    """A patient's lentigo / seborrhoeic-keratosis phenotype: larger, lighter, more irregular and variegated
    than the same patient's naevi, with between-patient variation of its own."""
    return Traits(
        log_diameter=nevus.log_diameter + rng.normal(0.45, 0.15),
        density=nevus.density * 0.55 * rng.lognormal(0.0, 0.2),
        redness=min(nevus.redness + 0.05, 0.9),
        blue_patch=nevus.blue_patch * 0.5,
        irregularity=nevus.irregularity * 2.2 * rng.lognormal(0.0, 0.3),
        asymmetry=nevus.asymmetry * 1.3,
        variegation=nevus.variegation * 1.4 * rng.lognormal(0.0, 0.3),
        aspect=max(0.45, nevus.aspect - 0.08),
    )


def lesion_counts(rng: np.random.Generator, age: float) -> tuple[int, int]:
    """(naevi, keratoses) of a patient of `age`: the mean naevus count peaks around 40 and falls after,
    the mean keratosis count grows from about 25 on; both heavy-tailed (lognormal, sd 0.8 of the log)."""
    nevus_mean = 12.0 * (0.3 + 0.7 * math.exp(-(((age - 40.0) / 22.0) ** 2)))
    keratosis_mean = 10.0 * max(0.0, (age - 25.0) / 50.0) ** 2
    sigma = 0.8
    nevi = int(np.round(rng.lognormal(math.log(nevus_mean) - sigma**2 / 2, sigma)))
    keratoses = int(np.round(rng.lognormal(math.log(max(keratosis_mean, 1e-3)) - sigma**2 / 2, sigma)))
    nevi, keratoses = min(nevi, 300), min(keratoses, 200)
    return (max(nevi, 1), keratoses) if nevi + keratoses == 0 else (nevi, keratoses)


# Within-patient spread of each trait (sd of the additive or log-scale noise) and the mean ugly-duckling
# step of a malignant lesion (each trait's step is this times U(0.4, 1.6)). Tuned so that the step is
# large next to the within-patient spread and small next to the between-patient spread
# (`sample_phenotype`): see `signal_report`.
WITHIN_PATIENT_SPREAD = Traits(log_diameter=0.09, density=0.075, redness=0.03, blue_patch=0.0225,
                               irregularity=0.15, asymmetry=0.15, variegation=0.15, aspect=0.0375)
MALIGNANT_STEP = Traits(log_diameter=0.144, density=0.104, redness=0.048, blue_patch=0.072,
                        irregularity=0.24, asymmetry=0.24, variegation=0.24, aspect=-0.04)


def sample_lesion_traits(rng: np.random.Generator, phenotype: Traits, malignant: bool) -> Traits:
    """A lesion's traits: the phenotype plus within-patient noise, plus an ugly-duckling step if malignant.

    The same number of draws is made either way, so the random stream does not depend on the label.
    """
    z = (rng.normal(size=8) * dataclasses.astuple(WITHIN_PATIENT_SPREAD)).tolist()
    step = (rng.uniform(0.4, 1.6, size=8) * dataclasses.astuple(MALIGNANT_STEP) * float(malignant)).tolist()
    p = phenotype
    return Traits(
        log_diameter=min(max(p.log_diameter + z[0] + step[0], math.log(1.5)), math.log(13.0)),
        density=p.density * math.exp(z[1] + step[1]),
        redness=min(max(p.redness + z[2] + step[2], 0.0), 0.9),
        blue_patch=min(p.blue_patch + abs(z[3]) + step[3], 0.9),
        irregularity=p.irregularity * math.exp(z[4] + step[4]),
        asymmetry=p.asymmetry * math.exp(z[5] + step[5]),
        variegation=p.variegation * math.exp(z[6] + step[6]),
        aspect=min(max(p.aspect + z[7] + step[7], 0.4), 1.0),
    )


def _id_permutation(seed: int, salt: int):
    """A seed-dependent bijection of [0, 10**7): unique 7-digit ids from a running counter."""
    rng = np.random.default_rng([seed, salt])
    a = 10 * int(rng.integers(10**5, 10**6)) + int(rng.choice([1, 3, 7, 9]))  # coprime with 10**7
    b = int(rng.integers(0, 10**7))
    return lambda k: f"{(a * k + b) % 10**7:07d}"


def sample_patient(seed: int, index: int) -> Patient:
    """Patient ``index`` of the dataset of ``seed`` (independent of the other patients)."""
    rng = np.random.default_rng([seed, index, 0])
    age = float(np.clip(rng.normal(57.0, 14.0), 18.0, 85.0))
    sex = "male" if rng.random() < 0.66 else "female"
    num_nevi, num_keratoses = lesion_counts(rng, age)
    age_missing, sex_missing = rng.random(2) < [0.03, 0.02]
    attribution = str(rng.choice(CLINICS, p=CLINIC_WEIGHTS))
    hairiness = rng.lognormal(math.log(2.0 if sex == "male" else 0.6), 0.6)
    tone = rng.beta(1.6, 5.0)  # 0 = light, 1 = dark skin
    phenotype = sample_phenotype(rng)
    # Naevi involute with age: lighter and a little larger in older skin.
    phenotype = dataclasses.replace(phenotype, density=phenotype.density * math.exp(-0.012 * (age - 45.0)),
                                    log_diameter=phenotype.log_diameter + 0.004 * (age - 45.0))
    return Patient(
        index=index,
        patient_id="IP_" + _id_permutation(seed, 1)(index),
        age=age,
        age_approx=math.nan if age_missing else float(5 * round(age / 5)),
        sex=None if sex_missing else sex,
        attribution=attribution,
        skin=(1 - tone) * LIGHT_SKIN + tone * DARK_SKIN,
        hairiness=hairiness,
        phenotype=phenotype,
        keratosis_phenotype=keratosis_phenotype(rng, phenotype),
        num_nevi=num_nevi,
        num_keratoses=num_keratoses,
        true_sex=sex,
    )


def sample_site(rng: np.random.Generator, weights: list[float]) -> tuple[str, str, str, np.ndarray]:
    """A body site drawn with `weights` (SITES order): (anatom_site_general, tbp_lv_location,
    tbp_lv_location_simple, (3,) x/y/z in mm).

    Body frame: y = height above the floor, x > 0 on the patient's left, z > 0 anterior.
    """
    site = str(rng.choice(SITES, p=weights))
    side_sign = rng.choice([-1.0, 1.0])
    side = "Left" if side_sign > 0 else "Right"
    u = rng.uniform(size=3)
    if site == "head/neck":
        xyz, location, simple = [120 * u[0] - 60, 1450 + 270 * u[1], 170 * u[2] - 80], "Head & Neck", "Head & Neck"
    elif site == "upper extremity":
        y = 850 + 600 * u[1]
        xyz, simple = [side_sign * (180 + 150 * u[0]), y, 80 * u[2] - 40], f"{side} Arm"
        location = f"{simple} - {'Upper' if y > 1150 else 'Lower'}"
    elif site == "lower extremity":
        y = 50 + 800 * u[1]
        xyz, simple = [side_sign * (40 + 130 * u[0]), y, 100 * u[2] - 50], f"{side} Leg"
        location = f"{simple} - {'Upper' if y > 450 else 'Lower'}"
    elif site == "anterior torso":
        y = 850 + 600 * u[1]
        xyz, simple = [320 * u[0] - 160, y, 60 + 70 * u[2]], "Torso Front"
        location = f"Torso Front {'Top' if y > 1150 else 'Bottom'} Half"
    else:
        y = 850 + 600 * u[1]
        xyz, simple = [320 * u[0] - 160, y, -60 - 70 * u[2]], "Torso Back"
        location = f"Torso Back {'Top' if y > 1250 else 'Middle' if y > 1050 else 'Bottom'} Third"
    return site, location, simple, np.asarray(xyz, dtype=float)


@lru_cache(maxsize=8)
def _grid_mm(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm from the image centre: x (1, S) and y (S, 1), float32."""
    g = ((np.arange(image_size) + 0.5 - image_size / 2) * (FIELD_OF_VIEW_MM / image_size)).astype(np.float32)
    return g[None, :], g[:, None]


def render_lesion(traits: Traits, skin: np.ndarray, rng: np.random.Generator, image_size: int,
                  tile_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a lesion without artefacts.

    Returns ``clean`` (S, S, 3) sRGB in [0, 1], ``alpha`` (S, S) lesion coverage in [0, 1] and ``rel``
    (S, S), each pixel's radius relative to the lesion outline at its angle (< 1 inside; inf beyond 2.3).
    """
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
    theta = np.arctan2(yn, xn)
    rel = np.full((image_size, image_size), np.inf, dtype=f32)
    rel[rows, cols] = np.hypot(xn, yn) / outline[np.rint((theta + np.pi) * (180 / np.pi)).astype(np.intp)]
    edge = rng.uniform(0.15, 0.35) / semi_major  # soft edge width, in outline units
    alpha = np.clip((1 - rel) / edge + 0.5, 0.0, 1.0)                                    # (S, S)

    # Pigment: density with a blotchy texture (smooth value noise), darker centre, optional blue-grey patch.
    grid = rng.normal(size=(6, 6)).astype(f32)
    texture = np.asarray(Image.fromarray(grid, mode="F").resize((image_size,) * 2, Image.BICUBIC)) / 0.85
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
    return np.clip(clean, 0.0, 1.0), alpha, rel


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


def measure_lesion(clean: np.ndarray, alpha: np.ndarray, rel: np.ndarray, rng: np.random.Generator) -> dict:
    """The ISIC 2024 measurement columns (``MEASURED_COLUMNS``) of a rendered lesion.

    clean: (S, S, 3) sRGB in [0, 1]; alpha: (S, S) coverage; rel: (S, S) radius relative to the outline.
    The lesion is ``alpha >= 0.5``. Colour columns are CIELAB means (L, A, B), chroma C and hue angle H
    (degrees) inside the lesion and in a ring of skin around it (``*ext``); ``delta*`` = inside - outside;
    ``deltaLBnorm`` is the CIE76 colour difference. ``norm_border`` and ``norm_color`` (0-10) combine the
    jaggedness with the asymmetry, and the radial with the overall colour spread. ``rng`` only adds the
    noise of the nevus-confidence "classifier", a function of the other measurements.
    """
    px_per_mm = clean.shape[0] / FIELD_OF_VIEW_MM
    mask = alpha >= min(0.5, alpha.max())  # never empty
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
    return {name: round(float(values[name]), 4) for name in MEASURED_COLUMNS}


def _lesion_records(patient: Patient, seed: int, image_size: int, malignant_rate: float,
                    first_lesion: int, isic_ids, lesion_ids) -> Iterator[dict]:
    """The records of one patient's lesions; lesion ``j`` gets the global counter ``first_lesion + j``."""
    rng = np.random.default_rng([seed, patient.index, 1])          # latent traits, site, labels
    render_rng = np.random.default_rng([seed, patient.index, 2])   # pixels (depends on image_size)
    p_malignant = min(1.0, malignant_rate * math.exp(0.03 * (patient.age - 57.0)))  # doubles every ~23 years
    kinds = np.array([False] * patient.num_nevi + [True] * patient.num_keratoses)[rng.permutation(patient.num_lesions)]
    for j, keratosis in enumerate(kinds.tolist()):
        malignant = bool(rng.random() < p_malignant)
        # A malignant lesion is an ugly duckling next to the patient's naevi, whatever the slot it took.
        phenotype = patient.keratosis_phenotype if keratosis and not malignant else patient.phenotype
        traits = sample_lesion_traits(rng, phenotype, malignant)
        weights = (KERATOSIS_SITE_WEIGHTS if keratosis else NEVUS_SITE_WEIGHTS)[patient.true_sex]
        site, location, location_simple, xyz = sample_site(rng, weights)
        site_missing, benign_with_id, measurement_missing = rng.random(3) < [0.015, 0.03, 0.01]
        tile_type = "3D: XP" if rng.random() < 0.6 else "3D: white"
        missing_column = MEASURED_COLUMNS[int(rng.integers(len(MEASURED_COLUMNS)))]
        diagnosis, thickness = int(rng.integers(len(MALIGNANT_DIAGNOSES))), rng.lognormal(np.log(0.6), 0.6)

        clean, alpha, rel = render_lesion(traits, patient.skin, render_rng, image_size, tile_type)
        image = add_artefacts(clean, render_rng, patient.hairiness * SITE_HAIR[site])
        measurements = measure_lesion(clean, alpha, rel, render_rng)
        if measurement_missing:
            measurements[missing_column] = math.nan
        counter = first_lesion + j
        record = {
            "isic_id": "ISIC_" + isic_ids(counter), "target": int(malignant), "patient_id": patient.patient_id,
            "age_approx": patient.age_approx, "sex": patient.sex,
            "anatom_site_general": None if site_missing else site,
            "image_type": "TBP tile: close-up", "tbp_tile_type": tile_type,
            "tbp_lv_location": "Unknown" if site_missing else location,
            "tbp_lv_location_simple": "Unknown" if site_missing else location_simple,
            "tbp_lv_x": round(xyz[0], 3), "tbp_lv_y": round(xyz[1], 3), "tbp_lv_z": round(xyz[2], 3),
            "attribution": patient.attribution, "copyright_license": "CC-BY-NC",
            "lesion_id": "IL_" + lesion_ids(counter) if malignant or benign_with_id else None,
            "iddx_full": MALIGNANT_DIAGNOSES[diagnosis] if malignant else "Benign",
            "iddx_1": "Malignant" if malignant else "Benign",
            "mel_thick_mm": round(thickness, 2) if malignant and diagnosis == 0 else math.nan,
            **measurements,
        }
        yield {**{name: record[name] for name in CSV_COLUMNS}, "image_bytes": encode_jpeg(image)}


def generate_records(num_patients: int, seed: int = 0, image_size: int = 128,
                     malignant_rate: float = 0.025) -> Iterator[dict]:
    """Yield one dict per lesion, patient after patient.

    Keys: ``CSV_COLUMNS`` (ISIC 2024 names; numbers as float with NaN for missing, except the int
    ``target``; categories as str or None) plus ``"image_bytes"`` (JPEG of ``image_size`` px square).
    """
    if num_patients < 0:
        raise ValueError(f"num_patients must be >= 0, got {num_patients}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not 0.0 <= malignant_rate <= 1.0:
        raise ValueError(f"malignant_rate must be in [0, 1], got {malignant_rate}")
    isic_ids, lesion_ids = _id_permutation(seed, 2), _id_permutation(seed, 3)
    first_lesion = 0
    for index in range(num_patients):
        patient = sample_patient(seed, index)
        yield from _lesion_records(patient, seed, image_size, malignant_rate, first_lesion, isic_ids, lesion_ids)
        first_lesion += patient.num_lesions


def write_kaggle_layout(output_dir, num_patients: int, seed: int = 0, image_size: int = 128, **kwargs) -> dict:
    """Write ``train-metadata.csv`` and ``train-image.hdf5`` as in the Kaggle ISIC 2024 download.

    Rows are streamed to disk as they are generated. The HDF5 file holds one scalar dataset of JPEG bytes
    per ``isic_id`` (read back with ``bytes(f[isic_id][()])``). ``kwargs`` go to `generate_records`.
    Returns counts of patients, lesions and malignant lesions, and the two paths.
    """
    import h5py

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, hdf5_path = output_dir / "train-metadata.csv", output_dir / "train-image.hdf5"
    counts = {"patients": num_patients, "lesions": 0, "malignant": 0}
    with open(csv_path, "w", newline="") as csv_file, h5py.File(hdf5_path, "w") as images:
        writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in generate_records(num_patients, seed=seed, image_size=image_size, **kwargs):
            images.create_dataset(record["isic_id"], data=np.void(record["image_bytes"]))
            writer.writerow({name: _csv_value(record[name]) for name in CSV_COLUMNS})
            counts["lesions"] += 1
            counts["malignant"] += record["target"]
    return {**counts, "metadata_csv": str(csv_path), "image_hdf5": str(hdf5_path)}


def _csv_value(value):
    """Missing values (None, NaN) as empty fields, which pandas reads back as NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def image_features(image_bytes: bytes) -> np.ndarray:
    """A cheap image-only descriptor, shape (80,): a 4x4x4 RGB histogram and 16 grey-level quantiles."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize((16, 16), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255                    # (256, 3)
    histogram = np.histogramdd(pixels, bins=4, range=[(0, 1)] * 3)[0].ravel() / len(pixels)
    return np.concatenate([histogram, np.sort(pixels.mean(1))[8::16]])


def within_patient_zscores(frame, columns: list[str], patient_column: str = "patient_id"):
    """Each value against the patient's OTHER lesions: (x - their mean) / pooled within-patient std.

    frame: pandas DataFrame, one row per lesion. Missing values are filled with the column median first;
    patients with a single lesion get 0. Returns a DataFrame of the same index and ``columns``.
    """
    values = frame[columns].astype(float)
    values = values.fillna(values.median())
    groups = values.groupby(frame[patient_column])
    count = groups.transform("count")
    leave_one_out_mean = (groups.transform("sum") - values) / (count - 1).where(count > 1)
    pooled_std = (values - groups.transform("mean"))[count > 1].std().replace(0.0, 1.0)
    return ((values - leave_one_out_mean) / pooled_std).fillna(0.0)


def _probe_auroc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int, n_splits: int):
    """Logistic-regression AUROC over patient-disjoint 70/30 splits: (mean, std)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for train, test in GroupShuffleSplit(n_splits, test_size=0.3, random_state=seed).split(features, labels, groups):
        if labels[train].min() == labels[train].max() or labels[test].min() == labels[test].max():
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        probe.fit(features[train], labels[train])
        scores.append(roc_auc_score(labels[test], probe.predict_proba(features[test])[:, 1]))
    return (float(np.mean(scores)), float(np.std(scores))) if scores else (math.nan, math.nan)


def signal_report(num_patients: int, seed: int = 0, image_size: int = 128, malignant_rate: float = 0.025,
                  n_splits: int = 5) -> dict:
    """How much malignancy signal each view of a generated dataset carries (linear-probe AUROC).

    Views: (a) absolute lesion measurements + age, (b) the same relative to the patient's other lesions
    (`within_patient_zscores`, signed and absolute), (c) both, (d) image-only colour histogram.
    """
    import pandas as pd

    start = time.perf_counter()
    rows, pixels = [], []
    for record in generate_records(num_patients, seed=seed, image_size=image_size, malignant_rate=malignant_rate):
        pixels.append(image_features(record.pop("image_bytes")))
        rows.append(record)
    seconds = time.perf_counter() - start
    frame = pd.DataFrame(rows)
    columns = MEASURED_COLUMNS
    absolute = frame[columns + ["age_approx"]].astype(float)
    absolute = absolute.fillna(absolute.median()).to_numpy()
    z = within_patient_zscores(frame, columns).to_numpy()
    relative = np.concatenate([z, np.abs(z)], 1)
    views = {"(a) absolute lesion measurements + age": absolute,
             "(b) relative to the patient's other lesions": relative,
             "(c) absolute + relative": np.concatenate([absolute, relative], 1),
             "(d) image only (colour histogram)": np.stack(pixels)}
    labels, groups = frame["target"].to_numpy(), frame["patient_id"].to_numpy()
    results = []
    for name, features in views.items():
        mean, std = _probe_auroc(features, labels, groups, seed, n_splits)
        results.append({"view": name, "auroc_mean": round(mean, 3), "auroc_std": round(std, 3)})
    return {"patients": num_patients, "lesions": len(frame), "malignant": int(labels.sum()),
            "seed": seed, "image_size": image_size, "malignant_rate": malignant_rate, "splits": n_splits,
            "generation_seconds": round(seconds, 1), "results": results,
            "patient_level": patient_level_signal(frame, seed, n_splits)}


def patient_level_signal(frame, seed: int = 0, n_splits: int = 5) -> dict:
    """How well a patient's age and sex are predicted from that patient's lesions (what the outer loss can
    align): per patient, the mean of each lesion measurement, the share of lesions at each body site, the
    mean body position and the log lesion count; ridge regression for age (R² on held-out patients) and
    logistic regression for sex (AUROC), 5-fold cross-validation over patients."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import r2_score, roc_auc_score
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values = frame[MEASURED_COLUMNS + BODY_POSITION].astype(float)
    values = values.fillna(values.median())
    sites = frame["anatom_site_general"].fillna("missing")
    per_patient = values.groupby(frame["patient_id"]).mean()
    per_patient = per_patient.join(pd_crosstab_shares(frame["patient_id"], sites))
    per_patient["log_lesions"] = np.log(frame.groupby("patient_id").size())
    info = frame.groupby("patient_id")[["age_approx", "sex"]].first().loc[per_patient.index]
    x = per_patient.to_numpy()
    folds = list(KFold(n_splits, shuffle=True, random_state=seed).split(x))
    age_known = info["age_approx"].notna().to_numpy()
    age = info["age_approx"].to_numpy(dtype=float)
    predicted = np.full(len(x), np.nan)
    for train, test in folds:
        train, test = train[age_known[train]], test[age_known[test]]
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 3, 12))).fit(x[train], age[train])
        predicted[test] = model.predict(x[test])
    sex_known = info["sex"].notna().to_numpy()
    male = (info["sex"] == "male").to_numpy(dtype=int)
    score = np.full(len(x), np.nan)
    for train, test in folds:
        train, test = train[sex_known[train]], test[sex_known[test]]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000)).fit(x[train], male[train])
        score[test] = model.predict_proba(x[test])[:, 1]
    return {"patients": len(x), "age_r2": round(float(r2_score(age[age_known], predicted[age_known])), 3),
            "sex_auroc": round(float(roc_auc_score(male[sex_known], score[sex_known])), 3)}


def pd_crosstab_shares(patients, categories):
    """(patients x categories) share of each patient's lesions in each category."""
    import pandas as pd

    return pd.crosstab(patients, categories, normalize="index").add_prefix("site_share_")


def report_markdown(report: dict) -> str:
    """A `signal_report` as a Markdown table."""
    lines = [f"{report['patients']} patients, {report['lesions']} lesions, {report['malignant']} malignant "
             f"(seed {report['seed']}, {report['image_size']} px); logistic regression, "
             f"{report['splits']} patient-disjoint 70/30 splits.", "",
             "| features | AUROC (mean ± std) |", "|---|---|"]
    lines += [f"| {r['view']} | {r['auroc_mean']:.3f} ± {r['auroc_std']:.3f} |" for r in report["results"]]
    level = report.get("patient_level")
    if level:
        lines += ["", f"Patient level ({level['patients']} patients, 5-fold cross-validation): age predicted from the "
                      f"patient's lesions R² = {level['age_r2']:.3f}; sex AUROC = {level['sex_auroc']:.3f}."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m training.data.synthetic {kaggle,report}` command line."""
    parser = argparse.ArgumentParser(prog="python -m training.data.synthetic", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {"kaggle": "write a synthetic dataset in the ISIC 2024 Kaggle layout (CSV + HDF5 of JPEG bytes)",
             "report": "print the signal table: how much each input tells about the label and the patient"}
    for name in ("kaggle", "report"):
        command = commands.add_parser(name, help=helps[name], description=helps[name])
        command.add_argument("--patients", type=int, default=400, help="number of patients to generate")
        command.add_argument("--seed", type=int, default=0, help="generator seed (same seed: same bytes)")
        command.add_argument("--image-size", type=int, default=128, help="side of the square JPEG crops, pixels")
        command.add_argument("--malignant-rate", type=float, default=0.025,
                             help="expected share of malignant lesions (ISIC 2024 has about 0.1%%)")
        if name == "kaggle":
            command.add_argument("--output-dir", required=True,
                                 help="folder for train-metadata.csv and train-image.hdf5")
        else:
            command.add_argument("--output", help="also write the Markdown table and JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "kaggle":
        start = time.perf_counter()
        counts = write_kaggle_layout(args.output_dir, args.patients, seed=args.seed, image_size=args.image_size,
                                     malignant_rate=args.malignant_rate)
        print(json.dumps({**counts, "seconds": round(time.perf_counter() - start, 1)}, indent=2))
        return
    report = signal_report(args.patients, seed=args.seed, image_size=args.image_size,
                           malignant_rate=args.malignant_rate)
    command_line = " ".join(["python -m training.data.synthetic"] + (sys.argv[1:] if argv is None else argv))
    text = (f"Command: `{command_line}`\n\n"
            f"{report_markdown(report)}\n\n```json\n{json.dumps(report, indent=2)}\n```\n")
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
