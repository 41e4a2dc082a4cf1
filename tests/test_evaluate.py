"""training/evaluate.py: full and k-shot linear probes, retrieval, the report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests._eval_fixtures import relabelled_dataset, tiny_data_and_checkpoint
from training import evaluate
from training import probe as protocol
from modeling_slimp.pooling import patient_context
from training.probe import FEATURE_SETS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RANGES = {"auroc": (0.0, 1.0), "pauc_80tpr": (0.0, 0.2), "balanced_accuracy": (0.0, 1.0)}


def projection_features(image, lesion, patient, phenotype, labels, codes) -> dict:
    """`embed_split`'s layout for hand-made projected embeddings (the patient context computed as it computes it)."""
    index = torch.from_numpy(codes)
    context = {name: patient_context(torch.from_numpy(x).double(), index).float().numpy() for name, x in (("image", image), ("lesion", lesion))}
    return {"projection": {"image": image, "lesion": lesion, "patient": patient, "phenotype": phenotype, "context": context},
            "labels": labels, "patient_codes": codes, "patient_ids": np.array([f"p{c}" for c in codes], dtype=object)}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_data_and_checkpoint(tmp_path_factory)


def _check_summary(summary: dict, metric: str, seeds: int) -> None:
    low, high = RANGES[metric]
    assert summary["n"] == seeds, summary
    assert len(summary["values"]) == seeds
    assert low <= summary["mean"] <= high, (metric, summary)
    assert summary["std"] >= 0.0
    assert math.isclose(summary["mean"], float(np.mean(summary["values"])), abs_tol=1e-12)


def test_binary_report(tiny, tmp_path):
    data, checkpoint = tiny
    output = tmp_path / "report"
    results = evaluate.main(["--model_dir", str(checkpoint), "--dataset_dir", str(data), "--output_dir", str(output),
                             "--seeds", "0", "1", "--shots", "1", "5", "500", "--splits", "train", "validation", "test",
                             "--batch_size", "64"])
    for name in ("results.json", "results.md", "roc.png", "kshot.png"):
        assert (output / name).is_file(), name
    for name in ("roc.png", "kshot.png"):
        assert (output / name).read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((output / "results.json").read_text())  # strict JSON: NaN would have been written as null
    assert saved["num_seeds"] == 2 and saved["seeds"] == [0, 1]
    assert saved["splits"]["train"]["lesions"] == sum(saved["splits"]["train"]["labels"].values())

    for split in ("validation", "test"):
        for feature_set in FEATURE_SETS:
            for metric in RANGES:
                _check_summary(saved["linear_probe"][split][feature_set][metric], metric, seeds=2)
                for k in ("1", "5"):
                    _check_summary(saved["kshot"][split][feature_set][k][metric], metric, seeds=2)
            assert "500" not in saved["kshot"][split][feature_set]
    # k = 500 exceeds the 12 training malignancies: noted, not run, not a crash.
    assert [s["k"] for s in saved["kshot_skipped"]] == [500]
    assert "malignant" in saved["kshot_skipped"][0]["reason"]
    # Two seeds draw different 1-shot training sets: some k-shot result must differ between them.
    spreads = [saved["kshot"][s][f]["1"][m]["std"] for s in ("validation", "test") for f in FEATURE_SETS for m in RANGES]
    assert max(spreads) > 0

    for split in ("validation", "test"):
        retrieval = saved["retrieval"][split]
        assert set(retrieval) == {f"{d}_recall@{k}" for d in ("image_to_metadata", "metadata_to_image", "chance") for k in (1, 5, 10)}
        assert all(0.0 <= v <= 1.0 for v in retrieval.values())
        assert retrieval["chance_recall@1"] == pytest.approx(1 / saved["splits"][split]["lesions"])
        for direction in ("image_to_metadata", "metadata_to_image"):
            assert retrieval[f"{direction}_recall@1"] <= retrieval[f"{direction}_recall@5"] <= retrieval[f"{direction}_recall@10"]

    markdown = (output / "results.md").read_text()
    assert "| image+metadata |" in markdown and "±" in markdown
    assert "k = 500" in markdown
    assert "## Retrieval on `test`" in markdown
    assert results["linear_probe"]["test"]["image"]["auroc"]["n"] == 2


def test_multiclass_report(tiny, tmp_path):
    data, checkpoint = tiny
    three_class = relabelled_dataset(data, tmp_path / "three_class")
    output = tmp_path / "report"
    results = evaluate.main(["--model_dir", str(checkpoint), "--dataset_dir", str(three_class), "--output_dir", str(output),
                             "--seeds", "0", "--shots", "2", "100", "--splits", "train", "test", "--pauc_class", "malignant"])
    assert results["label_names"] == ["low_hue", "high_hue", "malignant"]
    assert results["pauc_class"] == "malignant"
    assert set(results["splits"]["test"]["labels"]) == {"low_hue", "high_hue", "malignant"}
    assert all(count > 0 for count in results["splits"]["test"]["labels"].values())
    for feature_set in FEATURE_SETS:
        for metric in RANGES:
            _check_summary(results["linear_probe"]["test"][feature_set][metric], metric, seeds=1)
            _check_summary(results["kshot"]["test"][feature_set]["2"][metric], metric, seeds=1)
    assert [s["k"] for s in results["kshot_skipped"]] == [100]
    assert (output / "roc.png").read_bytes()[:8] == PNG_MAGIC
    assert (output / "kshot.png").read_bytes()[:8] == PNG_MAGIC
    assert "'malignant' vs rest" in (output / "results.md").read_text()


