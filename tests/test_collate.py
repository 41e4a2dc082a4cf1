"""Tests for training.data.collate (decode + resize + metadata in the workers, augment + normalise on the device)
and training.data.augment (the batched tensor augmentations)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import ViTImageProcessorPil

from conftest import tiny_config
from modeling_slimp import SLIMPProcessor
from training.data.augment import PARAMETERS, AugmentationConfig, augment, color_jitter, draw_parameters, gaussian_blur
from training.data.collate import BatchTransform, ColumnBatches, EncodedMetadata, DecodingCollator
from training.data.sampler import PatientBatchSampler

SIZE = (30, 26)  # (height, width), deliberately odd and non-square
IDENTITY = dict(center_x=0.0, center_y=0.0, width=1.0, height=1.0, flip_x=1.0, flip_y=1.0, angle=0.0, brightness=1.0,
                contrast=1.0, saturation=1.0, hue=0.0, blur_sigma=0.0)


@pytest.fixture(scope="module")
def processor() -> SLIMPProcessor:
    return SLIMPProcessor(ViTImageProcessorPil(size={"height": SIZE[0], "width": SIZE[1]}), config=tiny_config())


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


def parameters(**overrides) -> torch.Tensor:
    values = {**IDENTITY, **overrides}
    return torch.tensor([[values[name] for name in PARAMETERS]])


# ----- the collator (worker side) -----


def test_eval_batch_holds_uint8_images_metadata_labels_and_patient_index(processor):
    images = [lesion_image(0, mode="L"), lesion_image(1, (20, 60), "RGBA"), lesion_image(2, mode="P"),
              lesion_image(3), lesion_image(4, (17, 17))]
    rows = [make_row(i, patient, image) for i, (patient, image) in
            enumerate(zip(["IP_B", "IP_A", "IP_B", "IP_A", "IP_B"], images))]
    batch = DecodingCollator(processor, train=False)(rows)
    assert set(batch) == {"pixels", "lesion_numerical_values", "lesion_categorical_ids", "patient_index",
                          "patient_numerical_values", "patient_categorical_ids", "labels"}
    assert batch["pixels"].shape == (5, 3, *SIZE) and batch["pixels"].dtype == torch.uint8
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1]
    assert batch["patient_index"].tolist() == [0, 1, 0, 1, 0]  # patients in order of first appearance
    assert batch["patient_numerical_values"][:, 0].tolist() == [65.0, 40.0]
    assert batch["lesion_numerical_values"][:, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_eval_path_equals_the_processor(processor):
    """Decode + resize in the worker, normalise on the device == SLIMPProcessor(images) (the inference path)."""
    rows = [make_row(i, "IP_A", lesion_image(i, (48 + i, 40))) for i in range(3)]
    inputs = BatchTransform(processor)(DecodingCollator(processor, train=False)(rows), "cpu")
    expected = processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected, rtol=0, atol=1e-5)
    assert "ssl_pixel_values" not in inputs and "pixels" not in inputs


def test_train_batches_carry_parameters_that_vary_and_are_reproducible(processor):
    rows = [make_row(i, "IP_A") for i in range(4)]
    collator = DecodingCollator(processor, train=True)
    first, second = collator(rows)["augment_parameters"], collator(rows)["augment_parameters"]
    assert first.shape == (4, len(PARAMETERS)) and not torch.equal(first, second)
    seeded = [DecodingCollator(processor, train=True, seed=3) for _ in range(2)]
    assert torch.equal(seeded[0](rows)["augment_parameters"], seeded[1](rows)["augment_parameters"])
    inputs = BatchTransform(processor)(collator(rows), "cpu")
    values = inputs["pixel_values"]  # ViT normalisation (mean 0.5, std 0.5) maps [0, 255] to [-1, 1]
    assert values.shape == (4, 3, *SIZE) and torch.isfinite(values).all()
    assert values.min() >= -1.0 - 1e-5 and values.max() <= 1.0 + 1e-5


def test_seeded_augmentations_depend_only_on_seed_epoch_and_image(processor):
    """What exact resume and multi-process equivalence rely on: no hidden stream state, and an image's
    augmentation does not depend on the batch it is collated in."""
    rows = [make_row(i, "IP_A") for i in range(3)]
    collator = DecodingCollator(processor, train=True, seed=3)
    first = collator(rows)["augment_parameters"]
    collator([make_row(i, "IP_B") for i in range(5, 8)])  # another batch in between changes nothing
    assert torch.equal(collator(rows)["augment_parameters"], first)
    mixed = collator([make_row(9, "IP_C"), rows[1]])["augment_parameters"]  # same image, other batch
    assert torch.equal(mixed[1], first[1])
    collator.set_epoch(1)
    assert not torch.allclose(collator(rows)["augment_parameters"], first)
    assert not torch.allclose(DecodingCollator(processor, train=True, seed=4)(rows)["augment_parameters"], first)


def test_two_views_differ(processor):
    rows = [make_row(i, "IP_A") for i in range(3)]
    inputs = BatchTransform(processor)(DecodingCollator(processor, train=True, two_views=True, seed=0)(rows), "cpu")
    assert inputs["ssl_pixel_values"].shape == inputs["pixel_values"].shape == (3, 3, *SIZE)
    assert not torch.allclose(inputs["ssl_pixel_values"], inputs["pixel_values"])
    with pytest.raises(ValueError, match="train"):
        DecodingCollator(processor, train=False, two_views=True)


def test_undecodable_image_names_its_image_id(processor):
    rows = [make_row(0, "IP_A"), make_row(1, "IP_A", image={"bytes": b"not an image", "path": None})]
    with pytest.raises(ValueError, match="ISIC_0000001"):
        DecodingCollator(processor, train=False)(rows)
    rows[1]["image"] = {"bytes": png_bytes(lesion_image(1)), "path": None}  # undecoded bytes work
    assert DecodingCollator(processor, train=False)(rows)["pixels"].shape == (2, 3, *SIZE)


PATIENTS = ["IP_A"] * 5 + ["IP_B"] * 2 + ["IP_C"] * 3 + ["IP_D"]


def small_rows() -> list[dict]:
    """11 rows of 4 patients (5, 2, 3 and 1 lesions), images as PNG bytes."""
    return [make_row(i, p, image={"bytes": png_bytes(lesion_image(i)), "path": None}) for i, p in enumerate(PATIENTS)]


def dataset_of(rows: list[dict]):
    """`rows` as a `datasets.Dataset` with the converter's feature types."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("string"),
        "patient_id": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c"]),
        "clin_size_long_diam_mm": datasets.Value("float64"), "tbp_lv_areaMM2": datasets.Value("float64"),
        "anatom_site_general": datasets.Value("string"), "age_approx": datasets.Value("float64"),
        "sex": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in rows[0]}, features=features)


