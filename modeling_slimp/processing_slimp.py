"""SLIMPProcessor: raw rows + PIL images -> the model's batch, and fitting of the metadata schema.

Rows use the dataset's own column names and category strings (ISIC: `age_approx`, `sex`,
`anatom_site_general`, `tbp_lv_*`, ...) and carry `patient_id`. Lesions are grouped by patient: the
batch gets one row of patient metadata per distinct patient (in order of first appearance), taken from
the first non-missing value among that patient's rows, and `patient_index` maps each lesion to it.

The schema (feature names, category vocabularies, normalisation statistics) lives in the model config
(`SLIMPConfig.lesion_metadata_config` / `patient_metadata_config`); the processor reads the same object.
Image preprocessing is a built-in transformers image processor (`preprocessor_config.json`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch
from transformers import AutoImageProcessor, BatchFeature, ViTImageProcessorPil

from .configuration_slimp import SLIMPConfig, SLIMPMetadataConfig

logger = logging.getLogger(__name__)

PATIENT_COLUMN = "patient_id"
_MISSING_STRINGS = {"", "nan", "none", "null", "na", "n/a", "unk", "unknown"}


def _columns(metadata: Any) -> dict[str, list]:
    """Rows as columns: a pandas DataFrame, a dict of lists (a `datasets` batch) or a list of dicts."""
    if hasattr(metadata, "to_dict") and hasattr(metadata, "columns"):  # pandas.DataFrame
        return {str(k): list(v) for k, v in metadata.to_dict(orient="list").items()}
    if isinstance(metadata, Mapping):
        return {str(k): list(v) for k, v in metadata.items()}
    rows = list(metadata)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_STRINGS


def _as_category(value: Any) -> str | None:
    """Category string of a raw value; None when missing. 1.0 and 1 both become '1'."""
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _to_rgb(image):
    """Any PIL image (L, LA, P, RGBA, I;16, F, ...) -> 8-bit RGB."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        extrema = image.getextrema()
        low, high = float(extrema[0]), float(extrema[1])
        scale = 255.0 / (high - low) if high > low else 1.0
        image = image.point(lambda v: (v - low) * scale).convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


