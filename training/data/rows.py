"""Pass 1 of the converter (`training/data/convert.py`): which rows are kept, which columns are what, and
the patient-disjoint splits.

The metadata CSV is read in chunks; each row's id, patient and label are kept as compact Arrow arrays; rows
without an id, a patient or a known label, and repeated ids, are excluded and reported (`FaultLog`); the
output columns are planned from the header (`ColumnPlan`); patients are split, stratified by label.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from modeling_slimp import schema_slimp as contract

from .sources import SourceSpec, looks_numerical, read_metadata

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
RESERVED_COLUMNS = ("image", "image_id", "patient_id", "label")
CSV_CHUNK_ROWS = 5_000  # metadata rows parsed at once (what pass 1 and 2 hold; more does not parse faster)
MAX_CATEGORIES = 10_000  # a "categorical" column with more distinct spellings is free text: kept as written
KNOWN_VOCABULARIES = {**contract.ISIC2024_LESION_CATEGORICAL, **contract.ISIC2024_PATIENT_CATEGORICAL}


class DataError(RuntimeError):
    """A bad row under `--strict`: names the id, the reason and the file."""


class FaultLog:
    """Every excluded row, with its id and reason; under `strict` the first one is an error instead."""

    LOGGED = 20  # faults logged as warnings; later ones at debug level (all are in summary.json)

    def __init__(self, strict: bool):
        self.strict = strict
        self.entries: list[dict] = []
        self.unparsed: dict[str, dict] = {}  # column -> {"count", "examples": [{"id", "value"}]}

    def unparsed_values(self, column: str, ids: list, values: list, file: Optional[str] = None) -> None:
        """Present values of a numerical column that are not numbers: read as missing, counted per column
        with example ids in summary.json; under `strict` an error naming the first one."""
        if not ids:
            return
        where = f" in {file}" if file else ""
        if self.strict:
            raise DataError(f"{ids[0]}: column {column!r} holds {values[0]!r}, not a number ({len(ids)} such values"
                            f"{where}); fix the file or drop --strict to read them as missing")
        entry = self.unparsed.setdefault(column, {"count": 0, "examples": []})
        entry["count"] += len(ids)
        room = 5 - len(entry["examples"])
        entry["examples"] += [{"id": str(i), "value": str(v)} for i, v in zip(ids[:room], values[:room])]
        logger.warning("%s: %d value(s) of %r are not numbers and are read as missing, e.g. %s=%r%s", column,
                       len(ids), column, ids[0], values[0], where)

    def report(self, image_id: str, reason: str, detail: str, file: Optional[str] = None) -> None:
        where = f" in {file}" if file else ""
        if self.strict:
            raise DataError(f"{image_id}: {reason} ({detail}){where}")
        self.entries.append({"id": image_id, "reason": reason, "detail": detail} | ({"file": file} if file else {}))
        level = logging.WARNING if len(self.entries) <= self.LOGGED else logging.DEBUG
        logger.log(level, "excluded %s: %s (%s)%s", image_id, reason, detail, where)


@dataclasses.dataclass
class ColumnPlan:
    """Which output column is what; becomes `schema.json` and the dataset's `Features`."""

    patient_numerical: list[str]
    patient_categorical: list[str]
    lesion_numerical: list[str]
    lesion_categorical: list[str]
    domain_column: Optional[str]
    extra_numerical: list[str]
    extra_categorical: list[str]
    excluded: list[str]  # present in the CSV, dropped because they leak the label
    absent: list[str]  # feature columns of the source that this CSV lacks
    empty: list[str] = dataclasses.field(default_factory=list)  # columns without any value: left out

    @property
    def numerical(self) -> list[str]:
        return self.patient_numerical + self.lesion_numerical + self.extra_numerical

    @property
    def metadata_columns(self) -> list[str]:
        domain = [self.domain_column] if self.domain_column else []
        return (self.patient_numerical + self.patient_categorical + self.lesion_numerical
                + self.lesion_categorical + domain + self.extra_numerical + self.extra_categorical)

    def features(self, label_names: list[str]) -> datasets.Features:
        features = {"image": datasets.Image(), "image_id": datasets.Value("string"),
                    "patient_id": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)}
        for column in self.metadata_columns:
            features[column] = datasets.Value("float64" if column in self.numerical else "string")
        return datasets.Features(features)

    def schema(self, spec: SourceSpec, label_names: list[str]) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "source": spec.name,
            "license": spec.license,
            "id_column": "image_id",
            "id_source_column": spec.id_column,
            "patient_column": "patient_id",
            "patient_source_column": spec.patient_column,
            "label": {"column": "label", "names": label_names, "source_column": spec.label_column},
            "lesion": {"numerical": self.lesion_numerical, "categorical": self.lesion_categorical},
            "patient": {"numerical": self.patient_numerical, "categorical": self.patient_categorical},
            "domain_column": self.domain_column,
            "extra_columns": self.extra_numerical + self.extra_categorical,
            "excluded_columns": self.excluded,
        }


