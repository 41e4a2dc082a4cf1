"""SLIMPProcessor: images + raw metadata rows -> the model's batch, at inference time.

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

import difflib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, BatchFeature, ProcessorMixin, ViTImageProcessorPil

from .configuration_slimp import SLIMPConfig, SLIMPMetadataConfig
from .metadata_columns import arrow_dictionary, as_columns, as_list, category_codes, hashable, large_arrow, number_array, row_count
from .schema_slimp import PATIENT_COLUMN, factorize, is_missing_id

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


def _column_names(metadata) -> list:
    """The column names of rows in any accepted form (a list of dicts: those of its first 100 rows)."""
    if hasattr(metadata, "column_names"):
        return list(metadata.column_names)
    if hasattr(metadata, "columns"):
        return list(metadata.columns)
    if isinstance(metadata, Mapping):
        return list(metadata)
    rows = [row for row in list(metadata)[:100] if isinstance(row, Mapping)] if isinstance(metadata, (list, tuple)) else []
    return list(dict.fromkeys(key for row in rows for key in row))


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

    Categories are compared case- and space-insensitively (`Male`, ` MALE ` and `male` are the vocabulary's
    `male`). Unknown categories map to 0 and are counted in `unknown_categories` (a Counter of (feature,
    value)); present values that are not usable numbers (text, ±inf, beyond ±3.4e38) become NaN and are
    counted in `invalid_numbers`. A `patient_id` is missing only when None, NaN or blank: any text, `NA`
    included, is an id. `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` returns this class.
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
        self._category_cache: dict[tuple, dict] = {}  # (feature, vocabulary) -> `category_codes` cache
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
        (the built-in image processor), the code files (transformers copies this file and what it imports, as
        for the model), and `config.json` (the schema) unless a model put one there. An existing `config.json` must hold the same metadata schema: a mismatch raises instead
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
        if not os.path.exists(config_file):
            self.config.save_pretrained(save_directory)
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, config: SLIMPConfig | None = None,
                        **kwargs) -> "SLIMPProcessor":
        """The image processor of `preprocessor_config.json` and the schema of `config.json`, or of `config` when
        given: `SLIMPProcessor.from_pretrained(folder, config=model.config)` makes the model's config the one owner
        of the schema that both read (a classifier built on a pre-trained folder, a schema replaced in memory)."""
        hub = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if key in kwargs}
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub)
        config = config if config is not None else SLIMPConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        return cls(image_processor=image_processor, config=config)

    # ----- encoding -----
    def __call__(self, images=None, metadata=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if kwargs:  # a misspelt `metadata=` would otherwise drop every row's metadata without a word
            raise TypeError(f"SLIMPProcessor got unexpected keyword argument(s) {sorted(kwargs)}; it takes images=, "
                            "metadata= (rows with the dataset's column names) and return_tensors=.")
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
        columns, num_rows = self._read_columns(metadata)
        patient_index, num_patients = self._patient_index(columns, num_rows)
        return self.group_patients(self._encode_rows(columns, num_rows), patient_index, num_patients)

    def encode_rows(self, metadata) -> dict[str, torch.Tensor]:
        """Raw rows -> one row of codes per lesion, before lesions are grouped by patient: `lesion_numerical_values`
        (N, Fn) and `patient_numerical_values` (N, Gn) float (NaN = missing; the patient-level columns as
        each row has them), `lesion_categorical_codes` (N, Fc) and `patient_categorical_codes` (N, Gc) long
        (id >= 1 in the vocabulary, -1 missing, <= -2 an unknown category). A table of any size can be
        encoded once and its rows gathered per batch (`group_patients`): the encoding of a row depends only
        on that row. Unparseable numbers are counted in `invalid_numbers` here."""
        return self._encode_rows(*self._read_columns(metadata))

    def _read_columns(self, metadata) -> tuple[dict[str, Any], int]:
        """The schema's columns of `metadata` and its row count; absent and misspelt columns said once."""
        columns = self._schema_columns(metadata)
        num_rows = row_count(columns) if columns else row_count(as_columns(metadata))
        self.check_columns({*columns, *_column_names(metadata)})
        return columns, num_rows

    @staticmethod
    def _count(counter: Counter, feature: str, value: str, count: int, level: int = logging.WARNING) -> None:
        """Counts a value read as missing (`invalid_numbers` or `unknown_categories`); its first count says so, in
        the process that owns the processor (DataLoader workers hold copies that would say it again each epoch)."""
        if (feature, value) not in counter and torch.utils.data.get_worker_info() is None:
            problem, name = ("is not a number", "invalid_numbers") if level == logging.WARNING else \
                ("is not a known category", "unknown_categories")
            logger.log(level, "metadata '%s' = %r %s: read as missing (counted in the processor's %s).", feature, value,
                       problem, name)
        counter[(feature, value)] += count

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
        return as_columns(metadata, {PATIENT_COLUMN, *lesion.feature_names, *patient.feature_names})

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
                # info, not a warning: the schema leaves out categories that fewer than 5 training patients share,
                # so a training split's rare values land here too, by design
                self._count(self.unknown_categories, feature, names[-2 - int(code)], int(count), logging.INFO)

    def check_columns(self, column_names: Iterable[str]) -> list[str]:
        """The schema columns absent from `column_names` (a table's columns): each is read as missing, and
        `patient_id` missing makes every lesion its own patient. Says so once per column (info level: any subset
        of the columns is a valid input; a missing `patient_id` is a warning) for this processor
        and the copies made of it afterwards, so a training script calls it on the dataset's columns
        before its DataLoader workers copy the processor (each epoch), instead of every worker warning. A column
        that is not read but nearly names an absent one (`age_aprox`) is a typo: a warning, with the same once."""
        column_names = set(column_names)
        lesion, patient = self.config.lesion_metadata_config, self.config.patient_metadata_config
        features = lesion.feature_names + patient.feature_names
        absent = [f for f in features if f not in column_names]
        new = [f for f in absent if f not in self._warned_absent]
        if new:
            self._warned_absent.update(new)
            # Any subset of the columns is a valid input (an expected condition, not a fault): info, not a warning.
            logger.info("metadata has no column(s) %s: treated as missing.", ", ".join(new))
            unread = [c for c in column_names - {*features, PATIENT_COLUMN} if isinstance(c, str)]
            for feature in new:
                for close in difflib.get_close_matches(feature, unread, n=1, cutoff=0.85):
                    logger.warning("metadata column '%s' is not read (did you mean '%s'?): '%s' is treated as missing.",
                                   close, feature, feature)
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
        if large_arrow(keys):  # Arrow numbers the distinct ids in order of first appearance, as `factorize`
            indices, distinct = arrow_dictionary(keys)
            bad = {code for code, key in enumerate(distinct) if is_missing_id(key)} | ({-1} if (indices < 0).any() else set())
            if bad:
                row = int(np.flatnonzero(np.isin(indices, list(bad)))[0])
                raise ValueError(f"metadata row {row}: '{PATIENT_COLUMN}' is missing; every lesion needs its patient.")
            return torch.from_numpy(indices), len(distinct)
        keys = as_list(keys)
        try:
            distinct = set(keys)
        except TypeError:
            keys = [hashable(key) for key in keys]
            distinct = set(keys)
        missing = {key for key in distinct if is_missing_id(key)}  # each distinct key checked once
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
                block[:, j], invalid = number_array(columns[feature])
                if invalid:
                    for value in invalid:
                        self._count(self.invalid_numbers, feature, str(value), 1)
        with np.errstate(invalid="ignore"):
            block[~np.isfinite(block)] = np.nan
        categorical_features = config.categorical_features
        codes = torch.full((num_rows, len(categorical_features)), -1, dtype=torch.long)
        for j, (feature, vocabulary) in enumerate(categorical_features.items()):
            if feature in columns:
                cache = self._category_cache.setdefault((feature, tuple(vocabulary)), {})
                codes[:, j] = category_codes(columns[feature], vocabulary, cache)
        return torch.from_numpy(block.astype(np.float32)), codes


def _schema(config: SLIMPMetadataConfig) -> tuple:
    return (config.numerical_features, config.categorical_features, config.numerical_mean, config.numerical_std)


SLIMPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["SLIMPProcessor", "to_rgb", "load_image"]