def test_dataloader_with_workers_and_patient_sampler(processor):
    patients = PATIENTS
    dataset = dataset_of(small_rows())
    sampler = PatientBatchSampler(dataset["patient_id"], patients_per_batch=2, max_lesions_per_patient=3, seed=0)

    def run() -> list:
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=DecodingCollator(processor, train=True, seed=1),
                            num_workers=2)
        return list(loader)

    batches, again = run(), run()
    assert len(batches) == len(sampler)
    for batch, indices, replay in zip(batches, sampler, again):
        assert torch.equal(batch["pixels"], replay["pixels"])
        assert torch.equal(batch["augment_parameters"], replay["augment_parameters"])
        assert batch["labels"].tolist() == [i % 3 for i in indices]
        ids = [patients[i] for i in indices]
        expected = [list(dict.fromkeys(ids)).index(p) for p in ids]
        assert batch["patient_index"].tolist() == expected
        assert batch["patient_numerical_values"].shape[0] == len(set(ids)) <= 2
    assert sum(len(b["labels"]) for b in batches) == len(dataset)


def small_dataset():
    rows = small_rows()
    rows[3]["clin_size_long_diam_mm"] = None  # a missing number and a missing category travel as Arrow nulls
    rows[4]["sex"] = None
    return dataset_of(rows)


@pytest.mark.parametrize("train", [False, True])
def test_arrow_column_batches_equal_row_batches(processor, train):
    """`ColumnBatches` hands the collator one pyarrow Table per batch (metadata as column arrays); the batch
    is exactly the one the list of row dicts gives, through a DataLoader with workers too."""
    dataset = small_dataset()
    sampler = PatientBatchSampler(dataset["patient_id"], patients_per_batch=2, max_lesions_per_patient=3, seed=0)
    collator = DecodingCollator(processor, train=train, seed=1)
    columns = list(DataLoader(ColumnBatches(dataset), batch_sampler=sampler, collate_fn=collator, num_workers=1))
    rows = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=0))
    assert len(columns) == len(rows) == len(sampler)
    for a, b in zip(columns, rows):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key].nan_to_num(-7), b[key].nan_to_num(-7)), key
    assert any(torch.isnan(batch["lesion_numerical_values"]).any() for batch in columns)
    fetched = ColumnBatches(dataset).__getitems__([0, 5])
    assert fetched.indices == [0, 5] and fetched.table.num_rows == 2 and "image" in fetched.table.column_names


