"""Tests of the synthetic SLICE-3D-like generator (training/data/synthetic.py). Tiny: small images, few patients."""

import io
import math
import re
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training.data import synthetic
from training.data.synthetic import (
    CSV_COLUMNS,
    SYNTHETIC_LESION_CATEGORICAL,
    SYNTHETIC_LESION_NUMERICAL,
    SYNTHETIC_PATIENT_CATEGORICAL,
    SYNTHETIC_PATIENT_NUMERICAL,
    Traits,
    generate_records,
    measure_lesion,
    render_lesion,
    within_patient_zscores,
    write_kaggle_layout,
)


@lru_cache(maxsize=None)
def _records(num_patients: int, seed: int = 0, image_size: int = 64, malignant_rate: float = 0.025):
    return tuple(generate_records(num_patients, seed=seed, image_size=image_size, malignant_rate=malignant_rate))


def _frame(records) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in r.items() if k != "image_bytes"} for r in records])


def _decode(image_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"), dtype=np.float64) / 255


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_same_seed_gives_identical_rows_and_bytes():
    first, second = _records(6), tuple(generate_records(6, seed=0, image_size=64))
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        assert all(_same(a[k], b[k]) for k in a), [k for k in a if not _same(a[k], b[k])]


def test_different_seeds_differ():
    a, b = _records(6, seed=0), _records(6, seed=1)
    assert {r["isic_id"] for r in a}.isdisjoint({r["isic_id"] for r in b})
    assert a[0]["image_bytes"] != b[0]["image_bytes"]
    assert a[0]["tbp_lv_areaMM2"] != b[0]["tbp_lv_areaMM2"]


def test_fewer_patients_is_a_prefix():
    few, more = _records(3), _records(6)
    assert 0 < len(few) < len(more)
    assert all(all(_same(a[k], b[k]) for k in a) for a, b in zip(few, more))


def test_columns_types_and_ids():
    records = _records(6)
    assert list(records[0]) == CSV_COLUMNS + ["image_bytes"]
    inputs = (SYNTHETIC_LESION_NUMERICAL + SYNTHETIC_LESION_CATEGORICAL + SYNTHETIC_PATIENT_NUMERICAL
              + SYNTHETIC_PATIENT_CATEGORICAL)
    assert len(inputs) == len(set(inputs)) == 1 + 29 + 3 + 4 + 2
    assert set(inputs) <= set(CSV_COLUMNS)
    for record in records:
        assert all(isinstance(record[c], float) for c in SYNTHETIC_LESION_NUMERICAL + SYNTHETIC_PATIENT_NUMERICAL)
        assert all(record[c] is None or isinstance(record[c], str)
                   for c in SYNTHETIC_LESION_CATEGORICAL + SYNTHETIC_PATIENT_CATEGORICAL)
        assert re.fullmatch(r"ISIC_\d{7}", record["isic_id"]) and re.fullmatch(r"IP_\d{7}", record["patient_id"])
        assert record["target"] in (0, 1) and isinstance(record["image_bytes"], bytes)
        assert record["iddx_1"] == ("Malignant" if record["target"] else "Benign")
    assert len({r["isic_id"] for r in records}) == len(records)


def test_patient_level_columns_are_constant_within_a_patient():
    frame = _frame(_records(20))
    frame["age_approx"] = frame["age_approx"].fillna(-1.0)
    frame["sex"] = frame["sex"].fillna("missing")
    assert frame["patient_id"].nunique() == 20
    assert (frame.groupby("patient_id")[["age_approx", "sex", "attribution"]].nunique() == 1).all().all()
    assert frame["age_approx"].nunique() > 3 and frame["attribution"].nunique() > 1


def test_lesion_counts_are_heavy_tailed():
    counts = np.array([synthetic.sample_patient(0, i).num_lesions for i in range(400)])
    assert counts.min() >= 1
    assert counts.max() > 5 * np.median(counts)


def test_measurements_of_a_known_shape():
    """An ellipse without border harmonics: area, perimeter, diameters and eccentricity as in geometry."""
    diameter, aspect = 6.0, 0.6
    traits = Traits(log_diameter=math.log(diameter), density=1.0, redness=0.0, blue_patch=0.0,
                    irregularity=0.0, asymmetry=0.0, variegation=0.0, aspect=aspect)
    rng = np.random.default_rng(0)
    clean, alpha, rel = render_lesion(traits, synthetic.LIGHT_SKIN, rng, 128, "3D: XP")
    m = measure_lesion(clean, alpha, rel, rng)
    a, b = diameter / 2, diameter * aspect / 2
    ellipse_perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))  # Ramanujan
    assert m["tbp_lv_areaMM2"] == pytest.approx(math.pi * a * b, rel=0.05)
    assert m["tbp_lv_perimeterMM"] == pytest.approx(ellipse_perimeter, rel=0.05)
    assert m["clin_size_long_diam_mm"] == pytest.approx(diameter, rel=0.06)
    assert m["tbp_lv_minorAxisMM"] == pytest.approx(2 * b, rel=0.06)
    assert m["tbp_lv_eccentricity"] == pytest.approx(math.sqrt(1 - aspect**2), abs=0.03)
    assert m["tbp_lv_symm_2axis"] < 0.05
    assert m["tbp_lv_L"] < m["tbp_lv_Lext"] - 10 and m["tbp_lv_deltaL"] < -10


