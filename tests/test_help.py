"""`--help` of the training scripts: a usage line that shows the config-file form, options grouped by purpose,
one default per option, and `--no_X` switches described as such."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from training import evaluate, export_widget, extrapolate, finetune, pretrain
from training.arguments import PURPOSES, TRAINING_ARGUMENTS_GROUP, build_parser, parse_dataclasses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "pretrain": (pretrain.DataArguments, pretrain.ModelArguments, pretrain.TrainArguments),
    "finetune": (finetune.DataArguments, finetune.ModelArguments, finetune.FinetuneTrainingArguments),
    "evaluate": (evaluate.EvaluateArguments,),
    "extrapolate": (extrapolate.ExtrapolateArguments,),
    "export_widget": (export_widget.ExportWidgetArguments,),
}


def option_groups(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    return {group.title: [action.dest for action in group._group_actions] for group in parser._action_groups}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_usage_shows_the_config_file_form(script):
    text = build_parser(SCRIPTS[script]).format_help()
    assert text.splitlines()[0].endswith("[-h] [CONFIG.yaml | CONFIG.json | --option VALUE ...]")
    assert "A single .yaml/.yml/.json argument is read as a config file" in text


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_option_has_one_default_at_most_and_one_name(script):
    parser = build_parser(SCRIPTS[script])
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._get_help_string(action) or ""
        assert len(re.findall(r"\bdefault\s*:", text, re.IGNORECASE)) <= 1, (action.dest, text)
    listed = re.findall(r"^  (--[a-z0-9_-]+)", parser.format_help(), re.MULTILINE)
    assert not [name for name in listed if "-" in name[2:]], "the --hyphen-spelling is listed beside --the_underscore_one"


def test_the_no_switch_says_it_switches_off_not_the_options_own_text():
    parser = build_parser(SCRIPTS["pretrain"])
    on = next(a for a in parser._actions if "--linear_probe" in a.option_strings)
    off = next(a for a in parser._actions if "--no_linear_probe" in a.option_strings)
    assert off.help == "Switch off --linear_probe (default: on)." and off.help != on.help
    assert parse_dataclasses(SCRIPTS["pretrain"], ["--no_linear_probe"])[2].linear_probe is False
    assert parse_dataclasses(SCRIPTS["pretrain"], ["--linear-probe", "false"])[2].linear_probe is False  # both spellings


@pytest.mark.parametrize("script", ["pretrain", "evaluate", "extrapolate", "export_widget"])
def test_every_option_is_listed_under_its_purpose(script):
    groups = option_groups(build_parser(SCRIPTS[script]))
    assert "other options" not in groups, groups.get("other options")
    titles = [title for title in groups if title != "options"]
    assert titles == [title for title in PURPOSES if title in titles]  # in the order of PURPOSES
    assert sum(map(len, groups.values())) == len(build_parser(SCRIPTS[script])._actions)


def test_finetune_lists_its_own_options_before_the_rest_of_training_arguments():
    groups = option_groups(build_parser(SCRIPTS["finetune"]))
    assert list(groups)[-1] == TRAINING_ARGUMENTS_GROUP and "other options" not in groups
    assert {"learning_rate", "bf16", "eval_strategy", "resume_from_checkpoint", "push_to_hub"} <= {
        dest for title, dests in groups.items() if title != TRAINING_ARGUMENTS_GROUP for dest in dests}
    assert "adam_beta1" in groups[TRAINING_ARGUMENTS_GROUP] and "mode" in groups["model"]


def test_the_help_command_prints_the_groups():
    process = subprocess.run([sys.executable, "training/pretrain.py", "--help"], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert process.returncode == 0, process.stderr
    for title in ("inputs and outputs:", "model:", "optimisation:", "checkpoints and resume:"):
        assert f"\n{title}\n" in process.stdout
