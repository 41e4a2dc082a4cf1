"""What every script shares: typed arguments with a config-file shortcut, and strict JSON output."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
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


def to_jsonable(value):
    """Nested results -> strict JSON values: numpy scalars to Python, NaN/inf to None, keys to str."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
