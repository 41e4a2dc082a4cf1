"""training/extrapolate.py: kNN metadata imputation from a reference bank, its report, the bank's safety rules."""

from __future__ import annotations

import json
import logging
import math
import pickle

import datasets
import numpy as np
import pytest

from tests._eval_fixtures import duplicate_target, tiny_data_and_checkpoint
from training import extrapolate


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_data_and_checkpoint(tmp_path_factory)


def _no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the bank must load without pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_duplicates_are_recovered_exactly(tiny, tmp_path, monkeypatch, caplog):
    """Target images that are copies of reference images: with k = 1 every lesion's neighbour is its own
    copy, so the imputation equals the hidden truth and the imputed-metadata probe equals the true one."""
    data, checkpoint = tiny
    target = duplicate_target(data, tmp_path / "target")
    output, bank_dir = tmp_path / "report", tmp_path / "bank"
    with caplog.at_level(logging.WARNING, logger="training.extrapolate"):
        result = extrapolate.main(["--model_dir", str(checkpoint), "--reference_dir", str(data), "--reference_split", "train",
                                   "--target_dir", str(target), "--target_split", "test", "--output_dir", str(output),
                                   "--k", "1", "--save_bank", str(bank_dir), "--batch_size", "64"])
    assert "patient-derived data" in caplog.text

    errors = result["imputation"]
    numerical = [e for e in errors.values() if e["kind"] == "numerical" and e["n"] > 0]
    categorical = [e for e in errors.values() if e["kind"] == "categorical" and e["n"] > 0]
    assert len(numerical) >= 30 and len(categorical) >= 4
    assert {e["level"] for e in numerical + categorical} == {"lesion", "patient"}
    assert all(e["mae"] == 0.0 and e["coverage"] == 1.0 for e in numerical), numerical
    assert all(e["accuracy"] == 1.0 for e in categorical), categorical
    assert any(e["mean_baseline_mae"] > 0 for e in numerical)
    assert any(e["majority_baseline_accuracy"] < 1 for e in categorical)
    patients = len(set(datasets.load_from_disk(str(target / "test"))["patient_id"]))
    assert 0 < errors["age_approx"]["n"] <= patients < 45  # patient-level: scored once per patient with a known age

    downstream = result["downstream"]
    assert "downstream probes: positive class: 'malignant' (class 1)" in " ".join(result["notes"])
    assert set(downstream) == {"image only", "image+metadata (true metadata)", "image+metadata (imputed metadata)",
                               "image+metadata (missing metadata)"}
    assert downstream["image+metadata (imputed metadata)"] == downstream["image+metadata (true metadata)"]
    for metrics in downstream.values():
        assert 0 <= metrics["auroc"] <= 1 and 0 <= metrics["balanced_accuracy"] <= 1

    saved = json.loads((output / "extrapolation.json").read_text())
    reference_size = len(datasets.load_from_disk(str(data / "train")))
    assert saved["settings"]["k"] == 1 and saved["bank"]["num_lesions"] == reference_size
    markdown = (output / "extrapolation.md").read_text()
    assert "| `clin_size_long_diam_mm` | lesion | 45 | 1.00 | 0.000 |" in markdown
    assert "image+metadata (imputed metadata)" in markdown

    # The bank: safetensors + parquet + JSON, loadable without pickle, equal to the reference.
    assert sorted(p.name for p in bank_dir.iterdir()) == ["bank.json", "embeddings.safetensors", "metadata.parquet"]
    _no_pickle(monkeypatch)
    bank = extrapolate.load_bank(bank_dir)
    reference = datasets.load_from_disk(str(data / "train"))
    assert bank.embeddings.shape == (reference_size, 64) and bank.embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, atol=1e-5)
    assert bank.metadata["clin_size_long_diam_mm"] == pytest.approx(reference["clin_size_long_diam_mm"], nan_ok=True)
    assert bank.metadata["anatom_site_general"] == reference["anatom_site_general"]
    assert "patient_id" not in bank.metadata and "image_id" not in bank.metadata

    # The saved bank replaces the reference: same imputation; no reference, so no downstream probe.
    again = extrapolate.main(["--model_dir", str(checkpoint), "--bank", str(bank_dir), "--target_dir", str(target),
                              "--output_dir", str(tmp_path / "again"), "--k", "1"])
    assert again["imputation"] == result["imputation"] and again["downstream"] is None
    assert any("--reference_dir" in note for note in again["notes"])

    info = json.loads((bank_dir / "bank.json").read_text())
    (bank_dir / "bank.json").write_text(json.dumps({**info, "model_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="another model"):
        extrapolate.main(["--model_dir", str(checkpoint), "--bank", str(bank_dir), "--target_dir", str(target),
                          "--output_dir", str(tmp_path / "stale")])


def test_bank_refused_in_model_dir(tiny, tmp_path):
    data, checkpoint = tiny
    args = ["--model_dir", str(checkpoint), "--reference_dir", str(data), "--target_dir", str(data),
            "--output_dir", str(tmp_path / "report")]
    for place in (checkpoint / "bank", checkpoint, checkpoint / "a" / "b"):
        with pytest.raises(ValueError, match="refusing to write the reference bank.*--allow_bank_in_model_dir"):
            extrapolate.main(args + ["--save_bank", str(place)])
    assert not (checkpoint / "bank").exists() and not (checkpoint / "a").exists()
    assert extrapolate.check_bank_path(checkpoint / "bank", allow_in_model_dir=True) == (checkpoint / "bank").resolve()
    assert extrapolate.check_bank_path(tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        extrapolate.check_bank_path(tmp_path / "busy")


def _bank(embeddings, metadata, features) -> extrapolate.ReferenceBank:
    return extrapolate.ReferenceBank(np.asarray(embeddings, dtype=np.float32), metadata, {"features": features})


def test_impute_rules():
    """Mean of present values, similarity weighting, vote with bank-frequency tie-break, patient pooling."""
    features = {"lesion": {"numerical": ["size"], "categorical": ["site"]}, "patient": {"numerical": ["age"], "categorical": []}}
    angles = np.deg2rad([0, 10, 20, 90])
    bank = _bank(np.stack([np.cos(angles), np.sin(angles)], 1),
                 {"size": [1.0, 3.0, float("nan"), 100.0], "site": ["arm", "leg", "leg", None], "age": [40.0, 60.0, 80.0, 20.0]},
                 features)
    query = np.array([[1.0, 0.0], [0.0, 1.0], [np.cos(0.1), np.sin(0.1)]])
    indices, similarities = extrapolate.nearest_neighbours(query, bank.embeddings, k=3)
    assert indices[0].tolist() == [0, 1, 2] and indices[1].tolist() == [3, 2, 1]
    assert np.all(np.diff(similarities, axis=1) <= 0)

    imputed = extrapolate.impute(bank, indices, similarities, ["p", "q", "p"])
    assert imputed["size"][0] == pytest.approx(2.0)  # NaN neighbour ignored
    assert imputed["site"][0] == "leg"  # 2 votes to 1
    assert imputed["age"][0] == imputed["age"][2] == pytest.approx(60.0)  # patient p pools both lesions' neighbours
    assert imputed["age"][1] == pytest.approx((20 + 80 + 60) / 3)

    one = extrapolate.nearest_neighbours(query, bank.embeddings, k=1)
    two = extrapolate.nearest_neighbours(query, bank.embeddings, k=2)
    assert extrapolate.impute(bank, *one, ["a", "b", "c"])["site"][1] is None  # the only neighbour has no site
    assert extrapolate.impute(bank, *two, ["a", "b", "c"])["site"][1] == "leg"
    tie = extrapolate.impute(bank, np.array([[0, 1]]), np.array([[1.0, 0.9]]), ["a"])
    assert tie["site"] == ["leg"]  # 1 vote each: the category more frequent in the bank wins

    weighted = extrapolate.impute(bank, np.array([[0, 3]]), np.array([[0.9, 0.1]]), ["a"], weighting="similarity")
    assert weighted["size"][0] == pytest.approx(0.9 * 1 + 0.1 * 100)
    no_sites = _bank(bank.embeddings, {**bank.metadata, "site": [None] * 4}, features)
    assert extrapolate.impute(no_sites, indices, similarities, ["p", "q", "p"])["site"] == [None, None, None]
    with pytest.raises(ValueError, match="bank holds 4"):
        extrapolate.nearest_neighbours(query, bank.embeddings, k=5)


def test_imputation_errors_against_baselines():
    features = {"lesion": {"numerical": ["size"], "categorical": ["site"]}, "patient": {"numerical": [], "categorical": ["sex"]}}
    bank = _bank(np.eye(3), {"size": [1.0, 2.0, 6.0], "site": ["arm", "arm", "leg"], "sex": ["f", "m", "f"]}, features)
    truth = {"size": [1.0, float("nan"), 5.0], "site": ["leg", None, "leg"], "sex": None}
    imputed = {"size": [2.0, 4.0, float("nan")], "site": ["leg", "arm", "arm"], "sex": ["f", "f", "m"]}
    errors = extrapolate.imputation_errors(truth, imputed, bank, ["p", "p", "q"])
    size = errors["size"]
    assert size["n"] == 2 and size["coverage"] == 0.5  # row 1 has no truth, row 2 no imputation
    assert size["mae"] == pytest.approx(1.0) and size["mean_baseline_mae"] == pytest.approx(2.0)  # bank mean 3
    site = errors["site"]
    assert site["n"] == 2 and site["accuracy"] == 0.5 and site["majority"] == "arm" and site["majority_baseline_accuracy"] == 0.0
    assert errors["sex"]["n"] == 0 and "no such column" in errors["sex"]["note"]
    assert not any(isinstance(v, float) and math.isnan(v) for v in (size["mae"], site["accuracy"]))
