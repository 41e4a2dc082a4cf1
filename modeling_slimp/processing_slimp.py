"""SLIMPProcessor: images + raw metadata rows -> the model's batch; schema fitting; the data collator.

Rows use the dataset's own column names and category strings (ISIC: `age_approx`, `sex`,
`anatom_site_general`, `tbp_lv_*`, ...) and carry `patient_id`. Lesions are grouped by patient: the
batch gets one row of patient metadata per distinct patient (in order of first appearance), taken from
the first present value among that patient's rows, and `patient_index` maps each lesion to it.

The schema (feature names, category vocabularies, normalisation statistics) lives in the model config
(`SLIMPConfig.lesion_metadata_config` / `patient_metadata_config`, i.e. `config.json`); the processor
reads that same object, and `processor_config.json` holds only the processor's class and the image
processor's settings. Image preprocessing is a built-in transformers image processor
(`preprocessor_config.json`), so `pipeline(...)` and the Hub widget need no custom code for it.

Metadata is encoded column by column (numbers as one tensor, categories through a lookup of each distinct
value), never value by value; missing values and category spellings follow `schema_slimp`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import AutoImageProcessor, BatchFeature, ProcessorMixin, ViTImageProcessorPil

from .configuration_slimp import SLIMPConfig, SLIMPMetadataConfig
from .schema_slimp import PATIENT_COLUMN, as_category, factorize, is_missing, near_equal_chunks, parse_number, rows_by_patient

logger = logging.getLogger(__name__)


# ----- images -----
def to_rgb(image):
    """Any PIL image (L, LA, P, RGBA, I;16, F, ...) -> 8-bit RGB; 16-bit and float images are stretched to 0-255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        extrema = image.getextrema()
        low, high = float(extrema[0]), float(extrema[1])
        scale = 255.0 / (high - low) if high > low else 1.0
        image = image.point(lambda v: (v - low) * scale).convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(value: Any):
    """One image of any accepted kind -> RGB PIL image: a PIL image, a `datasets` image dict (`bytes`/`path`),
    encoded bytes, a file path, or an (H, W[, C]) / (C, H, W) numpy array or torch tensor (uint8, or float in [0, 1])."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif torch.is_tensor(value) or hasattr(value, "__array_interface__"):
        from transformers.image_transforms import to_pil_image

        array = value.detach().cpu() if torch.is_tensor(value) else value
        image = to_pil_image(array.numpy() if torch.is_tensor(array) else array)
    else:
        raise TypeError(f"cannot read an image from a {type(value).__name__}; give PIL images, numpy arrays, torch "
                        "tensors, encoded bytes, file paths or `datasets` image dicts")
    image.load()  # PIL decodes lazily: fail here, where the caller can name the image
    return to_rgb(image)


def _image_list(images: Any) -> list:
    """A single image, a batch tensor (N, C, H, W), or any iterable of images (list, `datasets` column) -> list."""
    if isinstance(images, (str, bytes, bytearray, os.PathLike, Mapping)) or hasattr(images, "getbands"):  # PIL
        return [images]
    if torch.is_tensor(images) or hasattr(images, "__array_interface__"):
        return list(images) if len(images.shape) == 4 else [images]
    return list(images)


# ----- metadata columns -----
def _columns(metadata: Any, needed: Iterable[str] | None = None) -> dict[str, Any]:
    """Rows as columns: a pandas DataFrame, a pyarrow Table, a dict of lists (a `datasets` batch) or a list of
    dicts. For a DataFrame or Table only the `needed` columns (default all) are taken."""
    if hasattr(metadata, "columns") and hasattr(metadata, "iloc"):  # pandas.DataFrame: keep its column arrays
        names = [name for name in metadata.columns if needed is None or str(name) in needed]
        return {str(name): metadata[name].to_numpy() for name in names}
    if hasattr(metadata, "column_names") and hasattr(metadata, "column"):  # a pyarrow Table: columns stay Arrow
        names = metadata.column_names if needed is None else [name for name in metadata.column_names if name in needed]
        return {str(name): metadata.column(name) for name in names}
    if isinstance(metadata, Mapping):
        return {str(key): value for key, value in metadata.items()}
    rows = list(metadata)
    if not rows:
        return {}
    first = rows[0].keys()
    if all(row.keys() == first for row in rows):  # the usual case: every row has the same columns
        return {key: [row[key] for row in rows] for key in first}
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def _num_rows(columns: Mapping[str, Any]) -> int:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"metadata columns differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def _numbers(values: Sequence) -> tuple[torch.Tensor, list]:
    """A column -> ((N,) float32 tensor, NaN = missing or unparseable; the unparseable raw values)."""
    numbers, invalid = _number_array(values)
    with np.errstate(invalid="ignore"):
        numbers[~np.isfinite(numbers)] = np.nan
    return torch.from_numpy(numbers.astype(np.float32)), invalid


def _number_array(values: Sequence) -> tuple[np.ndarray, list]:
    """A column -> ((N,) float64 array, non-finite = missing; the unparseable raw values).

    A column of numbers (a numeric array, or numbers and None) is converted in one C-level call; text is
    parsed value by value with the contract's rules (`parse_number`)."""
    if _is_arrow(values):
        array = values.to_numpy(zero_copy_only=False)  # numbers: C-level, nulls as NaN; text: objects
        values = array if array.dtype.kind in "biuf" else array.astype(object)
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        return values.astype(np.float64), []
    listed = _as_list(values)
    if _all_numbers(listed):
        return np.array([math.nan if value is None else value for value in listed], dtype=np.float64), []
    parsed, invalid = [], []
    for value in listed:
        number, ok = parse_number(value)
        parsed.append(number)
        if not ok:
            invalid.append(value)
    return np.asarray(parsed, dtype=np.float64), invalid


