"""training/data/streaming.py: patient-grouped batches from a datasets stream, split between processes."""

from __future__ import annotations

from collections import Counter

import pytest

from training import prepare_data, pretrain
from training.data.dataset import load_slimp_dataset
from training.data.streaming import StreamingPatientBatches, patient_chunks
from _synthetic_fixtures import TINY_SYNTHETIC  # noqa: E402


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("stream") / "synthetic"
    prepare_data.main(["synthetic", *TINY_SYNTHETIC, "--patients", "14", "--seed", "2", "--image-size", "32", "--output-dir", str(out)])
    return str(out)


def ids_of(rows: list[dict]) -> list[str]:
    return [row["image_id"] for row in rows]


def test_converted_splits_are_patient_contiguous(dataset_dir):
    train, _ = load_slimp_dataset(dataset_dir, "train")
    patients = train["patient_id"]
    runs = 1 + sum(a != b for a, b in zip(patients, patients[1:]))
    assert runs == len(set(patients))


def test_patient_chunks_split_long_patients_evenly():
    rows = [{"patient_id": p, "i": i} for i, p in enumerate("aaaaabbc")]
    chunks = list(patient_chunks(iter(rows), "patient_id", 2))
    assert [len(c) for c in chunks] == [2, 2, 1, 2, 1]  # 5 lesions with K=2: 2 + 2 + 1 (near-equal, as the sampler)
    assert [r["i"] for c in chunks for r in c] == list(range(8))


def test_two_processes_get_disjoint_patients_and_every_lesion_once_per_epoch(dataset_dir):
    stream, _ = load_slimp_dataset(dataset_dir, "train", streaming=True, num_shards=2)
    assert stream.num_shards == 2
    identity = lambda rows: rows  # noqa: E731 - rows themselves, to inspect the batching
    seen: dict[int, list[dict]] = {}
    for rank in range(2):
        batches = StreamingPatientBatches(stream, identity, patients_per_batch=3, max_lesions_per_patient=4,
                                          rank=rank, world_size=2, seed=0)
        epoch = list(batches._epoch_batches(0))
        for batch in epoch:
            patients = [row["patient_id"] for row in batch]
            assert len(set(patients)) <= 3
            assert max(Counter(patients).values()) <= 4, "at most K lesions of a patient per batch"
        seen[rank] = [row for batch in epoch for row in batch]
    train, _ = load_slimp_dataset(dataset_dir, "train")
    assert sorted(ids_of(seen[0] + seen[1])) == sorted(train["image_id"]), "every lesion exactly once"
    assert not {r["patient_id"] for r in seen[0]} & {r["patient_id"] for r in seen[1]}


def test_shards_are_cut_at_patient_boundaries_and_must_divide_between_processes(dataset_dir):
    from training.data.dataset import patient_shard_ranges

    assert patient_shard_ranges(list("aaaaabbbccdddddeef"), 4) == [(0, 5), (5, 10), (10, 15), (15, 18)]
    assert patient_shard_ranges(list("aaaaaaaaab"), 4) == [(0, 9), (9, 10)]  # fewer patients than shards
    stream, _ = load_slimp_dataset(dataset_dir, "train", streaming=True, num_shards=3)
    assert stream.num_shards == 3
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        StreamingPatientBatches(stream, ids_of, 2, 3, rank=0, world_size=2)


def test_stream_is_endless_deterministic_and_resumes_exactly(dataset_dir):
    stream, _ = load_slimp_dataset(dataset_dir, "train", streaming=True, num_shards=2)
    make = lambda: StreamingPatientBatches(stream, ids_of, 2, 3, seed=5)  # noqa: E731
    per_epoch = len(list(make()._epoch_batches(0)))
    first = [batch for _, batch in zip(range(per_epoch + 3), make())]  # runs into the second epoch
    assert first == [batch for _, batch in zip(range(per_epoch + 3), make())]
    resumed = make()
    resumed.set_start_batch(per_epoch - 1)
    assert [batch for _, batch in zip(range(4), resumed)] == first[per_epoch - 1 :]


def test_pretrain_streaming_runs_and_needs_max_steps(dataset_dir, tmp_path):
    args = ["--dataset_dir", dataset_dir, "--output_dir", str(tmp_path / "out"), "--streaming", "true", "--stream_shards", "2",
            "--image_size", "32", "--patients_per_batch", "3", "--max_lesions_per_patient", "4", "--num_workers", "0",
            "--eval_steps", "0", "--save_steps", "0", "--linear_probe", "false", "--warmup_steps", "1"]
    result = pretrain.main(args + ["--max_steps", "3"])
    assert result["global_step"] == 3 and (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="--max_steps"):
        pretrain.main(args + ["--max_steps", "0"])
