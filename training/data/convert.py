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
`--overwrite` (replace a non-empty OUT), `--restart` (ignore finished work from an interrupted run),
`--image-check decode|open|none`, `--max-shard-size 500MB`, `--push-to-hub REPO_ID [--private]`.

Pipeline: read the metadata CSV (held in memory), drop rows without id / patient / label or with a
repeated id (each reported), split patients, then stream each split's images from the image store
(decoded once to validate, stored as the original bytes) into an Arrow file, a bounded record batch at
a time, then save it as shards (`save_to_disk`), so memory stays bounded for the 401,059 ISIC 2024 images.

Work happens in `OUT.partial/` (or `--work-dir`). A finished split is kept there, and a re-run with
the same inputs and options skips it (resume); everything is moved to OUT only when all splits are done.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from .dataset_card import dataset_card, push_dataset_to_hub
from .sources import (
    SOURCES,
    InputError,
    MissingImage,
    SourceSpec,
    check_image,
    looks_numerical,
    open_image_store,
    read_metadata,
    to_float,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
RESERVED_COLUMNS = ("image", "image_id", "patient_id", "label")
BATCH_ROWS = 1000  # rows per Arrow record batch while streaming (also metadata rows turned into dicts at once)
BATCH_BYTES = 64 << 20  # ... or fewer, once their images reach 64 MiB


class DataError(RuntimeError):
    """A bad row under `--strict`: names the id, the reason and the file."""


class FaultLog:
    """Every excluded row, with its id and reason; under `strict` the first one is an error instead."""

    LOGGED = 20  # faults logged as warnings; later ones at debug level (all are in summary.json)

    def __init__(self, strict: bool):
        self.strict = strict
        self.entries: list[dict] = []
        self.unparsed: dict[str, dict] = {}  # column -> {"count", "examples": [{"id", "value"}]}

    def unparsed_values(self, column: str, ids: list, values: list, file: Optional[str] = None) -> None:
        """Present values of a numerical column that are not numbers: read as missing, counted per column
        with example ids in summary.json; under `strict` an error naming the first one."""
        if not ids:
            return
        where = f" in {file}" if file else ""
        if self.strict:
            raise DataError(f"{ids[0]}: column {column!r} holds {values[0]!r}, not a number ({len(ids)} such values"
                            f"{where}); fix the file or drop --strict to read them as missing")
        entry = self.unparsed.setdefault(column, {"count": 0, "examples": []})
        entry["count"] += len(ids)
        room = 5 - len(entry["examples"])
        entry["examples"] += [{"id": str(i), "value": str(v)} for i, v in zip(ids[:room], values[:room])]
        logger.warning("%s: %d value(s) of %r are not numbers and are read as missing, e.g. %s=%r%s", column,
                       len(ids), column, ids[0], values[0], where)

    def report(self, image_id: str, reason: str, detail: str, file: Optional[str] = None) -> None:
        where = f" in {file}" if file else ""
        if self.strict:
            raise DataError(f"{image_id}: {reason} ({detail}){where}")
        self.entries.append({"id": image_id, "reason": reason, "detail": detail} | ({"file": file} if file else {}))
        level = logging.WARNING if len(self.entries) <= self.LOGGED else logging.DEBUG
        logger.log(level, "excluded %s: %s (%s)%s", image_id, reason, detail, where)


@dataclasses.dataclass
class ColumnPlan:
    """Which output column is what; becomes `schema.json` and the dataset's `Features`."""

    patient_numerical: list[str]
    patient_categorical: list[str]
    lesion_numerical: list[str]
    lesion_categorical: list[str]
    domain_column: Optional[str]
    extra_numerical: list[str]
    extra_categorical: list[str]
    excluded: list[str]  # present in the CSV, dropped because they leak the label
    absent: list[str]  # feature columns of the source that this CSV lacks

    @property
    def numerical(self) -> list[str]:
        return self.patient_numerical + self.lesion_numerical + self.extra_numerical

    @property
    def metadata_columns(self) -> list[str]:
        domain = [self.domain_column] if self.domain_column else []
        return (self.patient_numerical + self.patient_categorical + self.lesion_numerical
                + self.lesion_categorical + domain + self.extra_numerical + self.extra_categorical)

    def features(self, label_names: list[str]) -> datasets.Features:
        features = {"image": datasets.Image(), "image_id": datasets.Value("string"),
                    "patient_id": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)}
        for column in self.metadata_columns:
            features[column] = datasets.Value("float64" if column in self.numerical else "string")
        return datasets.Features(features)

    def schema(self, spec: SourceSpec, label_names: list[str]) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "source": spec.name,
            "license": spec.license,
            "id_column": "image_id",
            "id_source_column": spec.id_column,
            "patient_column": "patient_id",
            "patient_source_column": spec.patient_column,
            "label": {"column": "label", "names": label_names, "source_column": spec.label_column},
            "lesion": {"numerical": self.lesion_numerical, "categorical": self.lesion_categorical},
            "patient": {"numerical": self.patient_numerical, "categorical": self.patient_categorical},
            "domain_column": self.domain_column,
            "extra_columns": self.extra_numerical + self.extra_categorical,
            "excluded_columns": self.excluded,
        }


