"""Tests for training.collate: augmentations, SLIMPCollator, and a DataLoader with the patient sampler."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import ViTImageProcessor

from conftest import tiny_config
from modeling_slimp import SLIMPProcessor
from training.collate import AugmentationConfig, SLIMPCollator, TrainAugmentation, random_resized_crop
from training.sampler import PatientBatchSampler

SIZE = (30, 26)  # (height, width), deliberately odd and non-square


@pytest.fixture(scope="module")
def processor() -> SLIMPProcessor:
    return SLIMPProcessor(ViTImageProcessor(size={"height": SIZE[0], "width": SIZE[1]}), config=tiny_config())


def lesion_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A random-noise image of `size` (width, height) in `mode`."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_row(index: int, patient: str, image=None) -> dict:
    """A dataset row in the shared layout (image, ids, label, raw metadata columns)."""
    return {
        "image": image if image is not None else lesion_image(index),
        "image_id": f"ISIC_{index:07d}",
        "patient_id": patient,
        "label": index % 3,
        "clin_size_long_diam_mm": 3.0 + index,
        "tbp_lv_areaMM2": float("nan"),
        "anatom_site_general": "posterior torso" if index % 2 else None,
        "age_approx": 40.0 if patient == "IP_A" else 65.0,
        "sex": "female" if patient == "IP_A" else "male",
    }


def test_eval_batch_has_processor_keys_labels_and_patient_index(processor):
    images = [lesion_image(0, mode="L"), lesion_image(1, (20, 60), "RGBA"), lesion_image(2, mode="P"),
              lesion_image(3), lesion_image(4, (17, 17))]
    rows = [make_row(i, patient, image) for i, (patient, image) in
            enumerate(zip(["IP_B", "IP_A", "IP_B", "IP_A", "IP_B"], images))]
    batch = SLIMPCollator(processor, train=False)(rows)
    assert set(batch) == {"pixel_values", "lesion_numerical_values", "lesion_categorical_ids", "patient_index",
                          "patient_numerical_values", "patient_categorical_ids", "labels"}
    assert batch["pixel_values"].shape == (5, 3, *SIZE)
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1]
    assert batch["patient_index"].tolist() == [0, 1, 0, 1, 0]  # patients in order of first appearance
    assert batch["patient_numerical_values"][:, 0].tolist() == [65.0, 40.0]
    assert batch["lesion_numerical_values"][:, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_eval_transform_is_the_processor_resize_and_deterministic(processor):
    rows = [make_row(i, "IP_A") for i in range(3)]
    collator = SLIMPCollator(processor, train=False)
    first = collator(rows)["pixel_values"]
    assert torch.equal(first, collator(rows)["pixel_values"])
    expected = processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]
    assert torch.equal(first, expected)


def test_train_transform_varies_is_reproducible_and_stays_in_range(processor):
    rows = [make_row(i, "IP_A") for i in range(4)]
    collator = SLIMPCollator(processor, train=True)
    first = collator(rows)["pixel_values"]
    second = collator(rows)["pixel_values"]
    assert first.shape == (4, 3, *SIZE)
    assert not torch.allclose(first, second)
    for values in (first, second):  # ViT normalisation (mean 0.5, std 0.5) maps [0, 1] to [-1, 1]
        assert torch.isfinite(values).all() and values.min() >= -1.0 - 1e-5 and values.max() <= 1.0 + 1e-5
    replay = [collator(rows, generator=torch.Generator().manual_seed(7))["pixel_values"] for _ in range(2)]
    assert torch.equal(replay[0], replay[1])
    seeded = [SLIMPCollator(processor, train=True, seed=3) for _ in range(2)]
    assert torch.equal(seeded[0](rows)["pixel_values"], seeded[1](rows)["pixel_values"])


def test_seeded_augmentations_depend_only_on_seed_epoch_and_image(processor):
    """What exact resume and multi-process equivalence rely on: no hidden stream state, and an image's
    augmentation does not depend on the batch it is collated in."""
    rows = [make_row(i, "IP_A") for i in range(3)]
    collator = SLIMPCollator(processor, train=True, seed=3)
    first = collator(rows)["pixel_values"]
    collator([make_row(i, "IP_B") for i in range(5, 8)])  # another batch in between changes nothing
    assert torch.equal(collator(rows)["pixel_values"], first)
    mixed = collator([make_row(9, "IP_C"), rows[1]])["pixel_values"]  # same image, other batch
    assert torch.equal(mixed[1], first[1])
    collator.set_epoch(1)
    assert not torch.allclose(collator(rows)["pixel_values"], first)
    other_seed = SLIMPCollator(processor, train=True, seed=4)
    assert not torch.allclose(other_seed(rows)["pixel_values"], first)


def test_two_views_differ(processor):
    rows = [make_row(i, "IP_A") for i in range(3)]
    batch = SLIMPCollator(processor, train=True, two_views=True)(rows)
    assert batch["ssl_pixel_values"].shape == batch["pixel_values"].shape == (3, 3, *SIZE)
    assert not torch.allclose(batch["ssl_pixel_values"], batch["pixel_values"])
    with pytest.raises(ValueError, match="train"):
        SLIMPCollator(processor, train=False, two_views=True)


def test_disabled_augmentation_is_a_plain_resize():
    image = lesion_image(5, (40, 40))
    off = AugmentationConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, rotate90=False,
                             max_degrees=0.0, jitter_p=0.0)
    out = TrainAugmentation((20, 20), off)(image, torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((20, 20), Image.Resampling.BILINEAR)))


def test_random_resized_crop_size_and_bounds():
    image = lesion_image(6, (50, 20))
    generator = torch.Generator().manual_seed(0)
    crops = [random_resized_crop(image, (12, 9), (0.2, 1.0), (3 / 4, 4 / 3), generator) for _ in range(20)]
    assert {crop.size for crop in crops} == {(9, 12)}
    assert len({crop.tobytes() for crop in crops}) > 1
    fallback = random_resized_crop(image, (8, 8), (1.0, 1.0), (1.0, 1.0), generator)  # no box fits: centre
    assert np.array_equal(np.asarray(fallback), np.asarray(image.resize((8, 8), Image.Resampling.BILINEAR, box=(15, 0, 35, 20))))


def test_undecodable_image_names_its_image_id(processor):
    rows = [make_row(0, "IP_A"), make_row(1, "IP_A", image={"bytes": b"not an image", "path": None})]
    with pytest.raises(ValueError, match="ISIC_0000001"):
        SLIMPCollator(processor, train=False)(rows)
    rows[1]["image"] = {"bytes": png_bytes(lesion_image(1)), "path": None}  # undecoded bytes work
    assert SLIMPCollator(processor, train=False)(rows)["pixel_values"].shape == (2, 3, *SIZE)


def test_dataloader_with_workers_and_patient_sampler(processor):
    datasets = pytest.importorskip("datasets")
    patients = ["IP_A"] * 5 + ["IP_B"] * 2 + ["IP_C"] * 3 + ["IP_D"]
    rows = [make_row(i, p, image={"bytes": png_bytes(lesion_image(i)), "path": None}) for i, p in enumerate(patients)]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    features = datasets.Features({
        "image": datasets.Image(decode=False), "image_id": datasets.Value("string"),
        "patient_id": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c"]),
        "clin_size_long_diam_mm": datasets.Value("float64"), "tbp_lv_areaMM2": datasets.Value("float64"),
        "anatom_site_general": datasets.Value("string"), "age_approx": datasets.Value("float64"),
        "sex": datasets.Value("string"),
    })
    dataset = datasets.Dataset.from_dict(columns, features=features)
    sampler = PatientBatchSampler(dataset["patient_id"], patients_per_batch=2, max_lesions_per_patient=3, seed=0)

    def run() -> list:
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=SLIMPCollator(processor, train=True),
                            num_workers=2, generator=torch.Generator().manual_seed(0))
        return list(loader)

    batches, again = run(), run()
    assert len(batches) == len(sampler)
    for batch, indices, replay in zip(batches, sampler, again):
        assert torch.equal(batch["pixel_values"], replay["pixel_values"])
        assert batch["labels"].tolist() == [i % 3 for i in indices]
        ids = [patients[i] for i in indices]
        expected = [list(dict.fromkeys(ids)).index(p) for p in ids]
        assert batch["patient_index"].tolist() == expected
        assert batch["patient_numerical_values"].shape[0] == len(set(ids)) <= 2
    assert sum(len(b["labels"]) for b in batches) == len(dataset)
