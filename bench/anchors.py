"""Reference rows without any pre-training: the raw metadata, read by logistic regression and LightGBM,
as absolute values, as patient-relative deviations, and both (the ISIC 2024 winning recipe: LightGBM on
both). The features are `training/tabular.py`'s, fitted on the train split (medians, category vocabularies).

    matrices = tabular_matrices(splits, schema)     # {"absolute": {split: X}, "patient-relative": ..., "both": ...}
    (scores,) = fit_and_score("lightgbm", matrices["both"]["train"], y_train, [matrices["both"]["test"]], seed=0)
"""

from __future__ import annotations

import numpy as np

from training.tabular import MODELS, fit_and_score, tabular_frames

VIEWS = ("absolute", "patient-relative", "both")
RECIPE = ("lightgbm", "both")  # the ISIC 2024 winners' tabular model


def _frame(dataset, schema: dict):
    columns = ["patient_id", "label"] + [c for level in ("lesion", "patient") for kind in ("numerical", "categorical")
                                         for c in schema[level][kind]]
    return dataset.select_columns([c for c in columns if c in dataset.column_names]).to_pandas()


def tabular_matrices(splits: dict, schema: dict) -> dict[str, dict[str, np.ndarray]]:
    """Feature matrices of each view (`VIEWS`) and split; statistics come from the `train` split."""
    numerical = schema["lesion"]["numerical"] + schema["patient"]["numerical"]
    categorical = schema["lesion"]["categorical"] + schema["patient"]["categorical"]
    fitted = None
    result: dict[str, dict[str, np.ndarray]] = {view: {} for view in VIEWS}
    for name in ["train"] + [s for s in splits if s != "train"]:
        absolute, relative, statistics = tabular_frames(
            _frame(splits[name], schema), numerical, categorical, lesion_numerical=schema["lesion"]["numerical"],
            medians=None if fitted is None else fitted[0], vocabularies=None if fitted is None else fitted[1])
        fitted = fitted or statistics
        result["absolute"][name], result["patient-relative"][name] = absolute.to_numpy(), relative.to_numpy()
        result["both"][name] = np.concatenate([result["absolute"][name], result["patient-relative"][name]], axis=1)
    return result


__all__ = ["VIEWS", "RECIPE", "MODELS", "tabular_matrices", "fit_and_score"]
