"""The synthetic SLICE-3D's calibration table: each published fact about the real ISIC 2024 train set beside
its value measured on a generated dataset, the tabular anchors, and the image's own signal.

    python -m training.data.synthetic report --patients 400 --seed 0 --output report.md

The facts (real value, accepted range) are `FACTS`; each has a statistic of its own below, a function of a
table with the ISIC 2024 column names (so it runs on a converted real dataset too, and the tests check each
on a small hand-made table). The model-based rows are out-of-fold over patient-grouped, label-stratified
folds, as in the published study of the real data (junaidaliop.github.io/isic2024-tbp):

- tabular anchors: logistic regression and LightGBM on the absolute metadata, on the patient-relative
  features alone, and on both (`training/tabular.py`); the share of LightGBM's gain that goes to the
  patient-relative features;
- the image's own signal: a small CNN trained from scratch on the crops (64 px) with the labels, alone, as one
  more input of the LightGBM recipe (the stack whose gain the calibration checks), and rank-averaged with the
  LightGBM score (the study's own stack: it suits an image model about as strong as the GBDT, as the real one is).

The real image model is an ImageNet-pretrained ConvNeXt trained on 400,000 crops; a small CNN from scratch on a
few thousand is weaker, so the image rows check that the image carries signal, and signal beyond the
measurements, not the real model's strength.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time

import numpy as np
import pandas as pd

from training.metrics import auroc, isic2024_pauc

SIZE, HUE, SITE, PATIENT = "clin_size_long_diam_mm", "tbp_lv_H", "anatom_site_general", "patient_id"


@dataclasses.dataclass(frozen=True)
class Fact:
    """One published fact about the real SLICE-3D: its value and the range a generated dataset must hit."""

    key: str
    description: str
    real: float
    low: float
    high: float
    note: str = ""


FACTS = (
    Fact("malignant_patient_share", "share of patients with at least one malignant lesion", 0.249, 0.20, 0.30,
         "259 of 1,042 patients; range = real ± 2 binomial sd at 400 patients"),
    Fact("malignant_per_positive_patient", "malignant lesions per patient with any", 1.52, 1.25, 1.80, "393 / 259"),
    Fact("size_ratio", "median long diameter, malignant / benign", 2.0, 1.7, 2.4),
    Fact("hue_auroc", "hue `tbp_lv_H` alone, univariate AUROC (lower hue = malignant)", 0.81, 0.76, 0.86),
    Fact("head_neck_share", "share of lesions on the head and neck", 0.07, 0.05, 0.10, "a small site"),
    Fact("head_neck_rate_ratio", "malignant rate on the head and neck / elsewhere", 7.0, 5.0, 9.5),
    Fact("top10_size_share", "share of cancers among the largest 10% of their patient's lesions", 0.457, 0.38, 0.54),
    Fact("lesions_per_patient_median", "lesions per patient, median", 241, 30, 60,
         "compromise: a CPU-sized dataset keeps a median of at least 30"),
    Fact("relative_gain_share", "share of LightGBM's gain on patient-relative features", 0.65, 0.50, 0.80),
    Fact("gbdt_pauc", "tabular GBDT (absolute + patient-relative), out-of-fold pAUC", 0.169, 0.14, 0.19),
    Fact("image_to_gbdt_pauc", "image model alone / tabular GBDT, out-of-fold pAUC", 0.94, 0.45, 1.05,
         "real: ImageNet ConvNeXt on 400k crops (0.158 / 0.169); here a small CNN from scratch"),
    Fact("stack_gain_pauc", "GBDT with the image model's score as one more input, minus the GBDT, pAUC", 0.005, 0.001, 0.03,
         "the image carries signal beyond the measurements (real stack 0.174 vs 0.169)"),
)


# ----- statistics of a table (ISIC 2024 column names; `target` 0/1) -----

def lesions_per_patient_median(frame: pd.DataFrame) -> float:
    return float(frame.groupby(PATIENT).size().median())


def malignant_patient_share(frame: pd.DataFrame) -> float:
    return float((frame.groupby(PATIENT)["target"].max() > 0).mean())


def malignant_per_positive_patient(frame: pd.DataFrame) -> float:
    per_patient = frame.groupby(PATIENT)["target"].sum()
    return float(per_patient[per_patient > 0].mean()) if (per_patient > 0).any() else math.nan


def prevalence(frame: pd.DataFrame) -> float:
    return float(frame["target"].mean())


def size_ratio(frame: pd.DataFrame) -> float:
    """Median long diameter of the malignant lesions over that of the benign ones."""
    sizes = frame[SIZE].astype(float)
    return float(sizes[frame["target"] == 1].median() / sizes[frame["target"] == 0].median())


def hue_auroc(frame: pd.DataFrame) -> float:
    """AUROC of the hue angle alone, lower hue (redder) scoring higher; lesions without hue left out."""
    known = frame[HUE].notna()
    return auroc(frame.loc[known, "target"].to_numpy(), -frame.loc[known, HUE].astype(float).to_numpy())


def head_neck_share(frame: pd.DataFrame) -> float:
    """Share of the lesions with a known site that lie on the head and neck."""
    sites = frame[SITE].dropna()
    return float((sites == "head/neck").mean())


def head_neck_rate_ratio(frame: pd.DataFrame) -> float:
    """Malignant rate on the head and neck over the rate on every other site (lesions with a known site)."""
    known = frame[frame[SITE].notna()]
    on_head = known[SITE] == "head/neck"
    return float(known.loc[on_head, "target"].mean() / known.loc[~on_head, "target"].mean())


def top10_size_share(frame: pd.DataFrame) -> float:
    """Share of the malignant lesions among the largest 10% of their own patient's lesions: fewer than a
    tenth of the patient's lesions are larger (for a patient with under 10 lesions: none is larger)."""
    sizes = frame[SIZE].astype(float)
    larger = sizes.groupby(frame[PATIENT]).rank(method="min", ascending=False) - 1  # lesions strictly larger
    count = frame.groupby(PATIENT)[PATIENT].transform("size")
    top = larger < 0.1 * count
    malignant = (frame["target"] == 1) & sizes.notna()
    return float(top[malignant].mean())