class SLIMPProcessor:
    """Turns images and raw metadata rows into `SLIMPModel` inputs.

    Args:
        image_processor: a built-in transformers image processor (default: ViT-style resize + normalise
            at the vision config's `image_size`).
        config: the `SLIMPConfig` whose metadata schema to apply.

    `processor(images=[...], metadata=rows, return_tensors="pt")` returns a `BatchFeature` with
    `pixel_values` (N, 3, H, W), `lesion_numerical_values` (N, Fn) float (NaN = missing),
    `lesion_categorical_ids` (N, Fc) long (0 = missing/unknown), `patient_numerical_values` (P, Gn),
    `patient_categorical_ids` (P, Gc) and `patient_index` (N,). `metadata=None` gives `pixel_values` only.

    Unknown categories map to 0 and are counted in `unknown_categories` (a Counter of (feature, value));
    unparseable numbers become NaN and are counted in `invalid_numbers`.
    """

    def __init__(self, image_processor=None, config: SLIMPConfig | None = None):
        self.config = config if config is not None else SLIMPConfig()
        if image_processor is None:
            size = getattr(self.config.vision_config, "image_size", 224)
            image_processor = ViTImageProcessorPil(size={"height": size, "width": size})
        self.image_processor = image_processor
        self.unknown_categories: Counter = Counter()
        self.invalid_numbers: Counter = Counter()
        self._warned_absent: set[str] = set()

    # ----- persistence -----
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write `preprocessor_config.json`, this file, and `config.json` (the schema) unless a model put one there.

        An existing `config.json` must hold the same metadata schema: a mismatch raises instead of
        leaving a processor and a model that disagree.
        """
        os.makedirs(save_directory, exist_ok=True)
        self.image_processor.save_pretrained(save_directory, **kwargs)
        # The code travels with the folder, as the model's does, for users without this package.
        shutil.copyfile(__file__, os.path.join(save_directory, os.path.basename(__file__)))
        config_file = os.path.join(save_directory, "config.json")
        if not os.path.exists(config_file):
            self.config.save_pretrained(save_directory)
            return
        saved = SLIMPConfig.from_pretrained(save_directory)
        for key in ("lesion_metadata_config", "patient_metadata_config"):
            if _schema(getattr(saved, key)) != _schema(getattr(self.config, key)):
                raise ValueError(
                    f"{config_file} holds a different {key} schema than this processor; save the processor next to "
                    "the model it was built for, or into an empty folder."
                )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "SLIMPProcessor":
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        config = SLIMPConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(image_processor=image_processor, config=config)

    # ----- encoding -----
    def __call__(self, images=None, metadata=None, return_tensors: str | None = "pt") -> BatchFeature:
        data: dict[str, Any] = {}
        if images is not None:
            images = [images] if not isinstance(images, (list, tuple)) else list(images)
            data["pixel_values"] = self.preprocess_images(images)
        if metadata is not None:
            encoded = self.encode_metadata(metadata)
            if images is not None and encoded["lesion_numerical_values"].shape[0] != len(images):
                raise ValueError(
                    f"Got {len(images)} images but {encoded['lesion_numerical_values'].shape[0]} metadata rows; "
                    "give one row per image."
                )
            data.update(encoded)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        """PIL images of any mode and size -> (N, 3, H, W) float."""
        rgb = [_to_rgb(image) for image in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def encode_metadata(self, metadata) -> dict[str, torch.Tensor]:
        """Raw rows (DataFrame, dict of lists, list of dicts) -> the metadata tensors and patient_index."""
        columns = _columns(metadata)
        num_rows = len(next(iter(columns.values()))) if columns else 0
        features = self.config.lesion_metadata_config.feature_names + self.config.patient_metadata_config.feature_names
        absent = [f for f in features if f not in columns and f not in self._warned_absent]
        if absent:
            self._warned_absent.update(absent)
            logger.warning("metadata has no column(s) %s: treated as missing.", ", ".join(absent))
        patient_keys = self._patient_keys(columns, num_rows)
        first_row: dict[Any, int] = {}
        for row, key in enumerate(patient_keys):
            first_row.setdefault(key, row)
        patient_of = {key: index for index, key in enumerate(first_row)}
        patient_index = torch.tensor([patient_of[key] for key in patient_keys], dtype=torch.long)
        lesion_numerical, lesion_categorical = self._encode(self.config.lesion_metadata_config, columns, num_rows)
        # Patient-level: the first non-missing value among each patient's rows.
        patient_rows = _first_present_per_patient(columns, self.config.patient_metadata_config.feature_names, patient_keys, first_row)
        patient_numerical, patient_categorical = self._encode(self.config.patient_metadata_config, patient_rows, len(first_row))
        return {
            "lesion_numerical_values": lesion_numerical,
            "lesion_categorical_ids": lesion_categorical,
            "patient_numerical_values": patient_numerical,
            "patient_categorical_ids": patient_categorical,
            "patient_index": patient_index,
        }

    def _patient_keys(self, columns: dict[str, list], num_rows: int) -> list:
        if PATIENT_COLUMN not in columns:
            if PATIENT_COLUMN not in self._warned_absent:
                self._warned_absent.add(PATIENT_COLUMN)
                logger.warning("metadata has no column '%s': every lesion is treated as its own patient.", PATIENT_COLUMN)
            return [("row", row) for row in range(num_rows)]
        keys = columns[PATIENT_COLUMN]
        for row, key in enumerate(keys):
            if _is_missing(key):
                raise ValueError(f"metadata row {row}: '{PATIENT_COLUMN}' is missing; every lesion needs its patient.")
        return [str(key) for key in keys]

    def _encode(self, config: SLIMPMetadataConfig, columns: dict[str, list], num_rows: int):
        numerical = torch.full((num_rows, config.num_numerical), float("nan"))
        for j, feature in enumerate(config.numerical_features):
            if feature not in columns:
                continue
            numerical[:, j] = torch.tensor([self._number(feature, value) for value in columns[feature]], dtype=torch.float32)
        categorical = torch.zeros((num_rows, config.num_categorical), dtype=torch.long)
        for j, (feature, vocabulary) in enumerate(config.categorical_features.items()):
            if feature not in columns:
                continue
            ids = {category: index + 1 for index, category in enumerate(vocabulary)}
            for row, value in enumerate(columns[feature]):
                category = _as_category(value)
                if category is None:
                    continue
                if category not in ids:
                    self.unknown_categories[(feature, category)] += 1
                categorical[row, j] = ids.get(category, 0)
        return numerical, categorical

    def _number(self, feature: str, value: Any) -> float:
        if _is_missing(value):
            return float("nan")
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.invalid_numbers[(feature, str(value))] += 1
            return float("nan")
        return number if math.isfinite(number) else float("nan")

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
        """Fit the lesion and patient schemas on training rows (a DataFrame, dict of lists or list of dicts).

        Numerical features get the mean and std of their present values (lesion features over lesions,
        patient features over patients, one value per patient); categorical features get the categories
        seen at least `min_category_count` times, most frequent first. `lesion_tower` / `patient_tower`
        hold tower sizes (hidden_size, num_hidden_layers, ...). Returns `(lesion_config, patient_config)`.
        """
        columns = _columns(metadata)
        num_rows = len(next(iter(columns.values()))) if columns else 0
        missing = [c for c in [*lesion_numerical, *lesion_categorical, *patient_numerical, *patient_categorical] if c not in columns]
        if missing:
            raise ValueError(f"fit_metadata_schema: metadata has no column(s) {missing}; columns are {sorted(columns)}.")
        if patient_numerical or patient_categorical:
            keys = [str(k) for k in columns.get(PATIENT_COLUMN, range(num_rows))]
            first_row: dict[Any, int] = {}
            for row, key in enumerate(keys):
                first_row.setdefault(key, row)
            patient_columns = _first_present_per_patient(columns, [*patient_numerical, *patient_categorical], keys, first_row)
        else:
            patient_columns = {}
        lesion = _fit_tower(columns, list(lesion_numerical), list(lesion_categorical), min_category_count, lesion_tower)
        patient = _fit_tower(patient_columns, list(patient_numerical), list(patient_categorical), min_category_count, patient_tower)
        return lesion, patient


def _schema(config: SLIMPMetadataConfig) -> tuple:
    return (config.numerical_features, config.categorical_features, config.numerical_mean, config.numerical_std)


def _first_present_per_patient(columns: dict[str, list], features: Iterable[str], patient_keys: list, first_row: dict) -> dict[str, list]:
    """One value per patient (ordered as `first_row`) per feature: the first non-missing one."""
    order = {key: index for index, key in enumerate(first_row)}
    result: dict[str, list] = {}
    for feature in features:
        if feature not in columns:
            continue
        values: list = [None] * len(order)
        for key, value in zip(patient_keys, columns[feature]):
            slot = order[key]
            if values[slot] is None and not _is_missing(value):
                values[slot] = value
        result[feature] = values
    return result


def _fit_tower(columns: dict[str, list], numerical: list[str], categorical: list[str], min_count: int,
               tower: Mapping[str, Any] | None) -> SLIMPMetadataConfig:
    """A feature with no present value in the training rows carries nothing to learn: it is left out
    of the schema, with a warning, rather than failing the fit (a column full of NaN is common)."""
    kept_numerical, means, stds, empty = [], [], [], []
    for feature in numerical:
        present = []
        for value in columns[feature]:
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                present.append(number)
        if not present:
            empty.append(feature)
            continue
        values = torch.tensor(present, dtype=torch.float64)
        std = float(values.std(unbiased=False)) if len(present) > 1 else 1.0
        kept_numerical.append(feature)
        means.append(float(values.mean()))
        stds.append(std if std > 1e-12 else 1.0)
    vocabularies = {}
    for feature in categorical:
        counts = Counter(c for c in (_as_category(v) for v in columns[feature]) if c is not None)
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


__all__ = ["SLIMPProcessor"]
