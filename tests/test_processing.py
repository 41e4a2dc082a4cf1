"""SLIMPProcessor: raw rows + PIL images -> model inputs; schema fitting; persistence."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import IMAGE_SIZE, tiny_config
from modeling_slimp import SLIMPMetadataConfig, SLIMPModel, SLIMPProcessor
from training.data.metadata_schema import fit_metadata_schema

# Patients B, A, C interleaved. B's age is missing on its first row; A's sex disagrees between its rows.
ROWS = [
    {"patient_id": "B", "clin_size_long_diam_mm": 3.5, "tbp_lv_areaMM2": 7.0, "tbp_lv_H": 40.0,
     "anatom_site_general": "head/neck", "tbp_tile_type": "3D: XP", "age_approx": None, "num_moles": 12, "sex": "male"},
    {"patient_id": "A", "clin_size_long_diam_mm": None, "tbp_lv_areaMM2": 2.0, "tbp_lv_H": 55.5,
     "anatom_site_general": "posterior torso", "tbp_tile_type": "3D: white", "age_approx": 60, "num_moles": 3, "sex": "female"},
    {"patient_id": "B", "clin_size_long_diam_mm": 8.0, "tbp_lv_areaMM2": 30.0, "tbp_lv_H": 47.0,
     "anatom_site_general": None, "tbp_tile_type": "3D: XP", "age_approx": 45, "num_moles": 12, "sex": "male"},
    {"patient_id": "C", "clin_size_long_diam_mm": 1.0, "tbp_lv_areaMM2": 1.5, "tbp_lv_H": 50.0,
     "anatom_site_general": "lower extremity", "tbp_tile_type": None, "age_approx": 30, "num_moles": None, "sex": None},
    {"patient_id": "A", "clin_size_long_diam_mm": 4.4, "tbp_lv_areaMM2": 9.9, "tbp_lv_H": 41.0,
     "anatom_site_general": "upper extremity", "tbp_tile_type": "3D: white", "age_approx": 61, "num_moles": 3, "sex": "male"},
]
NAN = float("nan")


def processor() -> SLIMPProcessor:
    return SLIMPProcessor(config=tiny_config())


def rgb_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (33 + 2 * i, 47, 3), dtype=np.uint8)) for i in range(count)]


def assert_batches_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True, rtol=0, atol=0, msg=key)


def test_list_of_dicts_dataframe_and_dict_of_lists_give_the_same_batch():
    images = rgb_images(len(ROWS))
    from_rows = processor()(images=images, metadata=ROWS)
    from_frame = processor()(images=images, metadata=pd.DataFrame(ROWS))
    from_columns = processor()(images=images, metadata={key: [row[key] for row in ROWS] for key in ROWS[0]})
    assert_batches_equal(from_rows, from_frame)
    assert_batches_equal(from_rows, from_columns)
    assert set(from_rows) == {"pixel_values", "lesion_numerical_values", "lesion_categorical_ids",
                              "patient_numerical_values", "patient_categorical_ids", "patient_index"}


def test_grouping_by_patient_and_values():
    batch = processor()(metadata=ROWS)
    assert batch["patient_index"].tolist() == [0, 1, 0, 2, 1]  # B, A, C in order of first appearance
    assert batch["patient_index"].dtype == torch.long
    torch.testing.assert_close(
        batch["lesion_numerical_values"],
        torch.tensor([[3.5, 7.0, 40.0], [NAN, 2.0, 55.5], [8.0, 30.0, 47.0], [1.0, 1.5, 50.0], [4.4, 9.9, 41.0]]),
        equal_nan=True,
    )
    # anatom_site_general: head/neck=1, upper=2, lower=3, posterior torso=4; tbp_tile_type: white=1, XP=2
    assert batch["lesion_categorical_ids"].tolist() == [[1, 2], [4, 1], [0, 2], [3, 0], [2, 1]]
    # Patient values: the first non-missing value among the patient's rows (B's age from its second row).
    torch.testing.assert_close(batch["patient_numerical_values"], torch.tensor([[45.0, 12.0], [60.0, 3.0], [30.0, NAN]]),
                               equal_nan=True)
    assert batch["patient_categorical_ids"].tolist() == [[2], [1], [0]]  # B male, A female (first row), C missing


def test_image_modes_and_sizes_become_rgb_batches():
    rng = np.random.default_rng(1)
    gray = Image.fromarray(rng.integers(0, 256, (31, 29), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (64, 20, 4), dtype=np.uint8), mode="RGBA")
    deep = Image.fromarray((np.arange(23 * 17, dtype=np.uint16).reshape(23, 17) * 150).astype(np.uint16))
    palette = rgb_images(1)[0].convert("P")
    assert deep.mode == "I;16"
    pixel_values = processor()(images=[gray, rgba, deep, palette])["pixel_values"]
    assert pixel_values.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()
    torch.testing.assert_close(pixel_values[0, 0], pixel_values[0, 1])  # grayscale: equal channels
    deep_values = pixel_values[2, 0]
    assert deep_values.max() - deep_values.min() > 1.0  # 16-bit range rescaled, not clipped to white
    assert deep_values[0, 0] < deep_values[-1, -1]  # the gradient survives


def test_single_image_without_list():
    batch = processor()(images=rgb_images(1)[0])
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_unknown_categories_and_unparseable_numbers_are_missing_and_counted():
    rows = [dict(ROWS[0]), dict(ROWS[1]), dict(ROWS[2])]
    rows[0]["anatom_site_general"] = "elbow"
    rows[1]["anatom_site_general"] = "elbow"
    rows[2]["sex"] = "other"
    rows[0]["clin_size_long_diam_mm"] = "abc"
    rows[1]["tbp_lv_areaMM2"] = "5.5"  # a number as a string is fine
    rows[2]["tbp_lv_H"] = ""  # an empty string is missing, not invalid
    proc = processor()
    batch = proc(metadata=rows)
    assert batch["lesion_categorical_ids"][:2, 0].tolist() == [0, 0]
    assert proc.unknown_categories == {("anatom_site_general", "elbow"): 2}  # patient B's "other" is not read:
    assert batch["patient_categorical_ids"].tolist() == [[2], [1]]  # B's first row says male
    assert math.isnan(batch["lesion_numerical_values"][0, 0])
    assert batch["lesion_numerical_values"][1, 1].item() == pytest.approx(5.5)
    assert math.isnan(batch["lesion_numerical_values"][2, 2])
    assert proc.invalid_numbers == {("clin_size_long_diam_mm", "abc"): 1}
    rows[0]["sex"] = "other"
    proc(metadata=rows)
    assert proc.unknown_categories[("sex", "other")] == 1


def test_numeric_categories_match_whatever_their_type():
    config = tiny_config(patient_metadata_config=SLIMPMetadataConfig(categorical_features={"fitspatrick": ["1", "2", "3"]},
                                                                     hidden_size=8, num_attention_heads=2))
    proc = SLIMPProcessor(config=config)
    rows = [{"patient_id": "p", "fitspatrick": 2.0}, {"patient_id": "q", "fitspatrick": "3"}, {"patient_id": "r", "fitspatrick": 1}]
    assert proc(metadata=rows)["patient_categorical_ids"].tolist() == [[2], [3], [1]]


def test_missing_patient_id_raises_naming_the_row():
    rows = [dict(row) for row in ROWS]
    rows[3]["patient_id"] = None
    with pytest.raises(ValueError, match="row 3.*patient_id"):
        processor()(metadata=rows)


def test_without_patient_id_column_each_row_is_its_own_patient():
    rows = [{k: v for k, v in row.items() if k != "patient_id"} for row in ROWS]
    batch = processor()(metadata=rows)
    assert batch["patient_index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["patient_numerical_values"].shape == (5, 2)


def test_metadata_none_gives_pixel_values_only():
    batch = processor()(images=rgb_images(2), metadata=None)
    assert set(batch) == {"pixel_values"}
    model = SLIMPModel(tiny_config()).eval()
    assert model(**batch).image_embeds.shape == (2, 12)


def test_image_and_row_count_mismatch_raises():
    with pytest.raises(ValueError, match="3 images but 5 metadata rows"):
        processor()(images=rgb_images(3), metadata=ROWS)


def test_fit_metadata_schema_on_a_dataframe():
    frame = pd.DataFrame(ROWS + [
        {"patient_id": "D", "clin_size_long_diam_mm": 2.0, "tbp_lv_areaMM2": 3.0, "anatom_site_general": "head/neck",
         "age_approx": 80, "sex": "female"},
        {"patient_id": "D", "clin_size_long_diam_mm": 6.0, "tbp_lv_areaMM2": 3.0, "anatom_site_general": "head/neck",
         "age_approx": 80, "sex": "female"},
    ])
    lesion, patient = fit_metadata_schema(
        frame, lesion_numerical=["clin_size_long_diam_mm", "tbp_lv_areaMM2"], lesion_categorical=["anatom_site_general"],
        patient_numerical=["age_approx"], patient_categorical=["sex"],
        lesion_tower={"hidden_size": 24, "num_attention_heads": 3}, min_patients=1,  # the arithmetic, on 4 patients
    )
    for feature, mean, std in zip(lesion.numerical_features, lesion.numerical_mean, lesion.numerical_std):
        assert mean == pytest.approx(frame[feature].mean())
        assert std == pytest.approx(frame[feature].std(ddof=0))
    # head/neck x3, then lower extremity / posterior torso / upper extremity x1 (ties alphabetical)
    assert lesion.categorical_features == {
        "anatom_site_general": ["head/neck", "lower extremity", "posterior torso", "upper extremity"]
    }
    # Patient statistics: one value per patient (B 45, A 60, C 30, D 80), not one per lesion.
    per_patient = frame.groupby("patient_id", sort=False)["age_approx"].first()
    assert len(per_patient) == 4
    assert patient.numerical_mean == [pytest.approx(per_patient.mean())]
    assert patient.numerical_std == [pytest.approx(per_patient.std(ddof=0))]
    assert patient.numerical_mean[0] != pytest.approx(frame["age_approx"].mean())
    assert patient.categorical_features == {"sex": ["female", "male"]}  # A, D female; B male (C missing)
    assert (lesion.hidden_size, lesion.num_attention_heads) == (24, 3)

    rare_dropped, _ = fit_metadata_schema(frame, lesion_categorical=["anatom_site_general"], min_category_count=2,
                                                         min_patients=1)
    assert rare_dropped.categorical_features == {"anatom_site_general": ["head/neck"]}
    with pytest.raises(ValueError, match="tbp_lv_z"):
        fit_metadata_schema(frame, lesion_numerical=["tbp_lv_z"], min_patients=1)


def test_a_column_full_of_nan_is_left_out_of_the_schema_with_a_warning(caplog):
    frame = pd.DataFrame(ROWS).assign(tbp_lv_H=float("nan"), tbp_tile_type=None)
    lesion, _ = fit_metadata_schema(
        frame, lesion_numerical=["clin_size_long_diam_mm", "tbp_lv_H"], lesion_categorical=["anatom_site_general", "tbp_tile_type"],
        min_patients=1)
    assert lesion.numerical_features == ["clin_size_long_diam_mm"]
    assert list(lesion.categorical_features) == ["anatom_site_general"]
    assert "tbp_lv_H" in caplog.text and "tbp_tile_type" in caplog.text
    # At inference an all-NaN column of a schema feature is simply missing, and the model stays finite.
    proc = processor()
    batch = proc(images=rgb_images(len(frame)), metadata=frame)
    column = proc.config.lesion_metadata_config.numerical_features.index("tbp_lv_H")
    assert torch.isnan(batch["lesion_numerical_values"][:, column]).all()
    model = SLIMPModel(proc.config).eval()
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.image_embeds).all()


def test_a_misspelt_keyword_is_an_error_not_dropped_metadata():
    proc = processor()
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['metdata'\]"):
        proc(images=rgb_images(1), metdata=ROWS[:1])
    with pytest.raises(TypeError, match=r"\['image'\]"):
        proc(image=rgb_images(1))


def test_save_and_load_alone(tmp_path):
    proc = processor()
    proc.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"preprocessor_config.json", "config.json"}
    loaded = SLIMPProcessor.from_pretrained(tmp_path)
    assert loaded.config.lesion_metadata_config.to_dict() == proc.config.lesion_metadata_config.to_dict()
    assert loaded.config.patient_metadata_config.to_dict() == proc.config.patient_metadata_config.to_dict()
    images = rgb_images(len(ROWS))
    assert_batches_equal(loaded(images=images, metadata=ROWS), proc(images=images, metadata=ROWS))


def test_save_next_to_a_model_keeps_its_config(tmp_path):
    config = tiny_config()
    model = SLIMPModel(config)
    model.save_pretrained(tmp_path)
    model_config = (tmp_path / "config.json").read_text()
    proc = SLIMPProcessor(config=config)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == model_config
    loaded = SLIMPProcessor.from_pretrained(tmp_path)
    images = rgb_images(len(ROWS))
    assert_batches_equal(loaded(images=images, metadata=ROWS), proc(images=images, metadata=ROWS))
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


def test_a_model_reads_its_categorical_columns_in_the_same_order_after_loading(tmp_path):
    # The ISIC 2024 CSV (and a schema fitted on it) lists tbp_tile_type before anatom_site_general; config.json
    # stores its keys sorted. A model trained in the first order and loaded in the second would read each lesion's
    # tile type through the site's embedding: the same rows must give the same inputs and the same outputs.
    from conftest import LESION_CATEGORICAL

    config = tiny_config()
    lesion = config.lesion_metadata_config.to_dict()
    lesion["categorical_features"] = dict(reversed(list(LESION_CATEGORICAL.items())))
    config.lesion_metadata_config = SLIMPMetadataConfig(**{k: v for k, v in lesion.items() if k != "model_type"})
    assert list(config.lesion_metadata_config.categorical_features) == sorted(LESION_CATEGORICAL)
    torch.manual_seed(0)
    model = SLIMPModel(config).eval()
    proc = SLIMPProcessor(config=config)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded_model = SLIMPModel.from_pretrained(tmp_path).eval()
    loaded = SLIMPProcessor.from_pretrained(tmp_path, config=loaded_model.config)
    images = rgb_images(len(ROWS))
    batch, loaded_batch = proc(images=images, metadata=ROWS), loaded(images=images, metadata=ROWS)
    assert_batches_equal(loaded_batch, batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(**loaded_batch).lesion_metadata_embeds, model(**batch).lesion_metadata_embeds,
                                   rtol=0, atol=0)


def test_refuses_to_save_next_to_a_different_schema(tmp_path):
    SLIMPModel(tiny_config()).save_pretrained(tmp_path)
    other = tiny_config()
    other.lesion_metadata_config.numerical_mean = [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="lesion_metadata_config"):
        SLIMPProcessor(config=other).save_pretrained(tmp_path)


def test_images_as_numpy_torch_lists_and_a_datasets_column_give_the_same_pixels():
    import datasets

    pil = rgb_images(3)
    proc = processor()
    expected = proc(images=pil)["pixel_values"]
    arrays = [np.array(image) for image in pil]  # (H, W, 3) uint8, writable (torch.from_numpy warns on a read-only view)
    tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]  # (3, H, W) uint8
    floats = [a.astype(np.float32) / 255 for a in arrays]  # (H, W, 3) in [0, 1]
    column = datasets.Dataset.from_dict({"image": pil}, features=datasets.Features({"image": datasets.Image()}))["image"]
    for name, images in (("numpy", arrays), ("torch", tensors), ("float numpy", floats), ("datasets column", column),
                         ("tuple", tuple(pil))):
        torch.testing.assert_close(proc(images=images)["pixel_values"], expected, rtol=0, atol=1e-6, msg=name)
    same_size = [Image.fromarray(a[:33, :47]) for a in arrays]
    stacked = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in same_size])  # (N, 3, H, W)
    torch.testing.assert_close(proc(images=stacked)["pixel_values"], proc(images=same_size)["pixel_values"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="image 1: cannot be read"):
        proc(images=[pil[0], b"not an image"])


def test_metadata_encoding_matches_a_value_by_value_reference():
    """The column-wise encoding (one conversion per column, a lookup per distinct category) gives what
    reading each value with the contract's rules gives."""
    from modeling_slimp.schema_slimp import category_key, parse_number

    rng = np.random.default_rng(3)
    rows = []
    for i in range(200):
        rows.append({"patient_id": f"P{rng.integers(0, 30)}", "clin_size_long_diam_mm": rng.choice([1.5, None, "2.5", "x", np.nan]),
                     "tbp_lv_areaMM2": float(rng.normal(9, 3)), "tbp_lv_H": rng.choice([40.0, "NA", ""]),
                     "anatom_site_general": rng.choice(["head/neck", " Head/Neck ", "elbow", None, "Unknown", "posterior  TORSO"]),
                     "tbp_tile_type": rng.choice(["3D: XP", "3D: white", None]), "age_approx": rng.choice([30.0, None, "45"]),
                     "num_moles": rng.integers(0, 50), "sex": rng.choice(["male", "Female", " MALE ", "UNK", None])})
    proc = processor()
    batch = proc(metadata=rows)
    lesion, patient = proc.config.lesion_metadata_config, proc.config.patient_metadata_config
    for i, row in enumerate(rows):
        for j, feature in enumerate(lesion.numerical_features):
            np.testing.assert_equal(batch["lesion_numerical_values"][i, j].item(), np.float32(parse_number(row[feature])[0]))
        for j, (feature, vocabulary) in enumerate(lesion.categorical_features.items()):
            keys = [category_key(v) for v in vocabulary]
            key = category_key(row[feature])
            assert batch["lesion_categorical_ids"][i, j].item() == (keys.index(key) + 1 if key in keys else 0)
    patients = list(dict.fromkeys(row["patient_id"] for row in rows))
    for p, key in enumerate(patients):
        mine = [row for row in rows if row["patient_id"] == key]
        for j, feature in enumerate(patient.numerical_features):
            first = next((parse_number(r[feature])[0] for r in mine if not np.isnan(parse_number(r[feature])[0])), float("nan"))
            np.testing.assert_equal(batch["patient_numerical_values"][p, j].item(), np.float32(first))
        for j, (feature, vocabulary) in enumerate(patient.categorical_features.items()):
            keys = [category_key(v) for v in vocabulary]
            first = next((category_key(r[feature]) for r in mine if category_key(r[feature]) is not None), None)
            assert batch["patient_categorical_ids"][p, j].item() == (keys.index(first) + 1 if first in keys else 0)


