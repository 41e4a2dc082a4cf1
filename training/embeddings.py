"""The one evaluation pass: frozen SLIMP features (or classifier logits) of every lesion of a split.

    features = embed_split(model, dataset, collator)               # SLIMPModel: towers, embeddings, phenotype
    features = embed_split(model, dataset, collator, losses=True)  # ... and the contrastive losses (validation)
    logits, labels = predict_split(classifier, dataset, collator)   # SLIMPForLesionClassification

Used by validation (`pretrain.py`), evaluation (`evaluate.py`), fine-tuning (`finetune.py`), metadata
extrapolation (`extrapolate.py`) and the benchmarks. Batches hold whole patients (a patient with more
lesions than `batch_size` spans consecutive batches of its own), and every patient-level value is a
per-patient sum (`modeling_slimp.PatientSums`) over all of the patient's lesions, so phenotype and
patient context are exact for any patient size and any batch size. Each pass shows a progress bar over its
batches on the local main process (`progress=False` hides it; it is removed when the pass ends).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_slimp import PatientSums, SLIMPForLesionClassification, SLIMPModel
from modeling_slimp.schema_slimp import factorize, rows_by_patient
from training.data.collate import BatchTransform, ColumnBatches, SLIMPCollator
from training.data.dataset import column_list

REPRESENTATIONS = ("projection", "tower")


def patient_batches(patient_ids: Sequence, batch_size: int) -> list[list[int]]:
    """Row indices packed into batches of at most `batch_size` rows without splitting a patient (a patient
    with more rows than that is split into consecutive batches of its own)."""
    batches, current = [], []
    for rows in rows_by_patient(patient_ids):
        if current and len(current) + len(rows) > batch_size:
            batches.append(current)
            current = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if len(current) + len(chunk) > batch_size:
                batches.append(current)
                current = []
            current.extend(chunk)
    if current:
        batches.append(current)
    return batches


def progress_bar(iterable, total: int, desc: str, progress: bool | None):
    """`iterable` with a tqdm bar on the local main process (`progress` None) or as `progress` says."""
    show = int(os.environ.get("LOCAL_RANK", "0")) == 0 if progress is None else progress
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=not show)


def _batches(dataset, collator: SLIMPCollator, batch_size: int, num_workers: int, device, desc: str = "embedding",
             progress: bool | None = None):
    """(rows, model inputs on `device`, global patient index (n,)) of each whole-patient batch."""
    patient_ids = column_list(dataset, "patient_id")
    codes, _ = factorize(patient_ids)
    codes = torch.tensor(codes, dtype=torch.long)
    batches = patient_batches(patient_ids, batch_size)
    source = ColumnBatches(dataset) if hasattr(dataset, "with_format") else dataset  # Arrow columns, not row dicts
    loader = DataLoader(source, batch_sampler=batches, collate_fn=collator, num_workers=num_workers)
    transform = BatchTransform(collator.processor)
    for rows, batch in zip(batches, progress_bar(loader, len(batches), desc, progress)):
        yield rows, transform(batch, device), codes[rows].to(device)


def context_of(values: torch.Tensor, patient_codes: torch.Tensor, num_patients: int | None = None) -> torch.Tensor:
    """(N, C) each lesion's row of `values` minus the mean of the same patient's other lesions (0 for a
    one-lesion patient), over all N lesions: `PatientSums.context`."""
    num_patients = num_patients if num_patients is not None else int(patient_codes.max()) + 1
    sums = PatientSums(num_patients, values.shape[-1], dtype=values.dtype).add(values, patient_codes)
    return sums.context(values, patient_codes)


@torch.inference_mode()
def embed_split(model: SLIMPModel, dataset, collator: SLIMPCollator, batch_size: int = 256, num_workers: int = 0,
                device: torch.device | str | None = None, losses: bool = False, desc: str = "embedding",
                progress: bool | None = None) -> dict[str, np.ndarray]:
    """Per-lesion features of a split, in dataset order.

    Returns numpy arrays: `image`, `lesion_metadata`, `patient_metadata`, `phenotype` (N, D), the
    L2-normalised embeddings ("projection"); `image_tower` (N, C), `lesion_metadata_tower` (N, H),
    `patient_metadata_tower` (N, H') the tower outputs before the projections ("tower"; patient-level
    rows repeated for each of the patient's lesions); `labels` (N,), `patient_ids` (N,) and
    `patient_codes` (N,) (patients numbered in order of first appearance). With `losses=True` also
    `lesion_loss` and `patient_loss`, the mean over the batches of the model's own loss terms.
    `collator` is an evaluation `SLIMPCollator` (no augmentation). `desc` names the progress bar.
    """
    model.eval()
    device = torch.device(device) if device is not None else model.device
    collator.processor.check_columns(dataset.column_names)  # once, before any worker copies the processor
    patient_ids = np.asarray(column_list(dataset, "patient_id"), dtype=object)
    codes, patients = factorize(patient_ids.tolist())
    sums = model.new_patient_sums(len(patients), device)
    keys = ("image", "lesion_metadata", "image_tower", "lesion_metadata_tower")
    parts: dict[str, list] = {key: [] for key in keys}
    patient_parts = {"patient_metadata": None, "patient_metadata_tower": None}
    labels, order, totals, batches = [], [], {"lesion_loss": 0.0, "patient_loss": 0.0}, 0
    for rows, batch, global_index in _batches(dataset, collator, batch_size, num_workers, device, desc, progress):
        batch_labels = batch.pop("labels", None)
        out = model(**batch, return_loss=losses)
        if losses:
            totals["lesion_loss"] += float(out.lesion_loss)
            totals["patient_loss"] += float(out.patient_loss)
        batches += 1
        model.add_lesions(sums, out.image_embeds.float(), out.lesion_metadata_embeds.float(), global_index)
        for key, value in zip(keys, (out.image_embeds, out.lesion_metadata_embeds, out.image_pooled_output,
                                     out.lesion_metadata_pooled_output)):
            parts[key].append(value.float().cpu())
        for key, value in (("patient_metadata", out.patient_metadata_embeds), ("patient_metadata_tower", out.patient_metadata_pooled_output)):
            if patient_parts[key] is None:
                patient_parts[key] = torch.zeros(len(patients), value.shape[-1])
            # This batch's patient rows -> their split-wide rows (a patient split over batches gets the same values).
            rows_of = torch.empty(value.shape[0], dtype=torch.long).scatter_(0, batch["patient_index"].cpu(), global_index.cpu())
            patient_parts[key][rows_of] = value.float().cpu()
        if batch_labels is not None:
            labels.append(batch_labels.cpu())
        order.extend(rows)
    back = torch.from_numpy(np.argsort(np.asarray(order), kind="stable"))  # batch order -> dataset order
    features = {key: torch.cat(value)[back].numpy() for key, value in parts.items()}
    phenotype = F.normalize(model.phenotype_from_sums(sums).float(), dim=-1).cpu()  # (P, D): all of each patient
    codes_t = torch.tensor(codes, dtype=torch.long)
    features["phenotype"] = phenotype[codes_t].numpy()
    for key, value in patient_parts.items():
        features[key] = value[codes_t].numpy()
    features["labels"] = torch.cat(labels)[back].numpy() if labels else np.zeros(0)
    features["patient_ids"] = patient_ids
    features["patient_codes"] = codes_t.numpy()
    if losses:
        features.update({key: value / max(batches, 1) for key, value in totals.items()})
    return features


@torch.inference_mode()
def predict_split(model: SLIMPForLesionClassification, dataset, collator: SLIMPCollator, batch_size: int = 256,
                  num_workers: int = 0, device: torch.device | str | None = None,
                  return_features: bool = False, desc: str = "predicting", progress: bool | None = None
                  ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
    """Logits (N, C) and labels (N,) of a split, in dataset order, with the patient context over all of each
    patient's lesions (`SLIMPForLesionClassification.lesion_features` per batch, `classify` at the end).
    With `return_features=True` also the head's input parts (numpy, per lesion) and `patient_codes`."""
    model.eval()
    device = torch.device(device) if device is not None else model.device
    collator.processor.check_columns(dataset.column_names)
    parts: dict[str, list] = {}
    labels, order, codes = [], [], []
    for rows, batch, global_index in _batches(dataset, collator, batch_size, num_workers, device, desc, progress):
        batch_labels = batch.pop("labels", None)
        batch.pop("ssl_pixel_values", None)
        features = model.lesion_features(**batch)
        for part in ("image", "lesion", "patient"):
            if part in features:
                parts.setdefault(part, []).append(features[part].float().cpu())
        codes.append(global_index.cpu())
        if batch_labels is not None:
            labels.append(batch_labels.cpu())
        order.extend(rows)
    back = torch.from_numpy(np.argsort(np.asarray(order), kind="stable"))
    features = {part: torch.cat(value)[back] for part, value in parts.items()}
    patient_codes = torch.cat(codes)[back]
    context = context_of(model.context_representation(features), patient_codes) if "context" in model.parts else None
    head = next(model.classifier.parameters())  # device and dtype of the head (also under peft's wrapper)
    inputs = {part: value.to(head.device, head.dtype) for part, value in features.items()}
    logits = model.classify(inputs, context.to(head.device, head.dtype) if context is not None else None)
    logits = logits.float().cpu().numpy()
    labels = torch.cat(labels)[back].numpy() if labels else np.zeros(0)
    if not return_features:
        return logits, labels
    extras = {part: value.numpy() for part, value in features.items()}
    extras["patient_codes"] = patient_codes.numpy()
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


__all__ = ["REPRESENTATIONS", "progress_bar", "patient_batches", "context_of", "embed_split", "predict_split", "predict_images_only"]