def plan_columns(spec: SourceSpec, columns: list[str], numeric_extras: set[str], empty: set[str]) -> ColumnPlan:
    """The output columns, from the CSV's header, the extra columns whose present values all parse as
    numbers (`numeric_extras`) and the columns without any value (`empty`: left out, reported)."""
    present = set(columns) - empty
    mapped = {spec.id_column, spec.patient_column}
    known = set(spec.feature_columns) | mapped | {spec.domain_column}
    extras = [c for c in columns if c not in known and not spec.leaks(c) and c not in empty]
    for column in [c for c in extras if c.casefold() in RESERVED_COLUMNS]:
        logger.warning("column %r clashes with a SLIMP column name and is dropped", column)
        extras.remove(column)
    plan = ColumnPlan(
        patient_numerical=[c for c in spec.patient_numerical if c in present],
        patient_categorical=[c for c in spec.patient_categorical if c in present],
        lesion_numerical=[c for c in spec.lesion_numerical if c in present],
        lesion_categorical=[c for c in spec.lesion_categorical if c in present],
        domain_column=spec.domain_column if spec.domain_column in present else None,
        extra_numerical=[c for c in extras if c in numeric_extras],
        extra_categorical=[c for c in extras if c not in numeric_extras],
        excluded=[c for c in columns if spec.leaks(c) and c not in mapped],
        absent=[c for c in spec.feature_columns if c not in columns],
        empty=sorted(c for c in empty if c in spec.feature_columns or c in extras or c == spec.domain_column),
    )
    if plan.absent:
        logger.warning("%s columns absent from the metadata (not used): %s", spec.name, ", ".join(plan.absent))
    if plan.empty:
        logger.warning("columns without any value in the metadata (left out): %s", ", ".join(plan.empty))
    return plan


def clean_text(values: pd.Series) -> list[Optional[str]]:
    """Stripped strings, None for missing or blank (a list: `Series.map` would turn None into NaN)."""
    return [None if v is None or v != v else (str(v).strip() or None) for v in values]


def _label_key(text: Optional[str], spec: SourceSpec) -> Optional[str]:
    """The label name a raw label value stands for (before checking that it is a known one)."""
    if text is None or spec.label_map is None:
        return text
    return spec.label_map.get(contract.as_category(text), text)  # "1.0" -> "1" -> "malignant"


@dataclasses.dataclass
class Keys:
    """Pass 1: what deciding rows and splits needs, one entry per CSV row, in compact Arrow arrays."""

    ids: pa.Array        # string, null when empty
    patients: pa.Array   # string, null when empty
    labels: pa.Array     # string: the label name (label_map applied), null when empty
    columns: list[str]
    numeric_extras: set[str]
    empty: set[str]
    spellings: dict[str, dict[str, str]]  # categorical column -> {spelling: the one kept for its category}