def rank_average(*scores: np.ndarray) -> np.ndarray:
    """The mean of each score's percentile rank (the study's parameter-free stack)."""
    return np.mean([pd.Series(s).rank(pct=True).to_numpy() for s in scores], axis=0)


STATISTICS = {"malignant_patient_share": malignant_patient_share,
              "malignant_per_positive_patient": malignant_per_positive_patient, "size_ratio": size_ratio,
              "hue_auroc": hue_auroc, "head_neck_share": head_neck_share, "head_neck_rate_ratio": head_neck_rate_ratio,
              "top10_size_share": top10_size_share, "lesions_per_patient_median": lesions_per_patient_median}


# ----- out-of-fold models -----

def patient_folds(labels: np.ndarray, patients: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped, label-stratified (train, held-out) index pairs."""
    from sklearn.model_selection import StratifiedGroupKFold

    return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(labels, labels, patients))


def out_of_fold(model: str, x: np.ndarray, labels: np.ndarray, folds: list, seed: int) -> tuple[np.ndarray, list]:
    """Out-of-fold positive scores of `model` (`training.tabular.fit_and_score`) and the fitted models."""
    from training.tabular import fit_and_score

    scores, fitted = np.zeros(len(labels)), []
    for train, held_out in folds:
        (score,), model_of_fold = fit_and_score(model, x[train], labels[train], [x[held_out]], seed=seed, return_model=True)
        scores[held_out] = score
        fitted.append(model_of_fold)
    return scores, fitted


def relative_gain_share(boosters: list, relative_columns: np.ndarray) -> float:
    """Share of the total split gain of LightGBM models that goes to the patient-relative columns (mask)."""
    gains = np.sum([b.booster_.feature_importance(importance_type="gain") for b in boosters], axis=0)
    return float(gains[relative_columns].sum() / gains.sum())


def image_scores(images: np.ndarray, labels: np.ndarray, folds: list, seed: int, epochs: int = 40) -> np.ndarray:
    """Out-of-fold malignancy scores of a small CNN trained from scratch on uint8 crops (N, S, S, 3): four
    conv-batchnorm-ReLU blocks, global pooling, a linear head; each epoch holds every positive of the fold and
    three times as many negatives drawn anew (the real study's undersampling), flips and quarter turns."""
    import torch
    from torch import nn

    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)                # (N, 3, S, S)
    x_all = (x_all - x_all.mean((0, 2, 3), keepdim=True)) / x_all.std((0, 2, 3), keepdim=True)
    scores = np.zeros(len(labels))
    for fold, (train, held_out) in enumerate(folds):
        generator = torch.Generator().manual_seed(seed * 100 + fold)
        torch.manual_seed(seed * 100 + fold)
        widths = [3, 12, 24, 48, 64]
        blocks = [nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                                nn.MaxPool2d(2) if i < 3 else nn.Identity()) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
        net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 1))
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        positives, negatives = train[labels[train] == 1], train[labels[train] == 0]
        for _ in range(epochs):
            pick = negatives[torch.randperm(len(negatives), generator=generator)[: 3 * len(positives)].numpy()]
            order = np.concatenate([positives, pick])[torch.randperm(len(positives) + len(pick), generator=generator).numpy()]
            net.train()
            for start in range(0, len(order), 64):
                batch = order[start: start + 64]
                x = x_all[batch]
                if torch.rand(1, generator=generator) < 0.5:
                    x = x.flip(3)
                x = torch.rot90(x, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))
                loss = nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(1), torch.from_numpy(labels[batch]).float())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.eval()
        with torch.no_grad():
            scores[held_out] = torch.cat([net(x_all[held_out[i: i + 256]]).squeeze(1) for i in range(0, len(held_out), 256)]).numpy()
    return scores


