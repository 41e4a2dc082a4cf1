"""The probe protocol behind every table (evaluate.py, pretrain.py's closing probe, the quality bench): linear
probes, full and k-shot, on frozen SLIMP features, and image <-> metadata retrieval.

    features = {split: embed_split(model, dataset, collator) for split, dataset in splits.items()}  # training/embeddings.py
    results, curves = evaluate_features(features, "train", ["validation", "test"], label_names, seeds=[0, 1, 2],
                                        shots=[1, 5, 10, 50], C=list(PROBE_C_GRID))
    x = probe_inputs(features["train"], "image+metadata+context", "tower")          # one probe by hand
    probe = fit_probe(x, features["train"]["labels"])

The protocol (`evaluate_features`): a logistic-regression probe (standardisation + L2, class-balanced, one BLAS
thread) on the whole training split, its C picked from a grid by AUROC on the validation split, and k-shot
probes on k lesions of each class drawn per seed (a k larger than the rarest class is skipped and noted);
metrics (`training.metrics.probability_metrics`): AUROC, the ISIC 2024 pAUC above 80% TPR and top-15
sensitivity for the positive class, balanced accuracy, as mean ± sample std over the seeds; retrieval
recall@1/5/10 of image -> lesion metadata and back within each evaluated split.

Feature sets (`FEATURE_SETS`, stated in `configuration_slimp.py` with the `classifier_features` each one is),
each from either representation (`CLASSIFIER_REPRESENTATIONS`: `tower`, the tower outputs before the projections;
`projection`, the L2-normalised embeddings the losses compare):

- `image` (`image`): the image feature;
- `image+context` (`image+context`): plus the patient context of the image feature (the lesion minus the mean of
  the same patient's other lesions, `pooling.patient_context`), the dermatologist's "ugly duckling" comparison;
- `image+metadata` (`image+lesion+patient`): the image, lesion-metadata and patient-metadata features;
- `image+metadata+context` (`image+lesion+patient+context`): plus the context of the image and lesion parts.

A probe reads exactly what a `SLIMPForLesionClassification` with those `classifier_features` reads, in its order,
so `finetune.py --mode linear` fits this probe on the same features. The pooled phenotype is not an input: the
context already holds the patient's other lesions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from modeling_slimp.configuration_slimp import CLASSIFIER_REPRESENTATIONS, DEFAULT_CLASSIFIER_REPRESENTATION, FEATURE_SETS
from training.embeddings import CONTEXT_PARTS
from training.metrics import probability_metrics, recall_at_k

METRICS = ("auroc", "pauc_80tpr", "top15_sensitivity", "balanced_accuracy")
PROBE_C_GRID = (0.01, 0.1, 1.0)  # the probe's inverse L2 strengths; each feature set takes the best on validation
RETRIEVAL_KS = (1, 5, 10)


def probe_inputs(features: dict, feature_set: str, representation: str = DEFAULT_CLASSIFIER_REPRESENTATION) -> np.ndarray:
    """The probe's input matrix (N, F) for a feature set of `embed_split` features: the parts of its
    `classifier_features` in the classifier's order, the context last (that of the image, then the lesion part)."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set must be one of {list(FEATURE_SETS)}, got '{feature_set}'")
    if representation not in CLASSIFIER_REPRESENTATIONS:
        raise ValueError(f"representation must be one of {CLASSIFIER_REPRESENTATIONS}, got '{representation}'")
    parts, values = FEATURE_SETS[feature_set].split("+"), features[representation]
    columns = [values[part] for part in parts if part != "context"]
    if "context" in parts:
        columns += [values["context"][part] for part in CONTEXT_PARTS if part in parts]
    return np.concatenate(columns, axis=1)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0, C: float = 1.0, class_weight="balanced"):
    """The linear probe: standardisation + logistic regression (class-balanced by default; `class_weight`
    as scikit-learn's: "balanced", None or {class: weight}), fitted (a scikit-learn pipeline;
    `predict_proba` columns follow its `classes_`). Fitted with one BLAS thread."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, class_weight=class_weight, random_state=seed))
    # One BLAS thread: the solver's products are small, and threads cost more than they give (measured on the 2-core
    # development machine: the evaluation protocol's probes 12-17 s -> 0.95 s, a 40,000 x 400 fit 0.45 s -> 0.28 s).
    with threadpool_limits(limits=1, user_api="blas"):
        return probe.fit(train_x, train_y)


def retrieval_metrics(features: dict, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of image -> lesion metadata and lesion metadata -> image over the split (the projected
    embeddings the lesion loss compares)."""
    result, embeds = {}, features["projection"]
    for name, query, gallery in (("image_to_metadata", "image", "lesion"), ("metadata_to_image", "lesion", "image")):
        for k, value in recall_at_k(embeds[query], embeds[gallery], ks=ks).items():
            result[f"{name}_recall@{k}"] = float(value)
    return result


