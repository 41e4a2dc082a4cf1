"""What each SLIMP data source looks like: its columns (a `SourceSpec` per source) and its image stores.

`training/prepare_data.py` turns any source into the layout of `docs/data_format.md`; this module holds
the per-source facts (which column is the image id, the patient, the label; which columns are
patient-level or lesion-level inputs; which leak the label) and the readers that do not depend on the
source: `read_metadata` (CSV -> normalised DataFrame) and the image stores (`Hdf5ImageStore` for the
Kaggle SLICE-3D `train-image.hdf5`, `FolderImageStore` for folders of image files).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image

from modeling_slimp import schema_slimp as contract

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
ISIC_LICENSE = "CC-BY-NC-4.0"


class InputError(ValueError):
    """An input that cannot be converted at all: a missing file or folder, a missing required column."""


class MissingImage(KeyError):
    """The image store holds no image for this id."""


class UnreadableImage(OSError):
    """The image store holds something for this id that is not image bytes (an HDF5 group, say)."""


class AmbiguousImage(UnreadableImage):
    """The id names two or more different image files."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """The columns of one source. Feature columns absent from a given CSV are skipped (and reported)."""

    name: str
    license: str
    description: str
    id_column: str
    patient_column: str
    label_column: str
    label_names: Optional[tuple[str, ...]] = None  # None: the sorted distinct values found in the data
    label_map: Optional[dict[str, str]] = None  # raw value -> label name; None: the raw value is the name
    patient_numerical: tuple[str, ...] = ()
    patient_categorical: tuple[str, ...] = ()
    lesion_numerical: tuple[str, ...] = ()
    lesion_categorical: tuple[str, ...] = ()
    domain_column: Optional[str] = None
    never_input: tuple[str, ...] = ()  # fnmatch patterns of label-leaking columns; dropped from the data

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return self.patient_numerical + self.patient_categorical + self.lesion_numerical + self.lesion_categorical

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.id_column, self.patient_column, self.label_column)

    def leaks(self, column: str) -> bool:
        """True for the label column and the never-input columns, in any case (`Target`, `IDDX_1`)."""
        return column.casefold() == self.label_column.casefold() or contract.leaks_label(column, self.never_input)


ISIC2024 = SourceSpec(  # the release schema itself: modeling_slimp/schema_slimp.py
    name="isic2024",
    license=ISIC_LICENSE,
    description="ISIC 2024 Challenge / SLICE-3D: 15x15 mm crops from 3D total-body photographs (Kaggle layout).",
    id_column=contract.ISIC2024_ID_COLUMN,
    patient_column=contract.PATIENT_COLUMN,
    label_column=contract.ISIC2024_LABEL_COLUMN,
    label_names=("benign", "malignant"),
    label_map={"0": "benign", "1": "malignant"},
    patient_numerical=contract.ISIC2024_PATIENT_NUMERICAL,
    patient_categorical=tuple(contract.ISIC2024_PATIENT_CATEGORICAL),
    lesion_numerical=contract.ISIC2024_LESION_NUMERICAL,
    lesion_categorical=tuple(contract.ISIC2024_LESION_CATEGORICAL),
    domain_column=contract.ISIC2024_DOMAIN_COLUMN,
    never_input=contract.ISIC2024_NEVER_INPUT,
)

ISIC_ARCHIVE = SourceSpec(
    name="isic-archive",
    license=ISIC_LICENSE,
    description="ISIC Archive images and metadata as written by `isic image download` (isic-cli).",
    id_column="isic_id",
    patient_column="patient_id",
    label_column="benign_malignant",
    label_names=("benign", "malignant"),
    label_map={"benign": "benign", "malignant": "malignant"},
    patient_numerical=("age_approx",),
    patient_categorical=("sex", "family_hx_mm", "personal_hx_mm", "fitzpatrick_skin_type"),
    lesion_numerical=("clin_size_long_diam_mm",),
    lesion_categorical=("anatom_site_general", "anatom_site_special", "dermoscopic_type", "image_type",
                        "tbp_tile_type"),
    domain_column="attribution",
    never_input=("benign_malignant", "diagnosis*", "iddx_*", "target", "mel_*", "melanocytic", "nevus_type",
                 "concomitant_biopsy", "lesion_id"),
)

HAM10000 = SourceSpec(
    name="ham10000",
    license="CC-BY-NC-4.0",
    description="HAM10000 dermatoscopic images (Tschandl et al. 2018); no patient id, lesion_id groups images.",
    id_column="image_id",
    patient_column="lesion_id",
    label_column="dx",
    label_names=("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"),
    patient_numerical=("age",),
    patient_categorical=("sex",),
    lesion_categorical=("localization",),
    never_input=("dx", "dx_type"),
)

PAD_UFES_20 = SourceSpec(
    name="pad-ufes-20",
    license="CC-BY-4.0",
    description="PAD-UFES-20 smartphone images of skin lesions with patient and lesion metadata (Pacheco et al. 2020).",
    id_column="img_id",
    patient_column="patient_id",
    label_column="diagnostic",
    label_names=("ACK", "BCC", "MEL", "NEV", "SCC", "SEK"),
    patient_numerical=("age", "fitspatrick"),
    patient_categorical=("smoke", "drink", "background_father", "background_mother", "pesticide", "gender",
                         "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system"),
    lesion_numerical=("diameter_1", "diameter_2"),
    lesion_categorical=("region", "itch", "grew", "hurt", "changed", "bleed", "elevation"),
    never_input=("diagnostic", "biopsed"),
)

SYNTHETIC = dataclasses.replace(
    ISIC2024,
    name="synthetic",
    license="CC-BY-4.0",
    description="Synthetic SLICE-3D lesions rendered by `training/data/synthetic.py` (ISIC 2024 columns), calibrated to the published facts about the real train set.",
)

SOURCES = {spec.name: spec for spec in (ISIC2024, ISIC_ARCHIVE, HAM10000, PAD_UFES_20, SYNTHETIC)}


def read_metadata(path: str | os.PathLike, spec: SourceSpec, chunksize: int | None = None):
    """Read a metadata CSV as strings, with the contract's missing values (`schema_slimp.MISSING_STRINGS`,
    any case) as NaN; in the id and patient columns only a blank cell is missing (`NA` is an id). Returns
    the DataFrame, or with `chunksize` an iterator of DataFrames of that many rows.

    A column name that appears more than once (`duplicate_columns`) is read once when its copies agree on
    every row, and is an InputError naming the first row where they differ otherwise. Raises InputError
    for a missing or unreadable file, a missing required column, or a file without rows.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"metadata file not found: {path}")
    try:
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, chunksize=chunksize or 10**12)
        first = next(reader, None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable CSV file ({error})") from error
    if first is None or len(first) == 0:
        columns = ", ".join(first.columns) if first is not None else "none"
        raise InputError(f"{path}: the CSV has no data rows (columns: {columns}); nothing to convert")
    copies = {name: [first.columns[i] for i in positions] for name, positions in duplicate_columns(path).items()}
    for column in spec.required_columns:
        if column not in first.columns:
            raise InputError(
                f"{path}: required column {column!r} is missing (columns found: {', '.join(first.columns)})"
            )
    ids = {spec.id_column, spec.patient_column}

    def chunks():
        line = 2  # the first data row's line (the header is line 1; a quoted newline shifts it, rarely)
        try:
            for chunk in [first] if chunksize is None else _chain(first, reader):
                chunk = _merge_copies(chunk, copies, path, line)
                line += len(chunk)
                yield _missing_as_nan(chunk, ids)
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a readable CSV file ({error})") from error

    return chunks() if chunksize else next(chunks())


def _chain(first: pd.DataFrame, reader):
    yield first
    yield from reader


def duplicate_columns(path: str | os.PathLike) -> dict[str, list[int]]:
    """{name: its 0-based positions} of every column name the CSV header holds more than once (pandas would
    silently rename the copies `name.1`, ...)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    positions: dict[str, list[int]] = {}
    for position, name in enumerate(header):
        positions.setdefault(name, []).append(position)
    return {name: found for name, found in positions.items() if len(found) > 1}


def _merge_copies(chunk: pd.DataFrame, copies: dict[str, list[str]], path: Path, line: int) -> pd.DataFrame:
    """Drops the copies of a repeated column (pandas named them `name.1`, ...) once checked equal to the first."""
    if not copies:
        return chunk
    for name, (kept, *others) in copies.items():
        first = chunk[kept].str.strip()
        for other in others:
            copy = chunk[other].str.strip()
            both_missing = first.str.lower().isin(contract.MISSING_STRINGS) & copy.str.lower().isin(contract.MISSING_STRINGS)
            differ = ((first != copy) & ~both_missing).to_numpy()
            if differ.any():
                row = int(differ.argmax())
                raise InputError(f"{path}: column {name!r} appears {len(others) + 1} times with different values (line "
                                 f"{line + row}: {chunk[kept].iloc[row]!r} vs {chunk[other].iloc[row]!r}); keep one of them")
    return chunk.drop(columns=[other for _, *others in copies.values() for other in others])


def _missing_as_nan(frame: pd.DataFrame, ids: set[str] = frozenset()) -> pd.DataFrame:
    """Strings that spell "missing" (the contract's rule, any case and surrounding space) -> NaN; in the `ids`
    columns only blank text."""
    def clean(column: pd.Series) -> pd.Series:
        text = column.str.strip()
        return column.where(text != "" if column.name in ids else ~text.str.lower().isin(contract.MISSING_STRINGS))

    return frame.apply(clean)


def to_float(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Strings -> (float64 values, mask of the present values that are not usable numbers, now NaN): text that
    does not parse, ±inf, and magnitudes beyond float32's (`schema_slimp.FLOAT32_MAX`: the model's precision)."""
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    numbers = numbers.where(np.isfinite(numbers) & (numbers.abs() <= contract.FLOAT32_MAX))
    return numbers, values.notna() & numbers.isna()


def looks_numerical(values: pd.Series) -> bool:
    present = values.dropna()
    return len(present) > 0 and bool(pd.to_numeric(present, errors="coerce").notna().all())


def check_image(data: bytes, mode: str = "decode") -> Optional[str]:
    """Returns None for a readable image, else why not. `decode` decodes (JPEG at 1/8 scale, which still
    reads every byte, so truncation is caught); `open` only parses the header; `none` checks nothing."""
    if mode == "none":
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if mode == "decode":
                image.draft("RGB", (1, 1))
                image.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        # PIL names the in-memory file by its address (<_io.BytesIO object at 0x...>): say "the image bytes",
        # so that summary.json is the same on every run.
        return f"{type(error).__name__}: " + re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(error))
    return None


class Hdf5ImageStore:
    """Kaggle SLICE-3D `train-image.hdf5`: one scalar dataset of encoded image bytes per `isic_id`.

    HDF5 keeps the metadata of every dataset it has opened in its caches; over the 401,059 datasets of
    SLICE-3D that would grow the converter's memory with the rows (about 130 MiB by 40,000), so the file is
    reopened every `REOPEN_EVERY` reads, which bounds it (about 20 MiB)."""

    REOPEN_EVERY = 5000

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"image file not found: {self.path}")
        self._file = None
        self._reads = 0

    def __enter__(self) -> "Hdf5ImageStore":
        import h5py

        self._h5py = h5py
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise InputError(f"{self.path}: not a readable HDF5 file ({error})") from error
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._file = None

    identical_copies: list[str] = []  # HDF5 names are unique

    def describe(self, image_id: str) -> str:
        return f"{self.path}[{image_id!r}]"

    def read(self, image_id: str) -> bytes:
        self._reads += 1
        if self._reads % self.REOPEN_EVERY == 0:
            import h5py

            self._file.close()
            self._file = h5py.File(self.path, "r")
        try:
            entry = self._file[image_id]
        except KeyError:
            raise MissingImage(f"image missing from {self.path.name}") from None
        except (ValueError, TypeError) as error:  # a name h5py cannot look up
            raise UnreadableImage(f"{self.path.name} cannot look up {image_id!r} ({error})") from None
        if not isinstance(entry, self._h5py.Dataset):
            raise UnreadableImage(f"{self.path.name}[{image_id!r}] is an HDF5 {type(entry).__name__.lower()}, not a "
                                  "dataset of image bytes")
        try:
            value = entry[()]  # bytes / numpy.bytes_ (Kaggle), numpy.void or a uint8 array
            return bytes(value) if isinstance(value, (bytes, np.bytes_)) else value.tobytes()
        except (TypeError, ValueError, AttributeError) as error:
            raise UnreadableImage(f"{self.path.name}[{image_id!r}] holds {entry.dtype} data of shape {entry.shape}, "
                                  f"not image bytes ({type(error).__name__})") from None


