"""Patient context and whole-patient pooling (modeling_slimp/pooling.py, training/embeddings.py), and the
ISIC 2024 patient-level metric against a hand-computed case."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessorPil

from conftest import IMAGE_SIZE, tiny_config
from modeling_slimp import PatientSums, SLIMPForLesionClassification, SLIMPModel, SLIMPProcessor
from training.data.collate import DecodingCollator
from modeling_slimp.pooling import patient_context as context_of
from training.embeddings import embed_split, predict_split
from training.metrics import top_k_sensitivity


def loop_context(values: torch.Tensor, patients: list) -> torch.Tensor:
    """The definition, one lesion at a time: the lesion minus the mean of the same patient's other lesions,
    zero for a patient with a single lesion."""
    rows = []
    for i, patient in enumerate(patients):
        others = [j for j, p in enumerate(patients) if p == patient and j != i]
        rows.append(values[i] - values[others].mean(dim=0) if others else torch.zeros_like(values[i]))
    return torch.stack(rows)


def test_context_equals_a_per_patient_loop():
    generator = torch.Generator().manual_seed(0)
    patients = [3, 0, 3, 1, 3, 2, 0, 3, 4]  # interleaved; patients 1, 2 and 4 have one lesion each
    values = torch.randn(len(patients), 5, generator=generator, dtype=torch.float64)
    codes = torch.tensor(patients)
    torch.testing.assert_close(context_of(values, codes), loop_context(values, patients), rtol=0, atol=1e-12)
    assert torch.equal(context_of(values, codes)[3], torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("attention", [False, True])
def test_patient_sums_added_in_batches_equal_one_batch(attention):
    """Sums filled 64 lesions at a time (any order of batches) give the mean, the attention pooling and the
    context of one batch holding every lesion."""
    generator = torch.Generator().manual_seed(1)
    codes = torch.cat([torch.zeros(600, dtype=torch.long), torch.randint(1, 6, (90,), generator=generator)])
    codes = codes[torch.randperm(len(codes), generator=generator)]
    values, scores = torch.randn(len(codes), 8, generator=generator), 3 * torch.randn(len(codes), generator=generator)
    whole = PatientSums(6, 8, attention=attention).add(values, codes, scores if attention else None)
    parts = PatientSums(6, 8, attention=attention)
    for start in reversed(range(0, len(codes), 64)):
        rows = slice(start, start + 64)
        parts.add(values[rows], codes[rows], scores[rows] if attention else None)
    torch.testing.assert_close(parts.mean(), whole.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.context(values, codes), whole.context(values, codes), rtol=1e-5, atol=1e-5)
    if attention:
        torch.testing.assert_close(parts.attention_pool(), whole.attention_pool(), rtol=1e-5, atol=1e-6)
        weights = torch.softmax(scores[codes == 0], dim=0)
        torch.testing.assert_close(whole.attention_pool()[0], (weights[:, None] * values[codes == 0]).sum(0), rtol=1e-5, atol=1e-6)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_patient_split() -> datasets.Dataset:
    """A 600-lesion patient among six small ones, rows interleaved as a converted split would not be."""
    rng = np.random.default_rng(0)
    patients = ["IP_BIG"] * 600 + [f"IP_{i}" for i in rng.integers(0, 6, size=60)]
    order = rng.permutation(len(patients))
    rows = {"image": [{"bytes": png(int(i)), "path": None} for i in order],
            "image_id": [f"ISIC_{i:07d}" for i in order], "patient_id": [patients[i] for i in order],
            "label": [int(i % 50 == 0) for i in order],
            "clin_size_long_diam_mm": rng.normal(4, 1, size=len(order)).tolist(),
            "age_approx": [55.0 if patients[i] == "IP_BIG" else 40.0 for i in order],
            "sex": ["male"] * len(order)}
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                  "patient_id": datasets.Value("string"), "label": datasets.ClassLabel(names=["b", "m"]),
                                  "clin_size_long_diam_mm": datasets.Value("float64"),
                                  "age_approx": datasets.Value("float64"), "sex": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize("aggregation", ["mean", "attention"])
def test_whole_patient_phenotype_and_context_do_not_depend_on_the_batch_size(big_patient_split, aggregation):
    """The 600-lesion patient is cut over ten batches of 64 lesions, or held in one of 2,048: the same
    phenotype for every one of its lesions, the same patient context, the same classifier logits."""
    torch.manual_seed(0)
    config = tiny_config(patient_aggregation=aggregation, feature_dropout=0.0)
    processor = SLIMPProcessor(ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), config)
    collator = DecodingCollator(processor, train=False)
    model = SLIMPModel(config).eval()
    small, large = (embed_split(model, big_patient_split, collator, batch_size=size) for size in (64, 2048))
    big = np.asarray(big_patient_split["patient_id"]) == "IP_BIG"
    np.testing.assert_allclose(small["projection"]["phenotype"], large["projection"]["phenotype"], rtol=1e-4, atol=1e-5)
    phenotype = large["projection"]["phenotype"]
    assert np.allclose(phenotype[big], phenotype[big][0], atol=1e-6)  # one phenotype per patient
    for name in ("image", "lesion"):
        codes = torch.from_numpy(small["patient_codes"])
        np.testing.assert_allclose(context_of(torch.from_numpy(small["tower"][name]).double(), codes).numpy(),
                                   context_of(torch.from_numpy(large["tower"][name]).double(), codes).numpy(), rtol=1e-4, atol=1e-5)

    config.classifier_features, config.num_labels = "image+lesion+patient+context", 2
    classifier = SLIMPForLesionClassification(config).eval()
    logits = [predict_split(classifier, big_patient_split, collator, batch_size=size)[0] for size in (64, 2048)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def test_top15_sensitivity_against_a_hand_computed_case():
    """Patient A: 20 lesions, malignant ones ranked 3rd and 17th -> 1/2 found. Patient B: 5 lesions, its one
    malignant lesion ranked last, still in the top 15 -> 1. Patient C: no malignant lesion, not counted.
    Patient D: 16 tied scores, one malignant -> 15/16 found in expectation (ties neither help nor hurt)."""
    y, score, patient = [], [], []
    for rank in range(20):  # A: scores 20 .. 1, rank r has score 20 - r
        y.append(int(rank in (2, 16)))
        score.append(20.0 - rank)
        patient.append("A")
    for rank in range(5):
        y.append(int(rank == 4))
        score.append(5.0 - rank)
        patient.append("B")
    for rank in range(7):
        y.append(0)
        score.append(float(rank))
        patient.append("C")
    for rank in range(16):
        y.append(int(rank == 0))
        score.append(0.5)
        patient.append("D")
    result = top_k_sensitivity(y, score, patient, k=15)
    assert result["patients"] == 3
    assert result["sensitivity"] == pytest.approx((0.5 + 1.0 + 15 / 16) / 3)
    assert result["found_fraction"] == pytest.approx((1 + 1 + 15 / 16) / 4)
    assert top_k_sensitivity(y, score, patient, k=1)["sensitivity"] == pytest.approx((0 + 0 + 1 / 16) / 3)