def test_evaluate_features_sanity():
    """Metadata embeddings that are noisy copies of the image embeddings retrieve each other far above
    chance; labels given by one direction of the image embedding are probed almost perfectly."""
    rng = np.random.default_rng(0)

    def split(n):
        image = rng.normal(size=(n, 16))
        labels = (image[:, 0] > 0.3).astype(int)
        metadata = image + 0.05 * rng.normal(size=image.shape)
        codes = np.arange(n) // 4  # 4 lesions per patient
        return projection_features(image, metadata, rng.normal(size=(n, 16)), rng.normal(size=(n, 16)), labels, codes)

    features = {"train": split(200), "test": split(100)}
    results, curves = protocol.evaluate_features(features, "train", ["test"], ["benign", "malignant"], seeds=[0, 1, 2],
                                                 shots=[1, 10, 1000], representation="projection")
    retrieval = results["retrieval"]["test"]
    assert retrieval["image_to_metadata_recall@1"] > 0.9 > 10 * retrieval["chance_recall@1"]
    assert retrieval["metadata_to_image_recall@1"] > 0.9
    assert results["linear_probe"]["test"]["image"]["auroc"]["mean"] > 0.95
    assert results["kshot"]["test"]["image"]["10"]["auroc"]["n"] == 3
    assert [s["k"] for s in results["kshot_skipped"]] == [1000]
    assert set(curves["scores"]) == set(FEATURE_SETS)


def test_evaluate_features_multiclass():
    """3 classes given by the image embedding: macro AUROC near 1, computed over all three columns."""
    rng = np.random.default_rng(1)

    def split(n):
        image = rng.normal(size=(n, 8))
        labels = np.digitize(image[:, 0], [-0.4, 0.4])  # 0, 1, 2
        codes = np.arange(n) // 3
        return projection_features(image, rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), labels, codes)

    features = {"train": split(300), "test": split(150)}
    results, curves = protocol.evaluate_features(features, "train", ["test"], ["a", "b", "c"], seeds=[0], shots=[20],
                                                 positive_class=2, representation="projection")
    probe = results["linear_probe"]["test"]["image"]
    assert probe["auroc"]["mean"] > 0.9 and probe["balanced_accuracy"]["mean"] > 0.7
    assert 0.1 < probe["pauc_80tpr"]["mean"] <= 0.2  # class 2 vs rest, well separated
    scores, classes = curves["scores"]["image"]
    assert scores.shape == (150, 3) and classes == [0, 1, 2]


def test_kshot_indices_and_summary():
    labels = np.array([0] * 20 + [1] * 5 + [2] * 7)
    rows = protocol.kshot_indices(labels, 4, seed=3)
    assert len(rows) == 12 and len(set(rows.tolist())) == 12
    assert np.bincount(labels[rows]).tolist() == [4, 4, 4]
    assert np.array_equal(rows, protocol.kshot_indices(labels, 4, seed=3))
    assert not np.array_equal(rows, protocol.kshot_indices(labels, 4, seed=4))
    kept, skipped = protocol.feasible_shots(labels, [1, 5, 6], ["a", "b", "c"])
    assert kept == [1, 5] and skipped[0]["k"] == 6 and "'b'" in skipped[0]["reason"]

    summary = protocol.summarise([0.5, float("nan"), 0.7])
    assert summary["n"] == 2 and summary["mean"] == pytest.approx(0.6) and summary["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert protocol.summarise([0.4])["std"] == 0.0
    assert protocol.summarise([float("nan")])["n"] == 0


def test_bad_arguments(tmp_path):
    base = ["--model_dir", "m", "--dataset_dir", "d", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--splits"):
        evaluate.parse_args(base + ["--splits", "train"])
    with pytest.raises(ValueError, match="--shots"):
        evaluate.parse_args(base + ["--shots", "0"])
    with pytest.raises(ValueError, match="--pauc_class"):
        evaluate.resolve_class("melanoma", ["benign", "malignant"])


def test_the_report_goes_beside_the_model_folder_by_default(tmp_path):
    model = tmp_path / "outputs" / "slimp-synthetic"
    model.mkdir(parents=True)
    args = evaluate.EvaluateArguments(model_dir=str(model) + "/", dataset_dir="data/synthetic")
    assert args.output_dir == str(tmp_path / "outputs" / "slimp-synthetic-eval")  # not inside the folder that is pushed
    assert evaluate.EvaluateArguments(model_dir="your-org/slimp", dataset_dir="d").output_dir == "eval/your-org--slimp"
    assert evaluate.EvaluateArguments(model_dir=str(model), dataset_dir="d", output_dir="mine").output_dir == "mine"
