"""Raw metadata rows -> columns of numbers and category codes, column by column (never value by value).

What `SLIMPProcessor` encodes with and fits its schema on. Rows may be a pandas DataFrame, a pyarrow Table,
a dict of columns or a list of dicts; missing values, unusable numbers and category spellings follow
`schema_slimp` (categories compared with `category_key`: `Male`, ` MALE ` and `male` are one category).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .schema_slimp import FLOAT32_MAX, as_category, category_key, parse_number


def as_columns(metadata: Any, needed: Iterable[str] | None = None) -> dict[str, Any]:
    """Rows as columns: a pandas DataFrame, a pyarrow Table, a dict of lists (a `datasets` batch) or a list of
    dicts. For a DataFrame or Table only the `needed` columns (default all) are taken."""
    if hasattr(metadata, "columns") and hasattr(metadata, "iloc"):  # pandas.DataFrame: keep its column arrays
        names = [name for name in metadata.columns if needed is None or str(name) in needed]
        return {str(name): metadata[name].to_numpy() for name in names}
    if hasattr(metadata, "column_names") and hasattr(metadata, "column"):  # a pyarrow Table: columns stay Arrow
        names = metadata.column_names if needed is None else [name for name in metadata.column_names if name in needed]
        return {str(name): metadata.column(name) for name in names}
    if isinstance(metadata, Mapping):
        return {str(key): value for key, value in metadata.items()}
    rows = list(metadata)
    if not rows:
        return {}
    first = rows[0].keys()
    if all(row.keys() == first for row in rows):  # the usual case: every row has the same columns
        return {key: [row[key] for row in rows] for key in first}
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def row_count(columns: Mapping[str, Any]) -> int:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"metadata columns differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def number_array(values: Sequence) -> tuple[np.ndarray, list]:
    """A column -> ((N,) float64 array, NaN = missing or unusable; the present values that are not usable
    numbers: text that does not parse, ±inf, magnitudes beyond `FLOAT32_MAX`).

    A column of numbers (a numeric array, or numbers and None) is converted in one C-level call; text is
    parsed value by value with the contract's rules (`parse_number`)."""
    if is_arrow(values):
        array = values.to_numpy(zero_copy_only=False)  # numbers: C-level, nulls as NaN; text: objects
        values = array if array.dtype.kind in "biuf" else array.astype(object)
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        return _drop_unusable(values.astype(np.float64))
    listed = as_list(values)
    if all(value is None or isinstance(value, (int, float, np.number, np.bool_)) for value in listed):
        try:
            return _drop_unusable(np.array([math.nan if value is None else value for value in listed], dtype=np.float64))
        except OverflowError:  # an int beyond float64: parsed one by one below
            pass
    parsed, invalid = [], []
    for value in listed:
        number, ok = parse_number(value)
        parsed.append(number)
        if not ok:
            invalid.append(value)
    return np.asarray(parsed, dtype=np.float64), invalid


def _drop_unusable(numbers: np.ndarray) -> tuple[np.ndarray, list]:
    """NaN stays missing; ±inf and magnitudes beyond `FLOAT32_MAX` become NaN and are returned as invalid."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isnan(numbers) & ~(np.abs(numbers) <= FLOAT32_MAX)
    if not bad.any():
        return numbers, []
    invalid = numbers[bad].tolist()
    numbers = numbers.copy()
    numbers[bad] = np.nan
    return numbers, invalid


def category_codes(values: Sequence, vocabulary: Sequence[str], cache: dict) -> torch.Tensor:
    """A column -> (N,) long codes: the category's id (1 ..) when it is in `vocabulary` (compared by
    `category_key`), -1 when the value is missing, and -2 - k for the k-th unknown category
    (`cache["unknown"][k]` names it).

    Each distinct raw value is cleaned once and remembered in `cache` for later calls; rows are then
    dictionary lookups (for a large Arrow column, an index into Arrow's distinct values)."""
    codes = cache.setdefault("codes", {})
    if large_arrow(values):  # Arrow finds the distinct values; only those are cleaned and looked up
        indices, distinct_values = arrow_dictionary(values)
        lookup = np.asarray([_code(value, vocabulary, cache) for value in distinct_values] + [-1], dtype=np.int64)
        return torch.from_numpy(lookup[indices])
    values = as_list(values)
    try:
        distinct = set(values)
    except TypeError:  # an unhashable value (a list, a dict): compare its text
        values = [hashable(value) for value in values]
        distinct = set(values)
    if len(codes) + len(distinct) > CATEGORY_CACHE_SIZE:  # free text: do not grow without bound
        codes.clear()
    for value in distinct.difference(codes):
        _code(value, vocabulary, cache)
    return torch.from_numpy(np.fromiter(map(codes.__getitem__, values), dtype=np.int64, count=len(values)))


CATEGORY_CACHE_SIZE = 50_000  # distinct raw values remembered per categorical feature


def _code(value: Any, vocabulary: Sequence[str], cache: dict) -> int:
    """The cached code of one distinct raw value (see `category_codes`), cleaning it on first sight."""
    codes, unknown = cache.setdefault("codes", {}), cache.setdefault("unknown", [])
    if "ids" not in cache:  # category_key -> id, for this vocabulary
        cache["ids"] = {category_key(category): position + 1 for position, category in reversed(list(enumerate(vocabulary)))}
    if value not in codes:
        category = as_category(value)
        if category is None:
            codes[value] = -1
        elif category_key(category) in cache["ids"]:
            codes[value] = cache["ids"][category_key(category)]
        else:
            if category not in unknown:
                unknown.append(category)
            codes[value] = -2 - unknown.index(category)
    return codes[value]


def is_arrow(values: Any) -> bool:
    """A pyarrow Array or ChunkedArray (recognised by its methods: pyarrow is not imported here)."""
    return hasattr(values, "dictionary_encode") and hasattr(values, "to_pylist")


# Below this many rows, Python sets and dicts over `to_pylist()` beat Arrow's per-call dispatch cost.
ARROW_DICTIONARY_ROWS = 2048


def large_arrow(values: Any) -> bool:
    return is_arrow(values) and len(values) >= ARROW_DICTIONARY_ROWS


def as_list(values: Any) -> list:
    if is_arrow(values):
        return values.to_pylist()
    return values.tolist() if hasattr(values, "tolist") else list(values)


def arrow_dictionary(values: Any) -> tuple[np.ndarray, list]:
    """An Arrow column -> ((N,) int64 index of each row's value among the distinct values, -1 for null; the
    distinct values in order of first appearance), computed by Arrow in C (`dictionary_encode`)."""
    array = values.combine_chunks() if hasattr(values, "combine_chunks") else values
    encoded = array.dictionary_encode()
    indices = encoded.indices.to_numpy(zero_copy_only=False)  # nulls (if any) come back as NaN
    if encoded.indices.null_count:
        indices = np.where(np.isnan(indices), -1, indices)
    return indices.astype(np.int64), encoded.dictionary.to_pylist()


def hashable(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


__all__ = ["as_columns", "row_count", "number_array", "category_codes", "is_arrow", "large_arrow", "as_list",
           "arrow_dictionary", "hashable"]
