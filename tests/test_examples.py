"""The scripts in examples/, each run as a user would (`python examples/x.py ...`) on the tiny synthetic
checkpoint, classifier and dataset."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForImageClassification

from _synthetic_fixtures import REPO, TINY_GENERATOR, synthetic  # noqa: F401
from modeling_slimp import SLIMPConfig, SLIMPForLesionClassification, SLIMPProcessor
from training.data.dataset import load_slimp_dataset
from training.data.synthetic import generate_records

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_example(script: str, *args: str) -> str:
    process = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, f"{script} failed:\n{process.stdout}\n{process.stderr[-4000:]}"
    return process.stdout


def printed_probabilities(stdout: str, prefix: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith(prefix + ":"))
    return {name: float(value) for name, value in re.findall(r"(\w+) ([0-9.]+)", line.split(":", 1)[1])}


def test_embed_and_classify_prints_embeddings_and_both_predictions(synthetic, tmp_path):  # noqa: F811
    test, _ = load_slimp_dataset(synthetic.dataset_dir, "test")
    row = test[1]
    row["image"].save(tmp_path / "lesion.png")
    metadata = {k: v for k, v in row.items() if k not in ("image", "label") and not (isinstance(v, float) and math.isnan(v))}
    stdout = run_example("embed_and_classify.py", "--model_dir", synthetic.classifier_dir,
                         "--image", str(tmp_path / "lesion.png"), "--metadata", json.dumps(metadata))

    dim = SLIMPConfig.from_pretrained(synthetic.classifier_dir).projection_dim
    for name in ("image_embeds", "lesion_metadata_embeds", "patient_metadata_embeds", "phenotype_embeds"):
        assert f"{name}: (1, {dim})" in stdout
    classifier = SLIMPForLesionClassification.from_pretrained(synthetic.classifier_dir).eval()
    inputs = SLIMPProcessor.from_pretrained(synthetic.classifier_dir)(images=[row["image"]], metadata=[metadata])
    with torch.no_grad():
        expected = {"image + metadata": classifier(**inputs).logits.softmax(-1)[0],
                    "image only": classifier(pixel_values=inputs["pixel_values"]).logits.softmax(-1)[0]}
    for prefix, probabilities in expected.items():
        printed = printed_probabilities(stdout, prefix)
        assert list(printed) == ["benign", "malignant"]
        assert list(printed.values()) == pytest.approx(probabilities.tolist(), abs=1.5e-3), prefix
    assert "positive class: malignant (its probability is the malignancy score)" in stdout


def test_embed_without_a_classifier_uses_a_generated_lesion(synthetic):  # noqa: F811
    stdout = run_example("embed_and_classify.py", "--model_dir", synthetic.checkpoint_dir)
    assert "using a synthetic lesion" in stdout and "image_embeds: (1, " in stdout
    assert "no classifier head" in stdout and "image only" not in stdout


def write_own_csv(folder: Path) -> Path:
    """A user's CSV: `image_path`, `patient_id`, a `diagnosis` label, ISIC metadata plus columns the
    checkpoint does not know (some of which would leak the label)."""
    (folder / "images").mkdir(parents=True)
    with open(folder / "lesions.csv", "w", newline="") as handle:
        writer = None
        for record in generate_records(12, seed=1, image_size=40, **TINY_GENERATOR):
            (folder / "images" / f"{record['isic_id']}.jpg").write_bytes(record.pop("image_bytes"))
            record = {"image_path": f"images/{record.pop('isic_id')}.jpg", "clinic_notes": "seen",
                      "diagnosis": "malignant" if record.pop("target") else "benign", **record}
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(record))
                writer.writeheader()
            writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                             for k, v in record.items()})
    return folder / "lesions.csv"


def test_lora_finetune_on_own_csv_writes_a_dataset_and_a_classifier(synthetic, tmp_path):  # noqa: F811
    csv_file = write_own_csv(tmp_path / "own")
    output_dir = tmp_path / "slimp-lora"
    stdout = run_example("lora_finetune_own_data.py", "--model_dir", synthetic.checkpoint_dir, "--csv", str(csv_file),
                         "--label_column", "diagnosis", "--output_dir", str(output_dir), "--max_steps", "2",
                         "--per_device_train_batch_size", "4", "--max_lesions_per_patient", "4", "--dataloader_num_workers", "0",
                         "--save_strategy", "no")
    ignored = json.loads(stdout.split("ignored (unknown to the checkpoint): ")[1].splitlines()[0].replace("'", '"'))
    assert {"clinic_notes", "iddx_full", "lesion_id", "mel_thick_mm"} <= set(ignored)

    dataset_dir = Path(f"{output_dir}-dataset")
    schema = json.loads((dataset_dir / "schema.json").read_text())
    assert schema["label"]["names"] == ["benign", "malignant"]
    assert "age_approx" in schema["patient"]["numerical"] and "anatom_site_general" in schema["lesion"]["categorical"]
    splits = datasets.load_from_disk(str(dataset_dir))
    assert set(splits) == {"train", "validation", "test"}
    assert sum(map(len, splits.values())) == len(csv_file.read_text().splitlines()) - 1
    patients = [set(split["patient_id"]) for split in splits.values()]
    assert all(not (a & b) for i, a in enumerate(patients) for b in patients[i + 1:]), "splits must be patient-disjoint"
    assert not {"iddx_full", "lesion_id", "diagnosis", "clinic_notes"} & set(splits["train"].column_names)

    results = json.loads((output_dir / "results.json").read_text())
    assert results["mode"] == "lora" and results["model_args"]["merge"] is True
    assert set(results["classification"]) == {"validation", "test", "test, images only"}  # the pipeline's use, scored
    model, info = AutoModelForImageClassification.from_pretrained(output_dir, trust_remote_code=True,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and model.config.id2label == {0: "benign", 1: "malignant"}


def test_retrieve_similar_lesions_ranks_the_index_by_cosine(synthetic):  # noqa: F811
    train, _ = load_slimp_dataset(synthetic.dataset_dir, "train")
    query = train[7]["image_id"]
    stdout = run_example("retrieve_similar_lesions.py", "--model_dir", synthetic.checkpoint_dir, "--dataset_dir",
                         synthetic.dataset_dir, "--query_split", "train", "--query_image_id", query, "--k", "4")
    assert stdout.splitlines()[0].startswith(f"query {query} ")
    blocks = stdout.split("top 4 by ")[1:]
    assert [block.split(":")[0] for block in blocks] == ["image", "image+metadata"]
    for block in blocks:
        hits = re.findall(r"^\s+\d\. (\S+)\s+(\w+)\s+cosine ([+-][0-9.]+)  z ([+-][0-9.]+)$", block, flags=re.M)
        assert len(hits) == 4
        ids, labels, cosines, z = zip(*hits)
        spread = re.search(r"cosines to the (\d+) index lesions: median ([+-][0-9.]+), 99th percentile ([+-][0-9.]+), "
                           r"max ([+-][0-9.]+)", block)
        assert int(spread[1]) == len(train) - 1 and float(spread[4]) == pytest.approx(float(cosines[0]), abs=1e-3)
        assert float(spread[2]) <= float(spread[3]) <= float(spread[4])
        assert list(map(float, z)) == sorted(map(float, z), reverse=True) and float(z[0]) >= 0
        assert set(ids) <= set(train["image_id"]) and query not in ids and len(set(ids)) == 4
        assert set(labels) <= {"benign", "malignant"}
        assert list(map(float, cosines)) == sorted(map(float, cosines), reverse=True) and float(cosines[0]) <= 1.0005
    assert "IP_" not in stdout, "no patient ids in the output"


def test_trainer_finetune_trains_saves_and_scores_through_a_pipeline(synthetic, tmp_path):  # noqa: F811
    output = tmp_path / "trainer"
    stdout = run_example("trainer_finetune.py", "--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir,
                         "--output_dir", str(output), "--max_steps", "2", "--patients_per_batch", "4")
    assert f"saved to {output}; training loss" in stdout
    assert (output / "model.safetensors").is_file() and (output / "processor_config.json").is_file()
    scores = stdout.split("): ", 1)[1]
    assert "'label': 'malignant'" in scores and "'label': 'benign'" in scores


def example_main(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", REPO / "examples" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_path_that_is_not_there_is_one_usage_error_not_a_traceback(synthetic, tmp_path, capsys):  # noqa: F811
    missing = str(tmp_path / "lesion.jpg")
    cases = [
        ("embed_and_classify.py", ["--model_dir", synthetic.checkpoint_dir, "--image", missing], f"--image {missing}: no such"),
        ("retrieve_similar_lesions.py", ["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", missing], "--dataset_dir"),
        ("retrieve_similar_lesions.py", ["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir,
                                         "--query_index", "99999"], "--query_index 99999: split 'test' has rows 0 to"),
        ("lora_finetune_own_data.py", ["--model_dir", synthetic.checkpoint_dir, "--csv", missing, "--output_dir",
                                       str(tmp_path / "out")], f"--csv {missing}: no such file or folder"),
    ]
    for script, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            example_main(script)(argv)
        assert exit_info.value.code == 2, script
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (script, err)
