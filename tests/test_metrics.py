"""Tests for training.metrics and the `evaluate` module metrics/isic2024_pauc."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from training import metrics
from training.metrics import auroc, balanced_accuracy, classification_metrics, isic2024_pauc, recall_at_k

REPO = Path(__file__).resolve().parents[1]


def pauc_by_integration(y: np.ndarray, score: np.ndarray, min_tpr: float) -> float:
    """Area between the (linearly interpolated) ROC curve and TPR = min_tpr, on a fine FPR grid."""
    fpr, tpr, _ = roc_curve(y, score)
    grid = np.linspace(0.0, 1.0, 1_000_001)
    above = np.clip(np.interp(grid, fpr, tpr) - min_tpr, 0.0, None)
    return float(np.trapezoid(above, grid))


def informative_data(n: int, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels (~10% positive) and noisy scores that separate them partly."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    score = y * 1.5 + rng.normal(size=n)
    return y, (np.round(score, decimals) if decimals is not None else score)


def test_pauc_known_values():
    y = np.array([0, 0, 1, 1, 0, 1])
    score = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert isic2024_pauc(y, score) == pytest.approx(0.2)
    assert isic2024_pauc(y, -score) == pytest.approx(0.0, abs=1e-12)
    # Catching both positives forces FPR = 0.5, so the curve is above 0.8 only on [0.5, 1].
    assert isic2024_pauc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.1)
    assert np.isnan(isic2024_pauc([1, 1], [0.2, 0.3]))


def test_pauc_of_random_scores_is_about_002():
    rng = np.random.default_rng(0)
    y = (rng.random(200_000) < 0.1).astype(int)
    assert isic2024_pauc(y, rng.random(len(y))) == pytest.approx(0.02, abs=0.002)


def test_pauc_is_invariant_to_monotone_transforms():
    y, score = informative_data(5000, seed=1)
    reference = isic2024_pauc(y, score)
    assert 0.03 < reference < 0.19
    for transformed in (np.exp(score), 3.0 * score - 7.0, np.argsort(np.argsort(score))):
        assert isic2024_pauc(y, transformed) == pytest.approx(reference, abs=1e-12)
    assert isic2024_pauc(y, -score) != pytest.approx(reference)


@pytest.mark.parametrize("min_tpr", [0.8, 0.5, 0.0])
@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many tied scores
def test_pauc_agrees_with_numerical_integration(min_tpr, decimals):
    y, score = informative_data(3000, seed=2, decimals=decimals)
    expected = pauc_by_integration(y, score, min_tpr)
    assert isic2024_pauc(y, score, min_tpr=min_tpr) == pytest.approx(expected, abs=1e-5)
    if min_tpr == 0.0:
        assert expected == pytest.approx(roc_auc_score(y, score), abs=1e-5)


def test_pauc_rejects_non_binary_targets():
    with pytest.raises(ValueError, match="binary"):
        isic2024_pauc([0, 1, 2], [0.1, 0.2, 0.3])


def test_training_metrics_uses_the_metric_module_function():
    source = Path(inspect.getsourcefile(isic2024_pauc)).resolve()
    assert source == REPO / "metrics" / "isic2024_pauc" / "pauc.py"
    assert "def isic2024_pauc" not in Path(metrics.__file__).read_text()


def test_evaluate_module_loads_offline_by_path_and_matches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    evaluate = pytest.importorskip("evaluate")
    module = evaluate.load(str(REPO / "metrics" / "isic2024_pauc"))
    y, score = informative_data(2000, seed=3)
    result = module.compute(references=y.tolist(), predictions=score.tolist())
    assert result["pauc"] == pytest.approx(isic2024_pauc(y, score), abs=1e-12)
    result = module.compute(references=y.tolist(), predictions=score.tolist(), min_tpr=0.5)
    assert result["pauc"] == pytest.approx(isic2024_pauc(y, score, min_tpr=0.5), abs=1e-12)
    with pytest.warns(UserWarning, match="one class only"):  # undefined: said, not a silent NaN
        assert np.isnan(module.compute(references=[1, 1, 1], predictions=[0.2, 0.5, 0.9])["pauc"])


def test_auroc_binary_and_two_column_logits():
    y, score = informative_data(1000, seed=4)
    assert auroc(y, score) == pytest.approx(roc_auc_score(y, score))
    logits = np.stack([-score, score], axis=1) * 0.5 + 3.0
    assert auroc(y, logits) == pytest.approx(roc_auc_score(y, score))
    assert np.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))


def test_auroc_multiclass_is_macro_one_vs_rest():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, size=600)
    logits = rng.normal(size=(600, 4)) + np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert auroc(y, probs) == pytest.approx(expected)
    present = y != 3  # a class absent from a small split is skipped, not an error
    per_class = [roc_auc_score(y[present] == c, probs[present, c]) for c in range(3)]
    assert auroc(y[present], probs[present]) == pytest.approx(np.mean(per_class))


def test_balanced_accuracy_and_classification_metrics():
    y = np.array([0, 0, 0, 1])
    assert balanced_accuracy(y, [0, 0, 0, 0]) == pytest.approx(0.5)
    assert balanced_accuracy(y, [[2.0, 1.0], [2.0, 1.0], [0.0, 1.0], [0.0, 1.0]]) == pytest.approx(5 / 6)
    binary = classification_metrics([0, 1, 0, 1], [[0.0, -50.0], [0.0, 60.0], [0.0, 70.0], [0.0, 55.0]])
    # Ranked by logit difference, 55 < 60 < 70 stay apart although all softmax to 1.0 (AUROC 0.75).
    assert binary == pytest.approx({"auroc": 0.5, "balanced_accuracy": 0.75, "pauc_80tpr": 0.1})
    multiclass = classification_metrics([0, 1, 2], np.eye(3))
    assert multiclass == pytest.approx({"auroc": 1.0, "balanced_accuracy": 1.0, "pauc_80tpr": 0.2})  # class 1 vs rest


def brute_force_recall(query: np.ndarray, gallery: np.ndarray, k: int) -> float:
    """Recall@k with the full similarity matrix (no ties in the data)."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    top = np.argsort(-(q @ g.T), axis=1)[:, :k]
    return float(np.mean([i in row for i, row in enumerate(top)]))


def test_recall_at_k_matches_brute_force_and_chunking_does_not_matter():
    rng = np.random.default_rng(6)
    query = rng.normal(size=(300, 16))
    gallery = query + rng.normal(scale=1.2, size=(300, 16))
    gallery = np.concatenate([gallery, rng.normal(size=(50, 16))])  # distractors
    full = recall_at_k(query, gallery, ks=(1, 5, 10), chunk_size=10_000)
    for k in (1, 5, 10):
        assert full[k] == pytest.approx(brute_force_recall(query, gallery, k))
    assert recall_at_k(query, gallery, ks=(1, 5, 10), chunk_size=7) == full
    assert 0.0 < full[1] < full[10] < 1.0


def test_recall_at_k_perfect_and_tied():
    x = np.random.default_rng(7).normal(size=(20, 8))
    assert recall_at_k(x, 3.0 * x, ks=(1,)) == {1: 1.0}
    same = np.ones((20, 8))  # every gallery row ties: expected recall@k = k / 20
    assert recall_at_k(x, same, ks=(1, 5)) == pytest.approx({1: 0.05, 5: 0.25})
    with pytest.raises(ValueError):
        recall_at_k(x, x[:10])