def test_an_arrow_table_encodes_as_its_rows_do():
    """A pyarrow Table (what `ColumnBatches` hands the collator) is encoded by Arrow's own dictionary
    encoding, to exactly the tensors and counts of the same rows as dicts: unknown categories, text in a
    numerical column, missing values, interleaved patients, and a missing patient id named by row."""
    pa = pytest.importorskip("pyarrow")
    rows = [dict(row) for row in ROWS] * 3
    rows = [dict(row, patient_id=f"{row['patient_id']}{i % 2}") for i, row in enumerate(rows)]
    rows[0]["anatom_site_general"] = "elbow"
    rows[4]["sex"] = "other"
    for row in rows:  # a numerical column of text, as a CSV gives it
        row["tbp_lv_H"] = None if row["tbp_lv_H"] is None else str(row["tbp_lv_H"])
    rows[1]["tbp_lv_H"] = "12,5"
    table = pa.Table.from_pylist(rows)
    by_rows, by_arrow = processor(), processor()
    assert_batches_equal(by_arrow(metadata=table), by_rows(metadata=rows))
    assert by_arrow.unknown_categories == by_rows.unknown_categories != {}
    assert by_arrow.invalid_numbers == by_rows.invalid_numbers == {("tbp_lv_H", "12,5"): 1}
    assert_batches_equal(by_arrow(metadata=table.slice(2, 9)), by_rows(metadata=rows[2:11]))  # a cached second call
    rows[7]["patient_id"] = None
    with pytest.raises(ValueError, match="row 7.*patient_id"):
        processor()(metadata=pa.Table.from_pylist(rows))


