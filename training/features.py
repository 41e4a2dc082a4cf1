"""Frozen SLIMP features of a dataset split, the linear probe, and image<->metadata retrieval.

Shared by `pretrain.py` (the probe printed after training), `evaluate.py` (the full protocol) and
`extrapolate.py` (the reference bank). Batches hold whole patients, so that phenotype and patient
features see all of a patient's lesions (up to `batch_size` lesions per patient).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from modeling_slimp import SLIMPModel
from training.metrics import auroc, balanced_accuracy, isic2024_pauc, recall_at_k

FEATURE_SETS = ("image", "image+metadata")


def patient_batches(patient_ids: Sequence, batch_size: int) -> list[list[int]]:
    """Row indices packed into batches of at most `batch_size` rows without splitting a patient
    (a patient with more rows than that is split into consecutive batches of its own)."""
    rows_of: dict = {}
    for row, patient in enumerate(patient_ids):
        rows_of.setdefault(patient, []).append(row)
    batches, current = [], []
    for rows in rows_of.values():
        if current and len(current) + len(rows) > batch_size:
            batches.append(current)
            current = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if len(current) + len(chunk) > batch_size:
                batches.append(current)
                current = []
            current.extend(chunk)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def extract_features(model: SLIMPModel, collator, dataset, batch_size: int = 256, num_workers: int = 0,
                     device: torch.device | str | None = None) -> dict[str, np.ndarray]:
    """Per-lesion L2-normalised embeddings of a split, in dataset order.

    Returns `image`, `lesion_metadata`, `patient_metadata`, `phenotype` (N, D) arrays (patient-level
    ones repeated for each of the patient's lesions), `labels` (N,) and `patient_ids` (N,).
    `collator` is an evaluation `SLIMPCollator` (deterministic transforms).
    """
    model.eval()
    device = torch.device(device) if device is not None else model.device
    batches = patient_batches(dataset["patient_id"], batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collator, num_workers=num_workers)
    keys = ("image", "lesion_metadata", "patient_metadata", "phenotype")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    labels: list[np.ndarray] = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        batch_labels = batch.pop("labels", None)
        batch.pop("ssl_pixel_values", None)
        out = model(**batch)
        index = batch["patient_index"]
        for key, value in zip(keys, (out.image_embeds, out.lesion_metadata_embeds,
                                     out.patient_metadata_embeds[index], out.phenotype_embeds[index])):
            parts[key].append(value.float().cpu().numpy())
        if batch_labels is not None:
            labels.append(batch_labels.cpu().numpy())
    order = np.argsort(np.concatenate(batches), kind="stable")  # back to dataset order
    features = {key: np.concatenate(value)[order] for key, value in parts.items()}
    features["labels"] = np.concatenate(labels)[order] if labels else np.zeros(0)
    features["patient_ids"] = np.asarray(dataset["patient_id"], dtype=object)
    return features


def probe_inputs(features: dict[str, np.ndarray], feature_set: str) -> np.ndarray:
    """The probe's input: image embeddings only, or image + lesion metadata + patient metadata +
    phenotype (the patient context a dermatologist uses to spot an "ugly duckling")."""
    if feature_set == "image":
        return features["image"]
    if feature_set == "image+metadata":
        return np.concatenate([features[k] for k in ("image", "lesion_metadata", "patient_metadata", "phenotype")], axis=1)
    raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got '{feature_set}'")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0, C: float = 1.0) -> dict[str, float]:
    """Logistic regression on standardised frozen features; AUROC, ISIC 2024 pAUC, balanced accuracy.

    Binary labels use the positive-class score; more classes use macro one-vs-rest AUROC (pAUC is
    then reported for class 1 vs rest when present).
    """
    probe = fit_probe(train_x, train_y, seed=seed, C=C)
    return probe_metrics(test_y, probe.predict_proba(test_x), probe.classes_)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0, C: float = 1.0):
    """The linear probe: standardisation + class-balanced logistic regression, fitted (a scikit-learn
    pipeline; `predict_proba` columns follow its `classes_`)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, class_weight="balanced", random_state=seed))
    return probe.fit(train_x, train_y)


def probe_metrics(test_y: np.ndarray, scores: np.ndarray, classes: Sequence[int], num_classes: int | None = None,
                  positive_class: int = 1) -> dict[str, float]:
    """AUROC, ISIC 2024 pAUC and balanced accuracy of probe scores.

    Args:
        test_y: (N,) labels in [0, num_classes).
        scores: (N, len(classes)) class probabilities, columns in the order of `classes`.
        classes: the class ids the probe was trained on (`probe.classes_`).
        num_classes: the dataset's number of classes (default: len(classes)). Binary problems use the
            positive-class score; more classes use macro one-vs-rest AUROC over the classes present in
            `test_y` (a class the probe never saw scores 0).
        positive_class: the class whose one-vs-rest pAUC is reported (NaN if the probe never saw it).
    """
    classes = [int(c) for c in classes]
    num_classes = num_classes or len(classes)
    seen = positive_class in classes
    positive = scores[:, classes.index(positive_class)] if seen else np.zeros(len(scores))
    if num_classes == 2:
        ranking = positive
    else:
        ranking = np.zeros((len(scores), max(num_classes, max(classes) + 1)))  # column c = class c
        ranking[:, classes] = scores
    return {
        "auroc": float(auroc(test_y, ranking)),
        "pauc_80tpr": float(isic2024_pauc((test_y == positive_class).astype(int), positive)) if seen else float("nan"),
        "balanced_accuracy": float(balanced_accuracy(test_y, np.asarray(classes)[scores.argmax(1)])),
    }


def retrieval_metrics(features: dict[str, np.ndarray], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of image -> lesion metadata and lesion metadata -> image over the split."""
    result = {}
    for name, query, gallery in (("image_to_metadata", "image", "lesion_metadata"),
                                 ("metadata_to_image", "lesion_metadata", "image")):
        for k, value in recall_at_k(features[query], features[gallery], ks=ks).items():
            result[f"{name}_recall@{k}"] = float(value)
    return result


__all__ = ["FEATURE_SETS", "patient_batches", "extract_features", "probe_inputs", "linear_probe", "fit_probe", "probe_metrics",
           "retrieval_metrics"]