def read_keys(path: Path, spec: SourceSpec) -> Keys:
    """Pass 1 over the CSV: ids, patients, label names; which columns are numbers, which are empty; how each
    category of a categorical input is spelled."""
    ids, patients, labels = [], [], []
    numeric: dict[str, bool] = {}
    present: dict[str, int] = {}
    columns: list[str] = []
    categorical = [*spec.patient_categorical, *spec.lesion_categorical, spec.domain_column]
    spellings: dict[str, Counter] = {}
    for chunk in read_metadata(path, spec, chunksize=CSV_CHUNK_ROWS):
        columns = list(chunk.columns)
        ids.append(pa.array(clean_text(chunk[spec.id_column]), pa.string()))
        patients.append(pa.array(clean_text(chunk[spec.patient_column]), pa.string()))
        labels.append(pa.array([_label_key(v, spec) for v in clean_text(chunk[spec.label_column])], pa.string()))
        for column in columns:
            values = chunk[column].dropna()
            present[column] = present.get(column, 0) + len(values)
            if len(values):
                numeric[column] = numeric.get(column, True) and looks_numerical(values)
            if column in categorical and len(spellings.setdefault(column, Counter())) <= MAX_CATEGORIES:
                spellings[column].update(v for v in clean_text(values) if v is not None)
    empty = {c for c in columns if present.get(c, 0) == 0}
    extras = {c for c, is_number in numeric.items() if is_number}
    return Keys(pa.concat_arrays(ids), pa.concat_arrays(patients), pa.concat_arrays(labels), columns, extras, empty,
                {column: canonical_spellings(column, counts) for column, counts in spellings.items()
                 if len(counts) <= MAX_CATEGORIES})


def canonical_spellings(column: str, counts: Counter) -> dict[str, str]:
    """{spelling: the spelling kept for its category} for the spellings that change: categories are compared
    case- and space-insensitively (`schema_slimp.category_key`: `Male`, ` MALE `, `male` are one), and each
    is stored as the release vocabulary spells it (ISIC 2024 columns), else as the column spells it most."""
    known = {contract.category_key(c): c for c in KNOWN_VOCABULARIES.get(column, ())}
    by_key: dict[str, list[str]] = {}
    for spelling in counts:
        by_key.setdefault(contract.category_key(spelling), []).append(spelling)
    kept = {}
    for key, variants in by_key.items():
        chosen = known.get(key) or min(variants, key=lambda v: (-counts[v], v))
        kept |= {variant: chosen for variant in variants if variant != chosen}
    if kept:
        logger.info("%s: %d spelling(s) read as the same category as another (case and spaces ignored), e.g. %r as %r",
                    column, len(kept), *next(iter(kept.items())))
    return kept


