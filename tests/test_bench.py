"""Smoke tests of the benchmarks: each script runs as a user would run it, with `--quick`, and writes the
JSON its README promises. Timings are not asserted (the machines are shared); only that every section
ran and produced finite, positive numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    process = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *args], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, f"{script} failed:\n{process.stdout[-2000:]}\n{process.stderr[-4000:]}"
    return process


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow  # a benchmark
def test_speed_quick_runs_every_section_and_writes_ratios(tmp_path):
    output = tmp_path / "speed.json"
    process = run_bench("speed.py", "--profile", "--output", str(output))
    result = json.loads(output.read_text())
    assert {"date", "torch", "torch_threads", "load_average_1m"} <= set(result["environment"])
    tiny = result["results"]["tiny"]
    assert set(tiny) == {"train", "inference", "memory", "profile"}

    train = tiny["train"]
    for name in ("slimp", "backbone"):
        assert positive(train[name]["median_s"]) and positive(train[name]["lesions_per_s"])
        assert len(train[name]["wall_s"]) == train[name]["n"] == result["arguments"]["repeats"]
    assert train["parameters"]["slimp"] > train["parameters"]["backbone"]
    assert all(positive(train["slimp_over_backbone"][key]) for key in (
        "ratio_of_medians", "ratio_of_minima", "median_paired_ratio", "ratio_of_medians_cpu"))
    assert isinstance(train["overhead_target_met"], bool)

    inference = tiny["inference"]
    for name in ("backbone", "slimp_image", "slimp_full", "slimp_full_with_loss"):
        assert positive(inference[name]["lesions_per_s"])
    assert positive(inference["slimp_full_over_backbone"]["primary"])
    assert positive(inference["slimp_full_over_with_loss"]["primary"]) and isinstance(inference["inference_no_slower_than_before"], bool)

    memory = tiny["memory"]
    for name in ("train_slimp", "train_backbone", "infer_backbone", "infer_slimp_image", "infer_slimp_full"):
        assert positive(memory[name]["peak_mib"]) and memory[name]["step_mib"] >= 0
    assert positive(memory["train_slimp_over_backbone_peak_mib"])

    profile = tiny["profile"]
    assert positive(profile["step_ms"]) and profile["top_ops"]
    assert {"vision_model", "lesion_metadata_model", "patient_metadata_model", "contrastive_loss"} <= set(profile["forward_ms_by_module"])

    scaling = result["scaling"]
    cases = {(row["sweep"], row["aggregation"], row["part"]) for row in scaling["rows"]}
    for aggregation in ("mean", "attention"):
        for part in ("aggregation", "loss+aggregation"):
            assert {("lesions", aggregation, part), ("patients", aggregation, part), ("skewed", aggregation, part)} <= cases
    assert all(positive(row["us_per_lesion"]) for row in scaling["rows"])
    assert scaling["growth"] and all(positive(g["time_factor"]) for g in scaling["growth"])
    assert set(scaling["skewed_over_uniform"]) == {f"{a}/{p}" for a in ("mean", "attention") for p in ("aggregation", "loss+aggregation")}
    assert scaling["memory"] and all(row["step_mib"] >= 0 for row in scaling["memory"])

    assert "SLIMP / backbone step time" in process.stderr and "| contender |" in process.stderr


@pytest.mark.slow  # a benchmark
def test_data_quick_converts_three_sizes_and_times_the_data_path(tmp_path):
    output, work = tmp_path / "data.json", tmp_path / "work"
    process = run_bench("data.py", "--data_dir", str(work), "--output", str(output))
    result = json.loads(output.read_text())

    synthetic = result["synthetic"]
    assert synthetic["lesions"] >= result["arguments"]["images"] and positive(synthetic["seconds"])

    converter = result["converter"]
    runs = converter["runs"]
    assert [run["rows"] for run in runs] == sorted(result["arguments"]["sizes"])
    for run in runs:
        assert run["rows_written"] == run["rows"]
        assert positive(run["rows_per_s"]) and positive(run["peak_rss_mib"])
    assert positive(converter["import_only"]["peak_rss_mib"]) and positive(converter["peak_ratio_largest_over_smallest"])

    loader = result["loader"]
    for name in ("loader_workers_0", "loader_workers_1", "train_precollated", "train_fed_by_1_worker"):
        assert loader[name]["lesions"] > 0 and positive(loader[name]["lesions_per_s"])
    assert set(loader["ratios"]) == {"loader_w0_over_train", "loader_w0_over_train_cpu", "loader_w1_over_train",
                                     "fed_by_1_worker_over_precollated", "median_round_loader_w1_over_train"}
    assert all(positive(v) for v in loader["ratios"].values())
    assert isinstance(loader["loader_is_bottleneck"], bool)
    assert isinstance(converter["flat_memory_target_met"], bool)
    assert runs[-1]["rows"] > result["arguments"]["images"]  # the largest size tiles the layout: every row written

    encoding = result["metadata_encoding"]  # the bench itself asserts that the three ways encode identically
    for rows in result["arguments"]["encode_rows"]:
        rates = encoding[str(rows)]["rows_per_s"]
        assert all(positive(rates[k]) for k in ("now_encoded_once", "now_arrow_table", "now_row_dicts"))
        assert positive(encoding[str(rows)]["encoded_once_over_row_dicts"])
    worker = result["worker"]
    for resolution in result["arguments"]["worker_resolutions"]:
        rates = worker[str(resolution)]["lesions_per_s"]
        assert all(positive(rates[k]) for k in ("now", "now_device_half_on_cpu"))
    release = result["release_step"]
    assert positive(release["flops_per_lesion"]) and positive(release["cpu_lesions_per_s"])
    gpu = release["gpu"]
    assert gpu["projected_lesions_per_s"] == pytest.approx(790e12 * 0.4 / release["flops_per_lesion"])
    for resolution in result["arguments"]["worker_resolutions"]:
        needed = gpu[f"workers_needed_at_{resolution}px"]
        assert needed == math.ceil(gpu["projected_lesions_per_s"] / worker[str(resolution)]["lesions_per_s"]["now"])
        assert positive(gpu[f"slice3d_epoch_minutes_at_{resolution}px"])
    assert positive(result["total_seconds"])

    assert list(work.iterdir()) == []  # everything it wrote is gone (no --keep)
    for table in ("| rows |", "Metadata encoding", "One loader worker", "Release architecture"):
        assert table in process.stderr, table
