"""Synthetic SLICE-3D (ISIC 2024) data, calibrated to what is published about the real one.

The embedded default dataset of SLIMP (pre-training on a laptop CPU in minutes, the tests, the quality
benchmark). It has the ISIC 2024 column names and the Kaggle file layout, a real image-metadata
correspondence (every measurement is computed from the rendered lesion), a patient-level structure in which
patient context carries signal, and dermoscopic structures that only the image shows.

Calibration
-----------
Every constant of the malignant lesions is set by a published fact about the ISIC 2024 train set
(401,059 crops of 1,042 patients, 393 malignant), whatever that does to any method; `training/data/calibration.py`
(``python -m training.data.synthetic report``) measures each fact on a generated dataset beside the real value:

- 24.9% of patients have at least one malignant lesion (259 of 1,042), 1.52 on average (393 / 259);
- malignant lesions are about twice as large as benign ones (median long diameter), darker and redder (the
  hue ``tbp_lv_H`` alone gives a univariate AUROC of about 0.81), more irregular and variegated;
- the malignant rate on the head and neck, a site holding ~5-10% of the lesions, is about 7x the rate
  elsewhere;
- 45.7% of cancers are among the largest 10% of their own patient's lesions;
- patient-relative deviations carry most (~65%) of a gradient-boosted model's gain, and a lesion's image
  carries signal beyond the measurements (out-of-fold pAUC above 80% TPR: tabular GBDT 0.169, an
  ImageNet-pretrained image model alone 0.158, a stack of both 0.174).

Two compromises, stated: a patient has a median of ``LESIONS_PER_PATIENT_MEDIAN`` = 40 lesions (real: 241),
so that a dataset with hundreds of patients fits a CPU; with the same share of positive patients and
malignant lesions per positive patient, the prevalence is therefore ~0.8%, not the real 0.098%.

Generative model
----------------
1. **Patient**: age, sex (about two thirds male, as in ISIC 2024), clinic (``attribution``), skin tone,
   hairiness, and two lesion **phenotypes**, the mean latent traits (`Traits`) of the patient's naevi and of
   their lentigines / seborrhoeic keratoses. Phenotypes vary a lot between patients. The number of naevi
   peaks in mid-life; keratoses, larger, lighter and more irregular than naevi, accumulate with age; lesions
   sit more on the trunk and back in men and on the legs in women; counts are heavy-tailed. Whether the
   patient has cancers, and how many, is drawn at the patient level (risk rising with age).
2. **Lesion**: benign traits are drawn close to its kind's phenotype. A malignant lesion (melanoma, basal or
   squamous cell carcinoma) is an **ugly duckling**: its traits step away from the patient's naevus
   phenotype (larger, darker, redder, more irregular, asymmetric and variegated; carcinomas redder and less
   pigmented than melanomas) by a severity that varies from lesion to lesion; some cancers look nearly
   benign. Its body site favours the head and neck.
3. **Image** (`training/data/synthetic_render.py`): the lesion body rendered on skin; the measurements
   (``clin_size_long_diam_mm``, ``tbp_lv_*``) computed from it; then the dermoscopic structures (dots and
   globules, blue-white veil, regression, atypical streaks, arborizing vessels), each in a share of the
   cancers and rarely in benign lesions, which the measurements do not see; then hair, blur, noise, JPEG.
4. **Missing values** like the real data: a few patients without age or sex, lesions without body site,
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
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from modeling_slimp import schema_slimp as contract

from .synthetic_render import (
    CUES,
    DARK_SKIN,
    LIGHT_SKIN,
    Traits,
    add_artefacts,
    draw_cues,
    encode_jpeg,
    measure_lesion,
    render_lesion,
)

BODY_POSITION = ["tbp_lv_x", "tbp_lv_y", "tbp_lv_z"]
SYNTHETIC_LESION_NUMERICAL = list(contract.ISIC2024_LESION_NUMERICAL)  # the generator fills every release column
MEASURED_COLUMNS = [c for c in SYNTHETIC_LESION_NUMERICAL if c not in BODY_POSITION]  # computed from the image
SYNTHETIC_LESION_CATEGORICAL = list(contract.ISIC2024_LESION_CATEGORICAL)
SYNTHETIC_PATIENT_NUMERICAL = list(contract.ISIC2024_PATIENT_NUMERICAL)
SYNTHETIC_PATIENT_CATEGORICAL = list(contract.ISIC2024_PATIENT_CATEGORICAL)

# The release columns this generator does not fill (finer diagnoses, the mitotic index, the DNN confidence).
NOT_GENERATED = ("iddx_2", "iddx_3", "iddx_4", "iddx_5", "mel_mitotic_index", "tbp_lv_dnn_lesion_confidence")
# Column order of the Kaggle ISIC 2024 train-metadata.csv (the columns this generator fills).
CSV_COLUMNS = [column for column in contract.ISIC2024_CSV_COLUMNS if column not in NOT_GENERATED]

# ----- published facts about the real SLICE-3D, and the two stated compromises -----
MALIGNANT_PATIENT_SHARE = 259 / 1042            # patients with at least one malignant lesion (24.9%)
MALIGNANT_PER_POSITIVE_PATIENT = 393 / 259      # malignant lesions of such a patient, on average (1.52)
HEAD_NECK_RELATIVE_RISK = 7.0                   # malignant rate on the head and neck / elsewhere
LESIONS_PER_PATIENT_MEDIAN = 40                 # real: 241 (a CPU-sized compromise)

SITES = list(contract.ISIC2024_LESION_CATEGORICAL["anatom_site_general"])
# Body-site shares (SITES order) of benign lesions: naevi in men favour the trunk and back, in women the legs;
# keratoses favour the trunk and the sun-exposed head and neck. The head and neck hold ~7% of all lesions.
NEVUS_SITE_WEIGHTS = {"male": [0.04, 0.15, 0.15, 0.27, 0.39], "female": [0.04, 0.17, 0.39, 0.19, 0.21]}
KERATOSIS_SITE_WEIGHTS = {"male": [0.14, 0.14, 0.09, 0.26, 0.37], "female": [0.14, 0.16, 0.22, 0.24, 0.24]}
SITE_HAIR = {"head/neck": 1.5, "upper extremity": 1.2, "lower extremity": 1.2, "anterior torso": 0.7,
             "posterior torso": 0.5}
CLINICS = ["Northbridge Dermatology Clinic", "Harbor Skin Cancer Centre", "Lakeside University Hospital",
           "Alpine Dermatology Group", "Coastal Skin Imaging Unit", "Riverside Melanoma Institute",
           "Eastgate Skin Research Unit"]
CLINIC_WEIGHTS = [0.26, 0.20, 0.17, 0.13, 0.10, 0.08, 0.06]


@dataclasses.dataclass(frozen=True)
class Malignancy:
    """A kind of skin cancer: its ISIC diagnosis path, its share of the cancers, how its traits step away
    from the patient's naevi (multipliers of `MALIGNANT_STEP` for density, redness and the blue-grey patch),
    how much of its colour is its own (``own_colour``: the weight of `CARCINOMA_COLOUR` against the
    patient's naevus colour; a carcinoma is not a naevus, so its colour owes little to the patient's naevi)
    and how often each dermoscopic structure shows (`CUE_RATES` column)."""

    diagnosis: str
    share: float
    density: float
    redness: float
    blue_patch: float
    own_colour: float
    cue_group: str


# Melanomas are dark, variegated, with blue-grey areas; basal and squamous cell carcinomas are pink-red and
# lightly pigmented. Shares: approximate split of the ISIC 2024 cancers between melanoma and carcinomas.
MALIGNANCIES = (
    Malignancy("Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive", 0.15, 1.3, 1.0, 1.5, 0.0, "melanoma"),
    Malignancy("Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma in situ", 0.20, 1.0, 1.0, 1.2, 0.0, "melanoma"),
    Malignancy("Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma", 0.45, 0.0, 1.0, 0.3, 0.6, "carcinoma"),
    Malignancy("Malignant::Malignant epidermal proliferations::Squamous cell carcinoma in situ", 0.20, 0.0, 1.0, 0.2, 0.6, "carcinoma"),
)
# The colour of a carcinoma's own (pink-red, lightly pigmented): density and redness, each with a lesion-level sd.
CARCINOMA_COLOUR = {"density": (0.45, 0.25), "redness": (0.45, 0.08)}
# Share of lesions showing each dermoscopic structure (synthetic_render.CUES), by group. Dermoscopy studies
# report irregular dots/globules, blue-white veil, regression and atypical streaks each in a third to a half
# of melanomas and in a few percent of naevi, and arborizing vessels in most basal cell carcinomas.
CUE_RATES = {
    "benign":    {"globules": 0.04, "veil": 0.01, "regression": 0.02, "streaks": 0.02, "vessels": 0.01},
    "melanoma":  {"globules": 0.45, "veil": 0.35, "regression": 0.35, "streaks": 0.30, "vessels": 0.05},
    "carcinoma": {"globules": 0.05, "veil": 0.15, "regression": 0.20, "streaks": 0.02, "vessels": 0.55},
}


@dataclasses.dataclass(frozen=True)
class Patient:
    """Patient-level draws; naevi are drawn from ``phenotype``, keratoses from ``keratosis_phenotype``."""

    index: int
    patient_id: str
    age: float           # true age (drives the lesion counts and the cancer risk)
    age_approx: float    # reported age: rounded to 5 years, NaN when missing
    sex: str | None      # None when missing
    attribution: str
    skin: np.ndarray     # (3,) sRGB skin colour
    hairiness: float     # mean number of hairs per image
    phenotype: Traits    # of the naevi (and the reference of the ugly-duckling step)
    keratosis_phenotype: Traits
    num_nevi: int
    num_keratoses: int
    num_malignant: int   # cancers among the patient's lesions (0 for three patients in four)
    true_sex: str        # the sex that drives the site distribution (reported or not)

    @property
    def num_lesions(self) -> int:
        return self.num_nevi + self.num_keratoses


# Between-patient sd of the log naevus size (the patient's typical naevus; within-patient spread below).
PHENOTYPE_LOG_DIAMETER_SD = 0.25


def sample_phenotype(rng: np.random.Generator) -> Traits:
    """A patient's nevus phenotype; the spread here is the between-patient variation."""
    return Traits(
        log_diameter=rng.normal(math.log(3.0), PHENOTYPE_LOG_DIAMETER_SD),
        density=rng.lognormal(math.log(0.9), 0.4),
        redness=rng.beta(2.0, 8.0),
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
        log_diameter=nevus.log_diameter + rng.normal(0.35, 0.15),
        density=nevus.density * 0.55 * rng.lognormal(0.0, 0.2),
        redness=min(nevus.redness + 0.05, 0.9),
        blue_patch=nevus.blue_patch * 0.5,
        irregularity=nevus.irregularity * 2.2 * rng.lognormal(0.0, 0.3),
        asymmetry=nevus.asymmetry * 1.3,
        variegation=nevus.variegation * 1.4 * rng.lognormal(0.0, 0.3),
        aspect=max(0.45, nevus.aspect - 0.08),
    )


