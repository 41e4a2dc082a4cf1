"""Reference rows without any pre-training: the raw metadata, read by logistic regression and LightGBM,
as absolute values and with the patient-relative features of the ISIC 2024 winning recipe.

The recipe (the top Kaggle solutions of ISIC 2024 were gradient-boosted trees on tabular features): each
numerical lesion measurement as it is, and normalised within the patient, `(x - patient mean) /
(patient std)`, plus the number of lesions of the patient. Categories are one-hot, missing values
median-imputed (fitted on the training split). `with_features` appends any learned features (e.g. a
SLIMP variant's image + metadata + context probe inputs) to the recipe, so a reader sees whether the
learned features add anything on top of it.

    matrices = tabular_matrices(splits, schema)          # {"absolute": {split: X}, "relative": {split: X}}
    scores = fit_and_score("lightgbm", x_train, y_train, [x_test], seed=0)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from modeling_slimp.schema_slimp import as_category

LIGHTGBM_PARAMS = dict(n_estimators=300, learning_rate=0.03, num_leaves=15, min_child_samples=10, subsample=0.8,
                       subsample_freq=1, colsample_bytree=0.6, reg_lambda=1.0, verbose=-1)
MODELS = ("logistic", "lightgbm")


def _frame(dataset, schema: dict) -> pd.DataFrame:
    columns = ["patient_id", "label"] + [c for level in ("lesion", "patient") for kind in ("numerical", "categorical")
                                         for c in schema[level][kind]]
    return dataset.select_columns([c for c in columns if c in dataset.column_names]).to_pandas()


def tabular_matrices(splits: dict, schema: dict) -> dict[str, dict[str, np.ndarray]]:
    """Feature matrices of each split: `absolute` (measurements, one-hot categories, age, sex) and `relative`
    (absolute + the per-patient normalised measurements + log lesion count). Statistics (medians, the
    category vocabularies) come from the `train` split."""
    frames = {name: _frame(split, schema) for name, split in splits.items()}
    numerical = [c for c in schema["lesion"]["numerical"] + schema["patient"]["numerical"] if c in frames["train"]]
    categorical = [c for c in schema["lesion"]["categorical"] + schema["patient"]["categorical"] if c in frames["train"]]
    medians = frames["train"][numerical].astype(float).median()
    vocabularies = {c: sorted({v for v in map(as_category, frames["train"][c]) if v is not None}) for c in categorical}
    lesion_numerical = [c for c in schema["lesion"]["numerical"] if c in numerical]
    result: dict[str, dict[str, np.ndarray]] = {"absolute": {}, "relative": {}}
    for name, frame in frames.items():
        values = frame[numerical].astype(float).fillna(medians)
        one_hot = [np.stack([(frame[c].map(as_category) == v).to_numpy(dtype=float) for v in vocabulary], axis=1)
                   for c, vocabulary in vocabularies.items() if vocabulary]
        absolute = np.concatenate([values.to_numpy(), *one_hot], axis=1)
        groups = values[lesion_numerical].groupby(frame["patient_id"])
        relative = (values[lesion_numerical] - groups.transform("mean")) / (groups.transform("std").fillna(0.0) + 1e-6)
        count = np.log(frame.groupby("patient_id")["patient_id"].transform("size").to_numpy(dtype=float))[:, None]
        result["absolute"][name] = absolute
        result["relative"][name] = np.concatenate([absolute, relative.to_numpy(), count], axis=1)
    return result


def fit_and_score(model: str, train_x: np.ndarray, train_y: np.ndarray, eval_x: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Fit `model` ("logistic" or "lightgbm", class-balanced) on train; positive-class scores of each of `eval_x`."""
    if model == "logistic":
        from training.probe import fit_probe

        fitted = fit_probe(train_x, train_y, seed=seed)
        return [fitted.predict_proba(x)[:, list(fitted.classes_).index(1)] for x in eval_x]
    if model == "lightgbm":
        import lightgbm

        booster = lightgbm.LGBMClassifier(random_state=seed, class_weight="balanced", **LIGHTGBM_PARAMS)
        booster.fit(train_x, train_y)
        return [booster.predict_proba(x)[:, 1] for x in eval_x]
    raise ValueError(f"model must be one of {MODELS}, got '{model}'")


__all__ = ["tabular_matrices", "fit_and_score", "MODELS", "LIGHTGBM_PARAMS"]
