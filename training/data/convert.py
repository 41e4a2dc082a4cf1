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

Pipeline, in memory that does not grow with the data (the 401,059 ISIC 2024 rows convert like 5,000):

1. **Keys** (CSV read in chunks): each row's id, patient and label, kept as compact Arrow arrays; rows
   without id / patient / known label or with a repeated id are excluded and reported; a feature column
   with no value at all is reported and left out.
2. **Splits**: patients are split (disjoint, stratified); a split without patients or positives is
   reported loudly.
3. **Buckets** (CSV read again, in chunks): the kept rows' metadata, parsed (a value that does not parse as
   a number is counted per column, with example ids, in `summary.json`), go to small Arrow files, one per
   (split, bucket of patients).
4. **Images**: split by split, bucket by bucket (rows sorted by patient, so a split is patient-contiguous),
   each image is read from the store, decoded once to validate, and written once, as the original bytes,
   into the split's Arrow shards (the `save_to_disk` layout), a bounded record batch at a time.

Work happens in `OUT.partial/` (or `--work-dir`). A finished split is kept there, and a re-run with
the same inputs and options (a content fingerprint of the CSV and the images) skips it (resume);
everything is moved to OUT only when all splits are done.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
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
import pyarrow.compute as pc
from tqdm.auto import tqdm

from modeling_slimp import schema_slimp as contract

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
BATCH_ROWS = 1000  # rows per Arrow record batch of a split (also metadata rows turned into dicts at once)
BATCH_BYTES = 64 << 20  # ... or fewer, once their images reach 64 MiB
CSV_CHUNK_ROWS = 5_000  # metadata rows parsed at once (what pass 1 and 2 hold; more does not parse faster)
BUCKET_ROWS = 5_000  # about this many rows per (split, bucket) file: what is held in memory when a split is written


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
    empty: list[str] = dataclasses.field(default_factory=list)  # columns without any value: left out

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


def plan_columns(spec: SourceSpec, columns: list[str], numeric_extras: set[str], empty: set[str]) -> ColumnPlan:
    """The output columns, from the CSV's header, the extra columns whose present values all parse as
    numbers (`numeric_extras`) and the columns without any value (`empty`: left out, reported)."""
    present = set(columns) - empty
    mapped = {spec.id_column, spec.patient_column}
    known = set(spec.feature_columns) | mapped | {spec.domain_column}
    extras = [c for c in columns if c not in known and not spec.leaks(c) and c not in empty]
    for column in [c for c in extras if c in RESERVED_COLUMNS]:
        logger.warning("column %r clashes with a SLIMP column name and is dropped", column)
        extras.remove(column)
    plan = ColumnPlan(
        patient_numerical=[c for c in spec.patient_numerical if c in present],
        patient_categorical=[c for c in spec.patient_categorical if c in present],
        lesion_numerical=[c for c in spec.lesion_numerical if c in present],
        lesion_categorical=[c for c in spec.lesion_categorical if c in present],
        domain_column=spec.domain_column if spec.domain_column in present else None,
        extra_numerical=[c for c in extras if c in numeric_extras],
        extra_categorical=[c for c in extras if c not in numeric_extras],
        excluded=[c for c in columns if spec.leaks(c) and c not in mapped],
        absent=[c for c in spec.feature_columns if c not in columns],
        empty=sorted(c for c in empty if c in spec.feature_columns or c in extras or c == spec.domain_column),
    )
    if plan.absent:
        logger.warning("%s columns absent from the metadata (not used): %s", spec.name, ", ".join(plan.absent))
    if plan.empty:
        logger.warning("columns without any value in the metadata (left out): %s", ", ".join(plan.empty))
    return plan


def _clean_text(values: pd.Series) -> list[Optional[str]]:
    """Stripped strings, None for missing or blank (a list: `Series.map` would turn None into NaN)."""
    return [None if v is None or v != v else (str(v).strip() or None) for v in values]


def _label_key(text: Optional[str], spec: SourceSpec) -> Optional[str]:
    """The label name a raw label value stands for (before checking that it is a known one)."""
    if text is None or spec.label_map is None:
        return text
    return spec.label_map.get(contract.as_category(text), text)  # "1.0" -> "1" -> "malignant"