# Mean counts at the peak, scaled so that the median patient has LESIONS_PER_PATIENT_MEDIAN lesions.
NEVUS_COUNT_PEAK, KERATOSIS_COUNT_AT_75 = 52.0, 43.0
COUNT_SIGMA = 0.8  # sd of the log count: a few patients have hundreds of lesions
MAX_LESIONS = 800


def lesion_counts(rng: np.random.Generator, age: float, median: float = LESIONS_PER_PATIENT_MEDIAN) -> tuple[int, int]:
    """(naevi, keratoses) of a patient of `age`: the mean naevus count peaks around 40 and falls after,
    the mean keratosis count grows from about 25 on; both heavy-tailed (lognormal). ``median`` scales both
    (the median patient's total)."""
    scale = median / LESIONS_PER_PATIENT_MEDIAN
    nevus_mean = scale * NEVUS_COUNT_PEAK * (0.3 + 0.7 * math.exp(-(((age - 40.0) / 22.0) ** 2)))
    keratosis_mean = scale * KERATOSIS_COUNT_AT_75 * max(0.0, (age - 25.0) / 50.0) ** 2
    nevi = int(np.round(rng.lognormal(math.log(nevus_mean) - COUNT_SIGMA**2 / 2, COUNT_SIGMA)))
    keratoses = int(np.round(rng.lognormal(math.log(max(keratosis_mean, 1e-3)) - COUNT_SIGMA**2 / 2, COUNT_SIGMA)))
    nevi, keratoses = min(nevi, MAX_LESIONS // 2), min(keratoses, MAX_LESIONS // 2)
    return (max(nevi, 1), keratoses) if nevi + keratoses == 0 else (nevi, keratoses)


# P(patient has a cancer) = sigmoid(MALIGNANT_PATIENT_LOGIT + MALIGNANT_AGE_SLOPE * (age - 57)): odds x1.4
# per decade; the intercept puts the share of such patients at MALIGNANT_PATIENT_SHARE over the age
# distribution of `sample_patient` (solved by `malignant_patient_logit`).
MALIGNANT_AGE_SLOPE = 0.035


def malignant_patient_logit(share: float) -> float:
    """The intercept that makes `share` of the patients (ages as `sample_patient` draws them) positive."""
    ages = np.clip(np.random.default_rng(12345).normal(57.0, 14.0, 20000), 18.0, 85.0)
    low, high = -12.0, 12.0
    for _ in range(60):  # bisection: the share rises with the intercept
        middle = (low + high) / 2
        mean = np.mean(1 / (1 + np.exp(-(middle + MALIGNANT_AGE_SLOPE * (ages - 57.0)))))
        low, high = (middle, high) if mean < share else (low, middle)
    return (low + high) / 2


# Within-patient spread of each benign trait (sd of the additive or log-scale noise) and the step of a
# malignant lesion of severity 1 (each trait's step is this times U(0.6, 1.4)); sizes vary a lot within a
# patient, so only ~46% of cancers are among the patient's largest 10% although they are ~2x the benign size.
WITHIN_PATIENT_SPREAD = Traits(log_diameter=0.47, density=0.12, redness=0.04, blue_patch=0.03,
                               irregularity=0.3, asymmetry=0.3, variegation=0.3, aspect=0.06)
MALIGNANT_STEP = Traits(log_diameter=0.82, density=0.35, redness=0.12, blue_patch=0.12,
                        irregularity=0.9, asymmetry=0.7, variegation=0.9, aspect=-0.1)
SUBTLE_CANCER_SHARE = 0.10  # cancers of low severity U(0, 0.3): they look nearly benign
SEVERITY_SIGMA = 0.3        # the other cancers: severity lognormal around 1


def sample_lesion_traits(rng: np.random.Generator, phenotype: Traits, malignancy: Malignancy | None) -> Traits:
    """A lesion's traits: the phenotype plus within-patient noise, plus an ugly-duckling step if malignant.

    The same number of draws is made either way, so the random stream does not depend on the label.
    """
    z = (rng.normal(size=8) * dataclasses.astuple(WITHIN_PATIENT_SPREAD)).tolist()
    subtle, low, typical = rng.random() < SUBTLE_CANCER_SHARE, rng.uniform(0.0, 0.3), rng.lognormal(0.0, SEVERITY_SIGMA)
    jitter = rng.uniform(0.6, 1.4, size=8)
    severity = 0.0 if malignancy is None else (low if subtle else typical)
    kind = (1.0, 1.0, 1.0) if malignancy is None else (malignancy.density, malignancy.redness, malignancy.blue_patch)
    step = (severity * jitter * dataclasses.astuple(MALIGNANT_STEP) * np.array([1, kind[0], kind[1], kind[2], 1, 1, 1, 1])).tolist()
    own = rng.normal(size=2) * [CARCINOMA_COLOUR["density"][1], CARCINOMA_COLOUR["redness"][1]]
    w = 0.0 if malignancy is None else malignancy.own_colour
    p = phenotype
    log_density = (1 - w) * (math.log(p.density) + z[1] + step[1]) + w * (math.log(CARCINOMA_COLOUR["density"][0]) + own[0])
    redness = (1 - w) * (p.redness + z[2] + step[2]) + w * (CARCINOMA_COLOUR["redness"][0] + own[1])
    return Traits(
        log_diameter=min(max(p.log_diameter + z[0] + step[0], math.log(1.2)), math.log(13.0)),
        density=math.exp(log_density),
        redness=min(max(redness, 0.0), 0.9),
        blue_patch=min(max(p.blue_patch + abs(z[3]) + step[3], 0.0), 0.9),
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


def sample_patient(seed: int, index: int, malignant_patient_share: float = MALIGNANT_PATIENT_SHARE,
                   lesions_per_patient_median: float = LESIONS_PER_PATIENT_MEDIAN) -> Patient:
    """Patient ``index`` of the dataset of ``seed`` (independent of the other patients)."""
    rng = np.random.default_rng([seed, index, 0])
    age = float(np.clip(rng.normal(57.0, 14.0), 18.0, 85.0))
    sex = "male" if rng.random() < 0.66 else "female"
    num_nevi, num_keratoses = lesion_counts(rng, age, lesions_per_patient_median)
    age_missing, sex_missing = rng.random(2) < [0.03, 0.02]
    attribution = str(rng.choice(CLINICS, p=CLINIC_WEIGHTS))
    hairiness = rng.lognormal(math.log(2.0 if sex == "male" else 0.6), 0.6)
    tone = rng.beta(1.6, 5.0)  # 0 = light, 1 = dark skin
    phenotype = sample_phenotype(rng)
    # Naevi involute with age: lighter and a little larger in older skin.
    phenotype = dataclasses.replace(phenotype, density=phenotype.density * math.exp(-0.012 * (age - 45.0)),
                                    log_diameter=phenotype.log_diameter + 0.004 * (age - 45.0))
    keratoses = keratosis_phenotype(rng, phenotype)
    logit = _malignant_logit(malignant_patient_share) + MALIGNANT_AGE_SLOPE * (age - 57.0)
    positive, extra = rng.random() < 1 / (1 + math.exp(-logit)), int(rng.poisson(MALIGNANT_PER_POSITIVE_PATIENT - 1))
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
        keratosis_phenotype=keratoses,
        num_nevi=num_nevi,
        num_keratoses=num_keratoses,
        num_malignant=min(1 + extra, num_nevi + num_keratoses) if positive else 0,
        true_sex=sex,
    )


_LOGITS: dict[float, float] = {}


def _malignant_logit(share: float) -> float:
    if share not in _LOGITS:
        _LOGITS[share] = malignant_patient_logit(share) if 0.0 < share < 1.0 else math.copysign(50.0, share - 0.5)
    return _LOGITS[share]


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


def _site_weights(weights: list[float], malignant: bool) -> np.ndarray:
    """Body-site probabilities (SITES order): the benign ones, times HEAD_NECK_RELATIVE_RISK on the head
    and neck for a cancer (so its rate there is that many times the rate elsewhere)."""
    risk = np.array([HEAD_NECK_RELATIVE_RISK if malignant and site == "head/neck" else 1.0 for site in SITES])
    weighted = np.asarray(weights) * risk
    return weighted / weighted.sum()


def _lesion_records(patient: Patient, seed: int, image_size: int, first_lesion: int, isic_ids, lesion_ids) -> Iterator[dict]:
    """The records of one patient's lesions; lesion ``j`` gets the global counter ``first_lesion + j``."""
    rng = np.random.default_rng([seed, patient.index, 1])          # latent traits, site, labels
    render_rng = np.random.default_rng([seed, patient.index, 2])   # pixels (depends on image_size)
    order = rng.permutation(patient.num_lesions)
    kinds = np.array([False] * patient.num_nevi + [True] * patient.num_keratoses)[order]
    malignant_slots = set(rng.permutation(patient.num_lesions)[: patient.num_malignant].tolist())
    shares = np.array([m.share for m in MALIGNANCIES])
    for j, keratosis in enumerate(kinds.tolist()):
        malignant = j in malignant_slots
        kind_draw, cue_draws = rng.random(), rng.random(len(CUES))
        malignancy = MALIGNANCIES[int(np.searchsorted(np.cumsum(shares) / shares.sum(), kind_draw))] if malignant else None
        # A malignant lesion is an ugly duckling next to the patient's naevi, whatever the slot it took.
        phenotype = patient.keratosis_phenotype if keratosis and not malignant else patient.phenotype
        traits = sample_lesion_traits(rng, phenotype, malignancy)
        weights = (KERATOSIS_SITE_WEIGHTS if keratosis else NEVUS_SITE_WEIGHTS)[patient.true_sex]
        site, location, location_simple, xyz = sample_site(rng, _site_weights(weights, malignant))
        site_missing, benign_with_id, measurement_missing = rng.random(3) < [0.015, 0.03, 0.01]
        tile_type = "3D: XP" if rng.random() < 0.6 else "3D: white"
        missing_column = MEASURED_COLUMNS[int(rng.integers(len(MEASURED_COLUMNS)))]
        thickness = rng.lognormal(np.log(0.6), 0.6)
        rates = CUE_RATES[malignancy.cue_group if malignancy else "benign"]
        cues = tuple(cue for cue, draw in zip(CUES, cue_draws) if draw < rates[cue])

        rendering = render_lesion(traits, patient.skin, render_rng, image_size, tile_type)
        measurements = measure_lesion(rendering, render_rng, MEASURED_COLUMNS)
        image = add_artefacts(draw_cues(rendering, cues, [seed, patient.index, 3, j]), render_rng,
                              patient.hairiness * SITE_HAIR[site])
        if measurement_missing:
            measurements[missing_column] = math.nan
        counter = first_lesion + j
        invasive_melanoma = malignancy is not None and malignancy is MALIGNANCIES[0]
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
            "iddx_full": malignancy.diagnosis if malignancy else "Benign",
            "iddx_1": "Malignant" if malignant else "Benign",
            "mel_thick_mm": round(thickness, 2) if invasive_melanoma else math.nan,
            **measurements,
        }
        yield {**{name: record[name] for name in CSV_COLUMNS}, "image_bytes": encode_jpeg(image)}


