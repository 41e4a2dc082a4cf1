"""LoRA fine-tune a pre-trained SLIMP checkpoint on your own CSV + image folder.

    python examples/lora_finetune_own_data.py --model_dir outputs/slimp-synthetic --csv my_lesions.csv \
        --image_dir my_images/ --label_column diagnosis --output_dir outputs/my-slimp-lora --max_steps 200

The CSV has one row per lesion image: `image_path` (relative to `--image_dir`, default the CSV's folder)
or `isic_id` (a file `<isic_id>.jpg`/`.png` in `--image_dir`), `patient_id`, a label column, and metadata
columns. Metadata columns are matched by name to the inputs the checkpoint was pre-trained on (ISIC
names such as `age_approx`, `sex`, `anatom_site_general`, `clin_size_long_diam_mm`, `tbp_lv_*` for the
ISIC and synthetic checkpoints); the others are listed and ignored (continual pre-training,
`training/pretrain.py --init_from CKPT --continual`, adapts a checkpoint to new columns).

The positive class (whose score AUROC, pAUC and top-15 rank, and whose probability the classifier's card
reports) is `--positive_label`, or else the one label value that names a malignant diagnosis (`malignant`,
`melanoma`, `mel`, `bcc`, ...: `training/labels.py`). A binary labelling without such a name (`a`/`b`) is
refused until you name it; the choice is printed and written in the card and `config.json`. Class ids: two
labels are ordered [other, positive]; more are sorted, or `--label_names` gives your order.

Steps: the CSV becomes a `datasets.DatasetDict` in the shared layout (docs/data_format.md:
patient-disjoint train/validation/test splits stratified by label, `schema.json`, `summary.json`) in
`OUTPUT_DIR-dataset` (outside the model folder, which may be pushed to the Hub); then
`training.finetune.main([... "--mode", "lora", "--merge"])` trains and saves a merged classifier to
OUTPUT_DIR (`--keep_adapter` saves the LoRA adapter instead). Any other option is
passed on to training/finetune.py (e.g. `--lora_r 16 --class_weights auto --eval_strategy steps --eval_steps 50`).
(An `isic image download` folder converts with `python -m training.prepare_data isic-archive` instead;
this script takes any label column and image paths.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import pandas as pd


from modeling_slimp import SLIMPConfig
from training import finetune
from training.arguments import require_paths
from training.data.rows import split_patients
from training.labels import LabelError, binary_label_order, describe, positive_class

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_file(row: pd.Series, image_dir: Path) -> Path:
    if isinstance(row.get("image_path"), str):
        return image_dir / row["image_path"]
    for suffix in IMAGE_SUFFIXES:
        if (image_dir / f"{row['isic_id']}{suffix}").is_file():
            return image_dir / f"{row['isic_id']}{suffix}"
    raise FileNotFoundError(f"no image for isic_id {row['isic_id']} in {image_dir}")


def category(value) -> str | None:
    """Category string of a CSV cell (1.0 -> '1'), None when empty."""
    if pd.isna(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def label_names(values, given: str | None, positive: str | None) -> list[str]:
    """Class names in id order: `--label_names` as given; two values as [other, positive]; more, sorted."""
    if given:
        return given.split(",")
    values = sorted(str(value) for value in values)
    return binary_label_order(values, positive) if len(values) == 2 else values


def csv_to_dataset(args: argparse.Namespace, config: SLIMPConfig, dataset_dir: Path) -> dict:
    """Write the CSV as a SLIMP dataset; returns the schema."""
    frame = pd.read_csv(args.csv)
    id_column = "image_path" if "image_path" in frame.columns else "isic_id"
    for column in (id_column, "patient_id", args.label_column):
        if column not in frame.columns:
            raise SystemExit(f"{args.csv} has no column '{column}' (columns: {', '.join(frame.columns)})")
    values = frame[args.label_column].astype(str)
    try:
        names = label_names(values.unique(), args.label_names, args.positive_label)
        args.positive_label = names[positive_class(names, args.positive_label)]
    except LabelError as error:
        raise SystemExit(f"{args.csv}, column '{args.label_column}': {error}") from None
    print(describe(names, names.index(args.positive_label)))
    labels = values.map({name: i for i, name in enumerate(names)})
    if labels.isna().any():
        raise SystemExit(f"label values {sorted(set(values) - set(names))} are not in --label_names")

    # The checkpoint's schema decides which columns are inputs, at which level, and of which kind.
    inputs = {}
    for level, tower in (("lesion", config.lesion_metadata_config), ("patient", config.patient_metadata_config)):
        inputs[level] = {"numerical": [c for c in tower.numerical_features if c in frame.columns],
                         "categorical": [c for c in tower.categorical_features if c in frame.columns]}
    used = {c for level in inputs.values() for kind in level.values() for c in kind}
    ignored = sorted(set(frame.columns) - used - {"image_path", "isic_id", "patient_id", args.label_column})
    print(f"metadata used: {sorted(used)}\nignored (unknown to the checkpoint): {ignored}")

    numerical = [c for level in inputs.values() for c in level["numerical"]]
    categorical = [c for level in inputs.values() for c in level["categorical"]]
    image_dir = Path(args.image_dir) if args.image_dir else Path(args.csv).parent
    table = pd.DataFrame({
        "image": [{"bytes": image_file(row, image_dir).read_bytes(), "path": None} for _, row in frame.iterrows()],
        "image_id": frame[id_column].map(lambda value: Path(str(value)).stem),
        "patient_id": frame["patient_id"].astype(str), "label": labels.astype(int),
        **{c: pd.to_numeric(frame[c], errors="coerce").astype("float64") for c in numerical},
        **{c: frame[c].map(category) for c in categorical},
    })
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                  "patient_id": datasets.Value("string"), "label": datasets.ClassLabel(names=names),
                                  **{c: datasets.Value("float64") for c in numerical},
                                  **{c: datasets.Value("string") for c in categorical}})
    split_of_row = split_patients(table[["patient_id", "label"]], args.validation_fraction, args.test_fraction, args.seed)
    splits = datasets.DatasetDict({name: datasets.Dataset.from_pandas(table[split_of_row == name].reset_index(drop=True),
                                                                      features=features, preserve_index=False)
                                   for name in ("train", "validation", "test")})
    splits.save_to_disk(str(dataset_dir))
    schema = {"format_version": 1, "source": args.source_name, "license": args.license, "id_column": "image_id",
              "id_source_column": id_column, "patient_column": "patient_id", "patient_source_column": "patient_id",
              "label": {"column": "label", "names": names, "source_column": args.label_column},
              **inputs, "domain_column": None, "extra_columns": [], "excluded_columns": ignored}
    (dataset_dir / "schema.json").write_text(json.dumps(schema, indent=1))
    summary = {name: {"patients": len(set(split["patient_id"])), "lesions": len(split),
                      "labels": {names[k]: int(v) for k, v in pd.Series(split["label"]).value_counts().sort_index().items()}}
               for name, split in splits.items()}
    (dataset_dir / "summary.json").write_text(json.dumps({"source": args.source_name, "splits": summary}, indent=1))
    for name, counts in summary.items():
        print(f"{name:>10}: {counts['patients']} patients, {counts['lesions']} lesions, {counts['labels']}")
    return schema


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a pre-trained SLIMP checkpoint folder")
    parser.add_argument("--csv", required=True, help="one row per lesion image (see the module docstring)")
    parser.add_argument("--image_dir", help="folder of the images (default: the CSV's folder)")
    parser.add_argument("--label_column", default="label", help="the CSV column holding each lesion's class")
    parser.add_argument("--label_names", help="comma-separated class names in label-id order (default: two labels as "
                        "[other, positive], more sorted)")
    parser.add_argument("--positive_label", help="the positive class, a label value (default: the one value that names a "
                        "malignant diagnosis, e.g. malignant, melanoma; a binary labelling without one is refused)")
    parser.add_argument("--output_dir", required=True, help="where the fine-tuned classifier (or adapter) is saved")
    parser.add_argument("--dataset_dir", help="where the converted dataset goes (default: OUTPUT_DIR-dataset)")
    parser.add_argument("--validation_fraction", type=float, default=0.1, help="fraction of patients")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="fraction of patients")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of training")
    parser.add_argument("--max_steps", type=int, default=200, help="LoRA optimizer steps")
    parser.add_argument("--keep_adapter", action="store_true", help="save the LoRA adapter instead of merging it")
    parser.add_argument("--source_name", default="own-csv", help="dataset name shown in the model card")
    parser.add_argument("--license", default="other", help="licence of your data (a Hub licence id)")
    args, finetune_args = parser.parse_known_args(argv)
    require_paths(parser, args, "model_dir", "csv", "image_dir")

    dataset_dir = Path(args.dataset_dir or f"{Path(args.output_dir)}-dataset")
    csv_to_dataset(args, SLIMPConfig.from_pretrained(args.model_dir), dataset_dir)
    result = finetune.main(["--model_dir", args.model_dir, "--dataset_dir", str(dataset_dir),
                            "--output_dir", args.output_dir, "--mode", "lora", "--max_steps", str(args.max_steps),
                            "--seed", str(args.seed), "--positive_label", args.positive_label,
                            *([] if args.keep_adapter else ["--merge"]), *finetune_args])
    print(json.dumps(result["classification"], indent=1))
    return result


if __name__ == "__main__":
    main()
