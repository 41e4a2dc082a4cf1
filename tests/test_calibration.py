"""Tests of the calibration report (training/data/calibration.py): each statistic on a small hand-made table
whose answer is known, the out-of-fold machinery, and the report end to end on a tiny generated dataset."""

import math

import numpy as np
import pandas as pd
import pytest

from training.data import calibration
from training.tabular import patient_relative, tabular_frames


def hand_table() -> pd.DataFrame:
    """3 patients, 12 lesions, 3 malignant.

    p1: sizes 1..6, the 6 mm one malignant (its largest), on the head.
    p2: sizes 2, 4, 8, the 4 mm one malignant (not its largest).
    p3: sizes 3, 5, 10, 10 (a tie at the top), one 10 mm malignant.
    """
    rows = [("p1", s, 0) for s in (1, 2, 3, 4, 5)] + [("p1", 6, 1)]
    rows += [("p2", 2, 0), ("p2", 4, 1), ("p2", 8, 0)]
    rows += [("p3", 3, 0), ("p3", 5, 0), ("p3", 10, 1), ("p3", 10, 0)]
    frame = pd.DataFrame(rows, columns=["patient_id", "clin_size_long_diam_mm", "target"])
    frame["tbp_lv_H"] = [60, 58, 57, 61, 59, 40, 55, 45, 62, 64, 63, 50, 66]
    frame["anatom_site_general"] = ["head/neck", "anterior torso", "anterior torso", None, "posterior torso", "head/neck",
                                    "upper extremity", "head/neck", "lower extremity", "lower extremity", "anterior torso",
                                    "posterior torso", "head/neck"]
    return frame


def test_counts_and_shares_of_patients():
    frame = hand_table()
    assert calibration.lesions_per_patient_median(frame) == 4  # 6, 3, 4
    assert calibration.malignant_patient_share(frame) == 1.0
    assert calibration.malignant_per_positive_patient(frame) == 1.0
    assert calibration.prevalence(frame) == pytest.approx(3 / 13)
    two = frame.copy()
    two.loc[two["patient_id"] == "p3", "target"] = 0
    two.loc[0, "target"] = 1  # p1 now has two cancers, p3 none
    assert calibration.malignant_patient_share(two) == pytest.approx(2 / 3)
    assert calibration.malignant_per_positive_patient(two) == pytest.approx(1.5)


def test_size_ratio_is_the_ratio_of_medians():
    frame = hand_table()
    # malignant sizes 6, 4, 10 -> median 6; benign 1,2,3,4,5,2,8,3,5,10 -> median 3.5
    assert calibration.size_ratio(frame) == pytest.approx(6 / 3.5)


def test_hue_auroc_scores_lower_hue_as_malignant():
    frame = hand_table()
    # malignant hues 40, 45, 50 are below every benign hue (55..66): lower hue = malignant, a perfect ranking
    assert calibration.hue_auroc(frame) == 1.0
    frame["tbp_lv_H"] = -frame["tbp_lv_H"]
    assert calibration.hue_auroc(frame) == 0.0
    frame.loc[frame["target"] == 1, "tbp_lv_H"] = np.nan  # missing hues are left out, not counted as anything
    frame.loc[0, "target"] = 1
    assert calibration.hue_auroc(frame) == pytest.approx(4 / 9)  # hue 60 (negated back) beats 55, 57, 58, 59 of 9


def test_head_neck_share_and_rate_ratio():
    frame = hand_table()
    # 12 lesions with a site, 4 on the head/neck (2 malignant); the other 8 hold 1 malignant
    assert calibration.head_neck_share(frame) == pytest.approx(4 / 12)
    assert calibration.head_neck_rate_ratio(frame) == pytest.approx((2 / 4) / (1 / 8))


def test_top10_share_counts_cancers_with_fewer_than_a_tenth_larger():
    frame = hand_table()
    # p1's 6 mm is its largest (in); p2's 4 mm has one larger of 3 (out); p3's 10 mm ties with another 10: none larger (in)
    assert calibration.top10_size_share(frame) == pytest.approx(2 / 3)
    big = pd.DataFrame({"patient_id": ["q"] * 20, "clin_size_long_diam_mm": np.arange(1, 21.0), "target": [0] * 20})
    big.loc[18, "target"] = 1  # 19 mm: one of 20 is larger (5% < 10%): in the top 10%
    assert calibration.top10_size_share(big) == 1.0
    big.loc[18, "target"], big.loc[17, "target"] = 0, 1  # 18 mm: two larger (10%, not below a tenth): out
    assert calibration.top10_size_share(big) == 0.0


