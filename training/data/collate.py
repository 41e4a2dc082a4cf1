"""Batch collation for SLIMP: dataset rows -> model inputs, by three collators named for what they do.

- `DecodingCollator` + `BatchTransform`: the project's own loaders (pretrain.py, the evaluation pass). The
  collator, in the DataLoader workers, decodes and resizes images to uint8 and gathers the encoded metadata;
  `BatchTransform`, on the training device, augments and normalises.
- `SLIMPDataCollator`: `transformers.Trainer`'s collator for any rows, through the processor (no augmentation):
  what examples/trainer_finetune.py and the README's Trainer snippet use.
- `AugmentingCollator`: `DecodingCollator` + `BatchTransform` in the worker, a finished, augmented batch for
  Trainer (finetune.py).

Rows are what a `datasets.Dataset` in the shared layout (docs/data_format.md) yields: ``image``,
``image_id``, ``patient_id``, ``label`` and the raw metadata columns. `DecodingCollator` does only what must
happen on the CPU: decode each image once (naming the ``image_id`` of
any that fails), convert it to RGB, resize it to the model's size and stack the batch as uint8; encode
the metadata with the processor (vectorised, grouping lesions by patient); and, for training, draw each
image's augmentation parameters (`augment.draw_parameters`). `BatchTransform` then applies the
augmentation (`augment.augment`) and the image processor's normalisation on the training device.

Randomness: with ``seed=None`` each image's generator is seeded from torch's global RNG. With
``seed=int`` (what `pretrain.py` uses) each image's augmentation is a function of (seed, epoch,
``image_id``, view) only: the same whichever batch, worker or process collates it, and after a resume
from a checkpoint, which is what makes resumed and multi-process runs reproduce a single uninterrupted
one. Call `set_epoch` each epoch (non-persistent DataLoader workers copy the collator when an epoch starts).

Usage::

    collator = DecodingCollator(processor, train=True, two_views=True, seed=0)
    loader = DataLoader(ds, batch_sampler=PatientBatchSampler(...), collate_fn=collator, num_workers=4)
    transform = BatchTransform(processor)
    for batch in loader:
        inputs = transform(batch, device)          # pixel_values (+ ssl_pixel_values), metadata, labels
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from modeling_slimp import SLIMPProcessor
from modeling_slimp.processing_slimp import load_image
from modeling_slimp.schema_slimp import PATIENT_COLUMN, factorize

from .augment import AugmentationConfig, augment, draw_parameters

PIXELS = "pixels"  # (N, 3, H, W) uint8 images at the model's size
PARAMETERS = "augment_parameters"  # (N, K) float, one row of augment.draw_parameters per image
SSL_PARAMETERS = "ssl_augment_parameters"  # the second view's


def decode_image(value: Any, image_id: Any, size: tuple[int, int]) -> np.ndarray:
    """A dataset's image value (PIL image, ``{"bytes", "path"}`` dict, bytes or path: anything the processor's
    `load_image` reads) -> (H, W, 3) uint8 RGB at `size` (height, width), resized bilinearly as the processor's
    image processor does.

    Raises:
        ValueError: naming `image_id` when the image cannot be decoded.
    """
    try:
        image = load_image(value)
    except Exception as error:
        raise ValueError(f"cannot decode the image of image_id={image_id!r}: {error}") from error
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image)


class DecodingCollator:
    """Collate dataset rows into a SLIMP batch of uint8 images, the processor's metadata keys and ``labels``.

    Args:
        processor: the `SLIMPProcessor` (image size and normalisation, metadata schema).
        train: draw augmentation parameters (True) or not (False: evaluation, deterministic).
        two_views: also draw a second, independent view's parameters, for the SimCLR term; needs ``train``.
        augmentation: augmentation strengths (default `AugmentationConfig()`).
        seed: seed of the per-image generators (see the module docstring); None uses torch's global RNG.
        image_column, id_column, label_column: column names of the dataset layout.

    Calling it on N rows returns a `BatchFeature` with ``pixels`` (N, 3, H, W) uint8, the metadata tensors
    and ``patient_index`` (N,) of the processor, ``labels`` (N,) long when the rows have labels, and for
    training ``augment_parameters`` (N, K) (and ``ssl_augment_parameters`` with `two_views`).
    """

    def __init__(self, processor: SLIMPProcessor, train: bool, two_views: bool = False,
                 augmentation: AugmentationConfig | None = None, seed: int | None = None, image_column: str = "image",
                 id_column: str = "image_id", label_column: str = "label",
                 encoded_metadata: "EncodedMetadata | None" = None) -> None:
        if two_views and not train:
            raise ValueError("two_views=True needs train=True: the second view is an augmentation")
        if getattr(processor.image_processor, "do_center_crop", False):
            raise ValueError(f"DecodingCollator resizes images to the processor's size; {type(processor.image_processor).__name__} "
                             "also crops. Build the processor with a resize-only image processor (ViTImageProcessorPil).")
        self.processor = processor
        self.train, self.two_views = train, two_views
        self.augmentation = augmentation or AugmentationConfig()
        self.size = processor.image_size
        self.image_column, self.id_column, self.label_column = image_column, id_column, label_column
        self.seed = seed
        self.epoch = 0
        self.encoded_metadata = encoded_metadata

    def set_epoch(self, epoch: int) -> None:
        """Epoch mixed into the seeded augmentations (see the module docstring)."""
        self.epoch = epoch

    @property
    def row_columns(self) -> list[str]:
        """The columns a batch must carry when the metadata comes from `encoded_metadata`."""
        return [self.image_column, self.id_column, self.label_column, "patient_id"]

    def __call__(self, rows) -> BatchFeature:
        """`rows`: a list of row dicts, or the columns of a batch (a dict of columns, or the `pyarrow.Table` that
        `ColumnBatches` yields: the metadata then stays column arrays, with no per-row Python objects)."""
        indices = rows.indices if isinstance(rows, ArrowBatch) else None
        rows = rows.table if isinstance(rows, ArrowBatch) else rows
        images, ids, labels, metadata = self._columns(rows)
        pixels = np.stack([decode_image(image, image_id, self.size) for image, image_id in zip(images, ids)])
        if self.encoded_metadata is not None and indices is not None:
            batch = BatchFeature(self.encoded_metadata.batch(indices))
        else:
            batch = BatchFeature(self.processor.encode_metadata(metadata))
        batch[PIXELS] = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
        if labels is not None:
            batch["labels"] = labels
        if self.train:
            batch[PARAMETERS] = self.parameters(ids, view=0)
            if self.two_views:
                batch[SSL_PARAMETERS] = self.parameters(ids, view=1)
        return batch

    def _columns(self, rows) -> tuple[list, list, torch.Tensor | None, Any]:
        """(images, image ids, labels (N,) long or None, metadata for the processor) of a batch in any form."""
        if hasattr(rows, "column_names") and hasattr(rows, "column"):  # pyarrow.Table
            names = rows.column_names
            images = rows.column(self.image_column).to_pylist()
            ids = rows.column(self.id_column).to_pylist() if self.id_column in names else list(range(len(images)))
            metadata = rows.select([name for name in names if name != self.image_column])  # Arrow columns, encoded by Arrow
        elif isinstance(rows, Mapping):
            images = list(rows[self.image_column])
            ids = list(rows[self.id_column]) if self.id_column in rows else list(range(len(images)))
            metadata = {name: values for name, values in rows.items() if name != self.image_column}
        else:
            images = [row[self.image_column] for row in rows]
            ids = [row.get(self.id_column, i) for i, row in enumerate(rows)]
            metadata = [{key: value for key, value in row.items() if key != self.image_column} for row in rows]
            labels = [row.get(self.label_column) for row in rows]
            present = bool(rows) and all(label is not None for label in labels)
            return images, ids, torch.tensor([int(v) for v in labels], dtype=torch.long) if present else None, metadata
        if hasattr(metadata, "column_names"):
            labels = metadata.column(self.label_column).to_pylist() if self.label_column in metadata.column_names else []
        else:
            labels = metadata.get(self.label_column)
            labels = [] if labels is None else (labels.tolist() if hasattr(labels, "tolist") else list(labels))
        if not labels or any(label is None for label in labels):
            return images, ids, None, metadata
        return images, ids, torch.tensor([int(label) for label in labels], dtype=torch.long), metadata

    def parameters(self, image_ids: Sequence, view: int) -> torch.Tensor:
        """(N, K) augmentation parameters of one view of each image."""
        aspect = self.size[1] / self.size[0]
        return torch.tensor([draw_parameters(self.augmentation, self._image_generator(i, view), aspect) for i in image_ids],
                            dtype=torch.float32)

    def _image_generator(self, image_id: Any, view: int) -> torch.Generator:
        """A generator for one view of one image: from (seed, epoch, image_id, view) when seeded, else
        from torch's global RNG."""
        if self.seed is None:
            return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        entropy = [self.seed, self.epoch, zlib.crc32(str(image_id).encode()), view]
        state = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator().manual_seed(state)