def patient_level_signal(frame: pd.DataFrame, columns: list[str], seed: int = 0, folds: int = 5) -> dict:
    """How well a patient's age and sex are predicted from that patient's lesions (what the outer, patient-level
    loss can align): per patient, the mean of each of ``columns``, the share of lesions at each body site and
    the log lesion count; ridge regression for age (R² on held-out patients) and logistic regression for sex
    (AUROC), cross-validated over patients."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import r2_score, roc_auc_score
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values = frame[columns].astype(float)
    values = values.fillna(values.median())
    per_patient = values.groupby(frame[PATIENT]).mean()
    shares = pd.crosstab(frame[PATIENT], frame[SITE].fillna("missing"), normalize="index").add_prefix("site_share_")
    per_patient = per_patient.join(shares)
    per_patient["log_lesions"] = np.log(frame.groupby(PATIENT).size())
    info = frame.groupby(PATIENT)[["age_approx", "sex"]].first().loc[per_patient.index]
    x = per_patient.to_numpy()
    splits = list(KFold(folds, shuffle=True, random_state=seed).split(x))
    age_known, age = info["age_approx"].notna().to_numpy(), info["age_approx"].to_numpy(dtype=float)
    sex_known, male = info["sex"].notna().to_numpy(), (info["sex"] == "male").to_numpy(dtype=int)
    predicted, score = np.full(len(x), np.nan), np.full(len(x), np.nan)
    for train, test in splits:
        fit, held = train[age_known[train]], test[age_known[test]]
        ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 3, 12))).fit(x[fit], age[fit])
        predicted[held] = ridge.predict(x[held])
        fit, held = train[sex_known[train]], test[sex_known[test]]
        logistic = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000)).fit(x[fit], male[fit])
        score[held] = logistic.predict_proba(x[held])[:, 1]
    return {"patients": len(x), "age_r2": round(float(r2_score(age[age_known], predicted[age_known])), 3),
            "sex_auroc": round(float(roc_auc_score(male[sex_known], score[sex_known])), 3)}


# ----- the report -----

def _metrics(labels: np.ndarray, score: np.ndarray) -> dict:
    return {"auroc": round(auroc(labels, score), 4), "pauc": round(isic2024_pauc(labels, score), 4)}


def generated_table(num_patients: int, seed: int, image_size: int, model_image_size: int = 64,
                    **generator_options) -> tuple[pd.DataFrame, np.ndarray]:
    """A generated dataset as a DataFrame (no image bytes) and its crops resized to ``model_image_size``."""
    from PIL import Image

    from .synthetic import generate_records

    rows, images = [], []
    for record in generate_records(num_patients, seed=seed, image_size=image_size, **generator_options):
        image = Image.open(io.BytesIO(record.pop("image_bytes"))).convert("RGB")
        images.append(np.asarray(image.resize((model_image_size,) * 2, Image.BILINEAR)))
        rows.append(record)
    return pd.DataFrame(rows), np.stack(images)


def calibration_report(num_patients: int, seed: int = 0, image_size: int = 128, folds: int = 5, image_epochs: int = 40,
                       **generator_options) -> dict:
    """Generate a dataset and measure every fact of `FACTS` on it, plus the tabular anchors and the image rows.
    ``generator_options`` go to `generate_records` (its defaults are the calibrated dataset)."""
    from .synthetic import (BODY_POSITION, MEASURED_COLUMNS, SYNTHETIC_LESION_CATEGORICAL, SYNTHETIC_PATIENT_CATEGORICAL,
                            SYNTHETIC_PATIENT_NUMERICAL)
    from training.tabular import tabular_frames

    start = time.perf_counter()
    frame, images = generated_table(num_patients, seed, image_size, **generator_options)
    generation_s = time.perf_counter() - start
    labels, patients = frame["target"].to_numpy(), frame[PATIENT].to_numpy()
    measured = {key: function(frame) for key, function in STATISTICS.items()}

    lesion_numerical = MEASURED_COLUMNS + BODY_POSITION
    absolute, relative, _ = tabular_frames(frame, lesion_numerical + SYNTHETIC_PATIENT_NUMERICAL,
                                           SYNTHETIC_LESION_CATEGORICAL + SYNTHETIC_PATIENT_CATEGORICAL,
                                           lesion_numerical=lesion_numerical)
    views = {"absolute": absolute.to_numpy(), "patient-relative": relative.to_numpy(),
             "absolute + patient-relative": np.concatenate([absolute.to_numpy(), relative.to_numpy()], axis=1)}
    split = patient_folds(labels, patients, folds, seed)
    anchors, scores = {}, {}
    for model in ("logistic", "lightgbm"):
        for view, x in views.items():
            scores[model, view], fitted = out_of_fold(model, x, labels, split, seed)
            anchors[f"{model} / {view}"] = _metrics(labels, scores[model, view])
            if model == "lightgbm" and view == "absolute + patient-relative":
                mask = np.r_[np.zeros(absolute.shape[1], bool), np.ones(relative.shape[1], bool)]
                measured["relative_gain_share"] = relative_gain_share(fitted, mask)
    gbdt = scores["lightgbm", "absolute + patient-relative"]
    image = image_scores(images, labels, split, seed, epochs=image_epochs)
    stacked, _ = out_of_fold("lightgbm", np.c_[views["absolute + patient-relative"], image], labels, split, seed)
    image_rows = {"image model alone (small CNN, 64 px)": _metrics(labels, image),
                  "stack: LightGBM recipe + the image model's score": _metrics(labels, stacked),
                  "stack: rank average of GBDT and image": _metrics(labels, rank_average(gbdt, image))}
    measured["gbdt_pauc"] = anchors["lightgbm / absolute + patient-relative"]["pauc"]
    measured["image_to_gbdt_pauc"] = image_rows["image model alone (small CNN, 64 px)"]["pauc"] / measured["gbdt_pauc"]
    measured["stack_gain_pauc"] = image_rows["stack: LightGBM recipe + the image model's score"]["pauc"] - measured["gbdt_pauc"]
    patient_level = patient_level_signal(frame, lesion_numerical, seed, folds)
    facts = [{**dataclasses.asdict(fact), "measured": round(float(measured[fact.key]), 4),
              "passed": bool(fact.low <= measured[fact.key] <= fact.high)} for fact in FACTS]
    return {"patients": num_patients, "lesions": len(frame), "malignant": int(labels.sum()),
            "prevalence": round(prevalence(frame), 5), "seed": seed, "image_size": image_size,
            "generator_options": generator_options, "folds": folds, "facts": facts,
            "passed": all(f["passed"] for f in facts), "anchors": anchors, "image": image_rows,
            "patient_level": patient_level,
            "generation_seconds": round(generation_s, 1), "total_seconds": round(time.perf_counter() - start, 1)}


def report_markdown(report: dict) -> str:
    """A `calibration_report` as Markdown: the facts table, then the anchors and the image rows."""
    lines = [f"{report['patients']} patients, {report['lesions']} lesions, {report['malignant']} malignant "
             f"(prevalence {100 * report['prevalence']:.2f}%; real 0.098%), seed {report['seed']}, "
             f"{report['image_size']} px; out-of-fold scores over {report['folds']} patient-grouped folds.", "",
             "| fact | real SLICE-3D | accepted | measured | pass |", "|---|---|---|---|---|"]
    for fact in report["facts"]:
        note = f" ({fact['note']})" if fact["note"] else ""
        lines.append(f"| {fact['description']}{note} | {fact['real']:g} | {fact['low']:g} – {fact['high']:g} | "
                     f"{fact['measured']:.3f} | {'yes' if fact['passed'] else '**no**'} |")
    lines += ["", "| out-of-fold model | AUROC | pAUC above 80% TPR |", "|---|---|---|"]
    lines += [f"| {name} | {m['auroc']:.3f} | {m['pauc']:.4f} |" for name, m in {**report["anchors"], **report["image"]}.items()]
    level = report["patient_level"]
    lines += ["", f"Patient level ({level['patients']} patients, cross-validated): a patient's age predicted from the "
                  f"patient's lesions R² = {level['age_r2']:.3f}; sex AUROC = {level['sex_auroc']:.3f} (what the "
                  "patient-level loss can align)."]
    lines += ["", f"All facts within range: {'yes' if report['passed'] else '**no**'}. Generation "
                  f"{report['generation_seconds']:.0f} s, total {report['total_seconds']:.0f} s."]
    return "\n".join(lines)


__all__ = ["FACTS", "STATISTICS", "calibration_report", "report_markdown", "rank_average", "patient_folds"]