def generate_records(num_patients: int, seed: int = 0, image_size: int = 128,
                     malignant_patient_share: float = MALIGNANT_PATIENT_SHARE,
                     lesions_per_patient_median: float = LESIONS_PER_PATIENT_MEDIAN) -> Iterator[dict]:
    """Yield one dict per lesion, patient after patient.

    Keys: ``CSV_COLUMNS`` (ISIC 2024 names; numbers as float with NaN for missing, except the int
    ``target``; categories as str or None) plus ``"image_bytes"`` (JPEG of ``image_size`` px square).
    ``malignant_patient_share`` is the expected share of patients with at least one cancer (the real 24.9% by
    default) and ``lesions_per_patient_median`` the median patient's number of lesions (40 by default): tests
    of tiny datasets raise the one and lower the other, to get positives in every split cheaply.
    """
    if num_patients < 0:
        raise ValueError(f"num_patients must be >= 0, got {num_patients}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not 0.0 <= malignant_patient_share <= 1.0:
        raise ValueError(f"malignant_patient_share must be in [0, 1], got {malignant_patient_share}")
    if lesions_per_patient_median < 1:
        raise ValueError(f"lesions_per_patient_median must be >= 1, got {lesions_per_patient_median}")
    isic_ids, lesion_ids = _id_permutation(seed, 2), _id_permutation(seed, 3)
    first_lesion = 0
    for index in range(num_patients):
        patient = sample_patient(seed, index, malignant_patient_share, lesions_per_patient_median)
        yield from _lesion_records(patient, seed, image_size, first_lesion, isic_ids, lesion_ids)
        first_lesion += patient.num_lesions


def write_kaggle_layout(output_dir, num_patients: int, seed: int = 0, image_size: int = 128, progress: bool = True,
                        **kwargs) -> dict:
    """Write ``train-metadata.csv`` and ``train-image.hdf5`` as in the Kaggle ISIC 2024 download.

    Rows are streamed to disk as they are generated. The HDF5 file holds one scalar dataset of JPEG bytes
    per ``isic_id`` (read back with ``bytes(f[isic_id][()])``). ``kwargs`` go to `generate_records`.
    ``progress`` shows a bar of the patients rendered (the long step: ~5 ms a lesion at 128 px).
    Returns counts of patients, lesions and malignant lesions, and the two paths.
    """
    import h5py
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, hdf5_path = output_dir / "train-metadata.csv", output_dir / "train-image.hdf5"
    counts = {"patients": num_patients, "lesions": 0, "malignant": 0}
    bar = tqdm(total=num_patients, desc="rendering synthetic patients", unit="patient", disable=not progress)
    with open(csv_path, "w", newline="") as csv_file, h5py.File(hdf5_path, "w") as images, bar:
        writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        patient = None
        for record in generate_records(num_patients, seed=seed, image_size=image_size, **kwargs):
            if record["patient_id"] != patient:
                bar.update(patient is not None)
                patient = record["patient_id"]
            images.create_dataset(record["isic_id"], data=np.void(record["image_bytes"]))
            writer.writerow({name: _csv_value(record[name]) for name in CSV_COLUMNS})
            counts["lesions"] += 1
            counts["malignant"] += record["target"]
        bar.update(bar.total - bar.n)
    return {**counts, "metadata_csv": str(csv_path), "image_hdf5": str(hdf5_path)}


def _csv_value(value):
    """Missing values (None, NaN) as empty fields, which pandas reads back as NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's two stated knobs, for every command line that builds a synthetic dataset."""
    parser.add_argument("--malignant-patient-share", type=float, default=MALIGNANT_PATIENT_SHARE,
                        help="expected share of patients with at least one cancer (ISIC 2024: 0.249)")
    parser.add_argument("--lesions-per-patient", type=float, default=LESIONS_PER_PATIENT_MEDIAN,
                        help="median number of lesions per patient (ISIC 2024: 241; default 40 fits a CPU)")


def generator_options(args: argparse.Namespace) -> dict:
    """`generate_records` keyword arguments from `add_generator_arguments`' options."""
    return {"malignant_patient_share": args.malignant_patient_share,
            "lesions_per_patient_median": args.lesions_per_patient}


def build_parser() -> argparse.ArgumentParser:
    """The `python -m training.data.synthetic {kaggle,report}` command line."""
    parser = argparse.ArgumentParser(prog="python -m training.data.synthetic", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {"kaggle": "write a synthetic dataset in the ISIC 2024 Kaggle layout (CSV + HDF5 of JPEG bytes)",
             "report": "the calibration table: each published fact about the real SLICE-3D beside its measured "
                       "value, the tabular anchors and the image's own signal"}
    for name in ("kaggle", "report"):
        command = commands.add_parser(name, help=helps[name], description=helps[name])
        command.add_argument("--patients", type=int, default=400, help="number of patients to generate")
        command.add_argument("--seed", type=int, default=0, help="generator seed (same seed: same bytes)")
        command.add_argument("--image-size", type=int, default=128, help="side of the square JPEG crops, pixels")
        add_generator_arguments(command)
        if name == "kaggle":
            command.add_argument("--output-dir", required=True,
                                 help="folder for train-metadata.csv and train-image.hdf5")
        else:
            command.add_argument("--folds", type=int, default=5, help="patient-grouped folds of the out-of-fold scores")
            command.add_argument("--output", help="also write the Markdown table and the JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "kaggle":
        start = time.perf_counter()
        counts = write_kaggle_layout(args.output_dir, args.patients, seed=args.seed, image_size=args.image_size,
                                     **generator_options(args))
        print(json.dumps({**counts, "seconds": round(time.perf_counter() - start, 1)}, indent=2))
        return
    from .calibration import calibration_report, report_markdown

    report = calibration_report(args.patients, seed=args.seed, image_size=args.image_size, folds=args.folds,
                                **generator_options(args))
    command_line = " ".join(["python -m training.data.synthetic"] + (sys.argv[1:] if argv is None else argv))
    text = f"Command: `{command_line}`\n\n{report_markdown(report)}\n\n```json\n{json.dumps(report, indent=2)}\n```\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
