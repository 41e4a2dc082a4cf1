"""Planted faults: each one gets a clear error (naming the file, row, field or tensor) or a loud, counted
report, and nothing is lost silently. One test per fault of issue 10."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_batch, tiny_config
from modeling_slimp import SLIMPForLesionClassification, SLIMPModel
from training import pretrain
from training.arguments import ArgumentError
from training.checkpointing import CheckpointError
from training.data import convert
from training.data.sources import InputError
from _synthetic_fixtures import TINY_SYNTHETIC  # noqa: E402

TINY = ["--image_size", "32", "--patients_per_batch", "3", "--max_lesions_per_patient", "4", "--num_workers", "0",
        "--eval_steps", "0", "--linear_probe", "false", "--warmup_steps", "1", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("faults") / "synthetic"
    convert.main(["synthetic", *TINY_SYNTHETIC, "--patients", "12", "--seed", "2", "--image-size", "40", "--output-dir", str(out)])
    return str(out)


def run(dataset_dir: str, output_dir: Path, *extra: str) -> dict:
    return pretrain.main(["--dataset_dir", dataset_dir, "--output_dir", str(output_dir), *TINY, *extra])


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def checkpoints(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + "-checkpoints")


# ----- 1. resume with a metadata tower without numerical features (every HAM10000 dataset) -----

def test_resume_works_when_a_tower_has_no_numerical_feature(dataset_dir, tmp_path):
    categorical_only = ["--exclude_features", "clin_size_long_diam_mm", "tbp_lv_*", "--max_steps", "4", "--save_steps", "2"]
    straight = tmp_path / "straight"
    run(dataset_dir, straight, *categorical_only)
    config = json.loads((straight / "config.json").read_text())
    assert config["lesion_metadata_config"]["numerical_features"] == []
    assert not any("numerical" in key for key in weights(straight) if key.startswith("lesion_metadata_model."))
    broken = tmp_path / "broken"
    run(dataset_dir, broken, *categorical_only, "--stop_after_steps", "3")
    shutil.rmtree(checkpoints(broken) / "step-0000003")
    resumed = run(dataset_dir, broken, *categorical_only, "--resume_from_checkpoint", "latest")
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----- 2. too few patients: an empty validation split -----

def test_a_dataset_too_small_for_a_validation_split_still_trains_and_saves(tmp_path, caplog):
    out = tmp_path / "small"
    summary = convert.main(["synthetic", *TINY_SYNTHETIC, "--patients", "8", "--seed", "0", "--image-size", "32", "--validation-fraction", "0",
                            "--output-dir", str(out)])
    assert summary["splits"]["validation"]["patients"] == 0
    assert any("validation" in warning and "no patient" in warning for warning in summary["warnings"])
    assert json.loads((out / "summary.json").read_text())["warnings"] == summary["warnings"]
    with caplog.at_level(logging.WARNING):
        result = run(str(out), tmp_path / "model", "--max_steps", "2", "--save_steps", "0", "--eval_steps", "1")
    assert result["global_step"] == 2 and result["validation"] is None
    assert "empty validation split: validation is skipped" in caplog.text
    assert (tmp_path / "model" / "model.safetensors").is_file()


# ----- 3. the model API: a ValueError naming the input, never a silent wrong answer -----

@pytest.mark.parametrize("case, message", [
    ("negative index", r"patient_index must lie in \[0, 3\).*-1"),
    ("index out of range", r"patient_index must lie in \[0, 3\).*to 3"),
    ("float index", r"patient_index must hold integer"),
    ("patient without lesions", r"patient rows \[2\] have no lesion"),
    ("row count mismatch", r"lesion_numerical_values must have shape \(7, 3\)"),
    ("patient rows mismatch", r"patient_numerical_values has 3 rows but patient_categorical_ids has 2"),
    ("no lesion", r"pixel_values holds no image"),
    ("3-D pixel values", r"pixel_values must be a \(N, 3, H, W\) tensor"),
    ("uint8 pixels", r"pixel_values has dtype torch.uint8"),
    ("float category ids", r"lesion_categorical_ids must hold integer category ids"),
])
def test_model_inputs_are_checked(case, message):
    torch.manual_seed(0)
    model = SLIMPModel(tiny_config()).eval()
    batch = make_batch(model.config, lesions_per_patient=(1, 4, 2))  # N = 7, P = 3
    index = batch["patient_index"]
    if case == "negative index":
        batch["patient_index"] = torch.where(index == 0, -1, index)
    elif case == "index out of range":
        batch["patient_index"] = torch.where(index == 0, 3, index)
    elif case == "float index":
        batch["patient_index"] = index.float()
    elif case == "patient without lesions":
        batch["patient_index"] = torch.where(index == 2, 0, index)
    elif case == "row count mismatch":
        batch["lesion_numerical_values"] = batch["lesion_numerical_values"][:5]
    elif case == "patient rows mismatch":
        batch["patient_categorical_ids"] = batch["patient_categorical_ids"][:2]
    elif case == "no lesion":
        batch = {"pixel_values": batch["pixel_values"][:0]}
    elif case == "3-D pixel values":
        batch = {"pixel_values": batch["pixel_values"][0]}
    elif case == "uint8 pixels":
        batch["pixel_values"] = (batch["pixel_values"].clamp(0, 1) * 255).to(torch.uint8)
    elif case == "float category ids":
        batch["lesion_categorical_ids"] = batch["lesion_categorical_ids"].float()
    with pytest.raises(ValueError, match=message):
        model(**batch, return_loss=True)


def test_unlabelled_batches_give_a_zero_loss_not_nan():
    torch.manual_seed(0)
    model = SLIMPForLesionClassification(tiny_config())
    batch = make_batch(model.config)
    out = model(**batch, labels=torch.full((7,), -100))
    assert out.loss.item() == 0.0
    out.loss.backward()  # still attached to the graph, gradients zero
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


# ----- 4. values lost quietly -----

def write_csv(tmp_path: Path, rows: list[dict]) -> tuple[str, list[str]]:
    from test_prepare_data import jpeg, write_images

    pd.DataFrame(rows).to_csv(tmp_path / "train-metadata.csv", index=False)
    return str(tmp_path / "train-metadata.csv"), write_images({r["isic_id"]: jpeg(i) for i, r in enumerate(rows)},
                                                              tmp_path / "train-image.hdf5")


def test_unparsed_numbers_are_counted_with_example_ids_and_strict_refuses_them(tmp_path):
    from test_prepare_data import isic_rows

    rows = isic_rows(patients=4)
    rows[2]["clin_size_long_diam_mm"], rows[5]["clin_size_long_diam_mm"], rows[7]["age_approx"] = "12,5", "sixty", "?"
    metadata, images = write_csv(tmp_path, rows)
    summary = convert.main(["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "out")])
    unparsed = summary["unparsed_values"]
    assert unparsed["clin_size_long_diam_mm"]["count"] == 2 and unparsed["age_approx"]["count"] == 1
    assert {e["id"] for e in unparsed["clin_size_long_diam_mm"]["examples"]} == {rows[2]["isic_id"], rows[5]["isic_id"]}
    assert {e["value"] for e in unparsed["clin_size_long_diam_mm"]["examples"]} == {"12,5", "sixty"}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["unparsed_values"] == unparsed
    with pytest.raises(convert.DataError, match=r"ISIC_\w+: column '(clin_size_long_diam_mm|age_approx)' holds '(12,5|sixty|\?)', not a number"):
        convert.main(["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "strict"),
                      "--strict"])


def test_a_header_only_csv_is_an_error(tmp_path):
    (tmp_path / "train-metadata.csv").write_text("isic_id,target,patient_id,age_approx\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match=r"train-metadata\.csv: the CSV has no data rows"):
        convert.main(["isic2024", "--metadata", str(tmp_path / "train-metadata.csv"), "--images", str(tmp_path / "images"),
                      "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_empty_column_is_reported_and_left_out(tmp_path):
    from test_prepare_data import isic_rows

    rows = [dict(r, tbp_lv_A="", sex="unknown") for r in isic_rows(patients=4)]
    metadata, images = write_csv(tmp_path, rows)
    summary = convert.main(["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "out")])
    assert summary["empty_columns"] == ["sex", "tbp_lv_A"]
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    assert "tbp_lv_A" not in schema["lesion"]["numerical"] and schema["patient"]["categorical"] == []


def test_a_patient_tower_without_any_feature_is_refused(tmp_path):
    from test_prepare_data import isic_rows

    rows = [dict(r, age_approx="", sex="") for r in isic_rows(patients=9)]  # 6 train patients: k = 5 is met
    metadata, images = write_csv(tmp_path, rows)
    convert.main(["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "data")])
    with pytest.raises(ArgumentError, match="patient metadata tower without any usable feature.*--lesion_loss_weight 1"):
        run(str(tmp_path / "data"), tmp_path / "model", "--max_steps", "1")
    result = run(str(tmp_path / "data"), tmp_path / "flat", "--max_steps", "1", "--lesion_loss_weight", "1", "--save_steps", "0")
    assert result["global_step"] == 1


# ----- 5. checkpoints that can be trusted -----

@pytest.fixture(scope="module")
def trained(dataset_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "model"
    run(dataset_dir, out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", "--stop_after_steps", "4")
    return out


def damaged_copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(checkpoints(trained), checkpoints(out))
    return out


def test_a_truncated_rng_state_is_an_error_unless_an_inexact_resume_is_accepted(dataset_dir, trained, tmp_path):
    out = damaged_copy(trained, tmp_path)
    rng = checkpoints(out) / "step-0000004" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl.*--allow_inexact_resume"):
        run(dataset_dir, out, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "latest")
    result = run(dataset_dir, out, "--max_steps", "6", "--save_steps", "0", "--resume_from_checkpoint", "latest",
                 "--allow_inexact_resume", "true")
    assert [r["step"] for r in result["history"]] == [5, 6]


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_damaged_weights_fall_back_to_the_previous_checkpoint(dataset_dir, trained, tmp_path, caplog, damage):
    out = damaged_copy(trained, tmp_path)
    weights_file = checkpoints(out) / "step-0000004" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-4096:-2048] = bytes(2048)  # zeros inside the tensor data: the header still parses
    weights_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        result = run(dataset_dir, out, "--max_steps", "6", "--save_steps", "0", "--resume_from_checkpoint", "latest")
    assert "step-0000004 is damaged (model.safetensors" in caplog.text
    assert [r["step"] for r in result["history"]] == [3, 4, 5, 6]  # resumed from step 2
    with pytest.raises(CheckpointError, match=r"step-0000004 is damaged: model\.safetensors"):
        run(dataset_dir, tmp_path / "other", "--max_steps", "6", "--resume_from_checkpoint",
            str(checkpoints(out) / "step-0000004"))


# ----- 6. the converter: fingerprints, determinism, the rename window, messages -----

def test_an_image_fixed_in_place_is_picked_up_by_the_rerun(tmp_path):
    from test_prepare_data import isic_rows, jpeg

    rows = isic_rows(patients=4)
    pd.DataFrame(rows).to_csv(tmp_path / "meta.csv", index=False)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, row in enumerate(rows):
        (folder / f"{row['isic_id']}.jpg").write_bytes(jpeg(i) if i != 3 else b"broken")
    args = ["isic2024", "--metadata", str(tmp_path / "meta.csv"), "--images", str(folder), "--output-dir", str(tmp_path / "out")]
    first = convert.main(args)
    assert [e["id"] for e in first["excluded"]] == [rows[3]["isic_id"]]
    stamp = os.stat(folder).st_mtime_ns
    (folder / f"{rows[3]['isic_id']}.jpg").write_bytes(jpeg(3))  # fixed in place: the folder's mtime stays
    os.utime(folder, ns=(stamp, stamp))
    second = convert.main(args + ["--overwrite"])
    assert second["excluded"] == [] and sum(s["lesions"] for s in second["splits"].values()) == len(rows)


def test_summary_json_is_the_same_on_every_run(tmp_path):
    from test_prepare_data import isic_rows, jpeg, write_images

    rows = isic_rows(patients=4)
    pd.DataFrame(rows).to_csv(tmp_path / "meta.csv", index=False)
    images = {r["isic_id"]: jpeg(i) for i, r in enumerate(rows)}
    images[rows[1]["isic_id"]] = b"not an image"
    store = write_images(images, tmp_path / "images.hdf5")
    texts = []
    for name in ("a", "b"):
        convert.main(["isic2024", "--metadata", str(tmp_path / "meta.csv"), "--images", *store, "--output-dir", str(tmp_path / name)])
        texts.append((tmp_path / name / "summary.json").read_text())
    assert texts[0] == texts[1] and "0x" not in texts[0] and "the image bytes" in texts[0]


def test_an_interruption_between_building_and_marking_a_split_is_recovered(tmp_path, monkeypatch):
    from test_prepare_data import isic_rows

    metadata, images = write_csv(tmp_path, isic_rows(patients=6))
    args = ["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "out")]
    real_rename = Path.rename

    def killed_after_rename(self, target):  # the train split is renamed into place, then the process dies
        result = real_rename(self, target)
        if Path(target).name == "train":
            (Path(target) / "slimp_done.json").unlink()  # as if the marker had been written after the rename
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Path, "rename", killed_after_rename)
    with pytest.raises(KeyboardInterrupt):
        convert.main(args)
    monkeypatch.setattr(Path, "rename", real_rename)
    summary = convert.main(args)
    assert sum(s["lesions"] for s in summary["splits"].values()) == 18
    assert len(datasets.load_from_disk(str(tmp_path / "out"))["train"]) == summary["splits"]["train"]["lesions"]


def test_a_missing_hdf5_file_is_named_as_a_file(tmp_path):
    (tmp_path / "meta.csv").write_text("isic_id,target,patient_id\nISIC_1,0,IP_1\n")
    with pytest.raises(InputError, match=r"image file not found: .*train-image\.hdf5"):
        convert.main(["isic2024", "--metadata", str(tmp_path / "meta.csv"), "--images", str(tmp_path / "train-image.hdf5"),
                      "--output-dir", str(tmp_path / "out")])


# ----- 7. --init_from keeps the checkpoint's pooling -----

def test_init_from_keeps_the_checkpoint_pooling(dataset_dir, tmp_path):
    base = tmp_path / "attention"
    run(dataset_dir, base, "--max_steps", "1", "--save_steps", "0", "--patient_aggregation", "attention")
    pooled = {k: v for k, v in weights(base).items() if k.startswith("patient_pooling.")}
    assert pooled
    continued = tmp_path / "continued"
    run(dataset_dir, continued, "--max_steps", "1", "--save_steps", "0", "--init_from", str(base), "--learning_rate", "1e-9")
    assert json.loads((continued / "config.json").read_text())["patient_aggregation"] == "attention"
    assert set(pooled) <= set(weights(continued))
    with pytest.raises(ArgumentError, match="--patient_aggregation mean differs from the --init_from checkpoint's 'attention'"):
        run(dataset_dir, tmp_path / "relabelled", "--max_steps", "1", "--init_from", str(base), "--patient_aggregation", "mean")
