"""training/pretrain.py end to end on a tiny synthetic dataset: exact resume, 2-process equivalence,
continual pre-training, non-finite losses, and a checkpoint free of patient identifiers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import pretrain, prepare_data
from training.data.sampler import PatientBatchSampler
from _synthetic_fixtures import TINY_SYNTHETIC  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ["--image_size", "32", "--patients_per_batch", "3", "--max_lesions_per_patient", "4", "--num_workers", "0",
        "--eval_steps", "0", "--linear_probe", "false", "--warmup_steps", "1", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_data.main(["synthetic", *TINY_SYNTHETIC, "--patients", "16", "--seed", "1", "--image-size", "40", "--output-dir", str(out)])
    return str(out)


def run(dataset_dir: str, output_dir: Path, *extra: str) -> dict:
    return pretrain.main(["--dataset_dir", dataset_dir, "--output_dir", str(output_dir), *TINY, *extra])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"{name} differs by {(a[name] - b[name]).abs().max()}"


def test_resume_after_interruption_ends_with_the_uninterrupted_weights(dataset_dir, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    run(dataset_dir, uninterrupted, "--max_steps", "5", "--save_steps", "2")
    interrupted = tmp_path / "interrupted"
    first = run(dataset_dir, interrupted, "--max_steps", "5", "--save_steps", "2", "--stop_after_steps", "3")
    assert first["global_step"] == 3
    assert not (interrupted / "model.safetensors").exists(), "an interrupted run must not publish a final model"
    checkpoints = interrupted.with_name("interrupted-checkpoints")  # beside the release folder, never inside it
    assert (checkpoints / "step-0000003").is_dir() and not (interrupted / "checkpoints").exists()
    # Training went on past the checkpoint before dying: the resumed run must not see those steps' effects.
    shutil.rmtree(checkpoints / "step-0000003")
    resumed = run(dataset_dir, interrupted, "--max_steps", "5", "--save_steps", "2", "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == 5
    assert [r["step"] for r in resumed["history"]] == [3, 4, 5], "resumed from step 2: steps 3-5 run once each"
    # Same batches in the same order with the same augmentations and dropout draws: the same weights.
    assert_same_weights(weights(uninterrupted), weights(interrupted))


def test_resume_from_a_missing_checkpoint_is_a_clear_error(dataset_dir, tmp_path):
    from training.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        run(dataset_dir, tmp_path / "out", "--max_steps", "2", "--resume_from_checkpoint", str(tmp_path / "nowhere"))


class _GlobalBatchSampler(PatientBatchSampler):
    """The reference for the 2-process run: one process seeing rank 0's batch + rank 1's batch."""

    def __init__(self, *args, num_replicas=None, rank=None, **kwargs):
        self.ranks = [PatientBatchSampler(*args, num_replicas=2, rank=r, **kwargs) for r in range(2)]
        super().__init__(*args, num_replicas=1, rank=0, **kwargs)

    def set_epoch(self, epoch):
        for sampler in self.ranks:
            sampler.set_epoch(epoch)

    def set_start_batch(self, start_batch):
        for sampler in self.ranks:
            sampler.set_start_batch(start_batch)

    def __len__(self):
        return len(self.ranks[0])

    def __iter__(self):
        for first, second in zip(*self.ranks):
            yield first + second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes
def test_two_process_gloo_pretraining_equals_one_process_on_the_same_global_batches(dataset_dir, tmp_path, monkeypatch):
    args = ["--max_steps", "3", "--save_steps", "0", "--feature_dropout", "0", "--seed", "3"]
    two = tmp_path / "two_processes"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(REPO / "training" / "pretrain.py"), "--dataset_dir", dataset_dir, "--output_dir", str(two), *TINY, *args]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 processes" in done.stderr
    monkeypatch.setattr(pretrain, "PatientBatchSampler", _GlobalBatchSampler)
    one = tmp_path / "one_process"
    run(dataset_dir, one, *args)
    assert_same_weights(weights(two), weights(one), atol=1e-5)
    moved = sum(float((weights(one)[k] - v).abs().max()) for k, v in weights(two).items())
    assert moved > 0


def test_checkpoint_folder_holds_no_patient_or_image_identifier(dataset_dir, tmp_path):
    out = tmp_path / "release"
    run(dataset_dir, out, "--max_steps", "2", "--save_steps", "1", "--linear_probe", "true")
    from datasets import load_from_disk

    data = load_from_disk(dataset_dir)
    identifiers = {str(v) for split in data.values() for column in ("patient_id", "image_id") for v in split[column]}
    assert len(identifiers) > 20
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_slimp.py"} <= {p.name for p in files}
    for path in files:
        content = path.read_bytes()
        leaked = [i for i in identifiers if i.encode() in content]
        assert not leaked, f"{path.relative_to(out)} contains identifiers {leaked[:3]}"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-feature-extraction" in card
    assert "model-index" in card and "linear probe AUROC" in card
    assert "not a medical device" in card.lower()


def test_continual_pretraining_trains_embeddings_only_and_adopts_new_columns(dataset_dir, tmp_path):
    base = tmp_path / "base"
    run(dataset_dir, base, "--max_steps", "2", "--save_steps", "0")
    target = tmp_path / "target"
    shutil.copytree(dataset_dir, target)
    schema = json.loads((target / "schema.json").read_text())
    kept = schema["lesion"]["numerical"][:3]
    # Other columns than pre-training; `attribution` (6 clinics, ~2 train patients each) is below k = 5 patients.
    schema["lesion"] = {"numerical": kept, "categorical": ["attribution", "tbp_tile_type"]}
    (target / "schema.json").write_text(json.dumps(schema))
    adapted = tmp_path / "adapted"
    run(str(target), adapted, "--max_steps", "2", "--save_steps", "0", "--init_from", str(base), "--continual", "true",
        "--learning_rate", "0.01")
    before, after = weights(base), weights(adapted)
    config = json.loads((adapted / "config.json").read_text())
    assert config["lesion_metadata_config"]["numerical_features"] == kept
    assert list(config["lesion_metadata_config"]["categorical_features"]) == ["tbp_tile_type"]
    frozen = [k for k in after if ".layers." in k or "self_attn" in k or "encoder.layer" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "attention blocks must stay frozen"
    trained = ["vision_model.embeddings.patch_embeddings.projection.weight", "visual_projection.weight",
               "patient_metadata_model.feature_tokenizer.numerical_weight"]
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    assert after["lesion_metadata_model.feature_tokenizer.numerical_weight"].shape[0] == len(kept)


def test_non_finite_losses_skip_steps_then_stop_the_run(dataset_dir, tmp_path, monkeypatch, caplog):
    from modeling_slimp import modeling_slimp as modeling

    original = modeling.nested_contrastive_loss

    def poisoned(*args, **kwargs):
        terms = original(*args, **kwargs)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(modeling, "nested_contrastive_loss", poisoned)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses"):
        run(dataset_dir, tmp_path / "nan", "--max_steps", "5", "--save_steps", "0", "--max_nonfinite_steps", "3")
    assert "non-finite loss" in caplog.text


def test_config_file_shortcut(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset_dir: some/data\nmax_steps: 7\npatient_aggregation: attention\nlesion_loss_weight: 1.0\n")
    data_args, model_args, train_args = pretrain.parse_args([str(config)])
    assert (data_args.dataset_dir, train_args.max_steps) == ("some/data", 7)
    assert (model_args.patient_aggregation, model_args.lesion_loss_weight) == ("attention", 1.0)


def test_tensorboard_logs_each_loss_term(dataset_dir, tmp_path):
    out = tmp_path / "tb"
    run(dataset_dir, out, "--max_steps", "2", "--save_steps", "0", "--report_to", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert not list(out.rglob("events.out.tfevents.*")), "logs stay out of the release folder (it is what gets pushed)"
    events = [p for p in out.with_name("tb-logs").rglob("events.out.tfevents.*")]
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lesion_loss", "train/patient_loss", "train/lesion_logit_scale",
            "train/learning_rate", "train/lesions_per_second"} <= tags
