"""The metadata schema of a model, fitted on training rows: feature names, category vocabularies and
normalisation statistics, as the two `SLIMPMetadataConfig`s (lesion, patient) that the model config stores once
(`config.json`) and the processor and the model both read.

    lesion, patient = fit_metadata_schema(train_rows, lesion_numerical=[...], lesion_categorical=[...],
                                          patient_numerical=["age_approx"], patient_categorical=["sex"])
    config = SLIMPConfig(lesion_metadata_config=lesion, patient_metadata_config=patient, ...)

Training-time only (`training/presets.build_slimp_config` fits it for pretrain.py): inference reads a fitted schema
and never needs this module, which is why it is not part of the checkpoint's code. Values are read with the
processor's own column rules (`modeling_slimp.metadata_columns`, `modeling_slimp.schema_slimp`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from modeling_slimp.configuration_slimp import SLIMPMetadataConfig
from modeling_slimp.metadata_columns import as_columns, as_list, number_array, row_count
from modeling_slimp.schema_slimp import (MIN_PATIENTS_PER_VALUE, PATIENT_COLUMN, as_category, category_key, factorize,
                                         is_missing, parse_number, rows_by_patient)

logger = logging.getLogger(__name__)


def fit_metadata_schema(
    metadata,
    lesion_numerical: Iterable[str] = (),
    lesion_categorical: Iterable[str] = (),
    patient_numerical: Iterable[str] = (),
    patient_categorical: Iterable[str] = (),
    min_category_count: int = 1,
    lesion_tower: Mapping[str, Any] | None = None,
    patient_tower: Mapping[str, Any] | None = None,
    min_patients: int = MIN_PATIENTS_PER_VALUE,
) -> tuple[SLIMPMetadataConfig, SLIMPMetadataConfig]:
    """Fit the lesion and patient schemas on training rows (a DataFrame, dict of columns or list of dicts).

    Numerical features get the mean and std of their usable values (lesion features over lesions,
    patient features over patients, one value per patient); categorical features get their categories,
    most frequent first (spellings compared by `category_key`; the most frequent spelling is kept).

    Nothing fitted describes fewer than `min_patients` patients (k, 5 by default: the schema is stored
    in every checkpoint): a category is kept only when at least k distinct patients have it (and it is
    seen at least `min_category_count` times), and a numerical feature gets statistics only when at
    least k distinct patients have a usable value of it. What falls short is left out of the schema,
    with a warning listing it; rows from fewer than k patients are a ValueError. Without a `patient_id`
    column each row counts as its own patient. A present value that is not a usable number (text, ±inf,
    beyond ±3.4e38) is read as missing, with a warning naming its row and column.
    `lesion_tower` / `patient_tower` hold tower sizes (hidden_size, num_hidden_layers, ...).
    Returns `(lesion_config, patient_config)`.
    """
    columns = as_columns(metadata)
    num_rows = row_count(columns)
    wanted = [*lesion_numerical, *lesion_categorical, *patient_numerical, *patient_categorical]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"fit_metadata_schema: metadata has no column(s) {missing}; columns are {sorted(columns)}.")
    keys = [str(k) for k in columns[PATIENT_COLUMN]] if PATIENT_COLUMN in columns else list(range(num_rows))
    codes, patients = factorize(keys)
    if len(patients) < min_patients:
        raise ValueError(f"fit_metadata_schema: the training rows come from {len(patients)} patient(s), fewer than "
                         f"min_patients={min_patients}: every statistic and category fitted on them would describe "
                         "individual patients, and the schema is stored in every checkpoint. Fit on more patients.")
    patient_columns, patient_rows = {}, {}  # one value per patient: the first present one among its rows
    for feature in [*patient_numerical, *patient_categorical]:
        values = as_list(columns[feature])
        first = [next((r for r in rows if not is_missing(values[r])), None) for rows in rows_by_patient(keys)]
        patient_columns[feature] = [None if r is None else values[r] for r in first]
        patient_rows[feature] = first
    fit = _TowerFit(min_patients, min_category_count)
    lesion = fit(columns, np.asarray(codes), list(lesion_numerical), list(lesion_categorical), lesion_tower, "lesion")
    patient = fit(patient_columns, np.arange(len(patients)), list(patient_numerical), list(patient_categorical),
                  patient_tower, "patient", patient_rows)
    return lesion, patient


class _TowerFit:
    """One tower's schema from its columns and each entry's patient (`fit_metadata_schema`'s rules).

    A feature with no usable value, or fewer than `min_patients` patients with one, is left out of the
    schema with a warning rather than failing the fit (a column full of NaN is common)."""

    def __init__(self, min_patients: int, min_count: int):
        self.min_patients, self.min_count = min_patients, min_count

    def __call__(self, columns: dict[str, Any], patient_of: np.ndarray, numerical: list[str], categorical: list[str],
                 tower: Mapping[str, Any] | None, level: str, rows_of: dict[str, list] | None = None) -> SLIMPMetadataConfig:
        kept_numerical, means, stds, left_out = [], [], [], []
        for feature in numerical:
            values, invalid = number_array(columns[feature])
            if invalid:
                self._warn_unusable(level, feature, columns[feature], invalid, (rows_of or {}).get(feature))
            usable = ~np.isnan(values)
            patients = len(np.unique(patient_of[usable]))
            if patients < self.min_patients:
                left_out.append(f"{feature} (usable values from {patients} patient(s))")
                continue
            present = values[usable].astype(np.float32).astype(np.float64)  # as the model will read them
            std = float(present.std()) if len(present) > 1 else 1.0
            kept_numerical.append(feature)
            means.append(float(present.mean()))
            stds.append(std if std > 1e-12 else 1.0)
        vocabularies = {}
        for feature in categorical:
            kept, dropped = self._vocabulary(as_list(columns[feature]), patient_of)
            if dropped:
                left_out.append(f"{feature} categories {dropped}")
            if kept:
                vocabularies[feature] = kept
            elif not dropped:
                left_out.append(f"{feature} (no value)")
            else:
                left_out.append(f"{feature} (no category left)")
        if left_out:
            logger.warning("fit_metadata_schema (%s): left out of the schema, each needs values from %d+ distinct patients "
                           "(and categories %d+ rows): %s", level, self.min_patients, self.min_count, "; ".join(left_out))
        return SLIMPMetadataConfig(numerical_features=kept_numerical, categorical_features=vocabularies,
                                   numerical_mean=means, numerical_std=stds, **dict(tower or {}))

    def _vocabulary(self, values: list, patient_of: np.ndarray) -> tuple[list[str], list[str]]:
        """(kept categories, most frequent first, ties alphabetical; dropped ones) of one column."""
        rows: Counter = Counter()
        spellings: dict[str, Counter] = {}
        patients: dict[str, set] = {}
        for value, patient in zip(values, patient_of.tolist()):
            key = category_key(value)
            if key is None:
                continue
            rows[key] += 1
            spellings.setdefault(key, Counter())[as_category(value)] += 1
            patients.setdefault(key, set()).add(patient)
        name = {key: min(counts, key=lambda s: (-counts[s], s)) for key, counts in spellings.items()}
        kept = {key for key in rows if rows[key] >= self.min_count and len(patients[key]) >= self.min_patients}
        dropped = sorted(name[key] for key in rows if key not in kept)
        return sorted((name[key] for key in kept), key=lambda c: (-rows[category_key(c)], c)), dropped

    @staticmethod
    def _warn_unusable(level: str, feature: str, raw, invalid: list, rows: list | None) -> None:
        values = as_list(raw)
        position = next(i for i, value in enumerate(values) if not parse_number(value)[1])
        row = rows[position] if rows is not None else position
        logger.warning("fit_metadata_schema (%s): %d value(s) of %r are not usable numbers (text, inf, or beyond "
                       "±3.4e38), read as missing; the first in row %d: %r", level, len(invalid), feature, row,
                       values[position])


__all__ = ["fit_metadata_schema"]