def _all_numbers(values) -> bool:
    """True when every value is a number (bool, int, float, numpy scalar) or None."""
    return all(value is None or isinstance(value, (int, float, np.number, np.bool_)) for value in values)


def _category_codes(values: Sequence, vocabulary: Sequence[str], cache: dict) -> torch.Tensor:
    """A column -> (N,) long codes: the category's id (1 ..) when it is in `vocabulary`, -1 when the value is
    missing, and -2 - k for the k-th unknown category (`cache["unknown"][k]` names it).

    Each distinct raw value is cleaned once (`as_category`) and remembered in `cache` for later calls;
    rows are then dictionary lookups (for a large Arrow column, an index into Arrow's distinct values)."""
    codes = cache.setdefault("codes", {})
    if _large_arrow(values):  # Arrow finds the distinct values; only those are cleaned and looked up
        indices, distinct_values = _arrow_dictionary(values)
        lookup = np.asarray([_code(value, vocabulary, cache) for value in distinct_values] + [-1], dtype=np.int64)
        return torch.from_numpy(lookup[indices])
    values = _as_list(values)
    try:
        distinct = set(values)
    except TypeError:  # an unhashable value (a list, a dict): compare its text
        values = [_hashable(value) for value in values]
        distinct = set(values)
    if len(codes) + len(distinct) > _CATEGORY_CACHE_SIZE:  # free text: do not grow without bound
        codes.clear()
    for value in distinct.difference(codes):
        _code(value, vocabulary, cache)
    return torch.from_numpy(np.fromiter(map(codes.__getitem__, values), dtype=np.int64, count=len(values)))


_CATEGORY_CACHE_SIZE = 50_000  # distinct raw values remembered per categorical feature


def _code(value: Any, vocabulary: Sequence[str], cache: dict) -> int:
    """The cached code of one distinct raw value (see `_category_codes`), cleaning it on first sight."""
    codes, unknown = cache.setdefault("codes", {}), cache.setdefault("unknown", [])
    if value not in codes:
        category = as_category(value)
        if category is None:
            codes[value] = -1
        elif category in vocabulary:
            codes[value] = vocabulary.index(category) + 1
        else:
            if category not in unknown:
                unknown.append(category)
            codes[value] = -2 - unknown.index(category)
    return codes[value]


