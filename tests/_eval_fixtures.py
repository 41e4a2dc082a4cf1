"""Tiny data and checkpoint shared by test_evaluate.py and test_extrapolate.py.

Built once per pytest session under the session's base temp folder (a marker file says it is
complete), so both test files reuse it: a 30-patient synthetic dataset at 48 px and a SLIMP
checkpoint pre-trained for 2 steps at 32 px (~15 s together on one core).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
from _synthetic_fixtures import TINY_SYNTHETIC  # noqa: E402

SYNTHETIC_PATIENTS = 30


def tiny_data_and_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset folder, checkpoint folder), built on first use in this session."""
    root = tmp_path_factory.getbasetemp() / "slimp_eval_fixture"
    data, checkpoint, done = root / "data", root / "checkpoint", root / "done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        from training import prepare_data, pretrain

        prepare_data.main(["synthetic", *TINY_SYNTHETIC, "--patients", str(SYNTHETIC_PATIENTS), "--seed", "0", "--image-size", "48",
                           "--output-dir", str(data)])
        pretrain.main(["--dataset_dir", str(data), "--output_dir", str(checkpoint), "--max_steps", "2",
                       "--patients_per_batch", "4", "--save_steps", "0", "--eval_steps", "0", "--linear_probe", "false",
                       "--num_workers", "0", "--image_size", "32", "--logging_steps", "1"])
        done.touch()
    return data, checkpoint


def write_dataset(splits: dict[str, datasets.Dataset], schema: dict, output_dir: Path) -> Path:
    """Save splits in the layout of docs/data_format.md (split folders + schema.json)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        split.save_to_disk(str(output_dir / name))
    (output_dir / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    (output_dir / "schema.json").write_text(json.dumps(schema, indent=1))
    return output_dir


def relabelled_dataset(data_dir: Path, output_dir: Path) -> Path:
    """The synthetic dataset with 3 classes: malignant, else low or high lesion hue (`tbp_lv_H`, computed
    from the rendered image, vs the train median)."""
    import numpy as np

    names = ["low_hue", "high_hue", "malignant"]
    splits = {name: datasets.load_from_disk(str(data_dir / name)) for name in ("train", "validation", "test")}
    median = float(np.nanmedian(splits["train"]["tbp_lv_H"]))
    relabelled = {}
    for name, split in splits.items():
        labels = [2 if label == 1 else int(hue > median) for label, hue in zip(split["label"], split["tbp_lv_H"])]
        relabelled[name] = split.remove_columns("label").add_column("label", labels, feature=datasets.ClassLabel(names=names))
    schema = json.loads((data_dir / "schema.json").read_text())
    schema["label"]["names"] = names
    return write_dataset(relabelled, schema, output_dir)


def duplicate_target(data_dir: Path, output_dir: Path, rows: range = range(0, 225, 5)) -> Path:
    """A dataset whose `test` split is a copy of some of `data_dir`'s train rows (same images, same metadata)."""
    train = datasets.load_from_disk(str(data_dir / "train"))
    schema = json.loads((data_dir / "schema.json").read_text())
    return write_dataset({"test": train.select(rows)}, schema, output_dir)