def select_rows(keys: Keys, spec: SourceSpec, metadata_path: Path, faults: FaultLog
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """Keep rows with an id (first occurrence only), a patient and a known label; report the others.

    Returns the kept CSV rows (K,), their patient codes (K,) and label codes (K,), the patients' names
    (the codes index them) and the label names."""
    ids = keys.ids.to_numpy(zero_copy_only=False)
    patients = keys.patients.to_numpy(zero_copy_only=False)
    label_keys = keys.labels.to_numpy(zero_copy_only=False)
    names = list(spec.label_names) if spec.label_names else sorted({k for k in label_keys if k is not None})
    index = {name: i for i, name in enumerate(names)}
    codes = np.array([-1 if k is None else index.get(k, -2) for k in label_keys], dtype=np.int64)
    # The first row of each id: ids as dictionary codes (compact), then numpy's first occurrence per code.
    has_id = np.flatnonzero(keys.ids.is_valid().to_numpy(zero_copy_only=False))
    id_codes = pc.dictionary_encode(keys.ids).indices.take(pa.array(has_id)).to_numpy(zero_copy_only=False)
    _, first_index, inverse = np.unique(id_codes, return_index=True, return_inverse=True)
    first_row = np.full(len(ids), -1, dtype=np.int64)
    first_row[has_id] = has_id[first_index[inverse]]
    keep = np.zeros(len(ids), dtype=bool)
    for row in range(len(ids)):  # rows in file order, so faults are reported in file order
        image_id, line = ids[row], row + 2  # CSV line: the header is line 1
        if image_id is None:
            faults.report(f"line {line}", "no image id", f"{spec.id_column} is empty", str(metadata_path))
        elif first_row[row] != row:
            faults.report(image_id, "duplicate id", f"line {line} repeats line {first_row[row] + 2}", str(metadata_path))
        elif patients[row] is None:
            faults.report(image_id, "no patient_id", f"{spec.patient_column} is empty", str(metadata_path))
        elif codes[row] == -1:
            faults.report(image_id, "missing label", f"{spec.label_column} is empty", str(metadata_path))
        elif codes[row] == -2:
            faults.report(image_id, "unknown label", f"{spec.label_column}={label_keys[row]!r} is not one of {names}",
                          str(metadata_path))
        else:
            keep[row] = True
    kept = np.flatnonzero(keep)
    encoded = pc.dictionary_encode(keys.patients.take(pa.array(kept)))  # patients numbered by first appearance
    patient_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return kept, patient_codes, codes[kept], encoded.dictionary.to_pylist(), names


def split_patients(table: pd.DataFrame, validation_fraction: float, test_fraction: float, seed: int
                   ) -> pd.Series:
    """Each row's split; patients are disjoint. A patient's stratum is its rarest label (by lesion count
    over the dataset), so for benign/malignant data a patient with any malignant lesion is positive.
    Quotas are rounded cumulatively over the strata (rarest first), so the totals match the fractions."""
    rarity = table["label"].map(table["label"].value_counts())
    ranked = table.assign(rarity=rarity).sort_values(["rarity", "label"], ascending=[True, False], kind="stable")
    stratum = ranked.groupby("patient_id", sort=True)[["label", "rarity"]].first()
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    seen = 0
    for (_, label), members in stratum.groupby(["rarity", "label"], sort=True):
        patients = np.array(sorted(members.index))[rng.permutation(len(members))]
        n_test = _quota(seen + len(patients), test_fraction) - _quota(seen, test_fraction)
        n_validation = _quota(seen + len(patients), validation_fraction) - _quota(seen, validation_fraction)
        n_validation = min(n_validation, len(patients) - n_test)
        seen += len(patients)
        for position, patient in enumerate(patients):
            in_test, in_validation = position < n_test, position < n_test + n_validation
            assignment[patient] = "test" if in_test else "validation" if in_validation else "train"
    return table["patient_id"].map(assignment)


def _quota(patients: int, fraction: float) -> int:
    return int(np.floor(patients * fraction + 0.5))


def split_rows(patient_codes: np.ndarray, labels: np.ndarray, patient_names: list[str], validation_fraction: float,
               test_fraction: float, seed: int) -> np.ndarray:
    """(K,) split index (into SPLITS) of each kept row (`split_patients`)."""
    table = pd.DataFrame({"patient_id": np.asarray(patient_names, dtype=object)[patient_codes], "label": labels})
    split = split_patients(table, validation_fraction, test_fraction, seed)
    return split.map({name: i for i, name in enumerate(SPLITS)}).to_numpy(dtype=np.int8)


def check_splits(splits: dict[str, dict], label_names: list[str]) -> list[str]:
    """Loud warnings (also in summary.json) for a split, as written, without any patient, without any
    positive, with one class only, or without some class (multi-class data too)."""
    warnings = []
    for name, counts in splits.items():
        absent = [label for label in label_names if counts["labels"][label] == 0]
        if not counts["patients"]:
            warnings.append(f"split '{name}' has no patient (too few patients for --{name}-fraction?)")
        elif len(label_names) == 2 and label_names[1] in absent:
            warnings.append(f"split '{name}' has no '{label_names[1]}' lesion: its AUROC and pAUC are undefined")
        elif len(absent) == len(label_names) - 1:
            only = next(label for label in label_names if label not in absent)
            warnings.append(f"split '{name}' holds one class only ('{only}'): a classifier can be neither trained "
                            "nor evaluated on it")
        elif absent:
            warnings.append(f"split '{name}' has no lesion of class {', '.join(map(repr, absent))}: "
                            "its per-class metrics are undefined there")
    for warning in warnings:
        logger.warning("!!! %s", warning)
    return warnings


def id_warnings(keys: Keys, spec: SourceSpec, kept: np.ndarray) -> list[str]:
    """Ids kept as written although they are spelled like a missing value (`NA`, `unknown`): an id column
    only counts a blank cell as missing, since `NA` can be a real id; each such id is reported, with its rows."""
    warnings = []
    for column, values in ((spec.id_column, keys.ids), (spec.patient_column, keys.patients)):
        counts = Counter(v for v in values.take(pa.array(kept)).to_pylist() if v.strip().lower() in contract.MISSING_STRINGS)
        for value, rows in sorted(counts.items()):
            warnings.append(f"{column} {value!r} ({rows} row(s)) is spelled like a missing value; it is kept as a real "
                            f"id (blank the cell if it means 'unknown')")
    for warning in warnings:
        logger.warning("!!! %s", warning)
    return warnings