# ----- issue 18: no patient in a checkpoint, spellings, unusable numbers, "NA" ids -----

def patients_frame(patients: int = 6) -> pd.DataFrame:
    """Two lesions per patient; every value shared by all patients except the planted ones."""
    rows = []
    for p in range(patients):
        for k in range(2):
            rows.append({"patient_id": f"P{p}", "clin_size_long_diam_mm": 2.0 + p + k, "anatom_site_general": "head/neck",
                         "age_approx": 40 + 5 * p, "sex": "female" if p % 2 else "male", "tbp_lv_H": None})
    return pd.DataFrame(rows)


def fit(frame: pd.DataFrame, **kwargs):
    return fit_metadata_schema(
        frame, lesion_numerical=["clin_size_long_diam_mm", "tbp_lv_H"], lesion_categorical=["anatom_site_general"],
        patient_numerical=["age_approx"], patient_categorical=["sex"], **kwargs)


def test_a_value_fewer_than_k_patients_share_never_enters_the_schema(caplog):
    frame = patients_frame(patients=6)  # sex: 3 male, 3 female patients -> both below k = 5
    frame.loc[0:1, "anatom_site_general"] = "left earlobe tattoo"  # unique to patient P0, on both its lesions
    frame.loc[2:3, "tbp_lv_H"] = 55.0  # only patient P1 has a hue
    lesion, patient = fit(frame)
    assert lesion.categorical_features == {"anatom_site_general": ["head/neck"]}
    assert lesion.numerical_features == ["clin_size_long_diam_mm"]
    assert patient.numerical_features == ["age_approx"] and patient.categorical_features == {}
    assert "left earlobe tattoo" not in json.dumps(lesion.to_dict()) + json.dumps(patient.to_dict())
    for left_out in ("left earlobe tattoo", "tbp_lv_H (usable values from 1 patient(s))", "sex categories ['female', 'male']"):
        assert left_out in caplog.text
    _, patient = fit(frame.assign(sex="female"))  # a value all six patients share is kept
    assert patient.categorical_features == {"sex": ["female"]}


