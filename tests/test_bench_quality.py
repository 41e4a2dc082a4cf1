"""Smoke test of bench/quality.py: `--quick` runs every variant for 2 steps on a 24-patient dataset and writes
the JSON, the Markdown tables and the plot its README promises. Quality is not asserted (2 steps learn
nothing); only that each variant was pre-trained (or not) as described and every headline number exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VARIANTS = ["random", "simclr", "clip_flat", "slimp_mean", "slimp_attention"]


def test_quality_quick_writes_every_variant_and_the_tables(tmp_path):
    output, work = tmp_path / "quality", tmp_path / "work"
    process = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--quick", "--output_dir", str(output),
                              "--work_dir", str(work)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, f"quality.py failed:\n{process.stdout[-2000:]}\n{process.stderr[-4000:]}"
    assert str(output / "quality.json") in process.stdout  # the JSON path, then the table, are printed

    result = json.loads((output / "quality.json").read_text())
    assert result["command"].startswith("python bench/quality.py --quick")
    assert {"date", "torch", "cpu_count", "load_average_1m"} <= set(result["environment"])
    assert list(result["variants"]) == VARIANTS
    assert len(result["runs"]) == len(VARIANTS)  # one seed in --quick
    for variant, summary in result["variants"].items():
        metrics = summary["metrics"]
        for key in ("probe/image/auroc", "probe/image+metadata/auroc", "probe/image/pauc_80tpr",
                    "probe/image+metadata/pauc_80tpr", "kshot/image/1/auroc", "retrieval/image_to_metadata_recall@10"):
            assert metrics[key]["n"] == 1 and 0.0 <= metrics[key]["mean"] <= 1.0, (variant, key)
        assert summary["wall_s"]["total"] > 0

    runs = {run["variant"]: run for run in result["runs"]}
    assert runs["random"]["pretrain_argv"] is None and runs["random"]["pretrain"] == {}
    assert "--image_ssl_weight" in runs["simclr"]["pretrain_argv"]
    for variant in VARIANTS[1:]:
        assert runs[variant]["pretrain"]["global_step"] == 2
        assert runs[variant]["pretrain_argv"][runs[variant]["pretrain_argv"].index("--max_steps") + 1] == "2"
    # The tiny dataset has fewer malignant training lesions than the larger k: skipped and said so.
    assert any(note["k"] == 50 for note in runs["random"]["kshot_skipped"])
    assert set(result["paired_differences"]) == {f"{s} - {b}" for s in VARIANTS[3:] for b in VARIANTS[:3]}

    table = (output / "quality.md").read_text()
    for variant in VARIANTS:
        assert f"| `{variant}` |" in table
    assert "probe AUROC (image+meta)" in table and "Where SLIMP does not beat a baseline" in table
    assert (output / "kshot.png").stat().st_size > 0
    assert (work / "runs" / "slimp_mean-seed0" / "model" / "model.safetensors").is_file()
    assert not list(output.glob("**/*.safetensors")), "checkpoints stay in the work folder, out of the results"
