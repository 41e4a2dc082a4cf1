"""Batch collation for SLIMP: dataset rows -> augmented images -> `SLIMPProcessor` batch.

Rows are what a `datasets.Dataset` in the shared layout (docs/data_format.md) yields: ``image``,
``image_id``, ``patient_id``, ``label`` and the raw metadata columns. `SLIMPCollator` decodes the
images (naming the ``image_id`` of any that fails), converts them to RGB, applies the training
augmentations (PIL + torch RNG, no torchvision) or none for evaluation, and lets the processor resize,
normalise, encode the metadata and group lesions by patient.

Randomness: with ``seed=None`` each call draws its generator's seed from torch's global RNG. With
``seed=int`` (what `pretrain.py` uses) each image's augmentation is a function of (seed, epoch,
``image_id``, view) only: the same whichever batch, worker or process collates it, and after a resume
from a checkpoint, which is what makes resumed and multi-process runs reproduce a single
uninterrupted one. Call `set_epoch` each epoch (with non-persistent DataLoader workers, which copy
the collator when an epoch starts).

Decoding in the collator (``dataset.cast_column("image", datasets.Image(decode=False))``) is the way to
get errors that name the ``image_id``: with ``decode=True`` `datasets` decodes, and fails, before the
collator sees the row. Both kinds of rows are accepted.

Usage::

    collator = SLIMPCollator(processor, train=True, two_views=True)
    loader = DataLoader(ds, batch_sampler=PatientBatchSampler(...), collate_fn=collator, num_workers=4)
"""

from __future__ import annotations

import io
import zlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from transformers import BatchFeature

from modeling_slimp import SLIMPProcessor
from modeling_slimp.processing_slimp import _to_rgb


@dataclass
class AugmentationConfig:
    """Pre-training augmentations. Colour changes are mild: colour is diagnostic for skin lesions.

    Args:
        crop_scale: area fraction range of the random resized crop.
        crop_ratio: aspect ratio range of the random resized crop.
        flip_p: probability of each of the horizontal and the vertical flip.
        rotate90: rotate by a random multiple of 90 degrees (lesions have no canonical orientation).
        max_degrees: extra rotation, uniform in [-max_degrees, max_degrees]; corners take the mean colour.
        jitter_p: probability of applying the colour jitter.
        brightness, contrast, saturation: jitter strengths; factors uniform in [1 - s, 1 + s].
        hue: hue shift, uniform in [-hue, hue] of a full turn.
        blur_p: probability of a Gaussian blur (0 = off).
        blur_radius: blur radius range in output pixels.
    """

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotate90: bool = True
    max_degrees: float = 15.0
    jitter_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    blur_p: float = 0.0
    blur_radius: tuple[float, float] = (0.1, 1.5)


_QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float uniform in [low, high)."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, p: float) -> bool:
    """True with probability p."""
    return p > 0 and torch.rand((), generator=generator).item() < p


def random_resized_crop(
    image: Image.Image,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Image.Image:
    """Crop a random box (area fraction in `scale`, aspect ratio in `ratio`) and resize it to `size`.

    The sampling follows torchvision's RandomResizedCrop: 10 tries, then the largest centred box
    with an aspect ratio inside `ratio`. `size` is (height, width).
    """
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            break
    else:
        aspect = min(max(width / height, ratio[0]), ratio[1])
        w, h = (width, round(width / aspect)) if aspect > width / height else (round(height * aspect), height)
        left, top = (width - w) // 2, (height - h) // 2
    box = (left, top, left + w, top + h)
    return image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)


def random_flip_rotate(image: Image.Image, config: AugmentationConfig, generator: torch.Generator) -> Image.Image:
    """Random horizontal/vertical flips, a random multiple of 90 degrees, plus a small random angle."""
    if _chance(generator, config.flip_p):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if _chance(generator, config.flip_p):
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if config.rotate90:
        quarter_turns = int(torch.randint(0, 4, (), generator=generator))
        if quarter_turns and image.width == image.height:  # a non-square image would change shape
            image = image.transpose(_QUARTER_TURNS[quarter_turns - 1])
    if config.max_degrees > 0:
        angle = _uniform(generator, -config.max_degrees, config.max_degrees)
        fill = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    return image


