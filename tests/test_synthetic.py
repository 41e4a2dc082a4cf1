"""Tests of the synthetic SLICE-3D generator (training/data/synthetic.py, synthetic_render.py). Tiny: small
images, few patients, ~10 lesions each (the calibrated default is 40; the facts themselves are checked by the
calibration report, tests/test_calibration.py)."""

import io
import math
import re
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training.data import synthetic
from training.data import synthetic_render
from training.data.calibration import patient_level_signal
from training.data.synthetic import (
    CSV_COLUMNS,
    MALIGNANCIES,
    MEASURED_COLUMNS,
    SYNTHETIC_LESION_CATEGORICAL,
    SYNTHETIC_LESION_NUMERICAL,
    SYNTHETIC_PATIENT_CATEGORICAL,
    SYNTHETIC_PATIENT_NUMERICAL,
    generate_records,
    write_kaggle_layout,
)
from training.data.synthetic_render import Traits, draw_cues, measure_lesion, render_lesion
from training.tabular import patient_relative


@lru_cache(maxsize=None)
def _records(num_patients: int, seed: int = 0, image_size: int = 64, malignant_patient_share: float = 0.6,
             lesions_per_patient_median: float = 10):
    return tuple(generate_records(num_patients, seed=seed, image_size=image_size, malignant_patient_share=malignant_patient_share,
                                  lesions_per_patient_median=lesions_per_patient_median))


def _frame(records) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in r.items() if k != "image_bytes"} for r in records])


