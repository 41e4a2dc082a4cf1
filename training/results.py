"""Results as strict JSON: what every script and benchmark writes (`results.json`, `summary.json`, ...)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def to_jsonable(value):
    """Nested results -> strict JSON values: numpy scalars and arrays to Python, NaN/inf to None, keys to str."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, value, indent: int = 1) -> Path:
    """`value` as strict JSON (sorted nothing, NaN as null) to `path`; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(value), indent=indent, allow_nan=False) + "\n")
    return path


__all__ = ["to_jsonable", "write_json"]