def test_measurements_agree_with_the_decoded_image():
    """Dark pixels of each re-decoded JPEG track the recorded area, and the lightness at the lesion's centre
    (always inside it: lesions are centred within 1 mm and at least 1.5 mm across) the recorded L."""
    records = _records(20)
    dark_area, dark_lightness = [], []
    for record in records:
        image = _decode(record["image_bytes"])                                         # (S, S, 3)
        grey = image.mean(-1)
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        dark = grey < 0.8 * np.median(border)
        dark_area.append(dark.sum() * (synthetic.FIELD_OF_VIEW_MM / grey.shape[0]) ** 2)
        middle = grey.shape[0] // 2
        centre = image[middle - 2 : middle + 2, middle - 2 : middle + 2].reshape(-1, 3)
        dark_lightness.append(synthetic.srgb_to_lab(centre)[:, 0].mean())
    frame = _frame(records).assign(dark_area=dark_area, dark_lightness=dark_lightness)
    assert frame["dark_area"].corr(frame["tbp_lv_areaMM2"], method="spearman") > 0.8
    assert frame["dark_area"].corr(frame["clin_size_long_diam_mm"], method="spearman") > 0.7
    assert frame["dark_lightness"].corr(frame["tbp_lv_L"], method="spearman") > 0.7


def test_malignant_rate_is_roughly_the_requested_one():
    for rate, num_patients in ((0.0, 5), (0.2, 40)):
        frame = _frame(_records(num_patients, image_size=16, malignant_rate=rate))
        assert frame["target"].mean() == pytest.approx(rate, abs=max(0.35 * rate, 1e-9))
        assert frame.loc[frame["target"] == 1, "lesion_id"].notna().all()
    assert _frame(_records(20))["lesion_id"].isna().mean() > 0.9


def test_malignant_lesions_are_ugly_ducklings():
    """Malignant lesions deviate more from the patient's other lesions than benign ones (which include the
    keratoses, themselves unlike the patient's naevi), darker and more variegated than them, yet their
    absolute size overlaps the benign range."""
    frame = _frame(_records(25, image_size=64, malignant_rate=0.1))
    columns = ["clin_size_long_diam_mm", "tbp_lv_areaMM2", "tbp_lv_L", "tbp_lv_color_std_mean",
               "tbp_lv_norm_border", "tbp_lv_area_perim_ratio"]
    z = within_patient_zscores(frame, columns)
    deviation = z.abs().mean(axis=1)
    malignant = frame["target"] == 1
    assert malignant.sum() >= 10
    assert deviation[malignant].mean() > 1.2 * deviation[~malignant].mean()
    assert z.loc[malignant, "tbp_lv_L"].mean() < -0.5 < 0.2 > abs(z.loc[~malignant, "tbp_lv_L"].mean())
    assert z.loc[malignant, "tbp_lv_color_std_mean"].mean() > 0.5
    benign_p90 = frame.loc[~malignant, "clin_size_long_diam_mm"].quantile(0.9)
    assert (frame.loc[malignant, "clin_size_long_diam_mm"] < benign_p90).mean() > 0.3


def test_malignant_traits_step_away_from_the_phenotype():
    rng = np.random.default_rng(0)
    phenotype = synthetic.sample_phenotype(rng)
    benign = [synthetic.sample_lesion_traits(rng, phenotype, False) for _ in range(300)]
    malignant = [synthetic.sample_lesion_traits(rng, phenotype, True) for _ in range(300)]
    for name in ("log_diameter", "irregularity", "asymmetry", "variegation", "density"):
        assert np.mean([getattr(t, name) for t in malignant]) > np.mean([getattr(t, name) for t in benign])


def test_missing_values_are_present():
    patients = [synthetic.sample_patient(0, i) for i in range(300)]
    assert 0 < sum(math.isnan(p.age_approx) for p in patients) < 30
    assert 0 < sum(p.sex is None for p in patients) < 30
    frame = _frame(_records(60, image_size=16))
    assert frame["anatom_site_general"].isna().any()
    assert (frame.loc[frame["anatom_site_general"].isna(), "tbp_lv_location"] == "Unknown").all()
    assert frame[SYNTHETIC_LESION_NUMERICAL].isna().any(axis=1).mean() < 0.05
    assert frame[SYNTHETIC_LESION_NUMERICAL].isna().any().any()
    assert frame["mel_thick_mm"].isna().mean() > 0.9


