"""The dataset card (README.md) of a converted SLIMP dataset, and the optional push to the Hub.

`training/prepare_data.py` always writes the card into the output folder (no network); the Hub is only
contacted by `push_dataset_to_hub`, i.e. with `--push-to-hub REPO_ID`.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_NOTES = {
    "isic2024": "ISIC 2024 Challenge / SLICE-3D (Kurtansky et al., Sci. Data 2024), "
                "https://doi.org/10.34970/2024-slice-3d.",
    "isic-archive": "The ISIC Archive, https://www.isic-archive.com (per-image attribution in `attribution`).",
    "ham10000": "HAM10000 (Tschandl, Rosendahl, Kittler, Sci. Data 2018), https://doi.org/10.7910/DVN/DBW86T.",
    "pad-ufes-20": "PAD-UFES-20 (Pacheco et al., Data in Brief 2020), https://doi.org/10.17632/zr7vgbcyr2.1.",
    "synthetic": ("Synthetic SLICE-3D data rendered by SLIMP's `training/data/synthetic.py`, calibrated to the published facts about "
                  "the real ISIC 2024 train set (a median of 40 lesions per patient instead of 241, so ~0.7% malignant instead of 0.098%)."),
}


def _yaml_header(schema: dict, summary: dict) -> str:
    lesions = sum(split["lesions"] for split in summary["splits"].values())
    size = next(name for limit, name in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"),
                                         (1e6, "100K<n<1M"), (float("inf"), "n>1M")) if lesions < limit)
    return "\n".join([
        "---",
        f"license: {schema['license'].lower()}",
        f"pretty_name: SLIMP {schema['source']}",
        "task_categories:",
        "- image-classification",
        "tags:",
        "- dermatology",
        "- skin-lesion",
        "- medical",
        "- slimp",
        "size_categories:",
        f"- {size}",
        "---",
    ])


def dataset_card(schema: dict, summary: dict) -> str:
    """Markdown with YAML metadata: source, licence, splits and counts, columns, exclusions, usage."""
    names = schema["label"]["names"]
    rows = [f"| {split} | {c['patients']} | {c['lesions']} | "
            + ", ".join(f"{name}: {c['labels'][name]}" for name in names) + " |"
            for split, c in summary["splits"].items()]
    counts = ", ".join(f"{reason}: {n}" for reason, n in summary["excluded_counts"].items()) or "none"
    inputs = "\n".join(f"- {level} {kind}: {', '.join(schema[level][kind]) or '(none)'}"
                       for level in ("patient", "lesion") for kind in ("numerical", "categorical"))
    return f"""{_yaml_header(schema, summary)}

# SLIMP dataset: {schema['source']}

Source: {SOURCE_NOTES.get(schema['source'], schema['source'])}

Licence: {schema['license']}. Converted with `python -m training.prepare_data {schema['source']} ...` from
the SLIMP repository. One row per lesion image; splits are patient-disjoint and stratified by label.

## Splits

| split | patients | lesions | labels |
|---|---|---|---|
{chr(10).join(rows)}

Excluded rows: {len(summary['excluded'])} ({counts}); each one, with its reason, is in `summary.json`.

## Columns

`image` (original encoded bytes), `image_id` (source column `{schema['id_source_column']}`), `patient_id`
(source column `{schema['patient_source_column']}`), `label` (ClassLabel: {', '.join(names)}; source column
`{schema['label']['source_column']}`). Model inputs (NaN / None = missing):

{inputs}

Domain column: {schema['domain_column'] or '(none)'}. Other columns, never model inputs:
{', '.join(schema['extra_columns']) or '(none)'}. Dropped because they leak the label:
{', '.join(schema['excluded_columns']) or '(none)'}. `schema.json` holds this in machine-readable form.

## Usage

```python
import datasets

splits = datasets.load_from_disk("path/to/this/folder")   # pushed to the Hub: datasets.load_dataset("org/name")
train = splits["train"]
print(train.features["label"].names, len(train))
```

With the SLIMP repository, `training.data.dataset.load_slimp_dataset(path_or_repo_id, "train")` also reads
`schema.json` (which columns are lesion-level or patient-level inputs).
"""


def push_dataset_to_hub(out_dir: Path, repo_id: str, private: bool = False) -> None:
    """Pushes the DatasetDict, then schema.json, summary.json and our card (keeping the Hub's data YAML)."""
    import datasets
    from huggingface_hub import DatasetCard, HfApi

    logger.info("pushing %s to the Hub dataset repo %s", out_dir, repo_id)
    datasets.load_from_disk(str(out_dir)).push_to_hub(repo_id, private=private)
    api = HfApi()
    for name in ("schema.json", "summary.json"):
        api.upload_file(path_or_fileobj=str(Path(out_dir) / name), path_in_repo=name, repo_id=repo_id,
                        repo_type="dataset")
    ours = DatasetCard((Path(out_dir) / "README.md").read_text())
    card = DatasetCard.load(repo_id, repo_type="dataset")
    for key, value in ours.data.to_dict().items():
        setattr(card.data, key, value)
    card.text = ours.text
    card.push_to_hub(repo_id, repo_type="dataset")