@dataclasses.dataclass
class Keys:
    """Pass 1: what deciding rows and splits needs, one entry per CSV row, in compact Arrow arrays."""

    ids: pa.Array        # string, null when empty
    patients: pa.Array   # string, null when empty
    labels: pa.Array     # string: the label name (label_map applied), null when empty
    columns: list[str]
    numeric_extras: set[str]
    empty: set[str]


def read_keys(path: Path, spec: SourceSpec) -> Keys:
    """Pass 1 over the CSV: ids, patients, label names; which columns are numbers, which are empty."""
    ids, patients, labels = [], [], []
    numeric: dict[str, bool] = {}
    present: dict[str, int] = {}
    columns: list[str] = []
    for chunk in read_metadata(path, spec, chunksize=CSV_CHUNK_ROWS):
        columns = list(chunk.columns)
        ids.append(pa.array(_clean_text(chunk[spec.id_column]), pa.string()))
        patients.append(pa.array(_clean_text(chunk[spec.patient_column]), pa.string()))
        labels.append(pa.array([_label_key(v, spec) for v in _clean_text(chunk[spec.label_column])], pa.string()))
        for column in columns:
            values = chunk[column].dropna()
            present[column] = present.get(column, 0) + len(values)
            if len(values):
                numeric[column] = numeric.get(column, True) and looks_numerical(values)
    empty = {c for c in columns if present.get(c, 0) == 0}
    extras = {c for c, is_number in numeric.items() if is_number}
    return Keys(pa.concat_arrays(ids), pa.concat_arrays(patients), pa.concat_arrays(labels), columns, extras, empty)


