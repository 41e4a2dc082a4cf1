"""Issue 18, the training scripts' rows: each fault planted as a careful user hit it, and what happens now.

Row numbers are the issue's table: 3 the release folder is the dataset (and what a push uploads), 4 a
one-patient train split and a value only one patient has, 5 a resume with another batch geometry, 6 two
pre-training runs on one folder, 7 a train split of one class, 8 a patient loss without negatives, 16 a
full disk as one line, 20 the learning rate recorded, 21 a split missing a class.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pandas as pd
import pytest

from _synthetic_fixtures import TINY_SYNTHETIC, TRAIN_FAST, synthetic  # noqa: F401
from test_prepare_data import isic_rows, write_isic2024
from training import finetune, pretrain
from training.arguments import DatasetError, run_cli
from training.checkpointing import CheckpointError
from training.data import convert
from training.release import PUSH_IGNORE, push_release, release_files
from training.safety import MARKER, FolderInUse, OutputError

REPO = Path(__file__).resolve().parent.parent
TINY = ["--image_size", "32", "--patients_per_batch", "3", "--max_lesions_per_patient", "4", "--num_workers", "0",
        "--eval_steps", "0", "--linear_probe", "false", "--warmup_steps", "1", "--logging_steps", "1"]


def run(dataset_dir, output_dir, *extra: str) -> dict:
    return pretrain.main(["--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), *TINY, *extra])


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("training-faults") / "synthetic"
    convert.main(["synthetic", *TINY_SYNTHETIC, "--patients", "12", "--seed", "2", "--image-size", "40", "--output-dir", str(out)])
    return out


def one_line_error(capsys, call) -> str:
    """Runs `call` as a script's command line does (`run_cli`): exit status 2 and one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(call)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    return line


# ----- row 3: a release folder that is the dataset; what a push uploads -----

def test_row3_an_output_folder_that_is_holds_or_lies_in_the_dataset_is_refused(dataset_dir, tmp_path, capsys):
    card = (dataset_dir / "README.md").read_text()
    before = sorted(p.name for p in dataset_dir.iterdir())
    line = one_line_error(capsys, lambda: run(dataset_dir, dataset_dir, "--max_steps", "1"))
    assert f"--output_dir {dataset_dir} is the --dataset_dir" in line
    with pytest.raises(OutputError, match="--output_dir .* holds the --dataset_dir"):
        run(dataset_dir, dataset_dir.parent, "--max_steps", "1")
    with pytest.raises(OutputError, match="--checkpoint_dir .* is inside the --dataset_dir"):
        run(dataset_dir, tmp_path / "release", "--max_steps", "1", "--checkpoint_dir", str(dataset_dir / "ckpt"))
    (tmp_path / "model").mkdir()  # a pre-trained checkpoint, fine-tuned into its own folder
    with pytest.raises(OutputError, match="--output_dir .* is the --model_dir checkpoint"):
        finetune.main(["--model_dir", str(tmp_path / "model"), "--dataset_dir", str(dataset_dir),
                       "--output_dir", str(tmp_path / "model")])
    assert (dataset_dir / "README.md").read_text() == card and sorted(p.name for p in dataset_dir.iterdir()) == before


def test_row3_a_release_folder_with_files_slimp_did_not_write_is_refused(dataset_dir, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    with pytest.raises(OutputError, match=r"holds README.md but no .slimp-output.json: this project did not write them"):
        run(dataset_dir, folder, "--max_steps", "1")
    assert (folder / "README.md").read_text() == "my notes"


@pytest.fixture(scope="module")
def release(dataset_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "model"
    run(dataset_dir, out, "--max_steps", "1", "--save_steps", "0")
    return out


def test_row3_push_uploads_the_model_processor_card_and_code_only(release, dataset_dir, monkeypatch, tmp_path):
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    assert json.loads((folder / MARKER).read_text())["kind"] == "release"
    shutil.copytree(dataset_dir / "train", folder / "train")  # the patient data, put there by mistake
    (folder / "data-00000-of-00001.arrow").write_bytes(b"rows")
    (folder / "train-metadata.csv").write_text("isic_id,patient_id\n")
    (folder / "ISIC_0000001.jpg").write_bytes(b"jpeg")
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: uploads.append(kwargs))
    pushed = push_release(folder, "someone/slimp")
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    [call] = uploads
    uploaded = set(filter_repo_objects(files, allow_patterns=call["allow_patterns"], ignore_patterns=call["ignore_patterns"]))
    assert uploaded == set(pushed) == set(release_files(folder))
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json", "processor_config.json",
            "modeling_slimp.py", "processing_slimp.py", "schema_slimp.py", "results.json"} <= uploaded
    assert not [name for name in uploaded if name.endswith((".arrow", ".csv", ".jpg")) or "/" in name or name == MARKER]
    ignored_alone = set(filter_repo_objects(files, ignore_patterns=PUSH_IGNORE))  # the ignore list alone keeps data out too
    assert not [name for name in ignored_alone if name.endswith((".arrow", ".csv", ".jpg")) or name.startswith("train/")]