def _is_arrow(values: Any) -> bool:
    """A pyarrow Array or ChunkedArray (recognised by its methods: pyarrow is not imported here)."""
    return hasattr(values, "dictionary_encode") and hasattr(values, "to_pylist")


# Below this many rows, Python sets and dicts over `to_pylist()` beat Arrow's per-call dispatch cost.
_ARROW_DICTIONARY_ROWS = 2048


def _large_arrow(values: Any) -> bool:
    return _is_arrow(values) and len(values) >= _ARROW_DICTIONARY_ROWS


def _as_list(values: Any) -> list:
    if _is_arrow(values):
        return values.to_pylist()
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _arrow_dictionary(values: Any) -> tuple[np.ndarray, list]:
    """An Arrow column -> ((N,) int64 index of each row's value among the distinct values, -1 for null; the
    distinct values in order of first appearance), computed by Arrow in C (`dictionary_encode`)."""
    array = values.combine_chunks() if hasattr(values, "combine_chunks") else values
    encoded = array.dictionary_encode()
    indices = encoded.indices.to_numpy(zero_copy_only=False)  # nulls (if any) come back as NaN
    if encoded.indices.null_count:
        indices = np.where(np.isnan(indices), -1, indices)
    return indices.astype(np.int64), encoded.dictionary.to_pylist()


