"""The SLIMP data contract: the ISIC 2024 (SLICE-3D) release columns, the columns that must never be
model inputs, and the rules that turn raw values into "missing", categories and numbers.

No torch and no third-party import: the default `SLIMPConfig`, the processor, the dataset converter,
the synthetic generator and the metadata extrapolation all read these facts from this one file, so
they cannot drift apart (a test checks that the default config and the converter agree).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

PATIENT_COLUMN = "patient_id"

# ----- ISIC 2024 / SLICE-3D (Kurtansky et al., Sci. Data 2024; Kaggle `train-metadata.csv`) -----
ISIC2024_ID_COLUMN = "isic_id"
ISIC2024_LABEL_COLUMN = "target"
ISIC2024_DOMAIN_COLUMN = "attribution"  # the contributing clinic: a domain label for splits and bias reports

# The 32 `tbp_lv_*` measurements of the 3D total-body-photography lesion visualiser.
TBP_LV_MEASUREMENTS = tuple(
    "tbp_lv_" + name
    for name in (
        "A Aext B Bext C Cext H Hext L Lext areaMM2 area_perim_ratio color_std_mean deltaA deltaB deltaL "
        "deltaLB deltaLBnorm eccentricity minorAxisMM nevi_confidence norm_border norm_color perimeterMM "
        "radial_color_std_max stdL stdLExt symm_2axis symm_2axis_angle x y z"
    ).split()
)
ISIC2024_LESION_NUMERICAL = ("clin_size_long_diam_mm",) + TBP_LV_MEASUREMENTS
# Category vocabularies as released ("Unknown" is a missing value, see MISSING_STRINGS).
ISIC2024_LESION_CATEGORICAL = {
    "anatom_site_general": ("head/neck", "upper extremity", "lower extremity", "anterior torso", "posterior torso"),
    "tbp_tile_type": ("3D: white", "3D: XP"),
    "tbp_lv_location": (
        "Head & Neck", "Left Arm", "Left Arm - Upper", "Left Arm - Lower", "Right Arm", "Right Arm - Upper",
        "Right Arm - Lower", "Left Leg", "Left Leg - Upper", "Left Leg - Lower", "Right Leg", "Right Leg - Upper",
        "Right Leg - Lower", "Torso Front", "Torso Front Top Half", "Torso Front Bottom Half", "Torso Back",
        "Torso Back Top Third", "Torso Back Middle Third", "Torso Back Bottom Third",
    ),
    "tbp_lv_location_simple": (
        "Head & Neck", "Left Arm", "Right Arm", "Left Leg", "Right Leg", "Torso Front", "Torso Back",
    ),
}
ISIC2024_PATIENT_NUMERICAL = ("age_approx",)
ISIC2024_PATIENT_CATEGORICAL = {"sex": ("female", "male")}
# Every column of the Kaggle ISIC 2024 `train-metadata.csv`, in its order.
ISIC2024_CSV_COLUMNS = (
    (ISIC2024_ID_COLUMN, ISIC2024_LABEL_COLUMN, PATIENT_COLUMN, "age_approx", "sex", "anatom_site_general",
     "clin_size_long_diam_mm", "image_type", "tbp_tile_type")
    + TBP_LV_MEASUREMENTS[:19] + ("tbp_lv_location", "tbp_lv_location_simple") + TBP_LV_MEASUREMENTS[19:]
    + (ISIC2024_DOMAIN_COLUMN, "copyright_license", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4",
       "iddx_5", "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence")
)
# fnmatch patterns of columns that leak the label (the diagnosis, its by-products, the lesion identity):
# never model inputs, dropped by the converter.
ISIC2024_NEVER_INPUT = ("target", "iddx_*", "mel_thick_mm", "mel_mitotic_index", "lesion_id")

# ----- missing values and category cleaning -----
# Spellings of "no value", compared after stripping and lower-casing; NaN, ±inf (numbers) and None too.
MISSING_STRINGS = frozenset({"", "nan", "none", "null", "na", "n/a", "#n/a", "<na>", "unk", "unknown"})
_INTEGER_TEXT = re.compile(r"^[+-]?\d+\.0*$")


def is_missing(value: Any) -> bool:
    """True for None, NaN, ±inf and the strings of `MISSING_STRINGS` (any case, any surrounding space)."""
    if value is None:
        return True
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return value.strip().lower() in MISSING_STRINGS
    try:  # numpy scalars, without importing numpy
        return not math.isfinite(float(value)) if hasattr(value, "dtype") and value.dtype.kind == "f" else False
    except (TypeError, ValueError):
        return False


def as_category(value: Any) -> str | None:
    """The category string of a raw value, None when missing. Integer-valued numbers and their text
    become the integer's text, so 1, 1.0 and "1.0" are all the category "1"; other text is stripped."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) or (hasattr(value, "dtype") and value.dtype.kind == "f"):
        number = float(value)
        return str(int(number)) if number.is_integer() else str(number)
    text = str(value).strip()
    if _INTEGER_TEXT.match(text):
        return str(int(float(text)))
    return text