def test_a_one_patient_training_split_is_refused():
    one = patients_frame(patients=1)
    with pytest.raises(ValueError, match=r"come from 1 patient\(s\), fewer than min_patients=5"):
        fit(one)
    with pytest.raises(ValueError, match=r"come from 4 patient\(s\)"):
        fit(patients_frame(patients=4))
    lesion, patient = fit(patients_frame(patients=5))
    assert patient.numerical_mean == [pytest.approx(50.0)]  # five patients' ages: 40, 45, 50, 55, 60


def test_category_spellings_are_compared_case_and_space_insensitively():
    frame = patients_frame(patients=6)
    frame["sex"] = [value for value in ("Male", " MALE ", "male", "male", "female", "female") for _ in range(2)]
    _, patient = fit(frame, min_patients=2)
    assert patient.categorical_features == {"sex": ["male", "female"]}  # one category each, the usual spelling
    proc = SLIMPProcessor(config=tiny_config())  # vocabulary ["female", "male"]
    rows = [{"patient_id": f"p{i}", "sex": value} for i, value in enumerate(["male", "Male", " MALE ", "FEMALE", "mâle"])]
    assert proc(metadata=rows)["patient_categorical_ids"][:, 0].tolist() == [2, 2, 2, 1, 0]
    assert proc.unknown_categories == {("sex", "mâle"): 1}


