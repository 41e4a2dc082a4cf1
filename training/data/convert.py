"""Convert a skin-lesion source into the SLIMP dataset layout (docs/data_format.md).

    python -m training.prepare_data isic2024 --metadata train-metadata.csv --images train-image.hdf5 \
        --output-dir data/isic2024
    python -m training.prepare_data isic2024 --metadata train-metadata.csv --images train-image/ --output-dir OUT
    python -m training.prepare_data isic-archive --metadata metadata.csv --images isic-images/ --output-dir OUT
    python -m training.prepare_data isic-archive --metadata metadata.csv --images isic-images/ \
        --label diagnosis_1 --output-dir OUT
    python -m training.prepare_data ham10000 --metadata HAM10000_metadata.csv \
        --images HAM10000_images_part_1 HAM10000_images_part_2 --output-dir data/ham10000
    python -m training.prepare_data pad-ufes-20 --metadata metadata.csv --images images/ --output-dir data/pad
    python -m training.prepare_data synthetic --patients 200 --seed 0 --image-size 128 --output-dir data/synthetic

Common options: `--validation-fraction 0.1 --test-fraction 0.2 --seed 0` (patient-disjoint splits,
stratified by each patient's rarest label), `--strict` (any bad row is an error naming it),
`--overwrite` (replace a non-empty OUT that this converter wrote), `--restart` (ignore finished work from
an interrupted run), `--image-check decode|open|none`, `--max-shard-size 500MB`,
`--push-to-hub REPO_ID [--private]`.

Pipeline, in memory that does not grow with the data (the 401,059 ISIC 2024 rows convert like 5,000):

1. **Keys** (`rows.py`, CSV read in chunks): each row's id, patient and label, kept as compact Arrow
   arrays; rows without id / patient / known label or with a repeated id are excluded and reported; a
   feature column with no value at all is reported and left out; category spellings are unified.
2. **Splits** (`rows.py`): patients are split (disjoint, stratified).
3. **Buckets** (`shards.py`, CSV read again, in chunks): the kept rows' metadata, parsed (a value that is not
   a usable number is counted per column, with example ids, in `summary.json`), go to small Arrow files,
   one per (split, bucket of patients).
4. **Images** (`shards.py`): split by split, bucket by bucket (rows sorted by patient, so a split is
   patient-contiguous), each image is read from the store, decoded once to validate, and written once, as
   the original bytes, into the split's Arrow shards (the `save_to_disk` layout).
5. **Publish**: the split counts of `summary.json` are counted from the written data, a split without
   patients, positives or some class is reported loudly, the inputs are checked unchanged, and the folder
   is moved to OUT.

One run per folder: OUT and the work folder are locked for the whole run (`training/safety.py`); a second
run on them stops at once, naming the pid of the first. Work happens in `OUT.partial/` (or `--work-dir`). A
finished split is kept there, and a re-run with the same inputs and options (a content fingerprint of the
CSV and the images) skips it (resume); everything is moved to OUT only when all splits are done. No
output folder may be, hold or lie inside an input.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets

from ..safety import OutputError, check_apart, check_replaceable, disk_error, file_sha256, is_empty, locked, write_marker
from .dataset_card import dataset_card, push_dataset_to_hub
from .rows import (FORMAT_VERSION, SPLITS, DataError, FaultLog, check_splits, id_warnings, plan_columns, read_keys,
                   select_rows, split_patients, split_rows)
from .shards import DONE, build_splits, images_digest, split_counts, write_buckets
from .sources import SOURCES, InputError, SourceSpec, duplicate_columns, open_image_store
from .synthetic import LESIONS_PER_PATIENT_MEDIAN, MALIGNANT_PATIENT_SHARE, add_generator_arguments

logger = logging.getLogger(__name__)

__all__ = ["ConvertArguments", "main", "run", "cli", "convert", "build_parser", "DataError", "split_patients"]


@dataclass
class ConvertArguments:
    """One conversion, as typed arguments (the command line's options, `build_parser`, with `_` for `-`):

        convert.run(ConvertArguments("synthetic", "data/synthetic", patients=250, seed=0))
        convert.run(ConvertArguments("isic2024", "data/isic2024", metadata="train-metadata.csv",
                                     images=["train-image.hdf5"]))

    `metadata` and `images` are the inputs of every source but `synthetic`; `label` is the ISIC Archive's label
    column; `patients`, `image_size`, `malignant_patient_share` and `lesions_per_patient` configure `synthetic`.
    """

    source: str
    output_dir: str
    metadata: Optional[str] = None
    images: list[str] = field(default_factory=list)
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    strict: bool = False
    overwrite: bool = False
    restart: bool = False
    work_dir: Optional[str] = None
    image_check: str = "decode"
    max_shard_size: str = "500MB"
    push_to_hub: Optional[str] = None
    private: bool = False
    label: str = "benign_malignant"
    patients: Optional[int] = None
    image_size: int = 128
    malignant_patient_share: float = MALIGNANT_PATIENT_SHARE
    lesions_per_patient: float = LESIONS_PER_PATIENT_MEDIAN

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {sorted(SOURCES)}, got '{self.source}'")
        if not (0 <= self.validation_fraction < 1 and 0 <= self.test_fraction < 1
                and self.validation_fraction + self.test_fraction < 1):
            raise ValueError("validation_fraction and test_fraction must be in [0, 1) and add up to less than 1, got "
                             f"{self.validation_fraction} and {self.test_fraction}")
        if self.source == "synthetic" and not self.patients:
            raise ValueError("the synthetic source needs `patients`")
        if self.source != "synthetic" and (not self.metadata or not self.images):
            raise ValueError(f"the {self.source} source needs `metadata` (the CSV) and `images`")


def run_fingerprint(args: ConvertArguments) -> str:
    """Identifies inputs (by content) and options, so that a resumed run only reuses splits built from the same ones."""
    keys = ["source", "validation_fraction", "test_fraction", "seed", "image_check", "max_shard_size"]
    keys += {"isic-archive": ["label"], "synthetic": ["patients", "image_size"]}.get(args.source, [])
    options = {key: getattr(args, key) for key in keys}
    if args.source != "synthetic":
        options |= {"metadata": file_sha256(Path(args.metadata)) if Path(args.metadata).is_file() else None,
                    "images": images_digest([p for p in args.images if Path(p).exists()])}
    options["format_version"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


def input_paths(args: ConvertArguments) -> dict[str, Path]:
    """{description: path} of the files and folders the conversion reads (none for `synthetic`)."""
    if args.source == "synthetic":
        return {}
    return {"the --metadata file": Path(args.metadata), **{f"the --images {path}": Path(path) for path in args.images}}


def input_stamp(paths: dict[str, Path]) -> list[tuple]:
    """(path, size, mtime) of every input file (each file of an image folder): changes when one is rewritten."""
    stamp = []
    for root in paths.values():
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            info = path.stat()
            stamp.append((str(path), info.st_size, info.st_mtime_ns))
    return stamp


def check_folders(args: ConvertArguments, out: Path, work: Path) -> None:
    """An output or work folder never is, holds or lies inside an input, nor each other; a non-empty OUT is
    replaced only with --overwrite, and only when it is a dataset this converter wrote (its marker)."""
    inputs = input_paths(args)
    check_apart(out, "--output-dir", inputs)
    check_apart(work, "--work-dir", {**inputs, "--output-dir": out})
    if not is_empty(out):
        if not args.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        check_replaceable(out, "dataset", "--output-dir")


def open_work_dir(work: Path, fingerprint: str, restart: bool) -> None:
    """Resume from `work` (same inputs and options) or start it afresh; a non-empty folder this converter did
    not start (no plan.json) is never deleted."""
    plan_file = work / "plan.json"
    if work.exists():
        if not is_empty(work) and not plan_file.is_file():
            raise OutputError(f"--work-dir {work} holds files this converter did not write (no plan.json in it): it "
                              "is never deleted; choose a new or empty folder")
        previous = json.loads(plan_file.read_text()).get("fingerprint") if plan_file.is_file() else None
        if restart or previous != fingerprint:
            logger.info("discarding %s (%s)", work, "--restart" if restart else "different inputs or options")
            shutil.rmtree(work)
        else:
            logger.info("resuming from %s", work)
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps({"fingerprint": fingerprint}))


def source_spec(args: ConvertArguments) -> SourceSpec:
    spec = SOURCES[args.source]
    if args.source == "isic-archive" and args.label != spec.label_column:
        spec = dataclasses.replace(spec, label_column=args.label, label_names=None, label_map=None)
    return spec


def resolve_inputs(args: ConvertArguments, work: Path) -> tuple[Path, list[Path]]:
    """The metadata CSV and image store paths (for `synthetic`, generated into `work` once)."""
    if args.source != "synthetic":
        return Path(args.metadata), [Path(p) for p in args.images]
    source = work / "source"
    if not (source / "done").is_file():
        from .synthetic import generator_options, write_kaggle_layout

        shutil.rmtree(source, ignore_errors=True)
        logger.info("rendering %d synthetic patients at %d px (the longest step of the build: about 4 ms per lesion on "
                    "one core), then converting them", args.patients, args.image_size)
        write_kaggle_layout(source, args.patients, seed=args.seed, image_size=args.image_size, **generator_options(args))
        (source / "done").touch()
    return source / "train-metadata.csv", [source / "train-image.hdf5"]


def finish(work: Path, schema: dict, summary: dict) -> None:
    """Writes the DatasetDict index, schema.json, summary.json, README.md and the SLIMP marker; removes resume state."""
    (work / datasets.config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(SPLITS)}))
    (work / "schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "README.md").write_text(dataset_card(schema, summary))
    write_marker(work, "dataset")
    (work / "plan.json").unlink(missing_ok=True)
    for split in SPLITS:
        (work / split / DONE).unlink(missing_ok=True)
    shutil.rmtree(work / "source", ignore_errors=True)
    shutil.rmtree(work / "buckets", ignore_errors=True)


def publish(work: Path, out: Path) -> None:
    """Moves the finished work dir to OUT; an existing OUT (a SLIMP dataset, checked again here) is deleted
    only once the new one is in place."""
    if not out.exists():
        shutil.move(work, out)  # a rename, unless --work-dir is on another file system
        return
    check_replaceable(out, "dataset", "--output-dir")
    old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    shutil.move(work, out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def convert(args: ConvertArguments) -> dict:
    """The whole conversion, holding the locks of OUT and the work folder; returns the summary (also written
    to OUT/summary.json)."""
    out = Path(args.output_dir)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".partial")
    spec = source_spec(args)
    if args.source != "synthetic":
        if not Path(args.metadata).is_file():
            raise InputError(f"metadata file not found: {args.metadata}")
        open_image_store(args.images)  # fails early, naming a missing file or folder
    check_folders(args, out, work)
    with locked({"dataset folder (--output-dir)": out, "work folder (--work-dir)": work}):
        check_folders(args, out, work)  # again, now that no other run can change them
        summary = _convert(args, spec, out, work)
    if args.push_to_hub:
        push_dataset_to_hub(out, args.push_to_hub, private=args.private)
    return summary


def _convert(args: ConvertArguments, spec: SourceSpec, out: Path, work: Path) -> dict:
    inputs = input_paths(args)
    stamp = input_stamp(inputs)
    fingerprint = run_fingerprint(args)
    open_work_dir(work, fingerprint, args.restart)
    try:
        metadata_path, image_paths = resolve_inputs(args, work)
        faults = FaultLog(args.strict)
        keys = read_keys(metadata_path, spec)
        plan = plan_columns(spec, keys.columns, keys.numeric_extras, keys.empty)
        kept, patient_codes, labels, patient_names, label_names = select_rows(keys, spec, metadata_path, faults)
        if not len(kept):
            raise DataError(f"{metadata_path}: no row has an id, a patient and a known label; nothing to convert "
                            f"({len(faults.entries)} rows excluded, see the warnings)")
        warnings = duplicate_column_warnings(metadata_path) + id_warnings(keys, spec, kept)
        split = split_rows(patient_codes, labels, patient_names, args.validation_fraction, args.test_fraction, args.seed)
        buckets = write_buckets(metadata_path, spec, plan, kept, split, patient_codes, labels, patient_names, keys.ids,
                                faults, work, keys.spellings)
        split_faults = build_splits(buckets, plan.features(label_names), image_paths, work, fingerprint, strict=args.strict,
                                    image_check=args.image_check, max_shard_size=args.max_shard_size)
    except BaseException:
        if not any(work.glob(f"*/{DONE}")) and not (work / "source" / "done").is_file():
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming from
        raise
    if input_stamp(inputs) != stamp:
        shutil.rmtree(work, ignore_errors=True)
        raise DataError(f"the inputs ({', '.join(map(str, inputs.values()))}) changed while they were converted: the "
                        "dataset would match neither version and is not published; run the same command again")
    splits = {name: split_counts(work / name, label_names) for name in SPLITS}  # what the data holds
    warnings += check_splits(splits, label_names)
    excluded = faults.entries + split_faults
    summary = {
        "source": spec.name,
        "metadata": None if spec.name == "synthetic" else Path(metadata_path).name,
        "images": None if spec.name == "synthetic" else [Path(p).name for p in image_paths],
        "rows_in_metadata": len(keys.ids),
        "options": {"validation_fraction": args.validation_fraction, "test_fraction": args.test_fraction,
                    "seed": args.seed, "image_check": args.image_check},
        "splits": splits,
        "excluded": excluded,
        "excluded_counts": dict(Counter(entry["reason"] for entry in excluded)),
        "unparsed_values": faults.unparsed,
        "absent_columns": plan.absent,
        "empty_columns": plan.empty,
        "duplicate_columns": {name: [p + 1 for p in found] for name, found in duplicate_columns(metadata_path).items()},
        "warnings": warnings,
    }
    finish(work, plan.schema(spec, label_names), summary)
    publish(work, out)
    return summary


def duplicate_column_warnings(metadata_path: Path) -> list[str]:
    """A column name the CSV repeats (its copies agree, or reading it failed already): read once, reported."""
    warnings = [f"column {name!r} appears {len(found)} times in {metadata_path.name} (columns "
                f"{', '.join(str(p + 1) for p in found)}) with the same values: read once"
                for name, found in duplicate_columns(metadata_path).items()]
    for warning in warnings:
        logger.warning("!!! %s", warning)
    return warnings


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output-dir", required=True, help="where the DatasetDict is written")
    common.add_argument("--validation-fraction", type=fraction, default=0.1, help="fraction of patients")
    common.add_argument("--test-fraction", type=fraction, default=0.2, help="fraction of patients")
    common.add_argument("--seed", type=int, default=0, help="split seed (and generator seed for synthetic)")
    common.add_argument("--strict", action="store_true", help="a bad row is an error, not an exclusion")
    common.add_argument("--overwrite", action="store_true", help="replace a dataset this converter wrote in --output-dir (any other non-empty folder is refused)")
    common.add_argument("--restart", action="store_true", help="do not resume from an interrupted run")
    common.add_argument("--work-dir", help="resumable work folder (default: OUTPUT_DIR.partial)")
    common.add_argument("--image-check", choices=("decode", "open", "none"), default="decode",
                        help="decode every image (catches truncated files), only open its header, or trust it")
    common.add_argument("--max-shard-size", default="500MB", help="Arrow shard size of the saved splits")
    common.add_argument("--push-to-hub", metavar="REPO_ID", help="also push to this Hub dataset repo")
    common.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    parser = argparse.ArgumentParser(prog="python -m training.prepare_data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    for name, images_help in (("isic2024", "train-image.hdf5, or a folder of <isic_id>.jpg"),
                              ("isic-archive", "the folder written by `isic image download`"),
                              ("ham10000", "folder(s) of <image_id>.jpg"),
                              ("pad-ufes-20", "folder(s) holding the img_id files")):
        source = sub.add_parser(name, parents=[common], help=SOURCES[name].description)
        source.add_argument("--metadata", required=True, help="the metadata CSV")
        source.add_argument("--images", required=True, nargs="+", help=images_help)
        if name == "isic-archive":
            source.add_argument("--label", default="benign_malignant",
                                help="label column: benign_malignant (binary) or e.g. diagnosis_1 (multi-class)")
    synthetic = sub.add_parser("synthetic", parents=[common], help=SOURCES["synthetic"].description)
    synthetic.add_argument("--patients", type=int, required=True, help="number of synthetic patients")
    synthetic.add_argument("--image-size", type=int, default=128, help="side of the square crops, pixels")
    add_generator_arguments(synthetic)
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    """The command line: parses `argv` into `ConvertArguments` and `run`s them."""
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.validation_fraction + options.test_fraction >= 1.0:
        parser.error("--validation-fraction + --test-fraction must be below 1")
    return run(ConvertArguments(**vars(options)))


def run(args: ConvertArguments) -> dict:
    """Converts, prints a short summary and returns the summary dict (also in OUT/summary.json)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = convert(args)
    for name, counts in summary["splits"].items():
        print(f"{name:>10}: {counts['patients']} patients, {counts['lesions']} lesions, {counts['labels']}")
    print(f"  excluded: {len(summary['excluded'])} rows {summary['excluded_counts']} -> {args.output_dir}")
    return summary


def cli(argv: Optional[list[str]] = None) -> None:
    """The command line: `main`, with a bad input, a folder this run may not write, a full disk or a read-only
    output reported as one `error:` line (exit status 2), not a traceback."""
    try:
        main(argv)
    except (DataError, InputError, FileExistsError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if disk_error(error) is None:
            raise
        print(f"error: {disk_error(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