def _decode(image_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"), dtype=np.float64) / 255


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_same_seed_gives_identical_rows_and_bytes():
    first = _records(6)
    second = tuple(generate_records(6, seed=0, image_size=64, malignant_patient_share=0.6, lesions_per_patient_median=10))
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


def test_lesion_counts_are_heavy_tailed_with_the_stated_median():
    counts = np.array([synthetic.sample_patient(0, i).num_lesions for i in range(600)])
    assert counts.min() >= 1
    assert 34 <= np.median(counts) <= 46  # LESIONS_PER_PATIENT_MEDIAN = 40 (the real SLICE-3D: 241)
    assert counts.max() > 5 * np.median(counts)
    fewer = np.array([synthetic.sample_patient(0, i, lesions_per_patient_median=10).num_lesions for i in range(600)])
    assert 7 <= np.median(fewer) <= 13


def test_cancers_are_drawn_per_patient_as_in_slice3d():
    """24.9% of patients have a cancer, 1.52 on average when they have one; the share is a knob."""
    patients = [synthetic.sample_patient(0, i) for i in range(3000)]
    malignant = np.array([p.num_malignant for p in patients])
    assert (malignant > 0).mean() == pytest.approx(259 / 1042, abs=0.025)
    assert malignant[malignant > 0].mean() == pytest.approx(393 / 259, abs=0.1)
    raised = [synthetic.sample_patient(0, i, malignant_patient_share=0.8).num_malignant for i in range(1000)]
    assert np.mean(np.array(raised) > 0) == pytest.approx(0.8, abs=0.04)
    assert all(synthetic.sample_patient(0, i, malignant_patient_share=0.0).num_malignant == 0 for i in range(200))


def test_measurements_of_a_known_shape():
    """An ellipse without border harmonics: area, perimeter, diameters and eccentricity as in geometry."""
    diameter, aspect = 6.0, 0.6
    traits = Traits(log_diameter=math.log(diameter), density=1.0, redness=0.0, blue_patch=0.0,
                    irregularity=0.0, asymmetry=0.0, variegation=0.0, aspect=aspect)
    rng = np.random.default_rng(0)
    m = measure_lesion(render_lesion(traits, synthetic_render.LIGHT_SKIN, rng, 128, "3D: XP"), rng, MEASURED_COLUMNS)
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
        dark_area.append(dark.sum() * (synthetic_render.FIELD_OF_VIEW_MM / grey.shape[0]) ** 2)
        middle = grey.shape[0] // 2
        centre = image[middle - 2 : middle + 2, middle - 2 : middle + 2].reshape(-1, 3)
        dark_lightness.append(synthetic_render.srgb_to_lab(centre)[:, 0].mean())
    frame = _frame(records).assign(dark_area=dark_area, dark_lightness=dark_lightness)
    assert frame["dark_area"].corr(frame["tbp_lv_areaMM2"], method="spearman") > 0.8
    assert frame["dark_area"].corr(frame["clin_size_long_diam_mm"], method="spearman") > 0.7
    assert frame["dark_lightness"].corr(frame["tbp_lv_L"], method="spearman") > 0.7


def test_malignant_lesions_are_ugly_ducklings():
    """Malignant lesions deviate more from the patient's other lesions than benign ones, larger and redder
    (lower hue) than them, yet their absolute size overlaps the benign range."""
    frame = _frame(_records(30, image_size=64))
    columns = ["clin_size_long_diam_mm", "tbp_lv_areaMM2", "tbp_lv_H", "tbp_lv_color_std_mean",
               "tbp_lv_norm_border", "tbp_lv_area_perim_ratio"]
    values = frame[columns].astype(float)
    z = patient_relative(values.fillna(values.median()), frame["patient_id"])[[c + "_z" for c in columns]]
    deviation = z.abs().mean(axis=1)
    malignant = frame["target"] == 1
    assert malignant.sum() >= 10
    assert deviation[malignant].mean() > 1.2 * deviation[~malignant].mean()
    assert z.loc[malignant, "clin_size_long_diam_mm_z"].mean() > 0.5
    assert z.loc[malignant, "tbp_lv_H_z"].mean() < -0.5
    benign_p90 = frame.loc[~malignant, "clin_size_long_diam_mm"].quantile(0.9)
    assert (frame.loc[malignant, "clin_size_long_diam_mm"] < benign_p90).mean() > 0.2


def test_malignant_traits_step_away_from_the_phenotype():
    rng = np.random.default_rng(0)
    phenotype = synthetic.sample_phenotype(rng)
    benign = [synthetic.sample_lesion_traits(rng, phenotype, None) for _ in range(400)]
    melanoma = [synthetic.sample_lesion_traits(rng, phenotype, MALIGNANCIES[0]) for _ in range(400)]
    carcinoma = [synthetic.sample_lesion_traits(rng, phenotype, MALIGNANCIES[2]) for _ in range(400)]
    mean = lambda traits, name: np.mean([getattr(t, name) for t in traits])  # noqa: E731
    for name in ("log_diameter", "irregularity", "asymmetry", "variegation"):
        assert mean(melanoma, name) > mean(benign, name) and mean(carcinoma, name) > mean(benign, name)
    assert mean(melanoma, "density") > mean(benign, "density")
    assert mean(carcinoma, "redness") > mean(melanoma, "redness") and mean(carcinoma, "density") < mean(melanoma, "density")
    subtle = np.mean([t.log_diameter - phenotype.log_diameter < 0.2 for t in melanoma])
    assert 0.05 < subtle < 0.5  # some cancers look nearly benign


def test_dermoscopic_structures_are_drawn_in_the_image_only():
    """Each structure changes the image in and around the lesion, in its own colour, and only when asked;
    the measurements come from the lesion body (the same whatever structures are drawn)."""
    traits = Traits(log_diameter=math.log(7.0), density=0.8, redness=0.1, blue_patch=0.0, irregularity=0.02,
                    asymmetry=0.05, variegation=0.1, aspect=0.8)
    rendering = render_lesion(traits, synthetic_render.LIGHT_SKIN, np.random.default_rng(1), 128, "3D: XP")
    plain = draw_cues(rendering, (), [0, 0])
    assert np.array_equal(plain, rendering.clean)
    near = rendering.rel < 1.6
    lab = lambda image: synthetic_render.srgb_to_lab(image[near]).mean(0)  # noqa: E731  (L, a, b)
    base = lab(plain)
    changed = {cue: draw_cues(rendering, (cue,), [0, 0]) for cue in synthetic_render.CUES}
    for cue, image in changed.items():
        difference = np.abs(image - plain).sum(-1)
        assert difference.sum() > 0 and difference[~near].sum() < 0.05 * difference.sum(), cue
    assert lab(changed["veil"])[2] < base[2] - 1        # bluer
    assert lab(changed["vessels"])[1] > base[1] + 0.3   # redder
    assert lab(changed["globules"])[0] < base[0] and lab(changed["streaks"])[0] < base[0]  # darker
    assert lab(changed["regression"])[0] > base[0]      # lighter (scar-like)
    both = draw_cues(rendering, ("veil", "globules"), [0, 0])  # the globules keep their shape beside a veil
    outside_veil = np.abs(changed["veil"] - plain).sum(-1) == 0
    assert outside_veil.sum() > 100 and np.allclose(both[outside_veil], changed["globules"][outside_veil], atol=1e-5)
    with pytest.raises(ValueError, match="unknown dermoscopic structure"):
        draw_cues(rendering, ("pigment network",), [0, 0])
    assert measure_lesion(rendering, np.random.default_rng(2), MEASURED_COLUMNS) == \
        measure_lesion(rendering, np.random.default_rng(2), MEASURED_COLUMNS)


def test_cancers_favour_the_head_and_neck():
    weights = synthetic.NEVUS_SITE_WEIGHTS["male"]
    benign, malignant = synthetic._site_weights(weights, False), synthetic._site_weights(weights, True)
    head = synthetic.SITES.index("head/neck")
    odds = lambda p: p[head] / (1 - p[head])  # noqa: E731
    assert np.allclose(benign, weights) and odds(malignant) / odds(benign) == pytest.approx(synthetic.HEAD_NECK_RELATIVE_RISK)


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
    counts = write_kaggle_layout(tmp_path, num_patients=4, seed=3, image_size=32, lesions_per_patient_median=10)
    metadata = pd.read_csv(tmp_path / "train-metadata.csv")
    assert list(metadata.columns) == CSV_COLUMNS
    assert counts["lesions"] == len(metadata) and counts["malignant"] == metadata["target"].sum()
    assert metadata["patient_id"].nunique() == 4
    assert metadata["lesion_id"].isna().any()
    expected = list(generate_records(4, seed=3, image_size=32, lesions_per_patient_median=10))
    assert metadata["tbp_lv_areaMM2"].tolist() == pytest.approx([r["tbp_lv_areaMM2"] for r in expected])
    with h5py.File(tmp_path / "train-image.hdf5", "r") as images:
        assert sorted(images.keys()) == sorted(metadata["isic_id"])
        for record in expected:
            data = bytes(images[record["isic_id"]][()])
            assert data == record["image_bytes"]
            assert Image.open(io.BytesIO(data)).convert("RGB").size == (32, 32)


def test_cli_kaggle(tmp_path, capsys):
    synthetic.main(["kaggle", "--output-dir", str(tmp_path), "--patients", "2", "--image-size", "32", "--lesions-per-patient", "5"])
    assert (tmp_path / "train-metadata.csv").exists() and '"lesions"' in capsys.readouterr().out


@pytest.mark.parametrize("kwargs", [{"num_patients": -1}, {"num_patients": 1, "image_size": 8},
                                    {"num_patients": 1, "malignant_patient_share": 1.5},
                                    {"num_patients": 1, "lesions_per_patient_median": 0}])
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

    frame = _frame(_records(150, image_size=16))
    shares = pd.crosstab(frame["sex"], frame["anatom_site_general"], normalize="index")
    assert shares.loc["male", "posterior torso"] > shares.loc["female", "posterior torso"] + 0.08
    assert shares.loc["female", "lower extremity"] > shares.loc["male", "lower extremity"] + 0.1
    positive = [synthetic.sample_patient(0, i).num_malignant > 0 for i in range(3000)]
    older = np.array([p.age >= 57 for p in patients])
    assert np.mean(np.array(positive)[older]) > 1.2 * np.mean(np.array(positive)[~older])
    level = patient_level_signal(frame, MEASURED_COLUMNS + synthetic.BODY_POSITION)
    assert level["age_r2"] > 0.1 and level["sex_auroc"] > 0.7
