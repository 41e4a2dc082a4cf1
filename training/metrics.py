"""Evaluation metrics: AUROC, the ISIC 2024 pAUC and patient-level top-15 sensitivity, balanced accuracy,
retrieval recall@k.

numpy + scikit-learn only (``evaluate.load("roc_auc")`` fetches its script from the Hub and fails
offline). The ISIC 2024 metrics have one implementation, in ``metrics/isic2024_pauc/pauc.py``: that folder
is also an `evaluate` metric module meant to be pushed to the Hub and run without this repository,
so it cannot import from here; instead this module loads that file by path, and
``training.metrics.isic2024_pauc`` / ``top_k_sensitivity`` *are* those functions.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

PAUC_MODULE_PATH = Path(__file__).resolve().parents[1] / "metrics" / "isic2024_pauc" / "pauc.py"


def _load_pauc_module() -> ModuleType:
    """Import ``metrics/isic2024_pauc/pauc.py`` (numpy + scikit-learn, cheap) under a fixed name."""
    name = "slimp_isic2024_pauc"
    if name not in sys.modules:  # registered so that the function pickles (DataLoader workers)
        spec = importlib.util.spec_from_file_location(name, PAUC_MODULE_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


isic2024_pauc = _load_pauc_module().isic2024_pauc
top_k_sensitivity = _load_pauc_module().top_k_sensitivity


def _binary_scores(score: np.ndarray) -> np.ndarray:
    """(N,) positive-class scores from (N,), (N, 1) or (N, 2) scores.

    For (N, 2) the column difference: monotone in the positive-class softmax probability whether
    the columns are probabilities or logits (column 1 of logits alone is not).
    """
    if score.ndim == 2 and score.shape[1] == 2:
        return score[:, 1] - score[:, 0]
    return score.reshape(len(score))


def auroc(y: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve; macro one-vs-rest average when `score` has more than 2 columns.

    Args:
        y: (N,) integer labels (binary 0/1, or class ids in [0, C)).
        score: (N,) positive-class scores, (N, 2) binary logits or probabilities, or (N, C)
            class probabilities (one-vs-rest needs probabilities: softmax logits first).

    Returns:
        The AUROC. Multi-class: the mean over classes with both positives and negatives in `y` of
        the class-vs-rest AUROC of that class's column (scikit-learn's ``multi_class="ovr"``, macro,
        but tolerant of classes absent from a small split). NaN if no class qualifies.
    """
    y, score = np.asarray(y).ravel(), np.asarray(score, dtype=np.float64)
    if len(score) != len(y):
        raise ValueError(f"y has {len(y)} values but score has {len(score)} rows")
    if score.ndim == 2 and score.shape[1] > 2:
        per_class = [
            roc_auc_score(y == c, score[:, c])
            for c in range(score.shape[1])
            if 0 < np.sum(y == c) < len(y)
        ]
        return float(np.mean(per_class)) if per_class else float("nan")
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, _binary_scores(score)))


def balanced_accuracy(y: ArrayLike, pred: ArrayLike) -> float:
    """Mean per-class recall (the ISIC 2018/2019 metric).

    Args:
        y: (N,) integer labels.
        pred: (N,) predicted labels, or (N, C) scores whose argmax is the prediction.
    """
    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    return float(balanced_accuracy_score(np.asarray(y).ravel(), pred))


