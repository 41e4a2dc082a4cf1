"""Load a dataset written by `python -m training.prepare_data` (layout: docs/data_format.md).

    from training.data.dataset import load_slimp_dataset, read_schema
    train, schema = load_slimp_dataset("data/isic2024", "train")                 # datasets.Dataset
    schema["lesion"]["numerical"]  # the lesion-level numerical model inputs

A path that is not a local folder is read as a Hub dataset repo id (`push_to_hub` of the converter).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import datasets

SCHEMA_FILE = "schema.json"


def read_schema(path: Union[str, os.PathLike]) -> dict:
    """The `schema.json` of a converted dataset: which column is the label, the patient, each input."""
    if Path(path).is_dir():
        schema_file = Path(path) / SCHEMA_FILE
        if not schema_file.is_file():
            raise FileNotFoundError(f"{path} is not a SLIMP dataset: no {SCHEMA_FILE} in it "
                                    "(convert it with `python -m training.prepare_data`)")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            schema_file = hf_hub_download(str(path), SCHEMA_FILE, repo_type="dataset")
        except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError) as error:
            from training.arguments import DatasetNotFoundError

            raise DatasetNotFoundError(f"{path}: no such dataset folder, and no Hub dataset of that id could be read "
                                    f"({type(error).__name__}; offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})"
                                    ) from None
    return json.loads(Path(schema_file).read_text())


def load_slimp_dataset(path: Union[str, os.PathLike], split: str = "train") -> tuple[datasets.Dataset, dict]:
    """One split (memory-mapped Arrow: nothing is read into memory until used) and the schema."""
    schema = read_schema(path)
    if Path(path).is_dir():
        split_dir = Path(path) / split
        if not split_dir.is_dir():
            available = sorted(p.name for p in Path(path).iterdir() if (p / "state.json").is_file())
            raise KeyError(f"no split {split!r} in {path}; splits: {', '.join(available)}")
        dataset = datasets.Dataset.load_from_disk(str(split_dir))
    else:
        dataset = datasets.load_dataset(str(path), split=split)
    return dataset, schema


def class_counts(dataset, label_names: list[str]) -> dict[str, int]:
    """Lesions per class of a split (`label` column), every class named, absent ones with 0."""
    labels = column_list(dataset, "label") if len(dataset) else []
    counts = Counter(int(label) for label in labels)
    return {name: counts.get(index, 0) for index, name in enumerate(label_names)}


def split_fingerprint(path: Union[str, os.PathLike], split: str = "train") -> Optional[str]:
    """What identifies the content of a local split: the `_fingerprint` of its `state.json` (for a converted
    dataset, a sha256 of its Arrow shards); None for a Hub dataset (not checked)."""
    state = Path(path) / split / "state.json"
    if not state.is_file():
        return None
    return json.loads(state.read_text()).get("_fingerprint")


def column_list(dataset, name: str) -> list:
    """One column of a `datasets.Dataset` as a Python list, read through Arrow: iterating `dataset[name]`
    (a lazy `Column`) formats every row and is about 40x slower on a large split."""
    if hasattr(dataset, "with_format"):
        return dataset.with_format("arrow")[name].to_pylist()
    return list(dataset[name])