def plan_columns(spec: SourceSpec, frame: pd.DataFrame) -> ColumnPlan:
    present = set(frame.columns)
    mapped = {spec.id_column, spec.patient_column}
    known = set(spec.feature_columns) | mapped | {spec.domain_column}
    extras = [c for c in frame.columns if c not in known and not spec.leaks(c)]
    for column in [c for c in extras if c in RESERVED_COLUMNS]:
        logger.warning("column %r clashes with a SLIMP column name and is dropped", column)
        extras.remove(column)
    plan = ColumnPlan(
        patient_numerical=[c for c in spec.patient_numerical if c in present],
        patient_categorical=[c for c in spec.patient_categorical if c in present],
        lesion_numerical=[c for c in spec.lesion_numerical if c in present],
        lesion_categorical=[c for c in spec.lesion_categorical if c in present],
        domain_column=spec.domain_column if spec.domain_column in present else None,
        extra_numerical=[c for c in extras if looks_numerical(frame[c])],
        extra_categorical=[c for c in extras if not looks_numerical(frame[c])],
        excluded=[c for c in frame.columns if spec.leaks(c) and c not in mapped],
        absent=[c for c in spec.feature_columns if c not in present],
    )
    if plan.absent:
        logger.warning("%s columns absent from the metadata (not used): %s", spec.name, ", ".join(plan.absent))
    return plan


def label_codes(raw: pd.Series, spec: SourceSpec) -> tuple[list[str], np.ndarray]:
    """Label names and each row's class index (-1: missing, -2: not a known label)."""
    keys = _clean_text(raw)
    if spec.label_map is not None:  # e.g. ISIC 2024 `target` 0/1 -> benign/malignant
        keys = [None if k is None else spec.label_map.get(_integer_text(k), k) for k in keys]
    names = list(spec.label_names) if spec.label_names else sorted({k for k in keys if k is not None})
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([-1 if k is None else index.get(k, -2) for k in keys], dtype=np.int64)


def _clean_text(values: pd.Series) -> list[Optional[str]]:
    """Stripped strings, None for missing or blank (a list: `Series.map` would turn None into NaN)."""
    return [None if v is None or v != v else (str(v).strip() or None) for v in values]


def _integer_text(text: str) -> str:
    """"1.0" -> "1", so that an ISIC 2024 `target` written as a float still maps to its label."""
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def select_rows(frame: pd.DataFrame, spec: SourceSpec, metadata_path: Path, faults: FaultLog
                ) -> tuple[pd.DataFrame, list[str]]:
    """Keep rows with an id (first occurrence only), a patient and a known label; report the others."""
    ids, patients = _clean_text(frame[spec.id_column]), _clean_text(frame[spec.patient_column])
    names, codes = label_codes(frame[spec.label_column], spec)
    first_line = {}
    keep = np.zeros(len(frame), dtype=bool)
    for row, (image_id, patient, code) in enumerate(zip(ids, patients, codes)):
        line = row + 2  # CSV line: the header is line 1
        if image_id is None:
            faults.report(f"line {line}", "no image id", f"{spec.id_column} is empty", str(metadata_path))
        elif image_id in first_line:
            faults.report(image_id, "duplicate id", f"line {line} repeats line {first_line[image_id]}",
                          str(metadata_path))
        elif patient is None:
            faults.report(image_id, "no patient_id", f"{spec.patient_column} is empty", str(metadata_path))
        elif code == -1:
            faults.report(image_id, "missing label", f"{spec.label_column} is empty", str(metadata_path))
        elif code == -2:
            faults.report(image_id, "unknown label", f"{spec.label_column}={frame[spec.label_column].iat[row]!r} "
                          f"is not one of {names}", str(metadata_path))
        else:
            keep[row] = True
        if image_id is not None:
            first_line.setdefault(image_id, line)
    table = pd.DataFrame({"image_id": np.array(ids, dtype=object)[keep],
                          "patient_id": np.array(patients, dtype=object)[keep], "label": codes[keep]},
                         index=frame.index[keep])
    return table, names


