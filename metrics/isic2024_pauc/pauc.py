"""The ISIC 2024 challenge metrics: partial ROC AUC above a minimum true-positive rate (the primary
metric), and the patient-level top-15 retrieval sensitivity (the secondary prize).

This file is the project's one implementation of both. It imports only numpy and
scikit-learn, so that both the `evaluate` module next to it (``isic2024_pauc.py``, which imports it
relatively and runs from the Hub without the SLIMP repository) and ``training.metrics`` (which loads
this file by path) use exactly this function.

Reference: the official scoring code of the Kaggle competition "ISIC 2024 - Skin Cancer Detection
with 3D-TBP" (https://www.kaggle.com/competitions/isic-2024-challenge, "Evaluation"), and ISIC-Research's
Challenge-2024-Metrics repository (`SecondaryMetric-TopNSensitivity.py`) for the patient-level metric.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score


def isic2024_pauc(y: ArrayLike, score: ArrayLike, min_tpr: float = 0.8) -> float:
    """Partial area under the ROC curve above `min_tpr` true-positive rate (ISIC 2024 metric).

    The area between the ROC curve and the horizontal line TPR = `min_tpr`, over FPR in [0, 1]:
    a value in [0, 1 - min_tpr], i.e. 0..0.2 by default; a perfect ranking scores 0.2 and a random
    one about 0.02. Computed as in the official scoring code: flip the problem (`1 - y`, `-score`),
    take scikit-learn's McClish-standardised partial AUC over FPR in [0, 1 - min_tpr] of the flipped
    problem, and undo the standardisation.

    Args:
        y: (N,) binary targets, 1 = malignant (positive).
        score: (N,) scores, higher = more likely malignant. Only their order matters.
        min_tpr: the TPR threshold, in [0, 1).

    Returns:
        The partial AUC; NaN if `y` holds a single class (the metric is undefined).
    """
    y = np.asarray(y).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != score.shape:
        raise ValueError(f"y has {y.shape[0]} values but score has {score.shape[0]}")
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y must be binary 0/1, got values {np.unique(y)[:10].tolist()}")
    if len(np.unique(y)) < 2:
        return float("nan")
    max_fpr = 1.0 - min_tpr
    scaled = roc_auc_score(1 - y, -score, max_fpr=max_fpr)  # McClish: 0.5 random .. 1 perfect
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5))


def top_k_sensitivity(y: ArrayLike, score: ArrayLike, patient_ids: ArrayLike, k: int = 15) -> dict[str, float]:
    """The ISIC 2024 patient-level metric: how many of each patient's malignant lesions are among that
    patient's `k` highest-scored lesions (what a dermatologist would look at first).

    Over the patients with at least one malignant lesion: `sensitivity` is the mean over patients of the
    share of the patient's malignant lesions found in its top `k` (the official ranking's "average rank",
    each patient weighing the same), and `found_fraction` is the share of all malignant lesions found
    (the official script's "sensitivity"). Ties at the cut-off are broken at random in expectation, so
    tied scores can neither inflate nor deflate the result.

    Args:
        y: (N,) binary targets, 1 = malignant.
        score: (N,) scores, higher = more likely malignant.
        patient_ids: (N,) the patient of each lesion.
        k: lesions looked at per patient (15 in the challenge).

    Returns:
        ``{"sensitivity", "found_fraction", "patients"}`` (NaN and 0 patients without any malignant lesion).
    """
    y = np.asarray(y).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    patients = np.asarray(patient_ids, dtype=object).ravel()
    if not (y.shape == score.shape == patients.shape):
        raise ValueError(f"y, score and patient_ids need one value per lesion, got {y.shape[0]}, {score.shape[0]}, "
                         f"{patients.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y must be binary 0/1, got values {np.unique(y)[:10].tolist()}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    _, codes = np.unique(patients.astype(str), return_inverse=True)
    shares, found_total, positives_total = [], 0.0, 0
    for patient in np.unique(codes[y == 1]):
        rows = codes == patient
        s, t = score[rows], y[rows]
        positives = int(t.sum())
        if len(s) <= k:
            found = float(positives)
        else:
            cut = np.sort(s)[::-1][k - 1]  # the k-th highest score
            above, tied = s > cut, s == cut
            slots = k - int(above.sum())
            found = float(t[above].sum()) + float(t[tied].sum()) * slots / int(tied.sum())
        shares.append(found / positives)
        found_total += found
        positives_total += positives
    if not shares:
        return {"sensitivity": float("nan"), "found_fraction": float("nan"), "patients": 0}
    return {"sensitivity": float(np.mean(shares)), "found_fraction": found_total / positives_total, "patients": len(shares)}
