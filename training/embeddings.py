"""The one evaluation pass: frozen SLIMP features (or classifier logits) of every lesion of a split.

    features = embed_split(model, dataset, collator)               # SLIMPModel: towers, embeddings, phenotype, context
    features = embed_split(model, dataset, collator, losses=True)  # ... and the contrastive losses (validation)
    logits, labels = predict_split(classifier, dataset, collator)   # SLIMPForLesionClassification

Used by validation (`pretrain.py`), evaluation (`evaluate.py`, `training/probe.py`), fine-tuning (`finetune.py`),
metadata extrapolation (`extrapolate.py`) and the benchmarks. One direction, once per split: the split's metadata
is encoded and its patients numbered once (`EncodedMetadata`), batches hold whole patients (`patient_batches`: a
patient with more lesions than `batch_size` spans consecutive batches of its own), each batch runs the towers and
projections only (`SLIMPModel.encode`: no per-batch phenotype or logits), every value is written to its lesion's
row as it arrives, and each patient-level value is a per-patient sum (`modeling_slimp.PatientSums`) over all of
the patient's lesions, so phenotype and patient context are exact for any patient size and any batch size; torch
throughout, numpy once at the end. Each pass shows a progress bar over its batches on the local main process
(`progress=False` hides it; it is removed when the pass ends).

`embed_split`'s features are named as the classifier reads them (`SLIMPConfig.classifier_features`,
`classifier_representation`): `features[representation][part]`, representation `tower` (the tower outputs before
the projections: `SLIMPOutput.image_pooled_output`, ...) or `projection` (the L2-normalised embeddings the losses
compare: `image_embeds`, ...), part `image`, `lesion` (the lesion's metadata) or `patient` (its patient's
metadata, repeated on each of the patient's lesions), and `features[representation]["context"][part]` the
patient context of the `image` and `lesion` parts.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_slimp import SLIMPForLesionClassification, SLIMPModel
from modeling_slimp.configuration_slimp import CLASSIFIER_REPRESENTATIONS
from modeling_slimp.pooling import patient_context
from training.data.collate import BatchTransform, ColumnBatches, EncodedMetadata, DecodingCollator
from training.data.dataset import column_list
from training.data.sampler import patient_batches

CONTEXT_PARTS = ("image", "lesion")  # the lesion-level parts whose patient context a head can read


def progress_bar(iterable, total: int, desc: str, progress: bool | None):
    """`iterable` with a tqdm bar on the local main process (`progress` None) or as `progress` says."""
    show = int(os.environ.get("LOCAL_RANK", "0")) == 0 if progress is None else progress
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=not show)


class SplitBatches:
    """A split read once, in batches of whole patients: its metadata encoded and its patients numbered once
    (`patient_codes` (N,), `num_patients`), each batch decoded by a copy of `collator` that gathers the encoded
    metadata. Iterating yields `(rows (n,), model inputs on device, patient codes (n,))`."""

    def __init__(self, dataset, collator: DecodingCollator, batch_size: int, num_workers: int = 0, device=None,
                 desc: str = "embedding", progress: bool | None = None) -> None:
        encoded = EncodedMetadata(collator.processor, dataset)
        self.patient_codes, self.num_patients = encoded.patient_codes, encoded.num_patients
        self.collator = copy.copy(collator)
        self.collator.encoded_metadata = encoded
        self.batches = patient_batches(self.patient_codes, batch_size)
        self.loader = DataLoader(ColumnBatches(dataset, columns=self.collator.row_columns), batch_sampler=self.batches,
                                 collate_fn=self.collator, num_workers=num_workers)
        self.transform = BatchTransform(collator.processor)
        self.device, self.desc, self.progress = device, desc, progress

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
        for rows, batch in zip(self.batches, progress_bar(self.loader, len(self.batches), self.desc, self.progress)):
            rows = torch.as_tensor(rows, dtype=torch.long)
            yield rows, self.transform(batch, self.device), self.patient_codes[rows].to(self.device)


class _Rows:
    """Per-lesion (N, C) tensors filled batch by batch at their dataset rows (no reordering afterwards)."""

    def __init__(self, num_rows: int):
        self.num_rows, self.values = num_rows, {}

    def put(self, key, rows: torch.Tensor, value: torch.Tensor) -> None:
        if key not in self.values:
            self.values[key] = torch.zeros(self.num_rows, *value.shape[1:], dtype=torch.float32)
        self.values[key][rows] = value.float().cpu()


@torch.inference_mode()
def embed_split(model: SLIMPModel, dataset, collator: DecodingCollator, batch_size: int = 256, num_workers: int = 0,
                device: torch.device | str | None = None, losses: bool = False, desc: str = "embedding",
                progress: bool | None = None) -> dict:
    """Per-lesion features of a split, in dataset order (numpy).

    Returns `{representation: {part: (N, ·)}}` for representation `tower` and `projection` and part `image`,
    `lesion`, `patient` (see the module docstring), with `["context"][part]` for `image` and `lesion` and
    `["projection"]["phenotype"]` (N, D) the L2-normalised phenotype of each lesion's patient (all of its
    lesions); and `labels` (N,), `patient_ids` (N,) and `patient_codes` (N,) (patients numbered in order of
    first appearance). With `losses=True` also `lesion_loss` and `patient_loss`, the mean over the batches of
    the model's own loss terms. `collator` is an evaluation `DecodingCollator` (no augmentation). `desc` names
    the progress bar.
    """
    model.eval()
    device = torch.device(device) if device is not None else model.device
    collator.processor.check_columns(dataset.column_names)  # once, before any worker copies the processor
    split = SplitBatches(dataset, collator, batch_size, num_workers, device, desc, progress)
    codes, num_patients = split.patient_codes, split.num_patients
    sums = model.new_patient_sums(num_patients, device)
    lesions, patients = _Rows(len(dataset)), _Rows(num_patients)
    labels, labelled = torch.zeros(len(dataset), dtype=torch.long), False
    totals = {"lesion_loss": 0.0, "patient_loss": 0.0}
    for rows, batch, batch_codes in split:
        batch_labels = batch.pop("labels", None)
        out = model(**batch, return_loss=True) if losses else model.encode(**batch)
        if losses:
            totals["lesion_loss"] += float(out.lesion_loss)
            totals["patient_loss"] += float(out.patient_loss)
        model.add_lesions(sums, out.image_embeds.float(), out.lesion_metadata_embeds.float(), batch_codes)
        for key, value in ((("projection", "image"), out.image_embeds), (("projection", "lesion"), out.lesion_metadata_embeds),
                           (("tower", "image"), out.image_pooled_output), (("tower", "lesion"), out.lesion_metadata_pooled_output)):
            lesions.put(key, rows, value)
        # This batch's patient rows -> their split-wide rows (a patient split over batches gets the same values).
        patient_rows = torch.empty(out.patient_metadata_embeds.shape[0], dtype=torch.long).scatter_(
            0, batch["patient_index"].cpu(), batch_codes.cpu())
        patients.put(("projection", "patient"), patient_rows, out.patient_metadata_embeds)
        patients.put(("tower", "patient"), patient_rows, out.patient_metadata_pooled_output)
        if batch_labels is not None:
            labels[rows], labelled = batch_labels.cpu(), True
    phenotype = F.normalize(model.phenotype_from_sums(sums).float(), dim=-1).cpu()  # (P, D): all of each patient
    features: dict = {representation: {} for representation in CLASSIFIER_REPRESENTATIONS}
    for (representation, part), value in lesions.values.items():
        features[representation][part] = value
    for (representation, part), value in patients.values.items():
        features[representation][part] = value[codes]
    for representation, values in features.items():
        values["context"] = {part: patient_context(values[part].double(), codes, num_patients).float()
                             for part in CONTEXT_PARTS}
    features["projection"]["phenotype"] = phenotype[codes]
    features = _numpy(features)
    features["labels"] = labels.numpy() if labelled else np.zeros(0)
    features["patient_ids"] = np.asarray(column_list(dataset, "patient_id"), dtype=object)
    features["patient_codes"] = codes.numpy()
    if losses:
        features.update({key: value / max(len(split), 1) for key, value in totals.items()})
    return features


def _numpy(values):
    if isinstance(values, dict):
        return {key: _numpy(value) for key, value in values.items()}
    return values.numpy()


@torch.inference_mode()
def predict_split(model: SLIMPForLesionClassification, dataset, collator: DecodingCollator, batch_size: int = 256,
                  num_workers: int = 0, device: torch.device | str | None = None,
                  return_features: bool = False, desc: str = "predicting", progress: bool | None = None
                  ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
    """Logits (N, C) and labels (N,) of a split, in dataset order, with the patient context over all of each
    patient's lesions (`SLIMPForLesionClassification.lesion_features` per batch, `classify` at the end).
    With `return_features=True` also the head's input parts (numpy, per lesion) and `patient_codes`."""
    model.eval()
    device = torch.device(device) if device is not None else model.device
    collator.processor.check_columns(dataset.column_names)
    split = SplitBatches(dataset, collator, batch_size, num_workers, device, desc, progress)
    parts = _Rows(len(dataset))
    labels, labelled = torch.zeros(len(dataset), dtype=torch.long), False
    for rows, batch, _ in split:
        batch_labels = batch.pop("labels", None)
        batch.pop("ssl_pixel_values", None)
        features = model.lesion_features(**batch)
        for part in ("image", "lesion", "patient"):
            if part in features:
                parts.put(part, rows, features[part])
        if batch_labels is not None:
            labels[rows], labelled = batch_labels.cpu(), True
    features = parts.values
    context = (patient_context(model.context_representation(features), split.patient_codes, split.num_patients)
               if "context" in model.parts else None)
    head = next(model.classifier.parameters())  # device and dtype of the head (also under peft's wrapper)
    inputs = {part: value.to(head.device, head.dtype) for part, value in features.items()}
    logits = model.classify(inputs, context.to(head.device, head.dtype) if context is not None else None)
    logits = logits.float().cpu().numpy()
    labels = labels.numpy() if labelled else np.zeros(0)
    if not return_features:
        return logits, labels
    extras = {part: value.numpy() for part, value in features.items()}
    extras["patient_codes"] = split.patient_codes.numpy()
    if context is not None:
        extras["context"] = context.numpy()
    return logits, labels, extras


@torch.no_grad()
def predict_images_only(model: SLIMPForLesionClassification, dataset, processor, batch_size: int = 64,
                        image_column: str = "image", device: torch.device | str | None = None,
                        progress: bool | None = None) -> np.ndarray:
    """Logits (N, C) of a split as `pipeline("image-classification")` and the Hub widget compute them: the
    images alone (every metadata value missing) and each lesion its own patient (no patient context). The
    explicit `patient_index` (one patient per lesion, what the pipeline's call implies) says this use is meant,
    so the model's images-only warning is left to the caller."""
    model.eval()
    device = torch.device(device) if device is not None else model.device
    logits = []
    starts = range(0, len(dataset), batch_size)
    for start in progress_bar(starts, len(starts), "predicting from images only", progress):
        images = dataset[start:start + batch_size][image_column]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        own_patients = torch.arange(len(pixel_values), device=device)
        logits.append(model(pixel_values=pixel_values, patient_index=own_patients).logits.float().cpu())
    return torch.cat(logits).numpy() if logits else np.zeros((0, model.config.num_labels), dtype=np.float32)


__all__ = ["CONTEXT_PARTS", "progress_bar", "SplitBatches", "embed_split", "predict_split", "predict_images_only"]