def classification_metrics(y: ArrayLike, logits: ArrayLike, patient_ids: ArrayLike | None = None,
                           positive_class: int = 1) -> dict[str, float]:
    """The metric bundle (`score_metrics`) of a classifier's logits.

    Args:
        y: (N,) integer labels in [0, C).
        logits: (N, C) classifier logits (C >= 2), or (N, 1) single-logit binary.
        patient_ids: (N,) the patient of each lesion (optional).
        positive_class: the class whose score pAUC and top-15 rank (`training.labels.positive_class` picks it
            from the label names); binary AUROC is this class vs the other.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {logits.shape}")
    if logits.shape[1] == 1:  # single-logit binary classifier
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    if not 0 <= positive_class < logits.shape[1]:
        raise ValueError(f"positive_class must be a class id below {logits.shape[1]}, got {positive_class}")
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    # Binary: rank by the logit difference, since softmax probabilities saturate to ties in float64.
    binary = logits.shape[1] == 2
    positive = logits[:, positive_class] - logits[:, 1 - positive_class] if binary else probs[:, positive_class]
    return score_metrics(y, positive, None if binary else probs, logits.argmax(axis=1), positive_class, patient_ids)


def probability_metrics(y: ArrayLike, probabilities: ArrayLike, classes: Sequence[int], num_classes: int | None = None,
                        positive_class: int = 1, patient_ids: ArrayLike | None = None) -> dict[str, float]:
    """The metric bundle (`score_metrics`) of class probabilities, e.g. a scikit-learn probe's `predict_proba`.

    Args:
        y: (N,) labels in [0, num_classes).
        probabilities: (N, len(classes)) class probabilities, columns in the order of `classes`.
        classes: the class ids the scorer was fitted on (`probe.classes_`).
        num_classes: the dataset's number of classes (default: len(classes)). Binary problems rank by the
            positive-class probability; more classes use macro one-vs-rest AUROC over the classes present in
            `y` (a class the scorer never saw scores 0).
        positive_class: the class whose pAUC and top-15 are reported (NaN if the scorer never saw it).
        patient_ids: (N,) each lesion's patient, for the ISIC 2024 patient-level metric.
    """
    probabilities = np.asarray(probabilities)
    classes = [int(c) for c in classes]
    num_classes = num_classes or len(classes)
    positive = probabilities[:, classes.index(positive_class)] if positive_class in classes else None
    class_scores = None
    if num_classes != 2:
        class_scores = np.zeros((len(probabilities), max(num_classes, max(classes) + 1)))  # column c = class c
        class_scores[:, classes] = probabilities
    predictions = np.asarray(classes)[probabilities.argmax(axis=1)]
    return score_metrics(y, positive, class_scores, predictions, positive_class, patient_ids)


def score_metrics(y: ArrayLike, positive_score: np.ndarray | None, class_scores: np.ndarray | None,
                  predictions: ArrayLike, positive_class: int = 1, patient_ids: ArrayLike | None = None) -> dict[str, float]:
    """The one metric bundle: AUROC, the ISIC 2024 pAUC above 80% TPR, balanced accuracy and, given the lesions'
    patients, the ISIC 2024 patient metric (top-15 retrieval sensitivity).

    Args:
        y: (N,) integer labels.
        positive_score: (N,) scores of `positive_class`, higher = more likely (any monotone score: a logit
            difference, a probability); None when the scorer never saw that class (its metrics are NaN).
        class_scores: (N, C) class probabilities for more than two classes (macro one-vs-rest AUROC); None for
            a binary problem (AUROC of `positive_score`, `positive_class` vs the other).
        predictions: (N,) predicted labels (balanced accuracy).
        positive_class: the class pAUC and top-15 rank.
        patient_ids: (N,) the patient of each lesion (optional).

    Returns:
        ``{"auroc", "pauc_80tpr", "balanced_accuracy"}`` (+ ``"top15_sensitivity"``); pAUC and top-15 are NaN
        when the split lacks either side.
    """
    y = np.asarray(y)
    is_positive = (y == positive_class).astype(int)
    if class_scores is None:
        value = auroc(is_positive, positive_score if positive_score is not None else np.zeros(len(y)))
    else:
        value = auroc(y, class_scores)
    both_sides = positive_score is not None and 0 < is_positive.sum() < len(y)
    result = {
        "auroc": float(value),
        "pauc_80tpr": float(isic2024_pauc(is_positive, positive_score)) if both_sides else float("nan"),
        "balanced_accuracy": balanced_accuracy(y, np.asarray(predictions)),
    }
    if patient_ids is not None:
        result["top15_sensitivity"] = (top_k_sensitivity(is_positive, positive_score, patient_ids, k=15)["sensitivity"]
                                       if positive_score is not None else float("nan"))
    return result


def recall_at_k(
    query_embeds: ArrayLike,
    gallery_embeds: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[int, float]:
    """Retrieval recall@k by cosine similarity; query row i's one positive is gallery row i.

    Similarities are computed `chunk_size` query rows at a time, so memory is O(chunk_size x M)
    (50k x 50k works). Ties with the positive (within 1e-6, e.g. lesions with identical metadata) are
    broken uniformly at random in expectation: the positive counts with probability
    ``clip((k - n_above) / (n_tied + 1), 0, 1)``, so identical embeddings do not inflate recall.

    Args:
        query_embeds: (N, D) query embeddings (e.g. images); need not be normalised.
        gallery_embeds: (M, D) gallery embeddings, M >= N (rows N.. are distractors).
        ks: the cut-offs.
        chunk_size: query rows per similarity block.

    Returns:
        ``{k: recall in [0, 1]}`` for each k in `ks`.
    """
    query = _normalise(np.asarray(query_embeds, dtype=np.float32))
    gallery = _normalise(np.asarray(gallery_embeds, dtype=np.float32))
    if query.shape[1] != gallery.shape[1] or len(gallery) < len(query):
        raise ValueError(f"need (N, D) queries and (M >= N, D) gallery: {query.shape}, {gallery.shape}")
    above, tied = np.empty(len(query)), np.empty(len(query))
    for start in range(0, len(query), chunk_size):
        sims = query[start : start + chunk_size] @ gallery.T  # (chunk, M)
        rows = np.arange(len(sims))
        positive = sims[rows, start + rows][:, None]  # (chunk, 1)
        above[start : start + len(sims)] = (sims > positive + 1e-6).sum(axis=1)
        tied[start : start + len(sims)] = (np.abs(sims - positive) <= 1e-6).sum(axis=1) - 1
    return {k: float(np.clip((k - above) / (tied + 1), 0.0, 1.0).mean()) for k in ks}


def _normalise(x: np.ndarray) -> np.ndarray:
    """(N, D) rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