def _hashable(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _first_present(present: torch.Tensor, patient_index: torch.Tensor, num_patients: int) -> torch.Tensor:
    """`present` (N,) or (N, F) bool -> (P,) or (P, F): the row of each patient's first present value, or -1
    when the patient has none."""
    rows = present.shape[0]
    order = torch.arange(rows).view(-1, *([1] * (present.dim() - 1))).expand_as(present)
    key = torch.where(present, order, torch.full_like(order, rows))
    index = patient_index.view(-1, *([1] * (present.dim() - 1))).expand_as(present)
    first = torch.full((num_patients, *present.shape[1:]), rows).scatter_reduce(0, index, key, "amin")
    return torch.where(first < rows, first, torch.full_like(first, -1))


class _NoTokenizer:
    """What `SLIMPProcessor.tokenizer` returns: SLIMP reads no text. `transformers.Trainer` aligns the special
    tokens of any ProcessorMixin's tokenizer with the model (`align_special_tokens`); every token id is None here,
    so it changes nothing."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class SLIMPProcessor(ProcessorMixin):
    """Turns images and raw metadata rows into `SLIMPModel` inputs (a transformers `ProcessorMixin`).

    Args:
        image_processor: a built-in transformers image processor (default: ViT-style resize + normalise
            at the vision config's `image_size`).
        config: the `SLIMPConfig` whose metadata schema to apply.

    `processor(images=[...], metadata=rows, return_tensors="pt")` returns a `BatchFeature` with
    `pixel_values` (N, 3, H, W), `lesion_numerical_values` (N, Fn) float (NaN = missing),
    `lesion_categorical_ids` (N, Fc) long (0 = missing/unknown), `patient_numerical_values` (P, Gn),
    `patient_categorical_ids` (P, Gc) and `patient_index` (N,). Images may be PIL images, numpy arrays,
    torch tensors, encoded bytes, paths, or a list / `datasets` column of those; rows a pandas DataFrame,
    a dict of columns or a list of dicts. `metadata=None` gives `pixel_values` only.

    Unknown categories map to 0 and are counted in `unknown_categories` (a Counter of (feature, value));
    present values that are not numbers become NaN and are counted in `invalid_numbers`.
    `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` returns this class.
    """

    def __init__(self, image_processor=None, config: SLIMPConfig | None = None, **kwargs):
        config = config if config is not None else SLIMPConfig()
        if image_processor is None:
            size = getattr(config.vision_config, "image_size", 224)
            image_processor = ViTImageProcessorPil(size={"height": size, "width": size})
        super().__init__(image_processor=image_processor, **kwargs)
        self.config = config
        self.unknown_categories: Counter = Counter()
        self.invalid_numbers: Counter = Counter()
        self._category_cache: dict[tuple, dict] = {}  # (feature, vocabulary) -> `_category_codes` cache: codes, unknown
        self._warned_absent: set[str] = set()

    @property
    def tokenizer(self) -> _NoTokenizer:
        return _NoTokenizer()

    # ----- persistence -----
    def to_dict(self) -> dict[str, Any]:
        """The processor's settings; the schema is not repeated here (it is the model's `config.json`)."""
        output = super().to_dict()
        for key in ("config", "unknown_categories", "invalid_numbers", "_warned_absent"):
            output.pop(key, None)
        if isinstance(output.get("image_processor"), dict):  # a built-in image processor: no custom-code auto_map
            output["image_processor"].pop("auto_map", None)
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Write `processor_config.json` (with the `auto_map` of AutoProcessor), `preprocessor_config.json`
        (the built-in image processor), the code files, and `config.json` (the schema) unless a model put
        one there. An existing `config.json` must hold the same metadata schema: a mismatch raises instead
        of leaving a processor and a model that disagree."""
        os.makedirs(save_directory, exist_ok=True)
        config_file = os.path.join(save_directory, "config.json")
        if os.path.exists(config_file):
            saved = SLIMPConfig.from_pretrained(save_directory)
            for key in ("lesion_metadata_config", "patient_metadata_config"):
                if _schema(getattr(saved, key)) != _schema(getattr(self.config, key)):
                    raise ValueError(
                        f"{config_file} holds a different {key} schema than this processor; save the processor next to "
                        "the model it was built for, or into an empty folder."
                    )
        files = super().save_pretrained(save_directory, **kwargs)
        # ProcessorMixin marks every sub-processor with the AutoProcessor auto_map; the image processor is a
        # built-in one and its preprocessor_config.json must stay loadable without custom code.
        self.image_processor.__dict__.pop("auto_map", None)
        self.image_processor.save_pretrained(save_directory)
        # The code travels with the folder, as the model's does, for users without this package.
        here = os.path.dirname(os.path.abspath(__file__))
        for name in ("processing_slimp.py", "configuration_slimp.py", "schema_slimp.py"):
            shutil.copyfile(os.path.join(here, name), os.path.join(save_directory, name))
        if not os.path.exists(config_file):
            self.config.save_pretrained(save_directory)
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "SLIMPProcessor":
        """The image processor of `preprocessor_config.json` and the schema of `config.json`."""
        hub = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if key in kwargs}
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub)
        config = SLIMPConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        return cls(image_processor=image_processor, config=config)

    # ----- encoding -----
    def __call__(self, images=None, metadata=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        data: dict[str, Any] = {}
        count = None
        if images is not None:
            images = _image_list(images)
            count = len(images)
            data["pixel_values"] = self.preprocess_images(images)
        if metadata is not None:
            encoded = self.encode_metadata(metadata)
            rows = encoded["lesion_numerical_values"].shape[0]
            if count is not None and rows != count:
                raise ValueError(f"Got {count} images but {rows} metadata rows; give one row per image.")
            data.update(encoded)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess_images(self, images: Iterable) -> torch.Tensor:
        """Images of any accepted kind, mode and size -> (N, 3, H, W) float, resized and normalised."""
        rgb = []
        for position, image in enumerate(_image_list(images)):
            try:
                rgb.append(load_image(image))
            except (OSError, ValueError, SyntaxError) as error:
                raise ValueError(f"image {position}: cannot be read ({error})") from error
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @property
    def image_mean(self) -> list[float]:
        return list(self.image_processor.image_mean) if self.image_processor.do_normalize else [0.0, 0.0, 0.0]

    @property
    def image_std(self) -> list[float]:
        return list(self.image_processor.image_std) if self.image_processor.do_normalize else [1.0, 1.0, 1.0]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 (or float in [0, 255]) images, already at the model's size -> the model's
        `pixel_values`: the image processor's rescale and normalisation, as one tensor operation (on any device)."""
        scale = float(self.image_processor.rescale_factor) if self.image_processor.do_rescale else 1.0
        mean = torch.tensor(self.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() * scale - mean) / std

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the image processor resizes to."""
        size = self.image_processor.size
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        if height and width:
            return int(height), int(width)
        edge = getattr(size, "shortest_edge", None) or getattr(self.config.vision_config, "image_size", 224)
        return int(edge), int(edge)

    def encode_metadata(self, metadata) -> dict[str, torch.Tensor]:
        """Raw rows (DataFrame, pyarrow Table, dict of columns, list of dicts) -> the metadata tensors and
        `patient_index`: `encode_rows`, then `group_patients`."""
        columns = self._schema_columns(metadata)
        num_rows = _num_rows(columns) if columns else _num_rows(_columns(metadata))
        self.check_columns(columns)
        patient_index, num_patients = self._patient_index(columns, num_rows)
        return self.group_patients(self._encode_rows(columns, num_rows), patient_index, num_patients)

    def encode_rows(self, metadata) -> dict[str, torch.Tensor]:
        """Raw rows -> one row of codes per lesion, before lesions are grouped by patient: `lesion_numerical_values`
        (N, Fn) and `patient_numerical_values` (N, Gn) float (NaN = missing; the patient-level columns as
        each row has them), `lesion_categorical_codes` (N, Fc) and `patient_categorical_codes` (N, Gc) long
        (id >= 1 in the vocabulary, -1 missing, <= -2 an unknown category). A table of any size can be
        encoded once and its rows gathered per batch (`group_patients`): the encoding of a row depends only
        on that row. Unparseable numbers are counted in `invalid_numbers` here."""
        columns = self._schema_columns(metadata)
        num_rows = _num_rows(columns) if columns else _num_rows(_columns(metadata))
        self.check_columns(columns)
        return self._encode_rows(columns, num_rows)

    def group_patients(self, rows: Mapping[str, torch.Tensor], patient_index: torch.Tensor,
                       num_patients: int) -> dict[str, torch.Tensor]:
        """`encode_rows` output (any subset of rows, e.g. a gathered batch) + each row's patient (N,) ->
        the model's metadata inputs: lesion ids (0 = missing or unknown), and one patient-level row per
        patient, its first present value among its rows. Unknown categories that are read are counted in
        `unknown_categories` (patient level: only the chosen rows)."""
        lesion, patient = self.config.lesion_metadata_config, self.config.patient_metadata_config
        lesion_codes = rows["lesion_categorical_codes"]
        self._count_unknown(lesion, lesion_codes)
        numbers, codes = rows["patient_numerical_values"], rows["patient_categorical_codes"]
        if numbers.shape[1]:
            first = _first_present(~torch.isnan(numbers), patient_index, num_patients)
            numbers = torch.where(first >= 0, numbers.gather(0, first.clamp(min=0)), torch.nan)
        else:
            numbers = numbers.new_empty((num_patients, 0))
        if codes.shape[1]:
            first = _first_present(codes != -1, patient_index, num_patients)
            codes = torch.where(first >= 0, codes.gather(0, first.clamp(min=0)), -1)
        else:
            codes = codes.new_empty((num_patients, 0))
        self._count_unknown(patient, codes)
        return {
            "lesion_numerical_values": rows["lesion_numerical_values"],
            "lesion_categorical_ids": lesion_codes.clamp(min=0),
            "patient_numerical_values": numbers,
            "patient_categorical_ids": codes.clamp(min=0),
            "patient_index": patient_index,
        }

    def _schema_columns(self, metadata) -> dict[str, Any]:
        lesion, patient = self.config.lesion_metadata_config, self.config.patient_metadata_config
        return _columns(metadata, {PATIENT_COLUMN, *lesion.feature_names, *patient.feature_names})

    def _encode_rows(self, columns: dict[str, Any], num_rows: int) -> dict[str, torch.Tensor]:
        lesion, patient = self.config.lesion_metadata_config, self.config.patient_metadata_config
        lesion_numbers, lesion_codes = self._encode(lesion, columns, num_rows)
        patient_numbers, patient_codes = self._encode(patient, columns, num_rows)
        return {"lesion_numerical_values": lesion_numbers, "lesion_categorical_codes": lesion_codes,
                "patient_numerical_values": patient_numbers, "patient_categorical_codes": patient_codes}

    def _count_unknown(self, config: SLIMPMetadataConfig, codes: torch.Tensor) -> None:
        if not codes.numel() or not bool((codes <= -2).any()):
            return
        for j, (feature, vocabulary) in enumerate(config.categorical_features.items()):
            names = self._category_cache.get((feature, tuple(vocabulary)), {}).get("unknown", [])
            for code, count in zip(*torch.unique(codes[:, j][codes[:, j] <= -2], return_counts=True)):
                self.unknown_categories[(feature, names[-2 - int(code)])] += int(count)

    def check_columns(self, column_names: Iterable[str]) -> list[str]:
        """The schema columns absent from `column_names` (a table's columns): each is read as missing, and
        `patient_id` missing makes every lesion its own patient. Warns once per column for this processor
        and the copies made of it afterwards, so a training script calls it on the dataset's columns
        before its DataLoader workers copy the processor (each epoch), instead of every worker warning."""
        column_names = set(column_names)
        lesion, patient = self.config.lesion_metadata_config, self.config.patient_metadata_config
        absent = [f for f in lesion.feature_names + patient.feature_names if f not in column_names]
        new = [f for f in absent if f not in self._warned_absent]
        if new:
            self._warned_absent.update(new)
            logger.warning("metadata has no column(s) %s: treated as missing.", ", ".join(new))
        if PATIENT_COLUMN not in column_names:
            absent.append(PATIENT_COLUMN)
            if PATIENT_COLUMN not in self._warned_absent:
                self._warned_absent.add(PATIENT_COLUMN)
                logger.warning("metadata has no column '%s': every lesion is treated as its own patient.", PATIENT_COLUMN)
        return absent

    def _patient_index(self, columns: dict[str, Any], num_rows: int) -> tuple[torch.Tensor, int]:
        if PATIENT_COLUMN not in columns:
            return torch.arange(num_rows), num_rows
        keys = columns[PATIENT_COLUMN]
        if _large_arrow(keys):  # Arrow numbers the distinct ids in order of first appearance, as `factorize`
            indices, distinct = _arrow_dictionary(keys)
            bad = {code for code, key in enumerate(distinct) if is_missing(key)} | ({-1} if (indices < 0).any() else set())
            if bad:
                row = int(np.flatnonzero(np.isin(indices, list(bad)))[0])
                raise ValueError(f"metadata row {row}: '{PATIENT_COLUMN}' is missing; every lesion needs its patient.")
            return torch.from_numpy(indices), len(distinct)
        keys = _as_list(keys)
        try:
            distinct = set(keys)
        except TypeError:
            keys = [_hashable(key) for key in keys]
            distinct = set(keys)
        missing = {key for key in distinct if is_missing(key)}  # each distinct key checked once
        if missing:
            row = next(row for row, key in enumerate(keys) if key in missing)
            raise ValueError(f"metadata row {row}: '{PATIENT_COLUMN}' is missing; every lesion needs its patient.")
        if not all(type(key) is str for key in distinct):
            keys = [str(key) for key in keys]
        codes, patients = factorize(keys)
        return torch.from_numpy(np.asarray(codes, dtype=np.int64)), len(patients)

    def _encode(self, config: SLIMPMetadataConfig, columns: dict[str, Any], num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, F_num) numbers and (N, F_cat) category codes of one tower's columns, one row per lesion. The
        numbers are one block: a conversion per column, then one missing-value mask."""
        numerical_features = config.numerical_features
        block = np.full((num_rows, len(numerical_features)), np.nan)
        for j, feature in enumerate(numerical_features):
            if feature in columns:
                block[:, j], invalid = _number_array(columns[feature])
                if invalid:
                    self.invalid_numbers.update((feature, str(value)) for value in invalid)
        with np.errstate(invalid="ignore"):
            block[~np.isfinite(block)] = np.nan
        categorical_features = config.categorical_features
        codes = torch.full((num_rows, len(categorical_features)), -1, dtype=torch.long)
        for j, (feature, vocabulary) in enumerate(categorical_features.items()):
            if feature in columns:
                cache = self._category_cache.setdefault((feature, tuple(vocabulary)), {})
                codes[:, j] = _category_codes(columns[feature], vocabulary, cache)
        return torch.from_numpy(block.astype(np.float32)), codes

    # ----- schema fitting -----
    @staticmethod
    def fit_metadata_schema(
        metadata,
        lesion_numerical: Iterable[str] = (),
        lesion_categorical: Iterable[str] = (),
        patient_numerical: Iterable[str] = (),
        patient_categorical: Iterable[str] = (),
        min_category_count: int = 1,
        lesion_tower: Mapping[str, Any] | None = None,
        patient_tower: Mapping[str, Any] | None = None,
    ) -> tuple[SLIMPMetadataConfig, SLIMPMetadataConfig]:
        """Fit the lesion and patient schemas on training rows (a DataFrame, dict of columns or list of dicts).

        Numerical features get the mean and std of their present values (lesion features over lesions,
        patient features over patients, one value per patient); categorical features get the categories
        seen at least `min_category_count` times, most frequent first. A feature with no usable value is
        left out, with a warning. `lesion_tower` / `patient_tower` hold tower sizes (hidden_size,
        num_hidden_layers, ...). Returns `(lesion_config, patient_config)`.
        """
        columns = _columns(metadata)
        num_rows = _num_rows(columns)
        wanted = [*lesion_numerical, *lesion_categorical, *patient_numerical, *patient_categorical]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ValueError(f"fit_metadata_schema: metadata has no column(s) {missing}; columns are {sorted(columns)}.")
        keys = [str(k) for k in columns[PATIENT_COLUMN]] if PATIENT_COLUMN in columns else list(range(num_rows))
        groups = rows_by_patient(keys)
        patient_columns = {}  # one value per patient: the first present one among its rows
        for feature in [*patient_numerical, *patient_categorical]:
            raw = columns[feature]
            values = _as_list(raw)
            patient_columns[feature] = [next((values[r] for r in rows if not is_missing(values[r])), None) for rows in groups]
        lesion = _fit_tower(columns, list(lesion_numerical), list(lesion_categorical), min_category_count, lesion_tower)
        patient = _fit_tower(patient_columns, list(patient_numerical), list(patient_categorical), min_category_count, patient_tower)
        return lesion, patient


def _schema(config: SLIMPMetadataConfig) -> tuple:
    return (config.numerical_features, config.categorical_features, config.numerical_mean, config.numerical_std)


def _fit_tower(columns: dict[str, Any], numerical: list[str], categorical: list[str], min_count: int,
               tower: Mapping[str, Any] | None) -> SLIMPMetadataConfig:
    """A feature with no present value in the training rows carries nothing to learn: it is left out
    of the schema, with a warning, rather than failing the fit (a column full of NaN is common)."""
    kept_numerical, means, stds, empty = [], [], [], []
    for feature in numerical:
        values, _ = _numbers(columns[feature])
        present = values[~torch.isnan(values)].double()
        if len(present) == 0:
            empty.append(feature)
            continue
        std = float(present.std(unbiased=False)) if len(present) > 1 else 1.0
        kept_numerical.append(feature)
        means.append(float(present.mean()))
        stds.append(std if std > 1e-12 else 1.0)
    vocabularies = {}
    for feature in categorical:
        raw = columns[feature]
        counts = Counter(as_category(v) for v in _as_list(raw))
        counts.pop(None, None)
        kept = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
        if kept:
            vocabularies[feature] = kept
        else:
            empty.append(feature)
    if empty:
        logger.warning("fit_metadata_schema: no usable value (or no category seen %d+ times) in %s: left out of the schema.",
                       min_count, ", ".join(empty))
    return SLIMPMetadataConfig(
        numerical_features=kept_numerical, categorical_features=vocabularies, numerical_mean=means, numerical_std=stds,
        **dict(tower or {}),
    )


# ----- batches for transformers.Trainer -----
class PatientChunks(Dataset):
    """A dataset of whole patients: item i is the list of rows of one patient, or of one near-equal chunk
    of at most `max_lesions_per_patient` lesions of a larger one (`schema_slimp.near_equal_chunks`).

    Give it to `transformers.Trainer` with `SLIMPDataCollator` when the classifier reads the patient
    context: a batch of `per_device_train_batch_size` items is then that many (chunks of) patients, so
    each lesion's context compares it with its own patient's other lesions.

    Args:
        dataset: rows indexable by position (`datasets.Dataset`, list of dicts).
        patient_ids: (N,) patient of each row (default `dataset["patient_id"]`).
        max_lesions_per_patient: K; None keeps every patient whole.
    """

    def __init__(self, dataset, patient_ids: Sequence | None = None, max_lesions_per_patient: int | None = None):
        self.dataset = dataset
        if patient_ids is None:  # a datasets.Dataset: read the column through Arrow, not row by row
            patient_ids = (dataset.with_format("arrow")[PATIENT_COLUMN].to_pylist() if hasattr(dataset, "with_format")
                           else [row[PATIENT_COLUMN] for row in dataset])
        patient_ids = list(patient_ids)
        self.chunks: list[list[int]] = []
        for rows in rows_by_patient(patient_ids):
            self.chunks += near_equal_chunks(rows, max_lesions_per_patient) if max_lesions_per_patient else [rows]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> list[dict]:
        rows = self.chunks[index]
        if hasattr(self.dataset, "select"):  # datasets.Dataset: one read for the chunk
            return list(self.dataset.select(rows))
        return [self.dataset[row] for row in rows]


class SLIMPDataCollator:
    """`transformers.Trainer`'s `data_collator` for SLIMP: dataset rows -> a model batch with `labels`.

    Rows are dicts with the image (`image_column`), the raw metadata columns, `patient_id` and the label
    (`label_column`, optional); items may also be lists of rows (`PatientChunks`), which are flattened.
    With a plain `datasets.Dataset`, pass `remove_unused_columns=False` to `TrainingArguments`: Trainer
    would otherwise drop the image and metadata columns before they reach the collator.

    Returns a `BatchFeature` with the processor's keys and `labels` (N,) long when every row has a label.
    """

    def __init__(self, processor: SLIMPProcessor, image_column: str = "image", label_column: str = "label"):
        self.processor = processor
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, items: Sequence) -> BatchFeature:
        rows = [row for item in items for row in (item if isinstance(item, (list, tuple)) else [item])]
        images = [row[self.image_column] for row in rows]
        metadata = [{k: v for k, v in row.items() if k != self.image_column} for row in rows]
        batch = self.processor(images=images, metadata=metadata, return_tensors="pt")
        if rows and all(row.get(self.label_column) is not None for row in rows):
            batch["labels"] = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        return batch


SLIMPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["SLIMPProcessor", "SLIMPDataCollator", "PatientChunks", "to_rgb", "load_image"]
