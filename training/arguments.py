"""What every script shares: typed arguments (`@dataclass` fields parsed by `HfArgumentParser`) with a
config-file shortcut, and a `--help` that lists the options by purpose."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

from transformers import HfArgumentParser, TrainingArguments

# The purpose of each option, by name (one name means one concept in every script): `--help` lists the options
# under these headings, in this order. An option of no heading is listed under "other options", or, for the
# options that transformers.TrainingArguments adds (finetune.py), under a heading of their own, last.
PURPOSES = {
    "inputs and outputs": ("dataset_dir", "model_dir", "output_dir", "checkpoint_dir", "logging_dir", "reference_dir",
                           "target_dir", "bank", "save_bank", "allow_bank_in_model_dir", "base_model", "base_model_id"),
    "data and batches": ("synthetic_patients", "synthetic_seed", "splits", "reference_split", "target_split", "probe_split",
                         "patients_per_batch", "per_device_train_batch_size", "max_lesions_per_patient", "include_malignant",
                         "batch_size", "eval_batch_size", "num_workers", "dataloader_num_workers",
                         "augmentation", "exclude_features", "remove_unused_columns"),
    "model": ("model_size", "vision_model_type", "image_size", "init_vision_from", "init_from", "continual", "mode",
              "classifier_features", "representation", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
              "merge"),
    "loss and labels": ("lesion_loss_weight", "patient_aggregation", "image_ssl_weight", "temperature", "feature_dropout",
                        "class_weights", "positive_label", "pauc_class"),
    "optimisation": ("max_steps", "num_train_epochs", "stop_after_steps", "learning_rate", "lr_scheduler_type",
                     "weight_decay", "warmup_steps", "max_grad_norm", "gradient_accumulation_steps", "max_nonfinite_steps",
                     "seed"),
    "speed and memory": ("mixed_precision", "bf16", "fp16", "gradient_checkpointing", "device", "use_cpu"),
    "evaluation and logging": ("logging_steps", "eval_steps", "eval_strategy", "report_to", "linear_probe", "seeds",
                               "shots", "feature_sets", "probe_C", "select_split", "metric_for_best_model",
                               "load_best_model_at_end", "k", "weighting", "atol"),
    "checkpoints and resume": ("save_steps", "save_strategy", "save_total_limit", "resume_from_checkpoint",
                               "allow_inexact_resume"),
    "Hub": ("push_to_hub", "hub_model_id"),
}
TRAINING_ARGUMENTS_GROUP = "every other transformers.TrainingArguments option (see the transformers documentation)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One name per option (`--max_steps`, not also `--max-steps`, which still works) and one default: none is
    appended to a help text that states its own default, or for a default of None."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = [name for name in action.option_strings if not (name.startswith("--") and "-" in name[2:])]
        if action.nargs == 0:
            return ", ".join(names)
        return f"{names[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        text = action.help or ""
        if re.search(r"\bdefault\s*:", text, re.IGNORECASE) or action.default in (None, argparse.SUPPRESS, []):
            return text
        return super()._get_help_string(action)


def build_parser(types: tuple) -> HfArgumentParser:
    """The `HfArgumentParser` of a script's dataclasses, with a usage line that shows the config-file form, the
    options grouped by purpose (`PURPOSES`), and each `--no_X` switch described as the opposite of `--X`."""
    parser = HfArgumentParser(types, formatter_class=HelpFormatter, usage="%(prog)s [-h] [CONFIG.yaml | CONFIG.json | --option VALUE ...]",
                              epilog="A single .yaml/.yml/.json argument is read as a config file whose keys are the "
                                     "options above. --option-name works as well as --option_name.")
    trainer_fields = {name for t in types if issubclass(t, TrainingArguments) for name in TrainingArguments.__dataclass_fields__
                      if name not in vars(t).get("__annotations__", {})}
    groups = {title: parser.add_argument_group(title) for title in (*PURPOSES, "other options", TRAINING_ARGUMENTS_GROUP)}
    purpose = {name: title for title, names in PURPOSES.items() for name in names}
    for action in list(parser._actions):
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"Switch off --{action.dest} (default: on)."
        title = purpose.get(action.dest) or (TRAINING_ARGUMENTS_GROUP if action.dest in trainer_fields else "other options")
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        groups[title]._group_actions.append(action)
    parser._action_groups[:] = [group for group in parser._action_groups if group._group_actions]
    return parser


def parse_dataclasses(types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse `argv` (default: sys.argv[1:]) into the dataclasses `types`; a single `.yaml`/`.yml`/`.json`
    argument is read as a config file whose keys are the options. An unknown option (or config key) is an
    `ArgumentError` naming it and the closest known option."""
    parser = build_parser(types)
    argv = sys.argv[1:] if argv is None else argv
    known = sorted(name for action in parser._actions for name in action.option_strings if name.startswith("--"))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise ArgumentError(f"config file {argv[0]} not found")
        try:
            if path.endswith(".json"):
                return tuple(parser.parse_json_file(path))
            return tuple(parser.parse_yaml_file(path))
        except ArgumentError:
            raise
        except (ValueError, TypeError) as error:
            unknown = [key for key in _config_keys(path) if f"--{key}" not in known]
            if unknown:
                raise ArgumentError(f"{argv[0]}: unknown key(s) {unknown}{_closest(unknown[0], known)}") from None
            raise ArgumentError(f"{argv[0]}: {error}") from None
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        option = next((text for text in remaining if text.startswith("-")), remaining[0])
        raise ArgumentError(f"unrecognised argument(s) {' '.join(remaining)}{_closest(option, known)}; "
                            "see --help")
    return tuple(parsed)


