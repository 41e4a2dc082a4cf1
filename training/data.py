"""Load a dataset written by `python -m training.prepare_data` (layout: docs/data_format.md).

    from training.data import load_slimp_dataset, read_schema
    train, schema = load_slimp_dataset("data/isic2024", "train")                 # datasets.Dataset
    stream, schema = load_slimp_dataset("data/isic2024", "train", streaming=True)  # IterableDataset
    schema["lesion"]["numerical"]  # the lesion-level numerical model inputs

A path that is not a local folder is read as a Hub dataset repo id (`push_to_hub` of the converter).
"""

from __future__ import annotations

import json
import os
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

        schema_file = hf_hub_download(str(path), SCHEMA_FILE, repo_type="dataset")
    return json.loads(Path(schema_file).read_text())


def load_slimp_dataset(path: Union[str, os.PathLike], split: str = "train", streaming: bool = False,
                       num_shards: Optional[int] = None
                       ) -> tuple[Union[datasets.Dataset, datasets.IterableDataset], dict]:
    """One split and the schema. `streaming=True` gives an `IterableDataset` in `num_shards` shards
    (default: one per Arrow file), which `DataLoader` workers can share."""
    schema = read_schema(path)
    if Path(path).is_dir():
        split_dir = Path(path) / split
        if not split_dir.is_dir():
            available = sorted(p.name for p in Path(path).iterdir() if (p / "state.json").is_file())
            raise KeyError(f"no split {split!r} in {path}; splits: {', '.join(available)}")
        dataset = datasets.Dataset.load_from_disk(str(split_dir))
    else:
        dataset = datasets.load_dataset(str(path), split=split)
    if streaming:
        shards = num_shards or max(1, len(dataset.cache_files))
        dataset = dataset.to_iterable_dataset(num_shards=min(shards, len(dataset)))  # 0 for an empty split
    return dataset, schema
