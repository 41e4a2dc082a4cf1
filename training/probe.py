"""Linear probes on frozen SLIMP features, and image <-> metadata retrieval.

    features = embed_split(model, dataset, collator)                       # training/embeddings.py
    x = probe_inputs(features, "image+metadata+context", "tower")
    probe = fit_probe(x_train, y_train); metrics = probe_metrics(y_test, probe.predict_proba(x_test), probe.classes_)

Feature sets (`FEATURE_SETS`), each from either representation (`tower`: the tower outputs before the
projections; `projection`: the L2-normalised embeddings the losses compare):

- `image`: the image feature;
- `image+context`: plus the patient context of the image feature (the lesion minus the mean of the same
  patient's other lesions, `PatientSums.context`), the dermatologist's "ugly duckling" comparison;
- `image+metadata`: the image, lesion-metadata and patient-metadata features;
- `image+metadata+context`: plus the context of the image + lesion-metadata representation.

These are the inputs `SLIMPForLesionClassification` can read (`classifier_features` image, lesion, patient,
context), so `finetune.py --mode linear` fits this probe on the same features. The pooled phenotype is
not an input: the context already holds the patient's other lesions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from modeling_slimp.configuration_slimp import DEFAULT_CLASSIFIER_REPRESENTATION
from training.embeddings import REPRESENTATIONS, context_of
from training.metrics import auroc, balanced_accuracy, isic2024_pauc, recall_at_k, top_k_sensitivity

FEATURE_SETS = ("image", "image+context", "image+metadata", "image+metadata+context")
# Default representation of the probes, chosen by measurement (bench/quality.py: the tower outputs probe
# better than the projected embeddings on validation, for every pre-training variant).
DEFAULT_REPRESENTATION = DEFAULT_CLASSIFIER_REPRESENTATION  # what the default classifier head reads


def _key(name: str, representation: str) -> str:
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got '{representation}'")
    return name if representation == "projection" else f"{name}_tower"


def probe_inputs(features: dict[str, np.ndarray], feature_set: str, representation: str = DEFAULT_REPRESENTATION) -> np.ndarray:
    """The probe's input matrix (N, F) for a feature set (see the module docstring) of `embed_split` features."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got '{feature_set}'")
    lesion_level = ["image"] + (["lesion_metadata"] if feature_set.startswith("image+metadata") else [])
    parts = [features[_key(name, representation)] for name in lesion_level]
    if feature_set.startswith("image+metadata"):
        parts.append(features[_key("patient_metadata", representation)])
    if feature_set.endswith("+context"):
        representation_rows = torch.from_numpy(np.concatenate([features[_key(n, representation)] for n in lesion_level], axis=1))
        codes = torch.from_numpy(np.asarray(features["patient_codes"], dtype=np.int64))
        parts.append(context_of(representation_rows.double(), codes).float().numpy())
    return np.concatenate(parts, axis=1)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0, C: float = 1.0, class_weight="balanced"):
    """The linear probe: standardisation + logistic regression (class-balanced by default; `class_weight`
    as scikit-learn's: "balanced", None or {class: weight}), fitted (a scikit-learn pipeline;
    `predict_proba` columns follow its `classes_`). Fitted with one BLAS thread."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, class_weight=class_weight, random_state=seed))
    # One BLAS thread: the solver's products are small, and threads cost more than they give (measured on the 2-core
    # development machine: the evaluation protocol's probes 12-17 s -> 0.95 s, a 40,000 x 400 fit 0.45 s -> 0.28 s).
    with threadpool_limits(limits=1, user_api="blas"):
        return probe.fit(train_x, train_y)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0,
                 C: float = 1.0, test_patient_ids: Sequence | None = None, positive_class: int = 1) -> dict[str, float]:
    """Fit on train, score test: AUROC, ISIC 2024 pAUC, balanced accuracy (and top-15 with patient ids), the
    ranking metrics for `positive_class`."""
    probe = fit_probe(train_x, train_y, seed=seed, C=C)
    return probe_metrics(test_y, probe.predict_proba(test_x), probe.classes_, positive_class=positive_class,
                         patient_ids=test_patient_ids)


def probe_metrics(test_y: np.ndarray, scores: np.ndarray, classes: Sequence[int], num_classes: int | None = None,
                  positive_class: int = 1, patient_ids: Sequence | None = None) -> dict[str, float]:
    """AUROC, ISIC 2024 pAUC, balanced accuracy and (given `patient_ids`) top-15 sensitivity of probe scores.

    Args:
        test_y: (N,) labels in [0, num_classes).
        scores: (N, len(classes)) class probabilities, columns in the order of `classes`.
        classes: the class ids the probe was trained on (`probe.classes_`).
        num_classes: the dataset's number of classes (default: len(classes)). Binary problems use the
            positive-class score; more classes use macro one-vs-rest AUROC over the classes present in
            `test_y` (a class the probe never saw scores 0).
        positive_class: the class whose one-vs-rest pAUC and top-15 are reported (NaN if the probe never saw it).
        patient_ids: (N,) each lesion's patient, for the ISIC 2024 patient-level metric.
    """
    classes = [int(c) for c in classes]
    num_classes = num_classes or len(classes)
    seen = positive_class in classes
    positive = scores[:, classes.index(positive_class)] if seen else np.zeros(len(scores))
    is_positive = (test_y == positive_class).astype(int)
    if num_classes == 2:
        ranking, ranked = positive, is_positive  # this class's score vs the other's
    else:
        ranking = np.zeros((len(scores), max(num_classes, max(classes) + 1)))  # column c = class c
        ranking[:, classes] = scores
        ranked = test_y
    result = {
        "auroc": float(auroc(ranked, ranking)),
        "pauc_80tpr": float(isic2024_pauc(is_positive, positive)) if seen else float("nan"),
        "balanced_accuracy": float(balanced_accuracy(test_y, np.asarray(classes)[scores.argmax(1)])),
    }
    if patient_ids is not None:
        result["top15_sensitivity"] = top_k_sensitivity(is_positive, positive, patient_ids)["sensitivity"] if seen else float("nan")
    return result


def retrieval_metrics(features: dict[str, np.ndarray], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of image -> lesion metadata and lesion metadata -> image over the split (the embeddings
    the lesion loss compares)."""
    result = {}
    for name, query, gallery in (("image_to_metadata", "image", "lesion_metadata"),
                                 ("metadata_to_image", "lesion_metadata", "image")):
        for k, value in recall_at_k(features[query], features[gallery], ks=ks).items():
            result[f"{name}_recall@{k}"] = float(value)
    return result


__all__ = ["FEATURE_SETS", "DEFAULT_REPRESENTATION", "probe_inputs", "fit_probe", "linear_probe", "probe_metrics",
           "retrieval_metrics"]