@dataclass
class ArrowBatch:
    """What `ColumnBatches` yields for a batch: the dataset positions of its rows and their columns."""

    indices: list[int]
    table: Any  # pyarrow.Table


class ColumnBatches(torch.utils.data.Dataset):
    """A `datasets.Dataset` whose batches reach the collator as columns (an `ArrowBatch`: one `pyarrow.Table`)
    instead of a list of row dicts: `DataLoader` fetches a `batch_sampler`'s batch with `__getitems__`, so
    no per-value Python object is made. With `columns`, only those are read (e.g. the image, ids and label
    when the metadata is pre-encoded with `EncodedMetadata`).

        loader = DataLoader(ColumnBatches(train_split), batch_sampler=sampler, collate_fn=DecodingCollator(...))
    """

    def __init__(self, dataset, columns: Sequence[str] | None = None) -> None:
        self.dataset = dataset
        view = dataset.select_columns([c for c in columns if c in dataset.column_names]) if columns else dataset
        self.table = view.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> ArrowBatch:
        indices = list(indices)
        return ArrowBatch(indices, self.table[indices])


class EncodedMetadata:
    """A split's metadata encoded once (`SLIMPProcessor.encode_rows`, in chunks of `chunk_rows`) and its patients
    numbered once (`patient_codes` (N,), in order of first appearance, `num_patients`), so that a batch's
    metadata is a gather and a patient grouping (`batch`), whatever its size: the same tensors the processor
    gives for those rows (tests/test_collate.py). About 0.2 KB per lesion for the ISIC 2024 schema. Build it in
    the main process before the DataLoader starts; workers share it.

        encoded = EncodedMetadata(processor, train_split)
        collator = DecodingCollator(processor, train=True, seed=0, encoded_metadata=encoded)
        loader = DataLoader(ColumnBatches(train_split, columns=collator.row_columns), batch_sampler=..., collate_fn=collator)
    """

    def __init__(self, processor: SLIMPProcessor, dataset, chunk_rows: int = 65536) -> None:
        self.processor = processor
        table = dataset.with_format("arrow")
        parts = [processor.encode_rows(table[start:start + chunk_rows]) for start in range(0, len(dataset), chunk_rows)]
        self.rows = {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else {}
        self.num_rows = len(dataset)
        codes, patients = factorize([str(key) for key in table[PATIENT_COLUMN].to_pylist()])
        self.patient_codes = torch.as_tensor(codes, dtype=torch.long)  # (N,) the split's patient of each row
        self.num_patients = len(patients)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The processor's five metadata tensors of the rows `indices` (dataset positions): the rows gathered, and
        their patients (`patient_codes`) renumbered 0 .. P-1 in order of first appearance, as the processor does."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        codes = self.patient_codes[index]  # (n,) split-wide
        patients, inverse = torch.unique(codes, return_inverse=True)  # sorted
        first = torch.full((len(patients),), len(codes)).scatter_reduce(0, inverse, torch.arange(len(codes)), "amin")
        rank = torch.empty_like(first)
        rank[torch.argsort(first)] = torch.arange(len(patients))  # sorted position -> order of first appearance
        rows = {key: value.index_select(0, index) for key, value in self.rows.items()}
        return self.processor.group_patients(rows, rank[inverse], len(patients))


class BatchTransform:
    """The device half of collation: a collated batch -> model inputs on `device`.

    Moves the tensors, augments the images when the batch carries augmentation parameters (the second
    view too: ``ssl_pixel_values``), and normalises them as the processor's image processor does.
    """

    def __init__(self, processor: SLIMPProcessor) -> None:
        self.processor = processor
        self.size = processor.image_size

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        batch = {key: value.to(device, non_blocking=True) if device is not None else value for key, value in batch.items()}
        pixels = batch.pop(PIXELS)
        parameters, ssl_parameters = batch.pop(PARAMETERS, None), batch.pop(SSL_PARAMETERS, None)
        views = {"pixel_values": parameters, "ssl_pixel_values": ssl_parameters}
        for key, params in views.items():
            if key == "pixel_values" or params is not None:
                images = augment(pixels, params, self.size) if params is not None else pixels
                batch[key] = self.processor.normalize(images)
        return batch


class AugmentingCollator:
    """`transformers.Trainer`'s `data_collator` for training with SLIMP's augmentation (finetune.py): items of
    `PatientChunks` (lists of rows) -> a model batch with `labels`, decoded and augmentation parameters drawn
    (`DecodingCollator`, seeded per image), then augmented and normalised (`BatchTransform`), all in the loader
    worker: Trainer has no device-side step for it."""

    def __init__(self, processor: SLIMPProcessor, seed: int):
        self.collate = DecodingCollator(processor, train=True, seed=seed)
        self.transform = BatchTransform(processor)

    def set_epoch(self, epoch: int) -> None:
        self.collate.set_epoch(epoch)

    def __call__(self, items: list) -> dict:
        return self.transform(self.collate(flatten_items(items)))


def flatten_items(items: Sequence) -> list:
    """Trainer items -> rows: an item is a row, or a list of rows (`PatientChunks`)."""
    return [row for item in items for row in (item if isinstance(item, (list, tuple)) else [item])]


class SLIMPDataCollator:
    """`transformers.Trainer`'s `data_collator` for SLIMP: dataset rows -> a model batch with `labels`.

    Rows are dicts with the image (`image_column`), the raw metadata columns, `patient_id` and the label
    (`label_column`, optional); items may also be lists of rows (`training.data.sampler.PatientChunks`), which are flattened.
    With a plain `datasets.Dataset`, pass `remove_unused_columns=False` to `TrainingArguments`: Trainer
    would otherwise drop the image and metadata columns before they reach the collator.

    Returns a `BatchFeature` with the processor's keys and `labels` (N,) long when every row has a label.
    """

    def __init__(self, processor: SLIMPProcessor, image_column: str = "image", label_column: str = "label"):
        self.processor = processor
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, items: Sequence) -> BatchFeature:
        rows = flatten_items(items)
        images = [row[self.image_column] for row in rows]
        metadata = [{k: v for k, v in row.items() if k != self.image_column} for row in rows]
        batch = self.processor(images=images, metadata=metadata, return_tensors="pt")
        if rows and all(row.get(self.label_column) is not None for row in rows):
            batch["labels"] = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        return batch


__all__ = ["DecodingCollator", "BatchTransform", "SLIMPDataCollator", "AugmentingCollator", "ColumnBatches", "ArrowBatch",
           "EncodedMetadata", "AugmentationConfig", "decode_image", "flatten_items", "PIXELS", "PARAMETERS", "SSL_PARAMETERS"]
