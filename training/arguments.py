"""What every script shares: typed arguments (`@dataclass` fields parsed by `HfArgumentParser`) with a
config-file shortcut."""

from __future__ import annotations

import os
import sys

from transformers import HfArgumentParser


def parse_dataclasses(types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse `argv` (default: sys.argv[1:]) into the dataclasses `types`; a single `.yaml`/`.yml`/`.json`
    argument is read as a config file whose keys are the options."""
    parser = HfArgumentParser(types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return tuple(parser.parse_yaml_file(os.path.abspath(argv[0])))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return tuple(parser.parse_json_file(os.path.abspath(argv[0])))
    return tuple(parser.parse_args_into_dataclasses(args=argv))


class ArgumentError(ValueError):
    """A command-line value that cannot work: raised before any data is read, reported as one line."""


def run_cli(main, errors: tuple[type[BaseException], ...] = (ArgumentError,)):
    """Run a script's `main()`; an expected error (a bad argument, a damaged checkpoint, bad data) is printed
    as one line on stderr and the process exits with status 2, without a traceback."""
    try:
        return main()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