def test_body_position_matches_site():
    frame = _frame(_records(20)).dropna(subset=["anatom_site_general"])
    by_site = frame.groupby("anatom_site_general")
    assert by_site["tbp_lv_y"].mean()["head/neck"] > by_site["tbp_lv_y"].mean()["lower extremity"] + 500
    assert (frame.loc[frame["anatom_site_general"] == "posterior torso", "tbp_lv_z"] < 0).all()
    assert (frame.loc[frame["anatom_site_general"] == "anterior torso", "tbp_lv_z"] > 0).all()
    left = frame["tbp_lv_location_simple"].str.startswith("Left")
    assert (frame.loc[left, "tbp_lv_x"] > 0).all()


def test_kaggle_layout_reads_back(tmp_path):
    h5py = pytest.importorskip("h5py")
    counts = write_kaggle_layout(tmp_path, num_patients=4, seed=3, image_size=32)
    metadata = pd.read_csv(tmp_path / "train-metadata.csv")
    assert list(metadata.columns) == CSV_COLUMNS
    assert counts["lesions"] == len(metadata) and counts["malignant"] == metadata["target"].sum()
    assert metadata["patient_id"].nunique() == 4
    assert metadata["lesion_id"].isna().any()
    expected = list(generate_records(4, seed=3, image_size=32))
    assert metadata["tbp_lv_areaMM2"].tolist() == pytest.approx([r["tbp_lv_areaMM2"] for r in expected])
    with h5py.File(tmp_path / "train-image.hdf5", "r") as images:
        assert sorted(images.keys()) == sorted(metadata["isic_id"])
        for record in expected:
            data = bytes(images[record["isic_id"]][()])
            assert data == record["image_bytes"]
            assert Image.open(io.BytesIO(data)).convert("RGB").size == (32, 32)


def test_cli_kaggle_and_report(tmp_path, capsys):
    synthetic.main(["kaggle", "--output-dir", str(tmp_path), "--patients", "2", "--image-size", "32"])
    assert (tmp_path / "train-metadata.csv").exists() and '"lesions"' in capsys.readouterr().out
    report = synthetic.signal_report(30, seed=0, image_size=32, malignant_rate=0.1, n_splits=2)
    assert [r["view"][:3] for r in report["results"]] == ["(a)", "(b)", "(c)", "(d)"]
    assert all(0.0 <= r["auroc_mean"] <= 1.0 for r in report["results"])
    assert synthetic.report_markdown(report).count("\n| (") == 4


@pytest.mark.parametrize("kwargs", [{"num_patients": -1}, {"num_patients": 1, "image_size": 8},
                                    {"num_patients": 1, "malignant_rate": 1.5}])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        next(generate_records(**kwargs))


def test_patient_level_structure_follows_dermatology():
    """Naevus counts peak in mid-life, keratoses accumulate with age, men's lesions favour the trunk and
    back and women's the legs, melanoma risk rises with age, and a patient's age and sex can be read from
    that patient's lesions (what the outer, patient-level loss aligns)."""
    patients = [synthetic.sample_patient(0, i) for i in range(3000)]
    by_age = pd.DataFrame({"age": [p.age for p in patients], "nevi": [p.num_nevi for p in patients],
                           "keratoses": [p.num_keratoses for p in patients]})
    middle, old, young = by_age[by_age.age.between(35, 45)], by_age[by_age.age >= 70], by_age[by_age.age < 30]
    assert middle.nevi.mean() > 1.5 * old.nevi.mean() and middle.nevi.mean() > young.nevi.mean()
    assert old.keratoses.mean() > 3 * middle.keratoses.mean() > 0
    assert 0.6 < np.mean([p.sex == "male" for p in patients if p.sex]) < 0.72

    frame = _frame(_records(150, image_size=16, malignant_rate=0.1))
    shares = pd.crosstab(frame["sex"], frame["anatom_site_general"], normalize="index")
    assert shares.loc["male", "posterior torso"] > shares.loc["female", "posterior torso"] + 0.08
    assert shares.loc["female", "lower extremity"] > shares.loc["male", "lower extremity"] + 0.1
    older = frame["age_approx"] >= frame["age_approx"].median()
    assert frame.loc[older, "target"].mean() > 1.2 * frame.loc[~older, "target"].mean()
    level = synthetic.patient_level_signal(frame)
    assert level["age_r2"] > 0.1 and level["sex_auroc"] > 0.7
