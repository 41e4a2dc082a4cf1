"""The command lines: every option has help text, a bad argument is one `error:` line (exit 2, no traceback)
before any data is read, and a warning about the data is printed once, not by every loader worker each epoch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from _synthetic_fixtures import synthetic  # noqa: F401
from training import evaluate, export_widget, extrapolate, finetune, pretrain
from training.arguments import ArgumentError, parse_dataclasses, run_cli
from training.data import convert
from training.data import synthetic as generator

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO)}
sys.path.insert(0, str(REPO / "bench"))


def dataclass_scripts() -> dict[str, tuple]:
    import data as data_bench
    import quality
    import speed

    return {
        "training/pretrain.py": (pretrain.DataArguments, pretrain.ModelArguments, pretrain.TrainArguments),
        "training/finetune.py": (finetune.DataArguments, finetune.ModelArguments, finetune.FinetuneTrainingArguments),
        "training/evaluate.py": (evaluate.EvaluateArguments,),
        "training/extrapolate.py": (extrapolate.ExtrapolateArguments,),
        "training/export_widget.py": (export_widget.ExportWidgetArguments,),
        "bench/quality.py": (quality.QualityArguments,),
        "bench/data.py": (data_bench.DataBenchArguments,),
        "bench/speed.py": (speed.SpeedArguments,),
    }


def options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += [f"{name} {option}" for option in options_without_help(sub)]
        elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
            missing.append(action.option_strings[0] if action.option_strings else action.dest)
    return missing


@pytest.mark.parametrize("script", list(dataclass_scripts()))
def test_every_option_of_every_script_has_help(script):
    parser = HfArgumentParser(dataclass_scripts()[script])
    assert len(parser._actions) > 3
    assert options_without_help(parser) == [], f"{script}: options without help text"


@pytest.mark.parametrize("name, parser", [("prepare_data", convert.build_parser()), ("synthetic", generator.build_parser())])
def test_every_option_of_the_data_commands_has_help(name, parser):
    assert options_without_help(parser) == [], f"{name}: options without help text"


MISSING = "/nonexistent/slimp-data"  # never read: every case must fail on its argument first
BAD_ARGUMENTS = [
    (pretrain.main, ["--dataset_dir", MISSING, "--lesion_loss_weight", "2"], "--lesion_loss_weight must be in [0, 1], got 2.0"),
    (pretrain.main, ["--dataset_dir", MISSING, "--patient_aggregation", "max"], "--patient_aggregation must be one of"),
    (pretrain.main, ["--dataset_dir", MISSING, "--push_to_hub", "true"], "--push_to_hub needs --hub_model_id"),
    (pretrain.main, ["--dataset_dir", MISSING, "--lesion_los_weight", "0.5"], "did you mean --lesion_loss_weight?"),
    (finetune.main, ["--dataset_dir", MISSING, "--model_dir", MISSING, "--output_dir", "x", "--mode", "probe"],
     "--mode must be one of"),
    (finetune.main, ["--dataset_dir", MISSING, "--model_dir", MISSING, "--output_dir", "x", "--push_to_hub", "true"],
     "--push_to_hub needs --hub_model_id"),
    (evaluate.main, ["--dataset_dir", MISSING, "--model_dir", MISSING, "--output_dir", "x", "--representation", "pooled"],
     "--representation must be one of"),
    (evaluate.main, ["--dataset_dir", MISSING, "--model_dir", MISSING, "--output_dir", "x", "--feature_sets", "pixels"],
     "--feature_sets must be a non-empty subset of"),
]


def test_a_missing_model_or_dataset_folder_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    # Offline, a folder that does not exist cannot be a Hub repository either: say so, instead of a Hub
    # download traceback that blames the network; online, a value that cannot be a repository id says the same.
    from training import extrapolate
    from training.arguments import DatasetNotFoundError
    from training.data.dataset import read_schema

    model, data, out = tmp_path / "model", tmp_path / "data", str(tmp_path / "out")
    model.mkdir(), data.mkdir()
    cases = [
        (finetune.main, ["--model_dir", MISSING, "--dataset_dir", str(data), "--output_dir", out], "--model_dir"),
        (finetune.main, ["--model_dir", str(model), "--dataset_dir", MISSING, "--output_dir", out], "--dataset_dir"),
        (evaluate.main, ["--model_dir", MISSING, "--dataset_dir", str(data), "--output_dir", out], "--model_dir"),
        (evaluate.main, ["--model_dir", str(model), "--dataset_dir", MISSING, "--output_dir", out], "--dataset_dir"),
        (extrapolate.main, ["--model_dir", str(model), "--target_dir", MISSING, "--reference_dir", str(data), "--output_dir", out],
         "--target_dir"),
    ]
    for main, argv, option in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: main(argv))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {option} {MISSING}: no such folder; offline (HF_HUB_OFFLINE=1), so no Hub "
                       f"{'model' if option == '--model_dir' else 'dataset'} is fetched either"], err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(SystemExit):
        run_cli(lambda: evaluate.main(["--model_dir", "outputs/no such model", "--dataset_dir", str(data), "--output_dir", out]))
    assert "no such folder; nor a Hub repository id" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="no such dataset folder") as raised:  # a DatasetError: one line in a script
        read_schema("org/absent-dataset")
    assert isinstance(raised.value, FileNotFoundError)


@pytest.mark.parametrize("main, argv, message", BAD_ARGUMENTS, ids=[" ".join(a[-2:]) for _, a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_before_any_data_is_read(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_config_file_with_an_unknown_key_names_the_file_and_the_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 5\nlesion_los_weight: 0.5\n")
    with pytest.raises(ArgumentError, match=r"run.yaml: unknown key\(s\) \['lesion_los_weight'\] \(did you mean --lesion_loss_weight\?\)"):
        parse_dataclasses((pretrain.DataArguments, pretrain.ModelArguments, pretrain.TrainArguments), [str(config)])
    with pytest.raises(ArgumentError, match="config file .*absent.yaml not found"):
        parse_dataclasses((pretrain.DataArguments,), [str(tmp_path / "absent.yaml")])


def test_only_rank_zero_prints_an_argument_error(monkeypatch, capsys):
    def fail():
        raise ArgumentError("--x is wrong")

    for rank, printed in (("1", ""), ("0", "error: --x is wrong\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            run_cli(fail)
        assert capsys.readouterr().err == printed


@pytest.mark.parametrize("launcher", [[sys.executable], pytest.param([str(Path(sys.executable).parent / "accelerate"), "launch", "-q"],
                                                                   marks=pytest.mark.slow)],  # a launcher and a subprocess
                         ids=["python", "accelerate launch -q"])
def test_script_prints_one_error_line_and_no_traceback(launcher):
    process = subprocess.run([*launcher, "training/pretrain.py", "--dataset_dir", MISSING, "--lesion_loss_weight", "2"],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert process.returncode != 0
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --lesion_loss_weight must be in [0, 1], got 2.0"], process.stderr
    assert "Traceback" not in process.stderr + process.stdout, process.stderr


def test_an_absent_column_is_said_once_not_by_each_worker_every_epoch(synthetic, tmp_path):  # noqa: F811
    """Any subset of the columns is valid input, so the absent ones are an info line, and only one."""
    script = textwrap.dedent(f"""
        import logging
        from accelerate import Accelerator
        from modeling_slimp import SLIMPProcessor
        from training.data.collate import DecodingCollator
        from training.data.dataset import load_slimp_dataset
        from training.pretrain import DataArguments, TrainArguments, build_loader

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        train, _ = load_slimp_dataset({synthetic.dataset_dir!r}, "train")
        train = train.remove_columns(["tbp_lv_areaMM2"])
        processor = SLIMPProcessor.from_pretrained({synthetic.checkpoint_dir!r})
        collator = DecodingCollator(processor, train=True)
        data_args = DataArguments(dataset_dir="unused", num_workers=1, patients_per_batch=8, max_lesions_per_patient=4)
        sampler, loader, _ = build_loader(train, collator, data_args, TrainArguments(output_dir={str(tmp_path / 'run')!r}),
                                          Accelerator(cpu=True))
        batches = 0
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches += sum(1 for _ in loader)
        print("batches", batches)
    """)
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert int(process.stdout.split()[-1]) >= 6  # several batches in each of 3 epochs, each with fresh workers
    said = [line for line in process.stderr.splitlines() if "has no column" in line]
    assert len(said) == 1 and "tbp_lv_areaMM2" in said[0] and said[0].startswith("INFO "), process.stderr