def split_patients(table: pd.DataFrame, validation_fraction: float, test_fraction: float, seed: int
                   ) -> pd.Series:
    """Each row's split; patients are disjoint. A patient's stratum is its rarest label (by lesion count
    over the dataset), so for benign/malignant data a patient with any malignant lesion is positive.
    Quotas are rounded cumulatively over the strata (rarest first), so the totals match the fractions."""
    rarity = table["label"].map(table["label"].value_counts())
    ranked = table.assign(rarity=rarity).sort_values(["rarity", "label"], ascending=[True, False], kind="stable")
    stratum = ranked.groupby("patient_id", sort=True)[["label", "rarity"]].first()
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    seen = 0
    for (_, label), members in stratum.groupby(["rarity", "label"], sort=True):
        patients = np.array(sorted(members.index))[rng.permutation(len(members))]
        n_test = _quota(seen + len(patients), test_fraction) - _quota(seen, test_fraction)
        n_validation = _quota(seen + len(patients), validation_fraction) - _quota(seen, validation_fraction)
        n_validation = min(n_validation, len(patients) - n_test)
        seen += len(patients)
        for position, patient in enumerate(patients):
            in_test, in_validation = position < n_test, position < n_test + n_validation
            assignment[patient] = "test" if in_test else "validation" if in_validation else "train"
    return table["patient_id"].map(assignment)


def _quota(patients: int, fraction: float) -> int:
    return int(np.floor(patients * fraction + 0.5))


def build_table(frame: pd.DataFrame, spec: SourceSpec, metadata_path: Path, faults: FaultLog
                ) -> tuple[pd.DataFrame, ColumnPlan, list[str]]:
    """The output columns (all but `image`) of every row that passes `select_rows`."""
    plan = plan_columns(spec, frame)
    table, label_names = select_rows(frame, spec, metadata_path, faults)
    for column in plan.metadata_columns:
        values = frame.loc[table.index, column]
        if column in plan.numerical:
            numbers, bad = to_float(values)
            faults.unparsed_values(column, table["image_id"][bad].tolist(), values[bad].tolist(), str(metadata_path))
            values = numbers
        table[column] = values
    return table.reset_index(drop=True), plan, label_names


def read_image(store, image_id: str, faults: FaultLog, image_check: str) -> Optional[bytes]:
    """The image's encoded bytes, or None after reporting why it cannot be used."""
    try:
        data = store.read(image_id)
    except MissingImage as error:
        faults.report(image_id, "missing image", error.args[0], store.describe(image_id))
        return None
    except OSError as error:  # e.g. an HDF5 entry that cannot be read
        faults.report(image_id, "corrupt image", f"unreadable: {error}", store.describe(image_id))
        return None
    problem = check_image(data, image_check)
    if problem:
        faults.report(image_id, "corrupt image", problem, store.describe(image_id))
        return None
    return data


