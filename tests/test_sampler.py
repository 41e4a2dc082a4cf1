"""Tests for training.data.sampler.PatientBatchSampler."""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import pytest

from training.data.sampler import PatientBatchSampler


def make_patient_ids(sizes: list[int], seed: int = 0) -> list[str]:
    """Row-level patient ids for patients with `sizes` lesions, rows shuffled."""
    ids = np.repeat([f"p{i:03d}" for i in range(len(sizes))], sizes)
    np.random.default_rng(seed).shuffle(ids)
    return ids.tolist()


def check_batches(batches: list[list[int]], patient_ids: list[str], P: int, K: int) -> None:
    """Each batch: distinct patients (one chunk each: at most P patients, at most K lesions each)."""
    for batch in batches:
        assert len(batch) == len(set(batch)), "a lesion repeated inside a batch"
        per_patient = Counter(patient_ids[i] for i in batch)
        assert len(per_patient) <= P
        assert max(per_patient.values()) <= K


SIZES = [1, 2, 3, 4, 5, 9, 13, 1, 1, 7, 2, 20, 4, 4, 6]  # ragged, several patients above K=4


def test_batches_hold_distinct_patients_and_cover_every_lesion_once():
    ids, P, K = make_patient_ids(SIZES), 4, 4
    sampler = PatientBatchSampler(ids, patients_per_batch=P, max_lesions_per_patient=K, seed=3)
    batches = list(sampler)
    check_batches(batches, ids, P, K)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ids)))
    patients = [len({ids[i] for i in b}) for b in batches]
    assert patients[:-1] == [P] * (len(batches) - 1), "all batches but the last should be full"


def test_chunks_are_near_equal_and_batches_ragged():
    ids = make_patient_ids([9, 1, 2, 1])  # 9 lesions, K=4 -> chunks of 3, 3, 3 (not 4, 4, 1)
    batches = list(PatientBatchSampler(ids, patients_per_batch=2, max_lesions_per_patient=4))
    chunk_sizes = sorted(n for b in batches for p, n in Counter(ids[i] for i in b).items() if p == "p000")
    assert chunk_sizes == [3, 3, 3]
    assert len({len(b) for b in batches}) > 1


def test_patient_with_more_chunks_than_batches_gives_balanced_batches():
    ids, P, K = make_patient_ids([40, 2, 2, 2, 6, 8]), 4, 2  # 20 chunks of p000, 30 chunks in all
    batches = list(PatientBatchSampler(ids, patients_per_batch=P, max_lesions_per_patient=K))
    check_batches(batches, ids, P, K)
    assert len(batches) == 20
    assert sorted(len({ids[i] for i in b}) for b in batches) == [1] * 10 + [2] * 10
    assert sorted(i for b in batches for i in b) == list(range(len(ids)))


@pytest.mark.parametrize("trial", range(30))
def test_invariants_on_random_configurations(trial):
    rng = np.random.default_rng(trial)
    sizes = rng.integers(1, 12, size=rng.integers(2, 25)).tolist()
    P, K, R = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 3))
    ids = make_patient_ids(sizes, seed=trial)
    samplers = [PatientBatchSampler(ids, P, K, seed=trial, num_replicas=R, rank=r) for r in range(R)]
    per_rank = [list(s) for s in samplers]
    for batches in per_rank:
        check_batches(batches, ids, P, K)
    assert len({len(b) for b in per_rank}) == 1
    assert set(i for batches in per_rank for b in batches for i in b) == set(range(len(ids)))


def test_order_is_a_function_of_seed_and_epoch():
    ids = make_patient_ids(SIZES)
    first = PatientBatchSampler(ids, 4, 4, seed=1)
    second = PatientBatchSampler(ids, 4, 4, seed=1)
    assert list(first) == list(second)
    epoch0 = list(first)
    first.set_epoch(1)
    second.set_epoch(1)
    assert list(first) == list(second) != epoch0
    assert list(PatientBatchSampler(ids, 4, 4, seed=2)) != epoch0


def test_two_ranks_get_disjoint_patients_and_equal_batch_counts():
    sizes = [12, 1, 1, 2, 2, 3, 3, 4, 5, 6, 1, 1, 1]  # a big patient unbalances a naive split
    ids = make_patient_ids(sizes)
    ranks = [PatientBatchSampler(ids, 2, 4, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(3):
        for s in ranks:
            s.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        patients = [{ids[i] for b in rank_batches for i in b} for rank_batches in batches]
        assert not patients[0] & patients[1]
        assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == len(ranks[1]) > 0
        # padded: every lesion is seen
        assert {i for rank_batches in batches for b in rank_batches for i in b} == set(range(len(ids)))


@pytest.mark.parametrize("n", [0, 1, 4, 100])
def test_resume_continues_exactly(n):
    ids = make_patient_ids(SIZES)
    fresh = PatientBatchSampler(ids, 3, 4, seed=5)
    fresh.set_epoch(2)
    full = list(fresh)
    resumed = PatientBatchSampler(ids, 3, 4, seed=5)
    resumed.set_epoch(2)
    resumed.set_start_batch(n)
    assert full[:n] + list(resumed) == full
    assert len(resumed) == len(full)
    resumed.set_epoch(3)  # a new epoch starts from its first batch
    assert len(list(resumed)) == len(resumed)


def test_include_malignant_puts_positives_in_every_chunk(caplog):
    sizes = [10, 3, 5, 2]
    ids = make_patient_ids(sizes)
    labels = np.zeros(len(ids), dtype=int)
    p0 = [i for i, p in enumerate(ids) if p == "p000"]
    labels[p0[:2]] = 1  # two positives of p000: 8 negatives chunked 2 per chunk (K - 2)
    with caplog.at_level(logging.WARNING, logger="training.data.sampler"):
        sampler = PatientBatchSampler(ids, 2, 4, labels=labels, include_malignant=True)
    assert "label-aware" in caplog.text
    batches = list(sampler)
    check_batches(batches, ids, 2, 4)
    chunks_of_p0 = [{i for i in b if ids[i] == "p000"} for b in batches if any(ids[i] == "p000" for i in b)]
    assert len(chunks_of_p0) == 4
    assert all(set(p0[:2]) <= chunk for chunk in chunks_of_p0)
    seen = Counter(i for b in batches for i in b)
    assert set(seen) == set(range(len(ids)))
    assert {seen[i] for i in p0[:2]} == {4} and {seen[i] for i in p0[2:]} == {1}


def test_include_malignant_is_off_by_default_and_needs_labels(caplog):
    ids = make_patient_ids(SIZES)
    with caplog.at_level(logging.WARNING, logger="training.data.sampler"):
        PatientBatchSampler(ids, 2, 4, labels=[1] * len(ids))
    assert "label-aware" not in caplog.text
    with pytest.raises(ValueError, match="labels"):
        PatientBatchSampler(ids, 2, 4, include_malignant=True)


def test_epoch_of_isic2024_size_builds_fast():
    rng = np.random.default_rng(0)
    sizes = np.maximum(1, rng.lognormal(5.0, 1.3, size=1042) / 0.9).astype(int)  # ~400k rows
    codes = np.repeat(np.arange(len(sizes)), sizes)
    sampler = PatientBatchSampler(codes, 16, 32)
    start = time.perf_counter()
    batches = list(sampler)
    elapsed = time.perf_counter() - start
    assert sum(len(b) for b in batches) == len(codes) > 300_000
    assert elapsed < 1.5, f"building an epoch took {elapsed:.2f} s"