def test_metadata_encoded_once_equals_the_per_batch_encoding(processor):
    """`EncodedMetadata` encodes the split once; each batch is then a gather + patient grouping that equals
    encoding that batch's rows (first present patient-level value, unknown categories counted alike)."""
    dataset = small_dataset().map(lambda row, i: {"anatom_site_general": "elbow" if i in (1, 6) else row["anatom_site_general"],
                                                  "sex": None if i == 5 else row["sex"]}, with_indices=True)
    sampler = PatientBatchSampler(dataset["patient_id"], patients_per_batch=2, max_lesions_per_patient=3, seed=0)
    direct_processor = SLIMPProcessor(processor.image_processor, config=processor.config)
    encoded_processor = SLIMPProcessor(processor.image_processor, config=processor.config)
    direct = DecodingCollator(direct_processor, train=True, seed=1)
    encoded = DecodingCollator(encoded_processor, train=True, seed=1, encoded_metadata=EncodedMetadata(encoded_processor, dataset))
    a = list(DataLoader(ColumnBatches(dataset), batch_sampler=sampler, collate_fn=direct))
    b = list(DataLoader(ColumnBatches(dataset, columns=encoded.row_columns), batch_sampler=sampler, collate_fn=encoded,
                        num_workers=0))
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key].nan_to_num(-7), y[key].nan_to_num(-7)), key
    assert encoded_processor.unknown_categories == direct_processor.unknown_categories != {}
    assert set(ColumnBatches(dataset, columns=encoded.row_columns).table.column_names) == {"image", "image_id", "label", "patient_id"}


# ----- the augmentations (device side) -----


def noise(shape=(2, 3, 24, 24), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def test_identity_parameters_leave_an_image_unchanged():
    pixels = noise()
    out = augment(pixels, parameters().expand(2, -1), (24, 24))
    torch.testing.assert_close(out, pixels.float(), rtol=0, atol=1e-3)


def test_flips_and_quarter_turns_are_exact():
    pixels = noise((1, 3, 20, 20))
    size = (20, 20)
    torch.testing.assert_close(augment(pixels, parameters(flip_x=-1.0), size), pixels.float().flip(-1), rtol=0, atol=1e-3)
    torch.testing.assert_close(augment(pixels, parameters(flip_y=-1.0), size), pixels.float().flip(-2), rtol=0, atol=1e-3)
    turned = augment(pixels, parameters(angle=math.pi / 2), size)
    assert any(torch.allclose(turned, pixels.float().rot90(k, dims=(2, 3)), atol=1e-3) for k in (1, 3))


def test_crop_of_a_quadrant_samples_that_quadrant():
    pixels = noise((1, 3, 24, 24))
    top_left = augment(pixels, parameters(center_x=-0.5, center_y=-0.5, width=0.5, height=0.5), (12, 12))
    torch.testing.assert_close(top_left, pixels[:, :, :12, :12].float(), rtol=0, atol=1e-3)


def test_drawn_crops_lie_inside_the_image_and_follow_the_scale():
    config = AugmentationConfig(crop_scale=(0.3, 0.6))
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        values = dict(zip(PARAMETERS, draw_parameters(config, generator, aspect=26 / 30)))
        assert abs(values["center_x"]) + values["width"] <= 1 + 1e-6 and abs(values["center_y"]) + values["height"] <= 1 + 1e-6
        assert 0.3 - 1e-6 <= values["width"] * values["height"] <= 0.6 + 1e-6
    none = AugmentationConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, rotate90=False, max_degrees=0.0,
                              jitter_p=0.0)
    assert none.is_identity()
    assert draw_parameters(none, generator) == [IDENTITY[name] for name in PARAMETERS]


def test_colour_jitter_factors():
    x = noise().float()
    ones, zero = torch.ones(2), torch.zeros(2)
    torch.testing.assert_close(color_jitter(x, ones, ones, ones, zero), x, rtol=0, atol=1e-3)
    torch.testing.assert_close(color_jitter(x, ones * 0.5, ones, ones, zero), x * 0.5, rtol=0, atol=1e-3)
    grey = color_jitter(x, ones, ones, zero, zero)  # saturation 0: every channel the luma
    torch.testing.assert_close(grey[:, 0], grey[:, 1], rtol=0, atol=1e-3)
    mid = torch.full((1, 3, 4, 4), 100.0) + torch.tensor([20.0, -10.0, 5.0]).view(1, 3, 1, 1)
    turned = color_jitter(mid, torch.ones(1), torch.ones(1), torch.ones(1), torch.full((1,), 0.05))
    luma = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)  # noqa: E731
    torch.testing.assert_close(luma(turned), luma(mid), rtol=0, atol=1e-3)  # a hue turn keeps brightness
    assert not torch.allclose(turned, mid, atol=1.0)


def test_blur_keeps_the_mean_and_smooths():
    x = noise((2, 3, 24, 24)).float()
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(2)), x)
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(blurred[0], x[0], rtol=0, atol=1e-3)  # sigma 0: that image untouched
    assert abs(blurred[1].mean() - x[1].mean()) < 1.0 and blurred[1].std() < 0.7 * x[1].std()


def test_batch_transform_augments_on_the_batch_device(processor):
    rows = [make_row(i, "IP_A") for i in range(2)]
    batch = DecodingCollator(processor, train=True, seed=0)(rows)
    inputs = BatchTransform(processor)(batch, torch.device("cpu"))
    expected = processor.normalize(augment(batch["pixels"], batch["augment_parameters"], SIZE))
    torch.testing.assert_close(inputs["pixel_values"], expected)
