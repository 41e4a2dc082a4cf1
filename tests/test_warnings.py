"""Warnings once per run and only where a user can act: each command runs in a fresh process (the model's
images-only warning is once per process) and its output is counted."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from _synthetic_fixtures import REPO, TRAIN_FAST, synthetic  # noqa: F401
from training import pretrain
from training.precision import cpu_has_fast_bf16, warn_if_slow_bf16

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}  # every Python warning shown, deprecations included


def run(*argv: str) -> str:
    process = subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    output = process.stdout + process.stderr
    assert "Traceback" not in output, output[-3000:]
    return output


def lines_with(output: str, text: str) -> list[str]:
    return [line for line in output.replace("\r", "\n").splitlines() if text in line]


def test_the_readme_snippet_with_a_subset_of_columns_warns_nothing(synthetic):  # noqa: F811
    script = textwrap.dedent(f"""
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({synthetic.checkpoint_dir!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({synthetic.checkpoint_dir!r}, trust_remote_code=True)
        rows = [{{"patient_id": "p1", "age_approx": 55, "sex": "male", "anatom_site_general": "posterior torso",
                 "clin_size_long_diam_mm": 4.2, "tbp_lv_areaMM2": 9.1}}]
        for _ in range(3):
            model(**processor(images=[Image.new("RGB", (40, 40), (180, 120, 100))], metadata=rows, return_tensors="pt"))
        print("done")
    """)
    output = run("-c", script)
    assert "done" in output
    assert lines_with(output, "treated as missing") == [] and lines_with(output, "Warning") == []


def test_the_images_only_warning_is_once_per_process_not_per_pipeline_call(synthetic):  # noqa: F811
    script = textwrap.dedent(f"""
        from PIL import Image
        from transformers import pipeline
        for _ in range(2):  # pipeline() builds a new model each time
            classify = pipeline("image-classification", model={synthetic.classifier_dir!r}, trust_remote_code=True)
            for _ in range(2):
                classify(Image.new("RGB", (40, 40), (180, 120, 100)))
    """)
    warned = lines_with(run("-c", script), "given images only")
    assert len(warned) == 1 and "classifier_features='image'" in warned[0]


def test_a_lora_finetune_warns_once_and_only_what_a_user_can_act_on(synthetic, tmp_path):  # noqa: F811
    output = run("training/finetune.py", "--model_dir", synthetic.checkpoint_dir, "--dataset_dir", synthetic.dataset_dir,
                 "--output_dir", str(tmp_path / "lora"), "--mode", "lora", "--max_steps", "1", *TRAIN_FAST)
    warned = [line for line in lines_with(output, "images only") if "WARNING" in line or "given images only" in line]
    assert len(warned) == 1 and "given images only (as pipeline" in warned[0]  # finetune's own line, with its AUROC
    for noise in ("pin_memory", "is_gradient_checkpointing", "LOAD REPORT", "were not sharded", "FutureWarning",
                  "DeprecationWarning", "treated as missing"):
        assert lines_with(output, noise) == [], noise
    assert len(lines_with(output, "positive class: 'malignant'")) == 1


def test_the_trainer_example_has_no_pin_memory_warning(synthetic, tmp_path):  # noqa: F811
    output = run("examples/trainer_finetune.py", "--model_dir", synthetic.checkpoint_dir, "--dataset_dir",
                 synthetic.dataset_dir, "--output_dir", str(tmp_path / "trainer"), "--max_steps", "1", "--patients_per_batch", "4")
    assert lines_with(output, "pin_memory") == []


@pytest.mark.slow  # two subprocess runs, ~12 s
def test_export_and_extrapolation_say_each_thing_once(synthetic, tmp_path):  # noqa: F811
    output = run("-m", "training.export_widget", "--model_dir", synthetic.classifier_dir, "--output_dir", str(tmp_path / "widget"))
    assert len(lines_with(output, "images only")) == 1, output  # export_widget's own line, not also the model's
    output = run("training/extrapolate.py", "--model_dir", synthetic.checkpoint_dir, "--reference_dir", synthetic.dataset_dir,
                 "--target_dir", synthetic.dataset_dir, "--output_dir", str(tmp_path / "extrapolation"),
                 "--save_bank", str(tmp_path / "bank"), "--k", "3")
    assert len(lines_with(output, "patient-derived data")) == 1
    assert lines_with(output, "WARNING modeling_slimp") == []


def test_bf16_on_a_cpu_without_amx_warns_once(tmp_path, caplog):
    import torch

    without, with_amx = tmp_path / "cpuinfo-avx512", tmp_path / "cpuinfo-amx"
    without.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    with_amx.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    amx = "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()  # PyTorch's own view wins over the flags
    logger = logging.getLogger("slimp-test-bf16")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert warn_if_slow_bf16("--bf16", on_cpu=True, logger=logger, cpuinfo=without) is (not amx)
        assert warn_if_slow_bf16("--bf16", on_cpu=True, logger=logger, cpuinfo=with_amx) is False
        assert warn_if_slow_bf16("--bf16", on_cpu=False, logger=logger, cpuinfo=without) is False  # not on a CPU
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == (0 if amx else 1)
    assert all("--bf16 on a CPU without AMX" in m and "slower than fp32" in m and "\n" not in m for m in said)


def test_pretrain_with_bf16_on_this_cpu_warns_once_and_saves_once(synthetic, tmp_path):  # noqa: F811
    output = run("training/pretrain.py", "--dataset_dir", synthetic.dataset_dir, "--output_dir", str(tmp_path / "run"),
                 "--max_steps", "1", "--patients_per_batch", "4", "--save_steps", "0", "--eval_steps", "0",
                 "--num_workers", "0", "--image_size", "32", "--mixed_precision", "bf16")
    warned = lines_with(output, "--mixed_precision bf16 on a CPU")
    assert len(warned) == (0 if cpu_has_fast_bf16() else 1)
    assert len(lines_with(output, "saved SLIMPModel")) == 1  # the release, then the probe's card: one "saved"
    assert "positive class **malignant**" in (tmp_path / "run" / "README.md").read_text()  # the probe says which class
    assert len(lines_with(output, "linear probe: positive class: 'malignant'")) == 1
    weights = tmp_path / "run" / "model.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask  # not transformers' private 0600


def test_the_help_of_the_bf16_options_names_the_cpu_slowdown():
    from transformers import HfArgumentParser

    from training import finetune

    for types, option in (((pretrain.TrainArguments,), "--mixed_precision"), ((finetune.FinetuneTrainingArguments,), "--bf16")):
        action = next(a for a in HfArgumentParser(types)._actions if option in a.option_strings)
        assert "without AMX" in action.help and "slower than fp32" in action.help