def select_rows(keys: Keys, spec: SourceSpec, metadata_path: Path, faults: FaultLog
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """Keep rows with an id (first occurrence only), a patient and a known label; report the others.

    Returns the kept CSV rows (K,), their patient codes (K,) and label codes (K,), the patients' names
    (the codes index them) and the label names."""
    ids = keys.ids.to_numpy(zero_copy_only=False)
    patients = keys.patients.to_numpy(zero_copy_only=False)
    label_keys = keys.labels.to_numpy(zero_copy_only=False)
    names = list(spec.label_names) if spec.label_names else sorted({k for k in label_keys if k is not None})
    index = {name: i for i, name in enumerate(names)}
    codes = np.array([-1 if k is None else index.get(k, -2) for k in label_keys], dtype=np.int64)
    # The first row of each id: ids as dictionary codes (compact), then numpy's first occurrence per code.
    has_id = np.flatnonzero(keys.ids.is_valid().to_numpy(zero_copy_only=False))
    id_codes = pc.dictionary_encode(keys.ids).indices.take(pa.array(has_id)).to_numpy(zero_copy_only=False)
    _, first_index, inverse = np.unique(id_codes, return_index=True, return_inverse=True)
    first_row = np.full(len(ids), -1, dtype=np.int64)
    first_row[has_id] = has_id[first_index[inverse]]
    keep = np.zeros(len(ids), dtype=bool)
    for row in range(len(ids)):  # rows in file order, so faults are reported in file order
        image_id, line = ids[row], row + 2  # CSV line: the header is line 1
        if image_id is None:
            faults.report(f"line {line}", "no image id", f"{spec.id_column} is empty", str(metadata_path))
        elif first_row[row] != row:
            faults.report(image_id, "duplicate id", f"line {line} repeats line {first_row[row] + 2}", str(metadata_path))
        elif patients[row] is None:
            faults.report(image_id, "no patient_id", f"{spec.patient_column} is empty", str(metadata_path))
        elif codes[row] == -1:
            faults.report(image_id, "missing label", f"{spec.label_column} is empty", str(metadata_path))
        elif codes[row] == -2:
            faults.report(image_id, "unknown label", f"{spec.label_column}={label_keys[row]!r} is not one of {names}",
                          str(metadata_path))
        else:
            keep[row] = True
    kept = np.flatnonzero(keep)
    encoded = pc.dictionary_encode(keys.patients.take(pa.array(kept)))  # patients numbered by first appearance
    patient_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return kept, patient_codes, codes[kept], encoded.dictionary.to_pylist(), names


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


def split_rows(patient_codes: np.ndarray, labels: np.ndarray, patient_names: list[str], args: argparse.Namespace
               ) -> np.ndarray:
    """(K,) split index (into SPLITS) of each kept row (`split_patients`)."""
    table = pd.DataFrame({"patient_id": np.asarray(patient_names, dtype=object)[patient_codes], "label": labels})
    split = split_patients(table, args.validation_fraction, args.test_fraction, args.seed)
    return split.map({name: i for i, name in enumerate(SPLITS)}).to_numpy(dtype=np.int8)


def check_splits(split: np.ndarray, labels: np.ndarray, patient_codes: np.ndarray, label_names: list[str]) -> list[str]:
    """Loud warnings (also in summary.json) for a split without any patient, or without any positive."""
    warnings = []
    for index, name in enumerate(SPLITS):
        mine = split == index
        if not mine.any():
            warnings.append(f"split '{name}' has no patient (too few patients for --{name}-fraction?)")
        elif len(label_names) == 2 and not (labels[mine] == 1).any():
            warnings.append(f"split '{name}' has no '{label_names[1]}' lesion: its AUROC and pAUC are undefined")
    for warning in warnings:
        logger.warning("!!! %s", warning)
    return warnings


def write_buckets(metadata_path: Path, spec: SourceSpec, plan: ColumnPlan, kept: np.ndarray, split: np.ndarray,
                  patient_codes: np.ndarray, labels: np.ndarray, patient_names: list[str], ids: pa.Array,
                  faults: FaultLog, work: Path) -> dict[str, list[Path]]:
    """Pass 2 over the CSV: the kept rows' parsed metadata into one Arrow file per (split, bucket of patients)."""
    bucket_dir = work / "buckets"
    shutil.rmtree(bucket_dir, ignore_errors=True)
    bucket_dir.mkdir(parents=True)
    counts = np.bincount(split, minlength=len(SPLITS))
    num_buckets = [max(1, -(-int(c) // BUCKET_ROWS)) for c in counts]
    schema = pa.schema([("row", pa.int64()), ("image_id", pa.string()), ("patient_id", pa.string()), ("label", pa.int64())]
                       + [(c, pa.float64() if c in plan.numerical else pa.string()) for c in plan.metadata_columns])
    writers: dict[tuple[int, int], pa.ipc.RecordBatchStreamWriter] = {}
    files: dict[str, list[Path]] = {name: [] for name in SPLITS}
    position_of_row = np.full(len(ids), -1, dtype=np.int64)
    position_of_row[kept] = np.arange(len(kept))
    start = 0
    try:
        for chunk in read_metadata(metadata_path, spec, chunksize=CSV_CHUNK_ROWS):
            positions = position_of_row[start:start + len(chunk)]
            local = np.flatnonzero(positions >= 0)
            start += len(chunk)
            if not len(local):
                continue
            chunk, positions = chunk.iloc[local], positions[local]
            columns = {"row": kept[positions], "image_id": ids.take(pa.array(kept[positions])),
                       "patient_id": np.asarray(patient_names, dtype=object)[patient_codes[positions]], "label": labels[positions]}
            for column in plan.metadata_columns:
                values = chunk[column]
                if column in plan.numerical:
                    numbers, bad = to_float(values)
                    faults.unparsed_values(column, [str(i) for i in ids.take(pa.array(kept[positions[bad.to_numpy()]])).to_pylist()],
                                           values[bad].tolist(), str(metadata_path))
                    values = numbers.to_numpy()
                else:
                    values = _clean_text(values)
                columns[column] = values
            table = pa.Table.from_pydict(columns, schema=schema)
            row_split = split[positions]
            row_bucket = np.array([patient_codes[p] % num_buckets[s] for p, s in zip(positions, row_split)])
            for s in np.unique(row_split):
                for b in np.unique(row_bucket[row_split == s]):
                    key = (int(s), int(b))
                    if key not in writers:
                        path = bucket_dir / f"{SPLITS[s]}-{b:05d}.arrow"
                        files[SPLITS[s]].append(path)
                        writers[key] = pa.ipc.new_stream(str(path), schema)
                    writers[key].write_table(table.filter(pa.array((row_split == s) & (row_bucket == b))))
    finally:
        for writer in writers.values():
            writer.close()
    return {name: sorted(paths) for name, paths in files.items()}


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
        arrays.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class ShardWriter:
    """The Arrow shards of one split in the `save_to_disk` layout, each image written once: a new shard
    starts when the current one reaches `max_bytes`; `close` names them `data-0000i-of-0000n.arrow` and
    writes `state.json` and `dataset_info.json`."""

    def __init__(self, folder: Path, features: datasets.Features, max_bytes: int):
        self.folder, self.features, self.max_bytes = folder, features, max_bytes
        self.schema = features.arrow_schema
        self.shards: list[Path] = []
        self.writer, self.bytes, self.rows = None, 0, 0
        folder.mkdir(parents=True)

    def write(self, batch: pa.RecordBatch, size: int) -> None:
        if self.writer is None or self.bytes >= self.max_bytes:
            self._open()
        self.writer.write_batch(batch)
        self.bytes += size
        self.rows += batch.num_rows

    def _open(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.shards.append(self.folder / f"shard-{len(self.shards):05d}.arrow")
        self.writer, self.bytes = pa.ipc.new_stream(str(self.shards[-1]), self.schema), 0

    def close(self) -> int:
        if self.writer is None:  # an empty split: one shard holding the schema only, as save_to_disk writes
            self._open()
        self.writer.close()
        names = []
        for index, shard in enumerate(self.shards):
            name = f"data-{index:05d}-of-{len(self.shards):05d}.arrow"
            shard.rename(self.folder / name)
            names.append(name)
        digest = hashlib.sha256("".join(file_digest(self.folder / name) for name in names).encode()).hexdigest()[:16]
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": digest, "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2))
        (self.folder / "dataset_info.json").write_text(json.dumps(
            {"citation": "", "description": "", "features": self.features.to_dict(), "homepage": "", "license": ""}, indent=2))
        return self.rows


def build_split(name: str, buckets: list[Path], features: datasets.Features, image_paths: list[Path],
                args: argparse.Namespace, work: Path) -> list[dict]:
    """Writes `work/<name>` (a saved `datasets.Dataset`, patient-contiguous) from its bucket files and the
    image store; returns the rows excluded on the way. The `done` marker is written before the rename that
    publishes the split, so no interruption leaves a split folder without it."""
    faults = FaultLog(args.strict)
    partial = work / f"{name}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(work / name, ignore_errors=True)  # a split folder without its done marker is unfinished
    writer = ShardWriter(partial, features, parse_size(args.max_shard_size))
    schema = writer.schema
    with open_image_store(image_paths) as store, tqdm(desc=name, unit="img") as bar:
        for path in buckets:
            table = pa.ipc.open_stream(str(path)).read_all()
            table = table.sort_by([("patient_id", "ascending"), ("row", "ascending")])
            for start in range(0, table.num_rows, BATCH_ROWS):
                batch, batch_bytes = [], 0
                for record in table.slice(start, BATCH_ROWS).to_pylist():
                    bar.update()
                    record["image"] = read_image(store, record["image_id"], faults, args.image_check)
                    if record["image"] is not None:
                        batch.append(record)
                        batch_bytes += len(record["image"])
                    if batch_bytes >= BATCH_BYTES:
                        writer.write(record_batch(batch, schema), batch_bytes)
                        batch, batch_bytes = [], 0
                if batch:
                    writer.write(record_batch(batch, schema), batch_bytes)
    writer.close()
    (partial / "slimp_done.json").write_text(json.dumps({"excluded": faults.entries}))
    partial.rename(work / name)
    return faults.entries


def parse_size(text: str) -> int:
    """"500MB" -> bytes (B, KB, MB, GB; powers of 1000 as datasets' max_shard_size; or a plain number)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size must look like 500MB, got {text!r}")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def split_summary(labels: np.ndarray, patients: np.ndarray, image_ids: list, excluded: list[dict],
                  label_names: list[str]) -> dict:
    dropped = {entry["id"] for entry in excluded}
    keep = np.array([i not in dropped for i in image_ids], dtype=bool)
    counts = np.bincount(labels[keep], minlength=len(label_names))
    return {"patients": int(len(np.unique(patients[keep]))), "lesions": int(keep.sum()),
            "labels": {name: int(counts[i]) for i, name in enumerate(label_names)}}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_digest(paths: list) -> str:
    """sha256 over every image file's relative path and content (an HDF5 file: its content): an image fixed
    in place changes it, so a resumed run never reuses a split built from the old one."""
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest.update(str(path.relative_to(root) if path != root else path.name).encode())
            digest.update(file_digest(path).encode())
    return digest.hexdigest()


def run_fingerprint(args: argparse.Namespace) -> str:
    """Identifies inputs (by content) and options, so that a resumed run only reuses splits built from the same ones."""
    options = {key: getattr(args, key) for key in ("source", "validation_fraction", "test_fraction", "seed",
                                                   "image_check", "max_shard_size", "label", "patients",
                                                   "image_size") if hasattr(args, key)}
    if args.source != "synthetic":
        options |= {"metadata": file_digest(Path(args.metadata)) if Path(args.metadata).is_file() else None,
                    "images": images_digest([p for p in args.images if Path(p).exists()])}
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


def build_splits(buckets: dict[str, list[Path]], features: datasets.Features, image_paths: list[Path],
                 args: argparse.Namespace, work: Path) -> list[dict]:
    """Builds each split not already finished in `work`; returns the rows excluded while reading images."""
    excluded = []
    for name in SPLITS:
        done = work / name / "slimp_done.json"
        if done.is_file():
            logger.info("%s: already built in %s, skipped", name, work / name)
            excluded += json.loads(done.read_text())["excluded"]
        else:
            excluded += build_split(name, buckets[name], features, image_paths, args, work)
    return excluded


def finish(work: Path, schema: dict, summary: dict) -> None:
    """Writes the DatasetDict index, schema.json, summary.json and README.md; removes resume state."""
    (work / datasets.config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(SPLITS)}))
    (work / "schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "README.md").write_text(dataset_card(schema, summary))
    (work / "plan.json").unlink(missing_ok=True)
    for split in SPLITS:
        (work / split / "slimp_done.json").unlink(missing_ok=True)
    shutil.rmtree(work / "source", ignore_errors=True)
    shutil.rmtree(work / "buckets", ignore_errors=True)


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
        if not Path(args.metadata).is_file():
            raise InputError(f"metadata file not found: {args.metadata}")
        open_image_store(args.images)  # fails early, naming a missing file or folder
    open_work_dir(work, run_fingerprint(args), args.restart)
    try:
        metadata_path, image_paths = resolve_inputs(args, work)
        faults = FaultLog(args.strict)
        keys = read_keys(metadata_path, spec)
        plan = plan_columns(spec, keys.columns, keys.numeric_extras, keys.empty)
        kept, patient_codes, labels, patient_names, label_names = select_rows(keys, spec, metadata_path, faults)
        if not len(kept):
            raise DataError(f"{metadata_path}: no row has an id, a patient and a known label; nothing to convert "
                            f"({len(faults.entries)} rows excluded, see the warnings)")
        split = split_rows(patient_codes, labels, patient_names, args)
        warnings = check_splits(split, labels, patient_codes, label_names)
        buckets = write_buckets(metadata_path, spec, plan, kept, split, patient_codes, labels, patient_names, keys.ids,
                                faults, work)
        split_faults = build_splits(buckets, plan.features(label_names), image_paths, args, work)
    except BaseException:
        if not any(work.glob("*/slimp_done.json")) and not (work / "source" / "done").is_file():
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming from
        raise
    ids = keys.ids.take(pa.array(kept)).to_pylist()
    names = np.asarray(patient_names, dtype=object)[patient_codes]
    splits = {name: split_summary(labels[split == i], names[split == i], [ids[j] for j in np.flatnonzero(split == i)],
                                  split_faults, label_names) for i, name in enumerate(SPLITS)}
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
        "warnings": warnings,
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