def test_inf_and_numbers_beyond_float32_are_counted_not_silently_missing(caplog):
    proc = processor()
    rows = [dict(row) for row in ROWS]
    rows[0]["tbp_lv_H"], rows[1]["tbp_lv_H"], rows[2]["tbp_lv_H"], rows[3]["tbp_lv_H"] = float("inf"), "1e308", -1e308, "-inf"
    batch = proc(metadata=rows)
    assert torch.isnan(batch["lesion_numerical_values"][:4, 2]).all()
    assert sum(count for (feature, _), count in proc.invalid_numbers.items() if feature == "tbp_lv_H") == 4
    frame = patients_frame(patients=6)
    frame.loc[3, "clin_size_long_diam_mm"] = 1e308  # fitting used to fail: "numerical_mean must be finite"
    lesion, _ = fit(frame)
    assert lesion.numerical_mean == [pytest.approx(frame["clin_size_long_diam_mm"].drop(index=3).mean())]
    assert "'clin_size_long_diam_mm' are not usable numbers" in caplog.text and "row 3: 1e+308" in caplog.text


def test_a_patient_id_spelled_like_a_missing_value_is_an_id():
    rows = [{"patient_id": pid, "age_approx": 50} for pid in ("NA", "na", "NA", "unknown")]
    batch = processor()(metadata=rows)
    assert batch["patient_index"].tolist() == [0, 1, 0, 2]
    with pytest.raises(ValueError, match="row 1.*patient_id"):
        processor()(metadata=[{"patient_id": "NA"}, {"patient_id": "  "}])


def test_unreadable_values_and_a_misspelt_column_are_said_once(caplog):
    proc = processor()
    rows = [{**ROWS[0], "age_approx": "sixty", "sex": "M"}, {**ROWS[1], "age_approx": "sixty"}]
    rows = [{("tbp_lv_areaMM" if k == "tbp_lv_areaMM2" else k): v for k, v in row.items()} for row in rows]
    with caplog.at_level("INFO", logger="modeling_slimp.processing_slimp"):
        proc(images=rgb_images(2), metadata=rows)
        proc(images=rgb_images(2), metadata=rows)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert warnings == ["metadata column 'tbp_lv_areaMM' is not read (did you mean 'tbp_lv_areaMM2'?): 'tbp_lv_areaMM2' is "
                        "treated as missing.",
                        "metadata 'age_approx' = 'sixty' is not a number: read as missing (counted in the processor's "
                        "invalid_numbers)."], warnings
    assert sum("'sex' = 'M' is not a known category" in m for m in infos) == 1, infos
    assert proc.invalid_numbers[("age_approx", "sixty")] == 4 and proc.unknown_categories[("sex", "M")] == 2
