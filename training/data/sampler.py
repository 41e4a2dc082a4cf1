"""Batches of whole patients: the pre-training sampler (`PatientBatchSampler`), the evaluation batches
(`patient_batches`) and `transformers.Trainer`'s items (`PatientChunks`).

Each batch holds up to P distinct patients with up to K lesions each (ragged), so that the outer,
patient-level contrastive loss sees whole patients and the inner, lesion-level loss sees their lesions.

How an epoch is built (all numpy, a function of ``(seed, epoch)`` only, identical on every rank):

1. **Chunks.** Each patient's lesions are shuffled and split into ``c = ceil(n / K)`` near-equal
   chunks (a patient with 33 lesions and K=32 gives chunks of 17 and 16, not 32 and 1).
2. **Ranks.** With several replicas, whole patients are dealt to ranks ("snake" order over patients
   sorted by chunk count, random tie-break, random rank relabelling), which balances chunk counts;
   all chunks of a patient go to the same rank.
3. **Batches.** On each rank the chunks, grouped by patient in a random patient order, are written
   column by column into a grid of B rows (batches) x P columns (McNaughton's wrap-around rule). A
   patient's chunks are consecutive in that order, so they land in distinct rows as long as the
   patient has no more chunks than the column is long: a batch never holds two chunks of a patient.
   Normally B = ceil(T / P) for T chunks, and every batch holds P patients except the last. If one
   patient has too many chunks for that (>= ceil(T / P), unless T is a multiple of P), B becomes
   max(ceil(T / P), its chunk count) and the batches are balanced instead: each holds
   floor(T / B) or ceil(T / B) <= P patients.
4. **Order.** Batches are shuffled; full batches come first, the partial batch last.

Distributed: every rank returns the same number of batches: a rank with fewer batches repeats its own
first batches (cycling) at the end of the epoch, so a few lesions are seen twice on that rank.

Label-aware mode (``include_malignant=True``, off by default, logged as a warning): every chunk of a
patient with positive lesions holds all of that patient's positives, and the negatives are chunked
with the remaining capacity ``K - n_pos``. Every lesion is still sampled at least once per epoch, but
positives appear once per chunk of their patient, i.e. possibly several times per epoch. A patient
with ``n_pos >= K`` is chunked normally (its positives are spread out, not repeated).

Usage::

    sampler = PatientBatchSampler(train_ds["patient_id"], patients_per_batch=16,
                                  max_lesions_per_patient=32, seed=0)
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collator, num_workers=4)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        if epoch == resume_epoch:
            sampler.set_start_batch(resume_step)  # continue exactly where the checkpoint stopped
        for batch in loader: ...

The sampler shards by rank itself: do not pass its DataLoader through ``accelerator.prepare`` with
more than one process (accelerate would shard the batches a second time); move batches to the
device instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler

from modeling_slimp.schema_slimp import PATIENT_COLUMN, near_equal_chunks, rows_by_patient

logger = logging.getLogger(__name__)


@dataclass
class _Chunks:
    """Lesion-to-chunk assignment for one epoch (chunks numbered patient by patient).

    rows: (E,) dataset row of each entry (E >= N rows; more with include_malignant repeats).
    chunk: (E,) chunk id of each entry, in [0, C).
    patient_chunks: (num_patients,) number of chunks of each patient.
    """

    rows: np.ndarray
    chunk: np.ndarray
    patient_chunks: np.ndarray


def _within(counts: np.ndarray) -> np.ndarray:
    """Position of each element inside its segment, for consecutive segments of sizes `counts`.

    Example: counts [2, 3] -> [0, 1, 0, 1, 2].
    """
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _grid_columns(num_chunks: int, max_chunks: int, patients_per_batch: int) -> np.ndarray:
    """Column lengths of the wrap-around grid for one rank.

    Args:
        num_chunks: T, the rank's number of chunks.
        max_chunks: the largest number of chunks of one patient on this rank.
        patients_per_batch: P.

    Returns:
        (num_columns,) lengths, non-increasing, summing to T. The number of batches is the first
        length. A run of c consecutive chunks lands in distinct rows whenever c <= every length it
        wraps out of; both layouts below guarantee that for c <= max_chunks.
    """
    if num_chunks == 0:
        return np.zeros(0, dtype=np.int64)
    num_rows = math.ceil(num_chunks / patients_per_batch)
    last_row = num_chunks - (num_rows - 1) * patients_per_batch  # patients in the last batch
    if max_chunks <= num_rows - 1 or (last_row == patients_per_batch and max_chunks <= num_rows):
        # Full batches except the last: `last_row` long columns, then shorter ones.
        lengths = np.full(patients_per_batch, num_rows - 1, dtype=np.int64)
        lengths[:last_row] += 1
        return lengths[lengths > 0]
    # One patient has too many chunks for ceil(T / P) batches: use one batch per chunk of it.
    num_rows = max(num_rows, max_chunks)
    full, rest = divmod(num_chunks, num_rows)
    return np.array([num_rows] * full + ([rest] if rest else []), dtype=np.int64)


class PatientBatchSampler(Sampler[list[int]]):
    """Batches of P distinct patients x up to K lesions, covering every lesion once per epoch.

    Args:
        patient_ids: (N,) patient id of each dataset row, e.g. ``ds["patient_id"]``.
        patients_per_batch: P, the number of distinct patients per batch (per rank).
        max_lesions_per_patient: K, the most lesions of one patient in one batch.
        labels: (N,) label of each row; only needed for ``include_malignant``.
        seed: base seed; the order of an epoch is a function of ``(seed, epoch)``.
        num_replicas: number of processes; defaults to the torch.distributed world size, else 1.
        rank: this process's rank; defaults to the torch.distributed rank, else 0.
        include_malignant: label-aware mode, see the module docstring. Off by default.
        positive_labels: labels that count as positive for ``include_malignant``.
    """

    def __init__(
        self,
        patient_ids: Sequence,
        patients_per_batch: int,
        max_lesions_per_patient: int,
        labels: Sequence[int] | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        include_malignant: bool = False,
        positive_labels: Sequence[int] = (1,),
    ) -> None:
        if patients_per_batch < 1:
            raise ValueError(f"patients_per_batch must be >= 1, got {patients_per_batch}")
        if max_lesions_per_patient < 1:
            raise ValueError(f"max_lesions_per_patient must be >= 1, got {max_lesions_per_patient}")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        # Patients are grouped by id as everywhere (`schema_slimp.factorize`), but numbered in sorted order, not in
        # order of first appearance: the epoch plan depends on the set of patients and the seed, never on row order.
        codes, uniques = pd.factorize(np.asarray(patient_ids, dtype=object), sort=True)
        if len(codes) == 0:
            raise ValueError("patient_ids is empty")
        if len(uniques) < num_replicas:
            raise ValueError(f"{len(uniques)} patients cannot be split over {num_replicas} replicas")
        self.patient_codes = codes.astype(np.int64)  # (N,)
        self.num_patients = len(uniques)
        self.patients_per_batch = patients_per_batch
        self.max_lesions_per_patient = max_lesions_per_patient
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.include_malignant = include_malignant
        self.is_positive = self._positives(labels, positive_labels) if include_malignant else None
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, rows, offsets)

    def _positives(self, labels: Sequence[int] | None, positive_labels: Sequence[int]) -> np.ndarray:
        """(N,) bool mask of positive rows, with the label-aware warning."""
        if labels is None:
            raise ValueError("include_malignant=True needs `labels`")
        labels = np.asarray(labels)
        if labels.shape != self.patient_codes.shape:
            raise ValueError(f"labels has shape {labels.shape}, patient_ids {self.patient_codes.shape}")
        logger.warning(
            "PatientBatchSampler(include_malignant=True) is label-aware: every chunk of a patient "
            "holds that patient's positive lesions (labels %s), which then repeat within an epoch.",
            list(positive_labels),
        )
        return np.isin(labels, np.asarray(positive_labels))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields; also resets `set_start_batch` to 0."""
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first `start_batch` batches of the current epoch (exact resume from a checkpoint)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Number of batches of one full epoch on this rank (skipped batches included)."""
        return len(self._epoch_plan()[1]) - 1

    def __iter__(self) -> Iterator[list[int]]:
        rows, offsets = self._epoch_plan()
        for i in range(min(self.start_batch, len(offsets) - 1), len(offsets) - 1):
            yield rows[offsets[i] : offsets[i + 1]].tolist()

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's batches of the current epoch: (E,) rows and (B+1,) offsets, cached."""
        if self._cache is None or self._cache[0] != self.epoch:
            rows, offsets = self._build_epoch(self.epoch)
            self._cache = (self.epoch, rows, offsets)
        return self._cache[1], self._cache[2]

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        """Independent random stream `stream` of `(seed, epoch)`, the same on every rank."""
        return np.random.default_rng([self.seed, epoch, stream])

    def _chunks(self, rng: np.random.Generator) -> _Chunks:
        """Shuffle each patient's lesions and split them into near-equal chunks of <= K lesions."""
        codes, K = self.patient_codes, self.max_lesions_per_patient
        n_pos = np.zeros(self.num_patients, dtype=np.int64)
        if self.is_positive is not None:
            n_pos = np.bincount(codes[self.is_positive], minlength=self.num_patients)
        repeat = (n_pos > 0) & (n_pos < K)  # (num_patients,) positives joined to every chunk
        capacity = np.where(repeat, K - n_pos, K)
        # Rows chunked normally: all rows, except the positives of `repeat` patients.
        repeated_rows = np.zeros(len(codes), dtype=bool)
        if self.is_positive is not None:
            repeated_rows = self.is_positive & repeat[codes]
        rows = np.flatnonzero(~repeated_rows)
        rows = rows[np.lexsort((rng.random(len(rows)), codes[rows]))]  # by patient, shuffled within
        counts = np.bincount(codes[rows], minlength=self.num_patients)
        patient_chunks = np.maximum(1, -(-counts // capacity))  # ceil; >= 1 for positives-only patients
        first_chunk = np.concatenate([[0], np.cumsum(patient_chunks)[:-1]])
        chunk = first_chunk[codes[rows]] + _within(counts) % patient_chunks[codes[rows]]
        if repeated_rows.any():
            pos_rows = np.flatnonzero(repeated_rows)
            copies = patient_chunks[codes[pos_rows]]  # one copy of each positive per chunk
            pos_rows = np.repeat(pos_rows, copies)
            pos_chunk = first_chunk[codes[pos_rows]] + _within(copies)
            rows, chunk = np.concatenate([rows, pos_rows]), np.concatenate([chunk, pos_chunk])
        return _Chunks(rows, chunk, patient_chunks)

    def _patient_ranks(self, patient_chunks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(num_patients,) rank of each patient: snake order over patients sorted by chunk count."""
        R = self.num_replicas
        order = np.lexsort((rng.random(self.num_patients), -patient_chunks))
        k = np.arange(self.num_patients)
        snake = np.where((k // R) % 2 == 0, k % R, R - 1 - k % R)
        ranks = np.empty(self.num_patients, dtype=np.int64)
        ranks[order] = rng.permutation(R)[snake]
        return ranks

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Build this rank's batches for `epoch`: (E,) dataset rows and (B+1,) batch offsets."""
        chunks = self._chunks(self._rng(epoch, 0))
        patient_rank = self._patient_ranks(chunks.patient_chunks, self._rng(epoch, 1))
        num_batches = self._num_batches_per_rank(chunks.patient_chunks, patient_rank)
        rank_rng = self._rng(epoch, 2 + self.rank)
        rows, offsets = self._rank_batches(chunks, patient_rank == self.rank, rank_rng)
        own = len(offsets) - 1
        order = np.arange(num_batches.max()) % max(own, 1)  # pad by cycling from the start
        starts, sizes = offsets[order], np.diff(offsets)[order]
        take = np.repeat(starts, sizes) + _within(sizes)
        return rows[take], np.concatenate([[0], np.cumsum(sizes)])

    def _num_batches_per_rank(self, patient_chunks: np.ndarray, patient_rank: np.ndarray) -> np.ndarray:
        """(R,) number of batches each rank has before equalisation."""
        counts = []
        for r in range(self.num_replicas):
            mine = patient_chunks[patient_rank == r]
            lengths = _grid_columns(int(mine.sum()), int(mine.max()), self.patients_per_batch)
            counts.append(int(lengths[0]) if len(lengths) else 0)  # the first column is the longest: B rows
        return np.array(counts)

    def _rank_batches(
        self, chunks: _Chunks, patient_mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lay out the chunks of the patients in `patient_mask` into batches (see module docstring).

        Returns:
            rows: (E_r,) dataset rows, batch by batch, grouped by patient inside a batch.
            offsets: (B_r + 1,) start of each batch in `rows`.
        """
        patients = np.flatnonzero(patient_mask)
        patients = patients[rng.permutation(len(patients))]
        n_chunks = chunks.patient_chunks[patients]
        first = np.concatenate([[0], np.cumsum(chunks.patient_chunks)[:-1]])[patients]
        # Chunk ids in grid order: patient by patient, each patient's chunks consecutively.
        grid_chunks = np.repeat(first, n_chunks) + _within(n_chunks)
        lengths = _grid_columns(len(grid_chunks), int(n_chunks.max()), self.patients_per_batch)
        column, row = np.repeat(np.arange(len(lengths)), lengths), _within(lengths)
        sizes = np.bincount(row, minlength=lengths[0])
        # Shuffle batches, full ones first; `batch_of_row[r]` is grid row r's position in the epoch.
        batch_order = np.lexsort((rng.random(len(sizes)), -sizes))
        batch_of_row = np.empty_like(batch_order)
        batch_of_row[batch_order] = np.arange(len(sizes))
        num_chunks = int(chunks.patient_chunks.sum())  # all ranks' chunks; other ranks' stay -1
        chunk_batch = np.full(num_chunks, -1, dtype=np.int64)
        chunk_slot = np.zeros(num_chunks, dtype=np.int64)
        chunk_batch[grid_chunks], chunk_slot[grid_chunks] = batch_of_row[row], column
        entry_batch = chunk_batch[chunks.chunk]
        keep = entry_batch >= 0
        order = np.flatnonzero(keep)
        order = order[np.lexsort((chunk_slot[chunks.chunk[order]], entry_batch[order]))]
        counts = np.bincount(entry_batch[order], minlength=len(sizes))
        return chunks.rows[order], np.concatenate([[0], np.cumsum(counts)])


def patient_batches(patient_codes, batch_size: int) -> list[list[int]]:
    """Evaluation batches: row indices packed into batches of at most `batch_size` rows without splitting a
    patient (a patient with more rows than that is split into consecutive batches of its own), patients in the
    order of their codes, rows in order. `patient_codes` (N,): each row's patient, numbered 0 .. P-1 (e.g.
    `EncodedMetadata.patient_codes`)."""
    codes = np.asarray(patient_codes)
    order = np.argsort(codes, kind="stable")  # grouped by patient, rows in order within each
    starts = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1]]) if len(codes) else np.zeros(0, int)
    batches, current = [], []
    for rows in np.split(order, starts[1:]) if len(codes) else []:
        rows = rows.tolist()
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


class PatientChunks(torch.utils.data.Dataset):
    """A dataset of whole patients: item i is the list of rows of one patient, or of one near-equal chunk
    of at most `max_lesions_per_patient` lesions of a larger one (`schema_slimp.near_equal_chunks`, as `PatientBatchSampler` cuts them).

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