# ----- row 4: no patient in a checkpoint -----

def test_row4_a_one_patient_train_split_is_refused(tmp_path, capsys):
    metadata, images = write_isic2024(tmp_path, isic_rows(patients=3))
    convert.main(["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "data"),
                  "--validation-fraction", "0.34", "--test-fraction", "0.34"])
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["splits"]["train"]["patients"] == 1
    line = one_line_error(capsys, lambda: run(tmp_path / "data", tmp_path / "model", "--max_steps", "1"))
    assert "split 'train'" in line and "holds 1 patient(s)" in line and "5+ patients" in line
    assert not (tmp_path / "model" / "config.json").exists()


def test_row4_a_value_only_one_patient_has_never_reaches_the_release(tmp_path):
    rows = isic_rows(patients=8)
    for row in rows:
        if row["patient_id"] == "IP_0002":
            row["anatom_site_general"], row["tbp_lv_location"] = "left earlobe tattoo", "Torso Front Top Half"
    metadata, images = write_isic2024(tmp_path, rows)
    convert.main(["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "data"),
                  "--validation-fraction", "0", "--test-fraction", "0"])
    run(tmp_path / "data", tmp_path / "model", "--max_steps", "1", "--save_steps", "0")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    text = (tmp_path / "model" / "config.json").read_text()
    assert "left earlobe tattoo" not in text and "Torso Front Top Half" not in text
    assert config["lesion_metadata_config"]["categorical_features"]["anatom_site_general"] == ["posterior torso"]


# ----- row 5: resume with another batch geometry -----

