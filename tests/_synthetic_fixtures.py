"""A tiny synthetic dataset, a SLIMP checkpoint pre-trained on it for 2 steps, and a linear classifier on
top, built once per test session and shared by test_finetune.py and test_examples.py.

A test module uses them with `from _synthetic_fixtures import synthetic  # noqa: F401` (a pytest fixture).
The builders are cached by folder, so two modules importing the fixture still build once.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Tiny synthetic datasets for the tests: ~10 lesions per patient (the calibrated default is 40) and more
# patients with a cancer (0.6; the calibrated 0.249), so that every split of a few dozen patients has positives.
TINY_SYNTHETIC = ["--lesions-per-patient", "10", "--malignant-patient-share", "0.6"]
TINY_GENERATOR = {"lesions_per_patient_median": 10, "malignant_patient_share": 0.6}
TRAIN_FAST = ["--per_device_train_batch_size", "4", "--max_lesions_per_patient", "4", "--dataloader_num_workers", "0",
              "--logging_steps", "1", "--warmup_steps", "1", "--save_strategy", "no"]


@dataclass(frozen=True)
class SyntheticRun:
    dataset_dir: str     # 24 patients, 48 px (train 17 patients / validation 2 / test 5, a few malignant in each)
    checkpoint_dir: str  # SLIMPModel, 32 px ViT, pre-trained for 2 steps
    classifier_dir: str  # SLIMPForLesionClassification, linear mode (the probe fitted on frozen features)


@functools.lru_cache(maxsize=None)
def build(root: str) -> SyntheticRun:
    from training import finetune, prepare_data, pretrain

    torch.set_num_threads(1)
    root_path = Path(root)
    dataset_dir, checkpoint_dir, classifier_dir = (str(root_path / name) for name in ("data", "checkpoint", "classifier"))
    prepare_data.main(["synthetic", "--patients", "24", "--seed", "0", "--image-size", "48", *TINY_SYNTHETIC,
                      "--output-dir", dataset_dir])
    pretrain.main(["--dataset_dir", dataset_dir, "--output_dir", checkpoint_dir, "--max_steps", "2",
                   "--patients_per_batch", "4", "--save_steps", "0", "--eval_steps", "0", "--linear_probe", "false",
                   "--num_workers", "0", "--image_size", "32"])
    finetune.main(["--model_dir", checkpoint_dir, "--dataset_dir", dataset_dir, "--output_dir", classifier_dir,
                   "--mode", "linear", *TRAIN_FAST])
    return SyntheticRun(dataset_dir, checkpoint_dir, classifier_dir)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> SyntheticRun:
    return build(str(tmp_path_factory.getbasetemp() / "slimp-synthetic"))