def _config_keys(path: str) -> list[str]:
    import json

    import yaml

    with open(path) as handle:
        content = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    return list(content) if isinstance(content, dict) else []


def _closest(option: str, known: list[str]) -> str:
    option = "--" + option.split("=", 1)[0].lstrip("-")
    match = difflib.get_close_matches(option, known, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


class ArgumentError(ValueError):
    """A command-line value that cannot work: raised before any data is read, reported as one line."""


class DatasetError(ValueError):
    """A dataset that cannot work for this run (one class in a split, too few patients): names the split."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """No dataset at that path or Hub id (still a `FileNotFoundError` for callers that catch that)."""


def require_paths(parser: argparse.ArgumentParser, args, *options: str) -> None:
    """An argparse script's path options that must exist when given: a usage error naming the first that does not
    (exit status 2, one line), before any work, instead of a traceback later."""
    for option in options:
        value = getattr(args, option)
        if value and not os.path.exists(value):
            parser.error(f"--{option} {value}: no such file or folder")


def check_source(path, option: str, kind: str) -> None:
    """An argument naming a local folder or a Hub repository (`kind`: "model" or "dataset"): when no such folder
    exists here and the Hub cannot be asked (HF_HUB_OFFLINE) or the value cannot be a repository id, one error
    line now instead of a Hub download traceback that blames the network."""
    if os.path.exists(path):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
    if offline or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(path)):
        why = f"offline (HF_HUB_OFFLINE=1), so no Hub {kind} is fetched either" if offline else "nor a Hub repository id"
        raise ArgumentError(f"{option} {path}: no such folder; {why}")


def run_cli(main, errors: tuple[type[BaseException], ...] = (ArgumentError,)):
    """Run a script's `main()`; an expected error (a bad argument, a damaged checkpoint, bad data, an output
    folder it may not write) is printed as one `error:` line on stderr and the process exits with status 2,
    without a traceback; so is a full disk or a read-only output (`training.safety.disk_error`).

    Under a multi-process launcher every rank sees the same arguments and data, so an `ArgumentError`,
    `DatasetError` or `OutputError` is printed by rank 0 only: one line, not one per process."""
    from training.safety import OutputError, disk_error

    try:
        return main()
    except (*errors, DatasetError, OutputError) as error:
        if not isinstance(error, (ArgumentError, DatasetError, OutputError)) or int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if disk_error(error) is None:
            raise
        print(f"error: {disk_error(error)}", file=sys.stderr)
        raise SystemExit(2) from None
