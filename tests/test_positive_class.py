"""Which class is positive: taken from the label names the user gives (training/labels.py), never from their
alphabetical order, said in the log, the card and config.json, and refused when a binary labelling is ambiguous."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _synthetic_fixtures import REPO, TRAIN_FAST, synthetic  # noqa: F401
from training import finetune
from training.data.dataset import load_slimp_dataset
from training.labels import LabelError, binary_label_order, positive_class
from training.metrics import classification_metrics

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("names, requested, expected", [
    (["benign", "malignant"], None, 1),
    (["melanoma", "nevus"], None, 0),                      # sorting would have made nevus positive
    (["Nevus", "MELANOMA"], None, 1),                      # case-insensitive
    (["benign", "other"], None, 1),                        # the non-benign one
    (["0", "1"], None, 1),
    (["a", "b"], "a", 0), (["a", "b"], "1", 1),           # named by the user, by name or id
    (["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], None, 4),   # HAM10000: melanoma first
    (["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"], None, 2),            # PAD-UFES-20
    (["x", "y", "z"], None, 1),                            # many classes without a malignant name: class 1
])
def test_the_positive_class_comes_from_the_label_names(names, requested, expected):
    assert positive_class(names, requested) == expected


@pytest.mark.parametrize("names, requested", [(["a", "b"], None), (["melanoma", "bcc"], None), (["a", "b"], "c")])
def test_an_ambiguous_or_unknown_positive_class_is_refused(names, requested):
    with pytest.raises(LabelError, match="positive"):
        positive_class(names, requested)


def test_evaluate_refuses_an_ambiguous_binary_labelling_naming_its_option():
    from training.arguments import ArgumentError
    from training.evaluate import resolve_class

    with pytest.raises(ArgumentError, match=r"--pauc_class: cannot tell the positive class .* \(--pauc_class type b"):
        resolve_class(None, ["type a", "type b"])
    assert resolve_class(None, ["melanoma", "nevus"]) == 0 and resolve_class("type b", ["type a", "type b"]) == 1


def test_two_labels_are_ordered_other_then_positive():
    assert binary_label_order(["melanoma", "nevus", "melanoma"]) == ["nevus", "melanoma"]
    assert binary_label_order(["a", "b"], "a") == ["b", "a"]


def test_classification_metrics_rank_the_named_positive_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    logits = np.stack([np.zeros(200), y * 1.5 + rng.normal(size=200)], axis=1)
    as_is = classification_metrics(y, logits, patient_ids=np.arange(200) // 10)
    swapped = classification_metrics(1 - y, logits[:, ::-1], patient_ids=np.arange(200) // 10, positive_class=0)
    assert swapped == pytest.approx(as_is)
    wrong_side = classification_metrics(y, logits, positive_class=0)
    assert wrong_side["pauc_80tpr"] != pytest.approx(as_is["pauc_80tpr"])


def own_csv(synthetic, folder, names: dict[int, str]):  # noqa: F811
    """The fixture's train and test lesions as a user's CSV + image folder, labels renamed by `names`."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for split in ("train", "test"):
        dataset, _ = load_slimp_dataset(synthetic.dataset_dir, split)
        for row in dataset:
            row["image"].save(folder / "images" / f"{row['image_id']}.png")
            rows.append({"image_path": f"images/{row.pop('image_id')}.png", "diagnosis": names[row.pop("label")],
                         **{k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                            for k, v in row.items() if k != "image"}})
    with open(folder / "lesions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "lesions.csv"


def run_lora_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / "lora_finetune_own_data.py"), *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_lora_example_makes_melanoma_positive_not_the_alphabet(synthetic, tmp_path):  # noqa: F811
    csv_file = own_csv(synthetic, tmp_path / "own", {0: "nevus", 1: "melanoma"})
    output = tmp_path / "lora"
    process = run_lora_example("--model_dir", synthetic.checkpoint_dir, "--csv", str(csv_file), "--label_column", "diagnosis",
                               "--output_dir", str(output), "--max_steps", "1", *TRAIN_FAST)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "positive class: 'melanoma' (class 1)" in process.stdout
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "nevus", "1": "melanoma"} and config["positive_label"] == "melanoma"
    assert json.loads((output / "results.json").read_text())["positive_label"] == "melanoma"
    assert "Positive class: **melanoma**" in (output / "README.md").read_text()


def test_lora_example_refuses_an_ambiguous_binary_labelling(synthetic, tmp_path):  # noqa: F811
    csv_file = own_csv(synthetic, tmp_path / "own", {0: "type a", 1: "type b"})
    process = run_lora_example("--model_dir", synthetic.checkpoint_dir, "--csv", str(csv_file), "--label_column", "diagnosis",
                               "--output_dir", str(tmp_path / "lora"))
    assert process.returncode != 0
    assert "cannot tell the positive class of the labels ['type a', 'type b']" in process.stderr
    assert "--positive_label" in process.stderr and "Traceback" not in process.stderr
    assert not (tmp_path / "lora").exists()


def test_finetune_names_the_positive_class_in_card_config_and_results(synthetic, tmp_path):  # noqa: F811
    output = tmp_path / "benign-positive"
    result = finetune.main(["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir,
                            "--output_dir", str(output), "--mode", "linear", "--positive_label", "benign", *TRAIN_FAST])
    assert result["positive_label"] == "benign" and result["model"].config.positive_label == "benign"
    assert json.loads((output / "config.json").read_text())["positive_label"] == "benign"
    assert "Positive class: **benign**" in (output / "README.md").read_text()
    default = json.loads((Path(synthetic.classifier_dir) / "config.json").read_text())
    assert default["positive_label"] == "malignant"
