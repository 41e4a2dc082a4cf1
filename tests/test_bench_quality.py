"""Smoke test of bench/quality.py: `--quick` runs every default variant and the supervised ceiling for 2 steps
on a 24-patient dataset and writes the JSON, the Markdown tables and the plot its README promises. Quality is
not asserted (2 steps learn nothing); only that each variant was pre-trained (or not) as described and every
headline number exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VARIANTS = ["random", "simclr", "clip_flat", "slimp_mean", "slimp_attention", "slimp_ssl"]
BASELINES, SLIMP = VARIANTS[:3], VARIANTS[3:]


def run_quality(tmp_path, *extra: str) -> tuple[dict, str, Path, Path]:
    output, work = tmp_path / "quality", tmp_path / "work"
    process = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--quick", "--output_dir", str(output),
                              "--work_dir", str(work), *extra], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=900)
    assert process.returncode == 0, f"quality.py failed:\n{process.stdout[-2000:]}\n{process.stderr[-4000:]}"
    assert str(output / "quality.json") in process.stdout  # the JSON path, then the table, are printed
    return json.loads((output / "quality.json").read_text()), (output / "quality.md").read_text(), output, work


@pytest.mark.slow
def test_quality_quick_writes_every_variant_anchor_and_target(tmp_path):
    result, table, output, work = run_quality(tmp_path)
    assert result["command"].startswith("python bench/quality.py --quick")
    assert {"date", "torch", "cpu_count", "load_average_1m"} <= set(result["environment"])
    assert list(result["variants"]) == VARIANTS
    assert len(result["runs"]) == len(VARIANTS)  # one seed, one evaluated step each in --quick

    runs = {run["variant"]: run for run in result["runs"]}
    assert runs["random"]["pretrain_argv"] is None and runs["random"]["pretrain"] == {} and runs["random"]["step"] == 0
    assert "--image_ssl_weight" in runs["simclr"]["pretrain_argv"]
    assert {"--image_ssl_weight", "--lesion_loss_weight"} <= set(runs["slimp_ssl"]["pretrain_argv"])
    for variant in VARIANTS[1:]:
        assert runs[variant]["pretrain"]["global_step"] == 2 and runs[variant]["step"] == 2
        assert runs[variant]["pretrain"]["chance_patient_loss"] > 0
    # The tower representation (the default), every feature set, k-shot, the patient metric and the winners' stacks.
    for variant, steps in result["variants"].items():
        metrics = steps[str(runs[variant]["step"])]["metrics"]
        assert not any(name.startswith("projection/") for name in metrics)
        for representation in ("tower",):
            for feature_set in ("image", "image+context", "image+metadata", "image+metadata+context"):
                for name in ("auroc@test", "pauc_80tpr@test", "top15_sensitivity@test", "auroc@validation"):
                    summary = metrics[f"{representation}/probe/{feature_set}/{name}"]
                    assert summary["n"] == 1 and 0.0 <= summary["mean"] <= 1.0, (variant, representation, feature_set, name)
            assert 0.0 <= metrics[f"{representation}/kshot/image+metadata+context/1/auroc"]["mean"] <= 1.0
            for stack in ("stack", "rank_average"):
                for name in ("auroc", "pauc_80tpr"):
                    assert 0.0 <= metrics[f"{representation}/{stack}/{name}"]["mean"] <= 1.0, (variant, stack, name)
        assert 0.0 <= metrics["retrieval/image_to_metadata_recall@10"]["mean"] <= 1.0
    # The reference rows: both tabular models on absolute, patient-relative and both; the supervised ceiling.
    ceiling = "supervised image model (same backbone and budget, trained with the labels)"
    assert set(result["anchors"]) == {f"{m} / {v} metadata" for m in ("logistic", "lightgbm")
                                      for v in ("absolute", "patient-relative", "both")} | {ceiling}
    assert result["anchors"][ceiling]["auroc"]["n"] == 1 and 0.0 <= result["anchors"][ceiling]["auroc"]["mean"] <= 1.0
    assert (work / "runs" / "default" / "supervised-seed0" / "model" / "config.json").is_file()
    assert result["representation"]["chosen"] in ("tower", "projection")
    assert result["best_configuration"] in SLIMP
    assert set(result["paired_differences"]) == {f"{s} - {b}" for s in SLIMP for b in BASELINES}
    checks = [target["check"] for target in result["targets"]]
    best = result["best_configuration"]
    for baseline in BASELINES:
        for metric in ("image-only probe AUROC", "image-only probe pAUC", "winners' stack AUROC", "winners' stack pAUC"):
            assert f"{best} beats {baseline} on {metric} by more than the seed std" in checks
    assert any("patient loss" in c for c in checks)
    assert all(isinstance(target["met"], bool) for target in result["targets"])
    # The tiny dataset has fewer malignant training lesions than the larger k: skipped and said so.
    assert any(note["k"] == 50 for note in runs["random"]["kshot_skipped"])

    for variant in VARIANTS:
        assert f"| `{variant}` |" in table
    for heading in ("Reference rows without pre-training", "## Targets",
                    "Paired differences", "lightgbm / both metadata", "winners' recipe", "supervised image model"):
        assert heading in table, heading
    assert (output / "kshot.png").stat().st_size > 0
    assert (work / "runs" / "default" / "slimp_mean-seed0" / "model" / "model.safetensors").is_file()
    assert not list(output.glob("**/*.safetensors")), "checkpoints stay in the work folder, out of the results"


@pytest.mark.slow
def test_quality_budget_curve_evaluates_each_saved_step(tmp_path):
    result, table, output, _ = run_quality(tmp_path, "--variants", "random", "slimp_mean", "--curve_steps", "0", "1", "2",
                                           "--anchors", "false", "--label", "curve")
    steps = [run["step"] for run in result["runs"] if run["variant"] == "slimp_mean"]
    assert steps == [0, 1, 2]
    metrics = {run["step"]: run["metrics"] for run in result["runs"] if run["variant"] == "slimp_mean"}
    # step 0 is the untrained model of the same seed: the random variant's numbers exactly
    random = next(run["metrics"] for run in result["runs"] if run["variant"] == "random")
    key = "tower/probe/image+metadata+context/auroc@test"
    assert metrics[0][key] == random[key]
    assert metrics[2][key] != metrics[0][key]  # two optimizer steps change the features
    assert result["paired_differences"] == {} and result["anchors"] == {}
    assert (output / "curve.png").stat().st_size > 0 and "Probe AUROC against pre-training steps" in table