def test_rank_average_and_patient_relative_features():
    assert np.allclose(calibration.rank_average(np.array([1.0, 2.0, 3.0]), np.array([30.0, 10.0, 20.0])),
                       [(1 / 3 + 1) / 2, (2 / 3 + 1 / 3) / 2, (1 + 2 / 3) / 2])
    frame = hand_table()
    relative = patient_relative(frame[["clin_size_long_diam_mm"]].astype(float), frame["patient_id"])
    p2 = relative[frame["patient_id"] == "p2"]
    assert np.allclose(p2["clin_size_long_diam_mm_z"], (np.array([2, 4, 8]) - 14 / 3) / np.std([2, 4, 8], ddof=1))
    assert np.allclose(p2["clin_size_long_diam_mm_rank"], [1 / 3, 2 / 3, 1])
    single = patient_relative(pd.DataFrame({"x": [5.0]}), pd.Series(["only"]))
    assert single["x_z"].tolist() == [0.0] and single["x_rank"].tolist() == [1.0]


def test_tabular_frames_reuse_the_training_statistics():
    frame = hand_table()
    absolute, relative, (medians, vocabularies) = tabular_frames(frame, ["clin_size_long_diam_mm", "tbp_lv_H"],
                                                                 ["anatom_site_general"])
    assert "anatom_site_general=head/neck" in absolute and "log_patient_lesions" in absolute
    assert absolute.loc[absolute.index[0], "log_patient_lesions"] == pytest.approx(math.log(6))
    assert list(relative.columns) == ["clin_size_long_diam_mm_z", "tbp_lv_H_z", "clin_size_long_diam_mm_rank", "tbp_lv_H_rank"]
    other = frame.iloc[:3].assign(anatom_site_general=["scalp", None, "head/neck"], tbp_lv_H=[np.nan, 1.0, 2.0])
    absolute2, _, _ = tabular_frames(other, ["clin_size_long_diam_mm", "tbp_lv_H"], ["anatom_site_general"],
                                     medians=medians, vocabularies=vocabularies)
    assert list(absolute2.columns) == list(absolute.columns)  # an unseen category adds no column
    assert absolute2["tbp_lv_H"].iloc[0] == medians["tbp_lv_H"]  # the training median fills the gap
    assert absolute2.filter(like="anatom_site_general=").iloc[0].sum() == 0


def test_relative_gain_share_sums_the_masked_columns():
    class Booster:
        def __init__(self, gains):
            self.booster_ = self
            self.gains = np.asarray(gains, dtype=float)

        def feature_importance(self, importance_type):
            assert importance_type == "gain"
            return self.gains

    share = calibration.relative_gain_share([Booster([1, 1, 2]), Booster([0, 3, 3])], np.array([False, True, True]))
    assert share == pytest.approx(9 / 10)


def test_patient_folds_keep_patients_whole():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0, 1, 0] * 3)
    patients = np.repeat(np.arange(10), 3)
    folds = calibration.patient_folds(labels, patients, 3, seed=0)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held) == list(range(30))
    for train, held_out in folds:
        assert not set(patients[train]) & set(patients[held_out])


@pytest.mark.slow  # the whole calibration report, ~40 s
def test_the_report_end_to_end_on_a_tiny_dataset():
    report = calibration.calibration_report(24, seed=0, image_size=32, folds=2, image_epochs=1,
                                            malignant_patient_share=0.7, lesions_per_patient_median=8)
    assert [f["key"] for f in report["facts"]] == [f.key for f in calibration.FACTS]
    for fact in report["facts"]:
        assert fact["passed"] == (fact["low"] <= fact["measured"] <= fact["high"])
    assert report["passed"] == all(f["passed"] for f in report["facts"])
    measured = {f["key"]: f["measured"] for f in report["facts"]}
    assert 4 <= measured["lesions_per_patient_median"] <= 12
    assert set(report["anchors"]) == {f"{m} / {v}" for m in ("logistic", "lightgbm")
                                      for v in ("absolute", "patient-relative", "absolute + patient-relative")}
    assert all(0 <= r["pauc"] <= 0.2 and 0 <= r["auroc"] <= 1 for r in {**report["anchors"], **report["image"]}.values())
    text = calibration.report_markdown(report)
    assert text.count("\n| ") >= len(calibration.FACTS) + len(report["anchors"]) + 3
    assert "real SLICE-3D" in text and "R² =" in text
