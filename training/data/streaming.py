"""Patient-grouped batches from a `datasets` stream, for data that does not fit on one machine.

    stream, _ = load_slimp_dataset("data/isic2024", "train", streaming=True, num_shards=64)
    batches = StreamingPatientBatches(stream, collator, patients_per_batch=16, max_lesions_per_patient=8,
                                      rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = DataLoader(batches, batch_size=None, num_workers=1)

Converted splits are patient-contiguous (training/prepare_data.py writes each split ordered by
patient), so consecutive rows of one `patient_id` are one patient. Each process reads its own shards
(`datasets.distributed.split_dataset_by_node`), groups rows into patients, cuts each patient into
chunks of at most K lesions, draws chunks from a shuffle buffer and emits batches of P chunks of
distinct patients. A patient cut by a shard boundary becomes two partial patients; with shards of
thousands of rows that is rare, and the shard count is yours to choose.

The stream repeats epoch after epoch (the stream's own `IterableDataset.set_epoch` reshuffles the shard
order, and the buffer's order is a function of (seed, epoch, rank)), so the iterator never ends: every process takes
exactly one batch per micro-step, whatever its shards hold, and a run resumes exactly by skipping the
number of batches it had consumed (`set_start_batch`; skipped batches are grouped but not decoded).
Exact resume holds with `num_workers` <= 1 (one producer per process).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

import datasets
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset

from modeling_slimp.schema_slimp import near_equal_chunks


def patient_chunks(rows: Iterator[dict], patient_column: str, max_lesions: int) -> Iterator[list[dict]]:
    """Consecutive rows of one patient, cut into near-equal chunks of at most `max_lesions` (the sampler's rule)."""
    for _, group in itertools.groupby(rows, key=lambda row: row[patient_column]):
        yield from near_equal_chunks(list(group), max_lesions)


class StreamingPatientBatches(IterableDataset):
    """An endless iterator of collated batches of P distinct patients x up to K lesions from a stream.

    Args:
        stream: one split as a `datasets.IterableDataset` (rows patient-contiguous).
        collator: turns a list of rows into a batch (`SLIMPCollator`); its epoch is kept in step.
        patients_per_batch, max_lesions_per_patient: P and K.
        rank, world_size: this process and the number of processes (shards are split between them).
        seed: order of the shuffle buffer.
        buffer_chunks: patient chunks held for shuffling (memory: buffer_chunks x K rows, undecoded).
        patient_column: the patient id column.
    """

    def __init__(self, stream: datasets.IterableDataset, collator: Callable, patients_per_batch: int,
                 max_lesions_per_patient: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 buffer_chunks: int = 256, patient_column: str = "patient_id") -> None:
        if world_size > 1 and stream.num_shards % world_size:
            # Otherwise split_dataset_by_node deals out rows one by one and cuts patients apart.
            raise ValueError(f"the stream has {stream.num_shards} shards for {world_size} processes: the shard count "
                             "must be a multiple of the number of processes (load_slimp_dataset(..., num_shards=...))")
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
        self.collator = collator
        self.patients_per_batch, self.max_lesions = patients_per_batch, max_lesions_per_patient
        self.rank, self.seed, self.buffer_chunks, self.patient_column = rank, seed, buffer_chunks, patient_column
        self.start_batch = 0

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first `start_batch` batches of the run (exact resume)."""
        self.start_batch = start_batch

    def _epoch_batches(self, epoch: int) -> Iterator[list[dict]]:
        self.stream.set_epoch(epoch)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        buffer: list[list[dict]] = []
        chunks = patient_chunks(iter(self.stream), self.patient_column, self.max_lesions)
        exhausted = False
        while buffer or not exhausted:
            while not exhausted and len(buffer) < self.buffer_chunks:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                else:
                    buffer.append(chunk)
            rng.shuffle(buffer)
            batch, patients, rest = [], set(), []
            for chunk in buffer:
                patient = chunk[0][self.patient_column]
                if len(patients) < self.patients_per_batch and patient not in patients:
                    patients.add(patient)
                    batch.extend(chunk)
                else:
                    rest.append(chunk)
            buffer = rest
            yield batch

    def __iter__(self):
        consumed = 0
        for epoch in itertools.count():
            if hasattr(self.collator, "set_epoch"):
                self.collator.set_epoch(epoch)
            produced = 0
            for rows in self._epoch_batches(epoch):
                produced += 1
                consumed += 1
                if consumed > self.start_batch:
                    yield self.collator(rows)
            if produced == 0:
                raise ValueError(f"process {self.rank} received no rows from the stream: give it more shards")


__all__ = ["patient_chunks", "StreamingPatientBatches"]