def test_row5_a_resume_with_another_batch_geometry_is_refused_unless_inexact_is_allowed(dataset_dir, tmp_path, caplog):
    out = tmp_path / "model"
    run(dataset_dir, out, "--max_steps", "4", "--save_steps", "2", "--stop_after_steps", "2")
    state = json.loads((tmp_path / "model-checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["geometry"]["patients_per_batch"] == 3 and state["geometry"]["train_data"]
    with pytest.raises(CheckpointError, match=r"another batch geometry \(patients_per_batch 3 -> 6\).*--allow_inexact_resume"):
        run(dataset_dir, out, "--max_steps", "4", "--resume_from_checkpoint", "latest", "--patients_per_batch", "6")
    with pytest.raises(CheckpointError, match=r"max_lesions_per_patient 4 -> 2; seed 0 -> 1"):
        run(dataset_dir, out, "--max_steps", "4", "--resume_from_checkpoint", "latest", "--max_lesions_per_patient", "2",
            "--seed", "1")
    with caplog.at_level(logging.WARNING):
        result = run(dataset_dir, out, "--max_steps", "4", "--save_steps", "0", "--resume_from_checkpoint", "latest",
                     "--patients_per_batch", "6", "--allow_inexact_resume", "true")
    assert [r["step"] for r in result["history"]] == [3, 4]
    assert "batch geometry changed (patients_per_batch 3 -> 6)" in caplog.text


def test_row5_a_resume_on_other_train_data_is_refused(dataset_dir, tmp_path):
    out = tmp_path / "model"
    run(dataset_dir, out, "--max_steps", "4", "--save_steps", "2", "--stop_after_steps", "2")
    other = tmp_path / "other"
    convert.main(["synthetic", *TINY_SYNTHETIC, "--patients", "12", "--seed", "5", "--image-size", "40", "--output-dir", str(other)])
    with pytest.raises(CheckpointError, match=r"train_data '\w+' -> '\w+'"):
        run(other, out, "--max_steps", "4", "--resume_from_checkpoint", "latest")


# ----- row 6: two pre-training runs at once -----

def test_row6_a_second_pretraining_run_on_a_busy_folder_stops_naming_the_first(dataset_dir, tmp_path):
    out = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(REPO / "training" / "pretrain.py"), "--dataset_dir", str(dataset_dir),
                              "--output_dir", str(out), *TINY, "--max_steps", "2000", "--save_steps", "0"],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (tmp_path / "model.lock").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second started"
        with pytest.raises(FolderInUse, match=rf"release folder \(--output_dir\) {out} is in use by another run \(pid "
                                              rf"{first.pid}"):
            run(dataset_dir, out, "--max_steps", "1")
        with pytest.raises(FolderInUse, match=rf"checkpoint folder \(--checkpoint_dir\) .* \(pid {first.pid}"):
            run(dataset_dir, tmp_path / "elsewhere", "--max_steps", "1", "--checkpoint_dir", str(tmp_path / "model-checkpoints"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    result = run(dataset_dir, out, "--max_steps", "1", "--save_steps", "0")  # the dead run's lock is taken over
    assert result["global_step"] == 1 and (out / "model.safetensors").is_file()


# ----- row 7: a split of one class -----

def one_class_dataset(tmp_path: Path) -> Path:
    rows = [dict(row, target=0) for row in isic_rows(patients=10)]
    metadata, images = write_isic2024(tmp_path, rows)
    convert.main(["isic2024", "--metadata", metadata, "--images", *images, "--output-dir", str(tmp_path / "data")])
    return tmp_path / "data"


@pytest.mark.parametrize("mode", ["linear", "full"])
def test_row7_finetuning_on_a_one_class_train_split_is_an_error_naming_it(synthetic, tmp_path, capsys, mode):  # noqa: F811
    data = one_class_dataset(tmp_path)
    argv = ["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", str(data), "--output_dir", str(tmp_path / "clf"),
            "--mode", mode, *TRAIN_FAST]
    line = one_line_error(capsys, lambda: finetune.main(argv))
    assert "split 'train'" in line and "holds one class only ('benign', " in line and "no classifier can be trained" in line
    assert not (tmp_path / "clf").exists()


def test_row7_and_21_a_one_class_evaluation_split_or_a_missing_class_is_a_warning_naming_the_split(caplog):
    names = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    split = lambda labels: datasets.Dataset.from_dict({"label": labels})  # noqa: E731
    with caplog.at_level(logging.WARNING):
        finetune.check_classes({"train": split([0, 1, 2, 3, 4, 5]), "validation": split([0, 1, 2, 3, 5]),
                                "test": split([3, 3])}, names, "pad")
    assert "split 'validation' of pad has no lesion of class 'SCC'" in caplog.text
    assert "split 'test' of pad holds one class only ('NEV'): its AUROC and pAUC are undefined" in caplog.text
    with pytest.raises(DatasetError, match=r"split 'train' of pad holds one class only \('NEV', 2 lesions\)"):
        finetune.check_classes({"train": split([3, 3]), "test": split([0, 1])}, names, "pad")


# ----- row 8: a patient loss without negatives -----

def test_row8_patients_per_batch_1_warns_once_that_the_patient_loss_has_no_negatives(dataset_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = run(dataset_dir, tmp_path / "model", "--max_steps", "3", "--save_steps", "0", "--patients_per_batch", "1")
    assert all(record["train/patient_loss"] == 0.0 for record in result["history"])
    assert caplog.text.count("no negatives") == 1 and "--patients_per_batch 1 on 1 process(es)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(dataset_dir, tmp_path / "flat", "--max_steps", "2", "--save_steps", "0", "--patients_per_batch", "1",
            "--lesion_loss_weight", "1")
    assert "no negatives" not in caplog.text  # the flat loss has no patient term: nothing to say


# ----- row 16: a full disk is one line for the training scripts too -----

@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_row16_a_full_disk_while_training_is_one_error_line(capsys, code, words):
    def full():
        raise OSError(code, os.strerror(code), "outputs/model-checkpoints/step-0000002/model.safetensors")

    line = one_line_error(capsys, full)
    assert "step-0000002/model.safetensors" in line and words in line


# ----- row 20: the learning rate used -----

def test_row20_results_record_the_learning_rate_used(synthetic, tmp_path):  # noqa: F811
    out = tmp_path / "full"
    finetune.main(["--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir, "--output_dir", str(out),
                   "--mode", "full", "--max_steps", "1", *TRAIN_FAST])
    results = json.loads((out / "results.json").read_text())
    assert results["train_args"]["learning_rate"] == finetune.DEFAULT_LEARNING_RATES["full"] == 5e-5
    assert "learning_rate: 5.0e-05" in (out / "README.md").read_text()
    linear = json.loads((Path(synthetic.classifier_dir) / "results.json").read_text())
    assert linear["train_args"]["learning_rate"] is None  # the linear head is fitted, not stepped
    _, _, args = finetune.parse_args(["--model_dir", "m", "--dataset_dir", "d", "--mode", "lora"])
    assert args.learning_rate == 5e-4


def test_row21_the_converter_reports_a_multiclass_split_missing_a_class(tmp_path):
    rows = [{"lesion_id": f"HAM_{i // 2:07d}", "image_id": f"ISIC_{i:07d}", "dx": "mel" if i < 6 else "nv",
             "dx_type": "histo", "age": 45.0, "sex": "male", "localization": "back"} for i in range(24)]
    pd.DataFrame(rows).to_csv(tmp_path / "meta.csv", index=False)
    from test_prepare_data import jpeg, write_images

    write_images({r["image_id"]: jpeg(i) for i, r in enumerate(rows)}, tmp_path / "images")
    summary = convert.main(["ham10000", "--metadata", str(tmp_path / "meta.csv"), "--images", str(tmp_path / "images"),
                            "--output-dir", str(tmp_path / "out")])
    assert any("has no lesion of class 'akiec', 'bcc', 'bkl', 'df', 'vasc'" in w for w in summary["warnings"])
