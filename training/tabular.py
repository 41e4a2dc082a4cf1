"""The ISIC 2024 tabular recipe: raw metadata plus patient-relative ("ugly duckling") features, read by
logistic regression or LightGBM.

The top Kaggle solutions of ISIC 2024 were gradient-boosted trees on the tabular columns, each numerical
lesion measurement as it is and relative to the same patient's other lesions. This module is the one home
of those features, used by the synthetic data's calibration report (`training/data/calibration.py`) and by
the quality benchmark's reference rows (`bench/anchors.py`):

    absolute, relative = tabular_frames(frame, numerical, categorical, patient_column="patient_id")
    (score,) = fit_and_score("lightgbm", x_train, y_train, [x_test], seed=0)

``absolute``: the numerical columns (missing values median-imputed), one-hot categories and the log number
of the patient's lesions. ``relative``: for each lesion-level numerical column, ``(x - patient mean) /
(patient std)`` and the lesion's percentile rank within its patient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from modeling_slimp.schema_slimp import as_category

# LightGBM settings of every tabular row (class-balanced, as the ISIC 2024 recipes undersample negatives).
LIGHTGBM_PARAMS = dict(n_estimators=300, learning_rate=0.03, num_leaves=15, min_child_samples=10, subsample=0.8,
                       subsample_freq=1, colsample_bytree=0.6, reg_lambda=1.0, verbose=-1)
MODELS = ("logistic", "lightgbm")


def patient_relative(values: pd.DataFrame, patients: pd.Series) -> pd.DataFrame:
    """Each value against the same patient's lesions: ``<column>_z`` = (x - patient mean) / patient std
    (0 for a patient with one lesion or no spread) and ``<column>_rank`` = percentile rank within the
    patient, in (0, 1] (1 = the patient's largest value; ties share their average rank).

    values: (N, F) numbers without missing values; patients: (N,) patient of each row.
    Returns (N, 2F) with the same index.
    """
    groups = values.groupby(patients.to_numpy())
    spread = groups.transform("std").fillna(0.0)
    z = ((values - groups.transform("mean")) / spread.where(spread > 0)).fillna(0.0)
    rank = groups.rank(pct=True)
    return pd.concat([z.add_suffix("_z"), rank.add_suffix("_rank")], axis=1)


def tabular_frames(frame: pd.DataFrame, numerical: Sequence[str], categorical: Sequence[str],
                   lesion_numerical: Sequence[str] | None = None, patient_column: str = "patient_id",
                   medians: pd.Series | None = None, vocabularies: dict[str, list[str]] | None = None):
    """(absolute, relative) feature frames of one table, one row per lesion (see the module docstring).

    ``lesion_numerical`` (default: all of ``numerical``) are the columns made patient-relative. ``medians``
    and ``vocabularies`` (fitted on this frame when None) let a test split reuse the training split's.
    Returns two DataFrames and the (medians, vocabularies) used.
    """
    numerical = [c for c in numerical if c in frame]
    categorical = [c for c in categorical if c in frame]
    values = frame[numerical].astype(float)
    medians = values.median() if medians is None else medians
    values = values.fillna(medians).fillna(0.0)
    if vocabularies is None:
        vocabularies = {c: sorted({v for v in map(as_category, frame[c]) if v is not None}) for c in categorical}
    one_hot = {f"{c}={v}": (frame[c].map(as_category) == v).astype(float) for c, vocab in vocabularies.items() for v in vocab}
    count = np.log(frame.groupby(patient_column)[patient_column].transform("size").astype(float)).rename("log_patient_lesions")
    absolute = pd.concat([values, pd.DataFrame(one_hot, index=frame.index), count], axis=1)
    lesion_numerical = [c for c in (lesion_numerical or numerical) if c in values]
    relative = patient_relative(values[lesion_numerical], frame[patient_column])
    return absolute, relative, (medians, vocabularies)


def fit_and_score(model: str, train_x: np.ndarray, train_y: np.ndarray, eval_x: list[np.ndarray], seed: int = 0,
                  return_model: bool = False):
    """Fit `model` ("logistic" or "lightgbm", class-balanced) on train; positive-class scores of each of `eval_x`
    (and the fitted model with ``return_model=True``)."""
    if model == "logistic":
        from training.probe import fit_probe

        fitted = fit_probe(train_x, train_y, seed=seed)
        scores = [fitted.predict_proba(x)[:, list(fitted.classes_).index(1)] for x in eval_x]
    elif model == "lightgbm":
        import lightgbm

        fitted = lightgbm.LGBMClassifier(random_state=seed, class_weight="balanced", **LIGHTGBM_PARAMS)
        fitted.fit(train_x, train_y)
        scores = [fitted.predict_proba(x)[:, 1] for x in eval_x]
    else:
        raise ValueError(f"model must be one of {MODELS}, got '{model}'")
    return (scores, fitted) if return_model else scores


__all__ = ["LIGHTGBM_PARAMS", "MODELS", "patient_relative", "tabular_frames", "fit_and_score"]
