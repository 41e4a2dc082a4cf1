"""What every script shares: typed arguments (`@dataclass` fields parsed by `HfArgumentParser`) with a
config-file shortcut."""

from __future__ import annotations

import difflib
import os
import sys

from transformers import HfArgumentParser


def parse_dataclasses(types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse `argv` (default: sys.argv[1:]) into the dataclasses `types`; a single `.yaml`/`.yml`/`.json`
    argument is read as a config file whose keys are the options. An unknown option (or config key) is an
    `ArgumentError` naming it and the closest known option."""
    parser = HfArgumentParser(types)
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