def color_jitter(image: Image.Image, config: AugmentationConfig, generator: torch.Generator) -> Image.Image:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], then a small hue shift."""
    for enhancer, strength in ((ImageEnhance.Brightness, config.brightness),
                               (ImageEnhance.Contrast, config.contrast),
                               (ImageEnhance.Color, config.saturation)):
        if strength > 0:
            image = enhancer(image).enhance(_uniform(generator, max(0.0, 1 - strength), 1 + strength))
    if config.hue > 0:
        shift = round(_uniform(generator, -config.hue, config.hue) * 256)  # PIL hue: 0..255 per turn
        hue, saturation, value = image.convert("HSV").split()
        hue = hue.point(lambda h: (h + shift) % 256)
        image = Image.merge("HSV", (hue, saturation, value)).convert("RGB")
    return image


class TrainAugmentation:
    """The pre-training view: crop, flips/rotations, colour jitter, optional blur.

    Args:
        size: output (height, width).
        config: augmentation strengths.
    """

    def __init__(self, size: tuple[int, int], config: AugmentationConfig | None = None) -> None:
        self.size = size
        self.config = config or AugmentationConfig()

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        """RGB PIL image of any size -> augmented RGB PIL image of `size`."""
        config = self.config
        image = random_resized_crop(image, self.size, config.crop_scale, config.crop_ratio, generator)
        image = random_flip_rotate(image, config, generator)
        if _chance(generator, config.jitter_p):
            image = color_jitter(image, config, generator)
        if _chance(generator, config.blur_p):
            image = image.filter(ImageFilter.GaussianBlur(_uniform(generator, *config.blur_radius)))
        return image


def processor_image_size(processor: SLIMPProcessor) -> tuple[int, int]:
    """(height, width) the processor resizes to: `size` height/width, or a square `shortest_edge`."""
    size = processor.image_processor.size
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    if height and width:
        return int(height), int(width)
    if getattr(size, "shortest_edge", None):
        return int(size.shortest_edge), int(size.shortest_edge)
    image_size = getattr(processor.config.vision_config, "image_size", 224)
    return int(image_size), int(image_size)


def decode_image(value: Any, image_id: Any) -> Image.Image:
    """A dataset's image value (PIL image, ``{"bytes", "path"}`` dict, or path) -> loaded RGB image.

    Raises:
        ValueError: naming `image_id` when the image cannot be decoded.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, str):
            image = Image.open(value)
        else:
            raise TypeError(f"unsupported image value of type {type(value).__name__}")
        image.load()  # PIL decodes lazily: force it here so the error names the image
        return _to_rgb(image)
    except Exception as error:
        raise ValueError(f"cannot decode the image of image_id={image_id!r}: {error}") from error


class SLIMPCollator:
    """Collate dataset rows into a SLIMP batch (the processor's keys plus ``labels``).

    Args:
        processor: the `SLIMPProcessor` (image processor + metadata schema).
        train: apply `augmentation` (True) or only the processor's deterministic resize (False).
        two_views: also return ``ssl_pixel_values``, a second independent augmented view of each
            image, for the SimCLR term; needs ``train=True``.
        augmentation: augmentation strengths (default `AugmentationConfig()`).
        seed: seed of the collator's own random stream (see the module docstring); None uses
            torch's global RNG.
        image_column, id_column, label_column: column names of the dataset layout.

    Calling it on N rows returns a `BatchFeature` with ``pixel_values`` (N, 3, H, W), the metadata
    tensors and ``patient_index`` (N,) of the processor, ``labels`` (N,) long when the rows have
    labels, and ``ssl_pixel_values`` (N, 3, H, W) with `two_views`.
    """

    def __init__(
        self,
        processor: SLIMPProcessor,
        train: bool,
        two_views: bool = False,
        augmentation: AugmentationConfig | None = None,
        seed: int | None = None,
        image_column: str = "image",
        id_column: str = "image_id",
        label_column: str = "label",
    ) -> None:
        if two_views and not train:
            raise ValueError("two_views=True needs train=True: the second view is an augmentation")
        self.processor = processor
        self.train = train
        self.two_views = two_views
        self.augment = TrainAugmentation(processor_image_size(processor), augmentation)
        self.image_column, self.id_column, self.label_column = image_column, id_column, label_column
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch mixed into the seeded augmentations (see the module docstring)."""
        self.epoch = epoch

    def __call__(self, rows: Sequence[dict[str, Any]], generator: torch.Generator | None = None) -> BatchFeature:
        """N dataset rows -> batch (see the class docstring).

        `generator` drives all the training augmentations of this call; by default each image gets
        its own (see `_image_generator`). Evaluation draws no random numbers.
        """
        ids = [row.get(self.id_column, i) for i, row in enumerate(rows)]
        images = [decode_image(row[self.image_column], image_id) for row, image_id in zip(rows, ids)]
        views = [self._augment(image, image_id, 0, generator) for image, image_id in zip(images, ids)] if self.train else images
        metadata = [{key: value for key, value in row.items() if key != self.image_column} for row in rows]
        batch = self.processor(images=views, metadata=metadata, return_tensors="pt")
        if rows and all(row.get(self.label_column) is not None for row in rows):
            batch["labels"] = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        if self.two_views:
            second = [self._augment(image, image_id, 1, generator) for image, image_id in zip(images, ids)]
            batch["ssl_pixel_values"] = self.processor.preprocess_images(second)
        return batch

    def _augment(self, image: Image.Image, image_id: Any, view: int, generator: torch.Generator | None) -> Image.Image:
        return self.augment(image, generator if generator is not None else self._image_generator(image_id, view))

    def _image_generator(self, image_id: Any, view: int) -> torch.Generator:
        """A generator for one view of one image: from (seed, epoch, image_id, view) when seeded, else
        from torch's global RNG. Seeded, an image's augmentation does not depend on which batch, worker
        or process collates it, so resumed and multi-process runs see the same augmented images."""
        if self.seed is None:
            return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        entropy = [self.seed, self.epoch, zlib.crc32(str(image_id).encode()), view]
        state = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator().manual_seed(state)
