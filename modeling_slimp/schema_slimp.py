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
# The largest magnitude a numerical input may have: the model computes in float32, where a larger value is
# inf (and a mean over such values overflows). A value beyond it is present but unusable: read as missing
# and counted, never stored or fitted.
FLOAT32_MAX = 3.4028234663852886e38
# k: a category enters a fitted vocabulary, and a numerical feature gets fitted statistics, only when at
# least this many distinct patients of the training rows have it, so that no checkpoint describes one
# patient (a rare body site, one patient's age as "the mean"). A train split with fewer patients is refused.
MIN_PATIENTS_PER_VALUE = 5


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


def is_missing_id(value: Any) -> bool:
    """True when an id (`patient_id`, an image id) is absent: None, NaN or blank text. Any other text is an
    id, including spellings that mean "missing" in a feature column (`NA` can be someone's initials)."""
    if value is None:
        return True
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"):
        return math.isnan(float(value))
    return isinstance(value, str) and not value.strip()


def as_category(value: Any) -> str | None:
    """The category string of a raw value, None when missing. Integer-valued numbers and their text
    become the integer's text, so 1, 1.0 and "1.0" are all the category "1"; other text is stripped.
    Spellings are compared with `category_key`, not as they are."""
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


def category_key(value: Any) -> str | None:
    """What two category spellings are compared by: `as_category`, case-folded, runs of white space made one
    space. `Male`, ` MALE ` and `male` are one category (the converter, schema fitting and the processor
    all compare this way; a vocabulary keeps one spelling of each)."""
    category = as_category(value)
    return None if category is None else " ".join(category.split()).casefold()


def usable_number(number: float) -> bool:
    """A finite number within float32's range (`FLOAT32_MAX`): what a numerical input may hold."""
    return math.isfinite(number) and abs(number) <= FLOAT32_MAX


def _is_infinite(value: Any) -> bool:
    if isinstance(value, str) or value is None:
        return False
    try:
        return math.isinf(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def parse_number(value: Any) -> tuple[float, bool]:
    """(number, parsed) of a raw value: `(nan, True)` for a missing value, `(nan, False)` for a present
    value that is not a usable number (``'12,5'``, ``'sixty'``, ±inf, ``1e308``: beyond `FLOAT32_MAX`),
    which a caller should count and report."""
    if is_missing(value) and not _is_infinite(value):
        return math.nan, True
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float64
        return math.nan, False
    return (number, True) if usable_number(number) else (math.nan, False)


def matches_any(column: str, patterns: Iterable[str]) -> bool:
    """True when `column` matches one of the fnmatch `patterns` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(column, pattern) for pattern in patterns)


def leaks_label(column: str, patterns: Iterable[str] = ISIC2024_NEVER_INPUT) -> bool:
    """True when `column` matches one of the never-input patterns, in any case (`Target`, `IDDX_1` leak too)."""
    return matches_any(column.casefold(), [pattern.casefold() for pattern in patterns])


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
    "ISIC2024_PATIENT_CATEGORICAL", "ISIC2024_NEVER_INPUT", "MISSING_STRINGS", "FLOAT32_MAX", "MIN_PATIENTS_PER_VALUE",
    "is_missing", "is_missing_id", "as_category", "category_key", "usable_number", "parse_number", "matches_any",
    "leaks_label", "factorize", "rows_by_patient", "near_equal_chunks",
]