class FolderImageStore:
    """Image files in one or more folders (searched recursively), found by file name or by name without suffix.

    An id that names two or more files (the same name in two folders, or `x.jpg` beside `x.png`) is read
    only when the files hold the same bytes; otherwise it is an `UnreadableImage` naming them (a row the
    converter excludes as "duplicate image"), never the first file in directory order."""

    def __init__(self, folders: list[str | os.PathLike]):
        self.folders = [Path(folder) for folder in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise InputError(f"image folder not found: {folder}")
        self._index: dict[str, list[Path]] = {}
        self.identical_copies: list[str] = []  # ids named by several files of the same bytes (read once)

    def __enter__(self) -> "FolderImageStore":
        found = 0
        for folder in self.folders:
            for root, _, files in os.walk(folder):
                for name in sorted(files):
                    if name.endswith(IMAGE_SUFFIXES):
                        found += 1
                        path = Path(root, name)
                        for key in {name, path.stem}:
                            self._index.setdefault(key, []).append(path)
        logger.info("found %d image files in %s", found, ", ".join(map(str, self.folders)))
        return self

    def __exit__(self, *exc) -> None:
        self._index = {}

    def describe(self, image_id: str) -> str:
        paths = self._index.get(image_id) or [self.folders[0] / image_id]
        return " and ".join(map(str, paths))

    def read(self, image_id: str) -> bytes:
        paths = self._index.get(image_id)
        if not paths:
            raise MissingImage(f"no file named {image_id}[.jpg|.png] in {', '.join(map(str, self.folders))}")
        data = paths[0].read_bytes()
        unique = {path.resolve() for path in paths}  # the same file reached through two given folders is one
        if len(unique) > 1:
            if any(path.read_bytes() != data for path in paths[1:]):
                raise AmbiguousImage(f"{len(unique)} different files are named {image_id}: "
                                     f"{', '.join(str(path) for path in paths)}; keep one")
            self.identical_copies.append(image_id)
        return data


HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf")


def open_image_store(paths: list[str | os.PathLike]) -> Hdf5ImageStore | FolderImageStore:
    """An HDF5 file (one path that is a file, or that is named like one) or folders of image files."""
    if len(paths) == 1 and (Path(paths[0]).is_file() or Path(paths[0]).suffix.lower() in HDF5_SUFFIXES):
        return Hdf5ImageStore(paths[0])
    return FolderImageStore(paths)