# ----- the protocol: full and k-shot probes and retrieval, pure functions of the extracted features -----

def summarise(values: list[float]) -> dict:
    """Mean ± sample std (ddof 1; 0 for one value) over the finite values; `n` counts them."""
    finite = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else float("nan")
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else (0.0 if finite else float("nan"))
    return {"mean": mean, "std": std, "n": len(finite), "values": [float(v) for v in values]}


def kshot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Row indices of k lesions of each class present in `labels`, drawn without replacement."""
    rng = np.random.default_rng([seed, k])
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in np.unique(labels)])


def feasible_shots(labels: np.ndarray, shots: list[int], label_names: list[str]) -> tuple[list[int], list[dict]]:
    """The k that the training split can supply for every class, and a note for each skipped one."""
    classes, counts = np.unique(labels, return_counts=True)
    rarest = int(counts.argmin())
    kept, skipped = [], []
    for k in sorted(set(shots)):
        if k <= counts[rarest]:
            kept.append(k)
        else:
            skipped.append({"k": k, "reason": f"class '{label_names[classes[rarest]]}' has only {counts[rarest]} "
                                              f"training lesions (k-shot needs k per class)"})
    return kept, skipped


def select_C(train_x: np.ndarray, train_y: np.ndarray, select_x: np.ndarray, select_y: np.ndarray, grid: list[float],
             seed: int = 0, positive_class: int = 1, progress=None) -> tuple[float, object | None]:
    """(C, probe): the L2 strength of the probe with the best AUROC on the selection split (the first of equal
    ones) and that probe, fitted on all of `train_x`; the grid's middle value and None (nothing fitted) when the
    selection split cannot rank (one class only). `progress`: a tqdm bar advanced once per fit."""
    if len(grid) == 1 or len(np.unique(select_y)) < 2:
        return grid[len(grid) // 2], None
    best, best_probe, best_auroc = grid[0], None, -np.inf
    for C in grid:
        probe = fit_probe(train_x, train_y, seed=seed, C=C)
        if progress is not None:
            progress.update(1)
        value = probability_metrics(select_y, probe.predict_proba(select_x), probe.classes_, positive_class=positive_class)["auroc"]
        if value > best_auroc + 1e-12:
            best, best_probe, best_auroc = C, probe, value
    return best, best_probe


def evaluate_features(features: dict[str, dict[str, np.ndarray]], train_split: str, eval_splits: list[str],
                      label_names: list[str], seeds: list[int], shots: list[int], C: float | list[float] = 1.0,
                      positive_class: int = 1, feature_sets: tuple[str, ...] = tuple(FEATURE_SETS),
                      representation: str = DEFAULT_CLASSIFIER_REPRESENTATION, select_split: str | None = None,
                      retrieval: bool = True, progress: bool = True) -> tuple[dict, dict]:
    """Full and k-shot probes and retrieval on extracted features.

    `C` is the probe's inverse L2 strength, or a grid of them: each feature set then uses the value with the
    best AUROC on `select_split` (default: "validation" when it is among `eval_splits`; without one, the
    grid's middle value), for its full and k-shot probes alike.

    The full probe is fitted once per feature set (the lbfgs solver is deterministic: every seed would fit the
    same model; the probe that won the selection of C is reused) and counted once per seed; the k-shot probes
    are fitted per seed and k. A progress bar counts the fits (`progress=False` hides it). `retrieval=False` skips
    the retrieval metrics.

    Returns `(results, curves)`: `results` has `linear_probe` / `kshot` as
    `{split: {feature_set: {metric: summary}}}` (k-shot one level deeper, by str(k)), `kshot_skipped`,
    `probe_C` (the value each feature set used) and `retrieval`; `curves` holds the first seed's full-probe
    scores of the last split for the ROC plot.
    """
    train = features[train_split]
    num_classes = len(label_names)
    kept, skipped = feasible_shots(train["labels"], shots, label_names)
    draws = {(k, seed): kshot_indices(train["labels"], k, seed) for k in kept for seed in seeds}
    raw = {"full": {}, "kshot": {}}  # (split, feature_set[, k]) -> metric -> values over seeds
    curves = {"split": eval_splits[-1], "labels": features[eval_splits[-1]]["labels"], "scores": {}}
    inputs = {(split, feature_set): probe_inputs(features[split], feature_set, representation)
              for split in [train_split, *eval_splits] for feature_set in feature_sets}
    grid = [float(c) for c in (C if isinstance(C, (list, tuple)) else [C])]
    select = select_split or ("validation" if "validation" in eval_splits else None)  # never the test split by default
    chosen = {}
    fits = len(feature_sets) * ((len(grid) if select is not None and len(grid) > 1 else 1) + len(seeds) * len(kept))
    bar = tqdm(total=fits, desc="probes", unit="fit", disable=not progress)
    for feature_set in feature_sets:
        train_x = inputs[train_split, feature_set]
        chosen[feature_set], full = (grid[len(grid) // 2], None) if select is None else select_C(
            train_x, train["labels"], inputs[select, feature_set], features[select]["labels"], grid, seeds[0],
            positive_class, bar)
        if full is None:
            full = fit_probe(train_x, train["labels"], seed=seeds[0], C=chosen[feature_set])
            bar.update(1)
        for seed in seeds:
            runs = [("full", None, full)] + [("kshot", k, draws[k, seed]) for k in kept]
            for kind, k, probe in runs:
                if kind == "kshot":
                    probe = fit_probe(train_x[probe], train["labels"][probe], seed=seed, C=chosen[feature_set])
                    bar.update(1)
                for split in eval_splits:
                    scores = probe.predict_proba(inputs[split, feature_set])
                    metrics = probability_metrics(features[split]["labels"], scores, probe.classes_, num_classes, positive_class,
                                            patient_ids=features[split]["patient_ids"])
                    key = (split, feature_set) if kind == "full" else (split, feature_set, k)
                    for name, value in metrics.items():
                        raw[kind].setdefault(key, {}).setdefault(name, []).append(value)
                    if kind == "full" and seed == seeds[0] and split == curves["split"]:
                        curves["scores"][feature_set] = (scores, [int(c) for c in probe.classes_])
    bar.close()
    results = {"linear_probe": {}, "kshot": {}, "kshot_skipped": skipped, "probe_C": chosen, "retrieval": {}}
    for (split, feature_set), metrics in raw["full"].items():
        results["linear_probe"].setdefault(split, {})[feature_set] = {m: summarise(v) for m, v in metrics.items()}
    for (split, feature_set, k), metrics in raw["kshot"].items():
        results["kshot"].setdefault(split, {}).setdefault(feature_set, {})[str(k)] = {m: summarise(v) for m, v in metrics.items()}
    for split in eval_splits if retrieval else []:
        recalls = retrieval_metrics(features[split], ks=RETRIEVAL_KS)
        recalls.update({f"chance_recall@{k}": min(1.0, k / len(features[split]["patient_codes"])) for k in RETRIEVAL_KS})
        results["retrieval"][split] = recalls
    return results, curves


__all__ = ["METRICS", "PROBE_C_GRID", "RETRIEVAL_KS", "probe_inputs", "fit_probe",
           "retrieval_metrics", "summarise", "kshot_indices", "feasible_shots", "select_C", "evaluate_features"]