def parse_number(value: Any) -> tuple[float, bool]:
    """(number, parsed) of a raw value: `(nan, True)` for a missing value, `(nan, False)` for a present
    value that is not a finite number (``'12,5'``, ``'sixty'``), which a caller should report."""
    if is_missing(value):
        return math.nan, True
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan, False
    return (number, True) if math.isfinite(number) else (math.nan, False)


def matches_any(column: str, patterns: Iterable[str]) -> bool:
    """True when `column` matches one of the fnmatch `patterns` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(column, pattern) for pattern in patterns)


def leaks_label(column: str, patterns: Iterable[str] = ISIC2024_NEVER_INPUT) -> bool:
    """True when `column` matches one of the never-input patterns."""
    return matches_any(column, patterns)


# ----- grouping rows by patient -----
def factorize(keys: Iterable[Hashable]) -> tuple[list[int], list[Hashable]]:
    """`(codes, uniques)`: each key's index among the distinct keys, numbered in order of first appearance.

    The one grouping-by-patient rule of the project: `codes` is a `patient_index`, `uniques` the patients.
    """
    keys = keys if isinstance(keys, (list, tuple)) else list(keys)
    index = {key: position for position, key in enumerate(dict.fromkeys(keys))}
    return list(map(index.__getitem__, keys)), list(index)


def rows_by_patient(patient_ids: Iterable[Hashable]) -> list[list[int]]:
    """Row numbers of each patient, patients in order of first appearance, rows in order."""
    codes, uniques = factorize(patient_ids)
    groups: list[list[int]] = [[] for _ in uniques]
    for row, code in enumerate(codes):
        groups[code].append(row)
    return groups


def near_equal_chunks(rows: Sequence, max_size: int) -> list:
    """`rows` cut into ceil(n / max_size) consecutive chunks whose sizes differ by at most one (33 rows with
    max_size 32 give 17 + 16, not 32 + 1), so that no chunk of a patient is a lone lesion by accident."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    parts = -(-len(rows) // max_size)
    if parts == 0:
        return []
    base, extra = divmod(len(rows), parts)
    chunks, start = [], 0
    for part in range(parts):
        size = base + (part < extra)
        chunks.append(rows[start : start + size])
        start += size
    return chunks


__all__ = [
    "PATIENT_COLUMN", "ISIC2024_ID_COLUMN", "ISIC2024_LABEL_COLUMN", "ISIC2024_DOMAIN_COLUMN", "TBP_LV_MEASUREMENTS",
    "ISIC2024_LESION_NUMERICAL", "ISIC2024_LESION_CATEGORICAL", "ISIC2024_PATIENT_NUMERICAL",
    "ISIC2024_PATIENT_CATEGORICAL", "ISIC2024_NEVER_INPUT", "MISSING_STRINGS", "is_missing", "as_category",
    "parse_number", "matches_any", "leaks_label", "factorize", "rows_by_patient", "near_equal_chunks",
]
