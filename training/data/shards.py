"""Pass 2 of the converter (`training/data/convert.py`): the kept rows' metadata into per-(split, bucket)
Arrow files, then each split's images, read once and written once into the `save_to_disk` layout.

Split by split, bucket by bucket (rows sorted by patient, so a split is patient-contiguous), each image is
read from the store, checked, and written as its original bytes into the split's Arrow shards, a bounded
record batch at a time. A finished split holds `slimp_done.json` (written before the folder is renamed
into place) with the rows excluded on the way and the fingerprint of the run that built it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ..safety import file_sha256
from .rows import CSV_CHUNK_ROWS, SPLITS, ColumnPlan, FaultLog, clean_text
from .sources import (AmbiguousImage, MissingImage, SourceSpec, UnreadableImage, check_image, open_image_store,
                      read_metadata, to_float)

logger = logging.getLogger(__name__)

BATCH_ROWS = 1000  # rows per Arrow record batch of a split (also metadata rows turned into dicts at once)
BATCH_BYTES = 64 << 20  # ... or fewer, once their images reach 64 MiB
BUCKET_ROWS = 5_000  # about this many rows per (split, bucket) file: what is held in memory when a split is written
DONE = "slimp_done.json"  # a finished split's marker


def write_buckets(metadata_path: Path, spec: SourceSpec, plan: ColumnPlan, kept: np.ndarray, split: np.ndarray,
                  patient_codes: np.ndarray, labels: np.ndarray, patient_names: list[str], ids: pa.Array,
                  faults: FaultLog, work: Path, spellings: dict[str, dict[str, str]]) -> dict[str, list[Path]]:
    """Pass 2 over the CSV: the kept rows' parsed metadata into one Arrow file per (split, bucket of patients);
    numbers that are not usable are counted, category spellings unified (`spellings`)."""
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
                    values = clean_text(values)
                    if spellings.get(column):  # one spelling per category (`rows.canonical_spellings`)
                        values = [spellings[column].get(value, value) for value in values]
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
    except AmbiguousImage as error:
        faults.report(image_id, "duplicate image", str(error), store.describe(image_id))
        return None
    except UnreadableImage as error:  # an HDF5 group, data that is not bytes
        faults.report(image_id, "corrupt image", str(error), store.describe(image_id))
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
        digest = hashlib.sha256("".join(file_sha256(self.folder / name) for name in names).encode()).hexdigest()[:16]
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": digest, "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2))
        (self.folder / "dataset_info.json").write_text(json.dumps(
            {"citation": "", "description": "", "features": self.features.to_dict(), "homepage": "", "license": ""}, indent=2))
        return self.rows


def build_split(name: str, buckets: list[Path], features: datasets.Features, image_paths: list[Path], work: Path,
                fingerprint: str, strict: bool = False, image_check: str = "decode", max_shard_size: str = "500MB") -> list[dict]:
    """Writes `work/<name>` (a saved `datasets.Dataset`, patient-contiguous) from its bucket files and the
    image store; returns the rows excluded on the way. The `done` marker (with the run's `fingerprint`) is
    written before the rename that publishes the split, so no interruption leaves a split folder without it.
    `strict`, `image_check` and `max_shard_size` are the converter's options of those names."""
    faults = FaultLog(strict)
    partial = work / f"{name}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(work / name, ignore_errors=True)  # a split folder without its done marker is unfinished
    writer = ShardWriter(partial, features, parse_size(max_shard_size))
    schema = writer.schema
    with open_image_store(image_paths) as store, tqdm(desc=name, unit="img") as bar:
        for path in buckets:
            table = pa.ipc.open_stream(str(path)).read_all()
            table = table.sort_by([("patient_id", "ascending"), ("row", "ascending")])
            for start in range(0, table.num_rows, BATCH_ROWS):
                batch, batch_bytes = [], 0
                for record in table.slice(start, BATCH_ROWS).to_pylist():
                    bar.update()
                    record["image"] = read_image(store, record["image_id"], faults, image_check)
                    if record["image"] is not None:
                        batch.append(record)
                        batch_bytes += len(record["image"])
                    if batch_bytes >= BATCH_BYTES:
                        writer.write(record_batch(batch, schema), batch_bytes)
                        batch, batch_bytes = [], 0
                if batch:
                    writer.write(record_batch(batch, schema), batch_bytes)
        if store.identical_copies:
            logger.warning("%s: %d image id(s) name several files with the same bytes (read once), e.g. %s", name,
                           len(store.identical_copies), store.identical_copies[0])
    writer.close()
    (partial / DONE).write_text(json.dumps({"excluded": faults.entries, "fingerprint": fingerprint}))
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


def split_counts(folder: Path, label_names: list[str]) -> dict:
    """Patients, lesions and lesions per label of a written split, counted from its data (so summary.json
    describes exactly the rows the folder holds)."""
    table = datasets.Dataset.load_from_disk(str(folder)).select_columns(["patient_id", "label"]).with_format("arrow")[:]
    counts = np.bincount(table.column("label").to_numpy(zero_copy_only=False).astype(np.int64), minlength=len(label_names))
    return {"patients": len(table.column("patient_id").unique()), "lesions": table.num_rows,
            "labels": {name: int(counts[i]) for i, name in enumerate(label_names)}}


def images_digest(paths: list) -> str:
    """sha256 over every image file's relative path and content (an HDF5 file: its content): an image fixed
    in place changes it, so a resumed run never reuses a split built from the old one."""
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest.update(str(path.relative_to(root) if path != root else path.name).encode())
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def build_splits(buckets: dict[str, list[Path]], features: datasets.Features, image_paths: list[Path], work: Path,
                 fingerprint: str, strict: bool = False, image_check: str = "decode", max_shard_size: str = "500MB") -> list[dict]:
    """Builds each split not already finished in `work` by a run of the same `fingerprint` (inputs and
    options); returns the rows excluded while reading images. `strict`, `image_check`, `max_shard_size`: `build_split`'s."""
    excluded = []
    for name in SPLITS:
        done = work / name / DONE
        marker = json.loads(done.read_text()) if done.is_file() else {}
        if marker.get("fingerprint") == fingerprint:
            logger.info("%s: already built in %s, skipped", name, work / name)
            excluded += marker["excluded"]
        else:
            excluded += build_split(name, buckets[name], features, image_paths, work, fingerprint, strict, image_check,
                                    max_shard_size)
    return excluded
