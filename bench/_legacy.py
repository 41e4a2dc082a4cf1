"""The training data path as it was before the device-side augmentation and the vectorised metadata
encoding (commit fa014e8), kept only so `bench/data.py` can time old and new side by side in one run on
the same machine: ratios, not absolute times, are what carries between machines.

Nothing in the library or the scripts imports this module. It reproduces, in the old order:

- `LegacyTrainCollator`: per image, decode the JPEG, convert to RGB, random-resized-crop **and resize to
  the model size** with PIL, flips, quarter turns, a small rotation, PIL colour jitter (brightness,
  contrast, saturation, an HSV hue shift); then the image processor resizes, rescales and normalises
  **again** (a second resize and a float conversion per image, in the worker); then the metadata.
- `encode_metadata_per_value`: the metadata read one Python value at a time (a call per value, a dict
  lookup per category, a loop per patient-level feature), with the contract's own parsing rules, so its
  output equals the vectorised encoder's (tests/test_bench.py checks that it does).
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import torch
from PIL import Image, ImageEnhance

from modeling_slimp.processing_slimp import PATIENT_COLUMN, to_rgb
from modeling_slimp.schema_slimp import as_category, parse_number


# ----- metadata, one value at a time -----
def _columns(rows) -> dict[str, list]:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def _encode(config, columns: dict[str, list], num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    numerical = torch.full((num_rows, config.num_numerical), float("nan"))
    for j, feature in enumerate(config.numerical_features):
        if feature in columns:
            numerical[:, j] = torch.tensor([parse_number(value)[0] for value in columns[feature]], dtype=torch.float32)
    categorical = torch.zeros((num_rows, config.num_categorical), dtype=torch.long)
    for j, (feature, vocabulary) in enumerate(config.categorical_features.items()):
        if feature not in columns:
            continue
        ids = {category: index + 1 for index, category in enumerate(vocabulary)}
        for row, value in enumerate(columns[feature]):
            category = as_category(value)
            if category is not None:
                categorical[row, j] = ids.get(category, 0)
    return numerical, categorical


def encode_metadata_per_value(config, rows: list[dict]) -> dict[str, torch.Tensor]:
    """List of row dicts -> the processor's five metadata tensors, value by value (the old encoder)."""
    columns = _columns(rows)
    num_rows = len(rows)
    keys = [str(key) for key in columns[PATIENT_COLUMN]]
    first_row: dict[str, int] = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    order = {key: index for index, key in enumerate(first_row)}
    patient_index = torch.tensor([order[key] for key in keys], dtype=torch.long)
    lesion = _encode(config.lesion_metadata_config, columns, num_rows)
    patient_columns: dict[str, list] = {}
    numerical = set(config.patient_metadata_config.numerical_features)
    for feature in config.patient_metadata_config.feature_names:  # first usable value per patient
        if feature not in columns:
            continue
        values: list = [None] * len(order)
        for key, value in zip(keys, columns[feature]):
            slot = order[key]
            usable = not math.isnan(parse_number(value)[0]) if feature in numerical else as_category(value) is not None
            if values[slot] is None and usable:
                values[slot] = value
        patient_columns[feature] = values
    patient = _encode(config.patient_metadata_config, patient_columns, len(order))
    return {"lesion_numerical_values": lesion[0], "lesion_categorical_ids": lesion[1],
            "patient_numerical_values": patient[0], "patient_categorical_ids": patient[1], "patient_index": patient_index}


# ----- images: PIL augmentation in the worker, then the processor's resize -----
def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand((), generator=generator).item() < p


def _random_resized_crop(image: Image.Image, size: tuple[int, int], generator: torch.Generator) -> Image.Image:
    width, height = image.size
    for _ in range(10):
        target = width * height * _uniform(generator, 0.4, 1.0)
        aspect = math.exp(_uniform(generator, math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            break
    else:
        left, top, w, h = 0, 0, width, height
    return image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def legacy_augment(image: Image.Image, size: tuple[int, int], generator: torch.Generator) -> Image.Image:
    """The old `TrainAugmentation` with its default strengths."""
    image = _random_resized_crop(image, size, generator)
    if _chance(generator, 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if _chance(generator, 0.5):
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    turns = int(torch.randint(0, 4, (), generator=generator))
    if turns:
        image = image.transpose(_TURNS[turns - 1])
    angle = _uniform(generator, -15.0, 15.0)
    fill = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if _chance(generator, 0.8):
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(_uniform(generator, 0.8, 1.2))
        shift = round(_uniform(generator, -0.02, 0.02) * 256)
        hue, saturation, value = image.convert("HSV").split()
        image = Image.merge("HSV", (hue.point(lambda h: (h + shift) % 256), saturation, value)).convert("RGB")
    return image


class LegacyTrainCollator:
    """Rows -> a float batch, the old way: everything per image, in the worker (see the module docstring)."""

    def __init__(self, processor, seed: int = 0):
        self.processor, self.seed, self.epoch = processor, seed, 0
        self.size = processor.image_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, image_id) -> torch.Generator:
        entropy = [self.seed, self.epoch, zlib.crc32(str(image_id).encode()), 0]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        views = []
        for row in rows:
            value = row["image"]
            image = Image.open(io.BytesIO(value["bytes"])) if isinstance(value, dict) else value
            image.load()
            views.append(legacy_augment(to_rgb(image), self.size, self._generator(row["image_id"])))
        pixel_values = self.processor.image_processor(images=views, return_tensors="pt")["pixel_values"]
        metadata = [{k: v for k, v in row.items() if k != "image"} for row in rows]
        batch = {"pixel_values": pixel_values, **encode_metadata_per_value(self.processor.config, metadata)}
        batch["labels"] = torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)
        return batch