def record_batch(records: list[dict], schema: pa.Schema) -> pa.RecordBatch:
    """Rows -> Arrow, column by column (NaN stays NaN in float64 columns, None becomes null)."""
    arrays = []
    for field in schema:
        values = [record[field.name] for record in records]
        if field.name == "image":
            values = [{"bytes": data, "path": None} for data in values]
        elif pa.types.is_string(field.type):  # pandas marks a missing string as NaN
            values = [None if value is None or value != value else value for value in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_arrow(rows: pd.DataFrame, path: Path, features: datasets.Features, image_paths: list[Path],
                faults: FaultLog, image_check: str, description: str) -> int:
    """Streams rows and their checked images into one Arrow file, a bounded batch at a time; returns
    the number of rows written. The file's schema carries `features` (Image, ClassLabel) for `datasets`."""
    schema = features.arrow_schema
    written, batch, batch_bytes = 0, [], 0
    with open_image_store(image_paths) as store, pa.OSFile(str(path), "wb") as sink, \
            pa.ipc.new_stream(sink, schema) as writer, tqdm(total=len(rows), desc=description, unit="img") as bar:
        for start in range(0, len(rows), BATCH_ROWS):
            for record in rows.iloc[start:start + BATCH_ROWS].to_dict("records"):
                bar.update()
                record["image"] = read_image(store, record["image_id"], faults, image_check)
                if record["image"] is not None:
                    batch.append(record)
                    batch_bytes += len(record["image"])
                if len(batch) == BATCH_ROWS or batch_bytes >= BATCH_BYTES:
                    writer.write_batch(record_batch(batch, schema))
                    written, batch, batch_bytes = written + len(batch), [], 0
        if batch:
            writer.write_batch(record_batch(batch, schema))
            written += len(batch)
    return written


def build_split(name: str, rows: pd.DataFrame, features: datasets.Features, image_paths: list[Path],
                args: argparse.Namespace, work: Path) -> list[dict]:
    """Writes `work/<name>` (a saved `datasets.Dataset`) and returns the rows excluded on the way."""
    faults = FaultLog(args.strict)
    partial, stream_file = work / f"{name}.tmp", work / f"{name}.stream.arrow"
    shutil.rmtree(partial, ignore_errors=True)
    written = write_arrow(rows, stream_file, features, image_paths, faults, args.image_check, name)
    dataset = datasets.Dataset.from_file(str(stream_file))
    shards = {"max_shard_size": args.max_shard_size} if written else {"num_shards": 1}  # 0 shards: unloadable
    dataset.save_to_disk(str(partial), **shards)
    del dataset
    stream_file.unlink()
    partial.rename(work / name)
    (work / f"{name}.done.json").write_text(json.dumps({"excluded": faults.entries}))
    return faults.entries


def split_summary(rows: pd.DataFrame, excluded: list[dict], label_names: list[str]) -> dict:
    kept = rows[~rows["image_id"].isin({entry["id"] for entry in excluded})]
    counts = kept["label"].value_counts()
    return {"patients": int(kept["patient_id"].nunique()), "lesions": len(kept),
            "labels": {name: int(counts.get(i, 0)) for i, name in enumerate(label_names)}}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(args: argparse.Namespace) -> str:
    """Identifies inputs and options, so that a resumed run only reuses splits built from the same ones."""
    options = {key: getattr(args, key) for key in ("source", "validation_fraction", "test_fraction", "seed",
                                                   "image_check", "max_shard_size", "label", "patients",
                                                   "image_size") if hasattr(args, key)}
    if args.source != "synthetic":
        stats = [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in args.images
                 if Path(p).exists()]
        options |= {"metadata": file_digest(Path(args.metadata)) if Path(args.metadata).is_file() else None,
                    "images": stats}
    options["format_version"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


def open_work_dir(work: Path, fingerprint: str, restart: bool) -> None:
    plan_file = work / "plan.json"
    if work.exists():
        previous = json.loads(plan_file.read_text()).get("fingerprint") if plan_file.is_file() else None
        if restart or previous != fingerprint:
            logger.info("discarding %s (%s)", work, "--restart" if restart else "different inputs or options")
            shutil.rmtree(work)
        else:
            logger.info("resuming from %s", work)
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps({"fingerprint": fingerprint}))


def source_spec(args: argparse.Namespace) -> SourceSpec:
    spec = SOURCES[args.source]
    if args.source == "isic-archive" and args.label != spec.label_column:
        spec = dataclasses.replace(spec, label_column=args.label, label_names=None, label_map=None)
    return spec


def resolve_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, list[Path]]:
    """The metadata CSV and image store paths (for `synthetic`, generated into `work` once)."""
    if args.source != "synthetic":
        return Path(args.metadata), [Path(p) for p in args.images]
    source = work / "source"
    if not (source / "done").is_file():
        from .synthetic import write_kaggle_layout

        shutil.rmtree(source, ignore_errors=True)
        write_kaggle_layout(source, args.patients, seed=args.seed, image_size=args.image_size)
        (source / "done").touch()
    return source / "train-metadata.csv", [source / "train-image.hdf5"]


def build_splits(table: pd.DataFrame, split_of_row: pd.Series, features: datasets.Features,
                 image_paths: list[Path], args: argparse.Namespace, work: Path) -> tuple[dict, list[dict]]:
    """Builds each split not already finished in `work`; returns per-split counts and excluded rows."""
    label_names = features["label"].names
    splits, excluded = {}, []
    for name in SPLITS:
        # Patient-contiguous rows (stable: source order within a patient), so that a stream of a split
        # can be batched by whole patients (training/data/streaming.py).
        rows = table[split_of_row == name].sort_values("patient_id", kind="stable").reset_index(drop=True)
        done = work / f"{name}.done.json"
        if done.is_file() and (work / name).is_dir():
            logger.info("%s: already built in %s, skipped", name, work / name)
            split_faults = json.loads(done.read_text())["excluded"]
        else:
            split_faults = build_split(name, rows, features, image_paths, args, work)
        excluded += split_faults
        splits[name] = split_summary(rows, split_faults, label_names)
    return splits, excluded


def finish(work: Path, schema: dict, summary: dict) -> None:
    """Writes the DatasetDict index, schema.json, summary.json and README.md; removes resume state."""
    (work / datasets.config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(SPLITS)}))
    (work / "schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "README.md").write_text(dataset_card(schema, summary))
    for name in ["plan.json"] + [f"{split}.done.json" for split in SPLITS]:
        (work / name).unlink(missing_ok=True)
    shutil.rmtree(work / "source", ignore_errors=True)


def publish(work: Path, out: Path) -> None:
    """Moves the finished work dir to OUT; an existing OUT is deleted only once the new one is in place."""
    if not out.exists():
        shutil.move(work, out)  # a rename, unless --work-dir is on another file system
        return
    old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    shutil.move(work, out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def convert(args: argparse.Namespace) -> dict:
    """The whole conversion; returns the summary (also written to OUT/summary.json)."""
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".partial")
    spec = source_spec(args)
    if args.source != "synthetic":
        open_image_store(args.images)  # fails early, naming a missing file or folder
    open_work_dir(work, run_fingerprint(args), args.restart)
    try:
        metadata_path, image_paths = resolve_inputs(args, work)
        frame = read_metadata(metadata_path, spec)
        faults = FaultLog(args.strict)
        table, plan, label_names = build_table(frame, spec, metadata_path, faults)
        split_of_row = split_patients(table, args.validation_fraction, args.test_fraction, args.seed)
        splits, split_faults = build_splits(table, split_of_row, plan.features(label_names), image_paths, args,
                                            work)
    except BaseException:
        if not any(work.glob("*.done.json")) and not (work / "source" / "done").is_file():
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming from
        raise
    excluded = faults.entries + split_faults
    summary = {
        "source": spec.name,
        "metadata": None if spec.name == "synthetic" else str(metadata_path),
        "images": None if spec.name == "synthetic" else [str(p) for p in image_paths],
        "rows_in_metadata": len(frame),
        "options": {"validation_fraction": args.validation_fraction, "test_fraction": args.test_fraction,
                    "seed": args.seed, "image_check": args.image_check},
        "splits": splits,
        "excluded": excluded,
        "excluded_counts": dict(Counter(entry["reason"] for entry in excluded)),
        "unparsed_values": faults.unparsed,
        "absent_columns": plan.absent,
    }
    finish(work, plan.schema(spec, label_names), summary)
    publish(work, out)
    if args.push_to_hub:
        push_dataset_to_hub(out, args.push_to_hub, private=args.private)
    return summary


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
    common.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    common.add_argument("--restart", action="store_true", help="do not resume from an interrupted run")
    common.add_argument("--work-dir", help="resumable work folder (default: OUTPUT_DIR.partial)")
    common.add_argument("--image-check", choices=("decode", "open", "none"), default="decode")
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
    synthetic.add_argument("--patients", type=int, required=True)
    synthetic.add_argument("--image-size", type=int, default=128)
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    """Parses `argv`, converts, prints a short summary and returns the summary dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.validation_fraction + args.test_fraction >= 1.0:
        parser.error("--validation-fraction + --test-fraction must be below 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = convert(args)
    for name, counts in summary["splits"].items():
        print(f"{name:>10}: {counts['patients']} patients, {counts['lesions']} lesions, {counts['labels']}")
    print(f"  excluded: {len(summary['excluded'])} rows {summary['excluded_counts']} -> {args.output_dir}")
    return summary


def cli(argv: Optional[list[str]] = None) -> None:
    """The command line: `main`, with a bad input reported as one line and exit status 2."""
    try:
        main(argv)
    except (DataError, InputError, FileExistsError) as error:
        logging.getLogger(__name__).error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    cli()
