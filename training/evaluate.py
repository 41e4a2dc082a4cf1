"""Evaluate a SLIMP checkpoint on frozen features: linear probe (full and k-shot) and retrieval.

    python training/evaluate.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic   # -> outputs/slimp-synthetic-eval
    python training/evaluate.py --model_dir outputs/slimp-isic2024 --dataset_dir data/ham10000 \
        --output_dir reports/ham10000 --seeds 0 1 2 3 4 --shots 1 5 10 50 --splits train validation test
    python training/evaluate.py configs/evaluate.yaml                  # a YAML/JSON config-file shortcut

Protocol (`training/probe.py`, the one behind every probe table). The frozen SLIMPModel embeds every lesion of each split (`--splits`: the
first is the probe's training split, each other one is evaluated) in one pass over whole patients
(`training/embeddings.py`). Feature sets (`--feature_sets`, `training/probe.py`): `image`,
`image+context` (plus how the lesion differs from the same patient's other lesions), `image+metadata`
(image + lesion metadata + patient metadata) and `image+metadata+context`, read from the tower
outputs before the projections or from the projected embeddings (`--representation`). A logistic
regression probe is fitted on the whole training split, and k-shot probes on k lesions of each class
(binary: k positives and k negatives) drawn from it, per seed; both feature sets see the same draw.
A k larger than the rarest class of the training split is skipped and noted. Metrics: AUROC (macro
one-vs-rest for more than 2 classes), the ISIC 2024 pAUC above 80% TPR and the ISIC 2024 patient metric
(top-15 retrieval sensitivity), both for `--pauc_class` vs rest (default: the label name that is a known malignant
diagnosis, `training/labels.py`), and balanced accuracy, as mean ± sample std over the seeds; the full probe's solver
is deterministic, so it is fitted once (spread 0) and the seeds matter for the k-shot draws. Retrieval: recall@1/5/10
of image -> lesion metadata and back within each evaluated split, beside chance (k/N). Splits are
patient-disjoint by construction (training/prepare_data.py).

Writes `results.json`, `results.md` (Markdown tables), `roc.png` (full-probe ROC per feature set on the
last split) and `kshot.png` (AUROC vs k, std error bars) into `--output_dir` (default `MODEL_DIR-eval`, beside
the model folder, never inside the folder that is pushed); `main` returns the results. Progress bars show the
feature extraction and the probe fits.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


from modeling_slimp import SLIMPModel, SLIMPProcessor
from modeling_slimp.configuration_slimp import CLASSIFIER_REPRESENTATIONS, DEFAULT_CLASSIFIER_REPRESENTATION, FEATURE_SETS
from training.arguments import ArgumentError, check_source, parse_dataclasses, run_cli
from training.data.collate import DecodingCollator
from training.data.dataset import column_list, load_slimp_dataset
from training.embeddings import embed_split
from training import labels as label_rules
from training.probe import METRICS, PROBE_C_GRID, RETRIEVAL_KS, evaluate_features
from training.release import is_hub_id
from training.results import write_json

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    model_dir: str = field(metadata={"help": "A saved SLIMPModel folder (pretrain.py output) or Hub id."})
    dataset_dir: str = field(metadata={"help": "A dataset from `python -m training.prepare_data`."})
    output_dir: str | None = field(default=None, metadata={"help": "Where results.json, results.md, roc.png and kshot.png go (default: MODEL_DIR-eval beside the model folder, so that the folder you push holds the model only; eval/NAME for a Hub id)."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the probes and k-shot draws."})
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 50], metadata={"help": "k of the k-shot probes (k lesions per class)."})
    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"],
                              metadata={"help": "The probe's training split, then the evaluated splits (plots: the last)."})
    feature_sets: list[str] = field(default_factory=lambda: list(FEATURE_SETS), metadata={"help": f"Any of {list(FEATURE_SETS)}."})
    representation: str = field(default=DEFAULT_CLASSIFIER_REPRESENTATION, metadata={"help": f"What the probes read: one of {CLASSIFIER_REPRESENTATIONS} (tower outputs before the projections, or the projected embeddings)."})
    batch_size: int = field(default=256, metadata={"help": "Most lesions per feature-extraction batch (whole patients; phenotype and context are exact for any size)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers of the feature extraction."})
    probe_C: list[float] = field(default_factory=lambda: list(PROBE_C_GRID), metadata={"help": "Inverse L2 strength of the logistic-regression probe, or several: each feature set takes the one with the best validation AUROC (--select_split)."})
    select_split: str | None = field(default=None, metadata={"help": "Split that picks the probe's C from --probe_C (default: validation when evaluated; without it the grid's middle value)."})
    pauc_class: str | None = field(default=None,
                                   metadata={"help": "The positive class (a label name or id) whose one-vs-rest pAUC and top-15 are reported; default: the label name that is a known malignant diagnosis ('malignant', 'melanoma', 'mel', ...); a binary labelling without one is refused."})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda | ...; default: cuda if available."})

    def __post_init__(self):
        if self.output_dir is None:
            model = Path(self.model_dir.rstrip("/"))
            self.output_dir = str(model.with_name(model.name + "-eval") if model.exists() or not is_hub_id(self.model_dir)
                                  else Path("eval") / self.model_dir.replace("/", "--"))
        if len(self.splits) < 2 or len(set(self.splits)) != len(self.splits):
            raise ArgumentError(f"--splits needs the training split and at least one other, all distinct; got {self.splits}")
        if not self.seeds:
            raise ArgumentError("--seeds needs at least one seed")
        if any(k < 1 for k in self.shots):
            raise ArgumentError(f"--shots must be positive integers, got {self.shots}")
        unknown = [f for f in self.feature_sets if f not in FEATURE_SETS]
        if unknown or not self.feature_sets:
            raise ArgumentError(f"--feature_sets must be a non-empty subset of {list(FEATURE_SETS)}, got {self.feature_sets}")
        if self.representation not in CLASSIFIER_REPRESENTATIONS:
            raise ArgumentError(f"--representation must be one of {CLASSIFIER_REPRESENTATIONS}, got '{self.representation}'")


def parse_args(argv: list[str] | None = None) -> EvaluateArguments:
    (args,) = parse_dataclasses((EvaluateArguments,), argv)
    return args


# ----- report -----

def _cell(summary: dict, digits: int = 3) -> str:
    if summary["n"] == 0:
        return "n/a"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _metric_cells(metrics: dict) -> str:
    return " | ".join(_cell(metrics[m], 4 if m == "pauc_80tpr" else 3) for m in METRICS)


def render_markdown(results: dict) -> str:
    pauc = f"pAUC (TPR>80%, '{results['pauc_class']}' vs rest)"
    lines = [f"# SLIMP evaluation: `{results['model_dir']}` on `{results['dataset_dir']}`", "",
             f"Frozen features ({results['representation']} representation); logistic-regression probe trained on "
             f"`{results['train_split']}`; "
             f"k-shot rows: mean ± std over {results['num_seeds']} seed(s) {results['seeds']} (the full probe's solver is "
             "deterministic: it is fitted once, so its std is 0). Splits are patient-disjoint.", "",
             "| split | patients | lesions | labels |", "|---|---|---|---|"]
    for split, info in results["splits"].items():
        counts = ", ".join(f"{name}: {n}" for name, n in info["labels"].items())
        lines.append(f"| {split} | {info['patients']} | {info['lesions']} | {counts} |")
    header = f"| features | AUROC | {pauc} | top-15 sensitivity | balanced acc. |\n|---|---|---|---|---|"
    for split, by_set in results["linear_probe"].items():
        lines += ["", f"## Linear probe, full training split -> `{split}`", "", header]
        lines += [f"| {feature_set} | {_metric_cells(metrics)} |" for feature_set, metrics in by_set.items()]
    for split, by_set in results["kshot"].items():
        lines += ["", f"## k-shot probe (k lesions per class) -> `{split}`", "",
                  f"| k | features | AUROC | {pauc} | top-15 sensitivity | balanced acc. |", "|---|---|---|---|---|---|"]
        ks = sorted({int(k) for runs in by_set.values() for k in runs})
        lines += [f"| {k} | {feature_set} | {_metric_cells(by_set[feature_set][str(k)])} |" for k in ks for feature_set in by_set]
    if results["kshot_skipped"]:
        lines += ["", "Skipped k-shot settings:"] + [f"- k = {s['k']}: {s['reason']}" for s in results["kshot_skipped"]]
    for split, retrieval in results["retrieval"].items():
        lines += ["", f"## Retrieval on `{split}` (recall@k, one positive among all lesions of the split)", "",
                  "| direction | " + " | ".join(f"R@{k}" for k in RETRIEVAL_KS) + " |", "|---|" + "---|" * len(RETRIEVAL_KS)]
        for direction in ("image_to_metadata", "metadata_to_image", "chance"):
            cells = " | ".join(f"{retrieval[f'{direction}_recall@{k}']:.3f}" for k in RETRIEVAL_KS)
            lines.append(f"| {direction.replace('_', ' ')} | {cells} |")
    lines += ["", "Plots: `roc.png` (full probe, first seed, last split), `kshot.png` (AUROC vs k, error bars = std)."]
    return "\n".join(lines) + "\n"


def plot_roc(curves: dict, label_names: list[str], positive_class: int, path: Path) -> None:
    """ROC of the full probe per feature set (class `positive_class` vs rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    y = (curves["labels"] == positive_class).astype(int)
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for feature_set, (scores, classes) in curves["scores"].items():
        if positive_class in classes and 0 < y.sum() < len(y):
            score = scores[:, classes.index(positive_class)]
            fpr, tpr, _ = roc_curve(y, score)
            axis.plot(fpr, tpr, label=f"{feature_set} (AUC {roc_auc_score(y, score):.3f})")
    axis.plot([0, 1], [0, 1], "k:", linewidth=1)
    axis.axhline(0.8, color="grey", linewidth=0.8, linestyle="--")  # the pAUC region lies above TPR 0.8
    axis.set(xlabel="false positive rate", ylabel="true positive rate",
             title=f"{label_names[positive_class]} vs rest, {curves['split']}")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_kshot(results: dict, path: Path) -> None:
    """AUROC vs k per feature set (error bars: std over seeds), full-probe AUROC dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = results["eval_splits"][-1]
    figure, axis = plt.subplots(figsize=(5, 4))
    for index, feature_set in enumerate(results["feature_sets"]):
        color = f"C{index}"
        runs = results["kshot"].get(split, {}).get(feature_set, {})
        ks = sorted(int(k) for k in runs)
        if ks:
            axis.errorbar(ks, [runs[str(k)]["auroc"]["mean"] for k in ks], yerr=[runs[str(k)]["auroc"]["std"] for k in ks],
                          marker="o", capsize=3, color=color, label=feature_set)
        full = results["linear_probe"][split][feature_set]["auroc"]
        if full["n"]:
            axis.axhline(full["mean"], color=color, linestyle="--", linewidth=1, label=f"{feature_set}, full")
    if not results["kshot"].get(split):
        axis.text(0.5, 0.5, "no k fits the training split", ha="center", transform=axis.transAxes)
    axis.set_xscale("log")
    all_ks = sorted({int(k) for runs in results["kshot"].get(split, {}).values() for k in runs})
    if all_ks:
        axis.set_xticks(all_ks, [str(k) for k in all_ks])
        axis.minorticks_off()
    axis.set(xlabel="k (lesions per class)", ylabel="AUROC", title=f"k-shot linear probe, {split}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(results: dict, curves: dict, label_names: list[str], positive_class: int, output_dir: str) -> Path:
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "results.json", results)
    (output / "results.md").write_text(render_markdown(results))
    plot_roc(curves, label_names, positive_class, output / "roc.png")
    plot_kshot(results, output / "kshot.png")
    return output


# ----- script -----

def resolve_class(name: str | None, label_names: list[str]) -> int:
    """`--pauc_class` (label name or id; None: from the label names, `training.labels.positive_class`) -> class id."""
    try:
        return label_rules.positive_class(label_names, name)
    except label_rules.LabelError as error:
        raise ArgumentError(f"--pauc_class: {error}".replace("--positive_label", "--pauc_class")) from None


def split_info(dataset, label_names: list[str]) -> dict:
    labels = np.asarray(column_list(dataset, "label"))
    return {"patients": len(set(column_list(dataset, "patient_id"))), "lesions": len(dataset),
            "labels": {name: int((labels == c).sum()) for c, name in enumerate(label_names)}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_source(args.model_dir, "--model_dir", "model")
    check_source(args.dataset_dir, "--dataset_dir", "dataset")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = SLIMPModel.from_pretrained(args.model_dir).to(device).eval()
    collator = DecodingCollator(SLIMPProcessor.from_pretrained(args.model_dir), train=False)  # whole patients, any batch size
    features, splits, label_names = {}, {}, None
    for split in args.splits:
        dataset, _ = load_slimp_dataset(args.dataset_dir, split)
        label_names = label_names or list(dataset.features["label"].names)
        logger.info("extracting features of %s (%d lesions)", split, len(dataset))
        features[split] = embed_split(model, dataset, collator, batch_size=args.batch_size,
                                      num_workers=args.num_workers, device=device, desc=f"embedding {split}")
        splits[split] = split_info(dataset, label_names)
    positive_class = resolve_class(args.pauc_class, label_names)
    logger.info(label_rules.describe(label_names, positive_class))
    results, curves = evaluate_features(features, args.splits[0], args.splits[1:], label_names, args.seeds,
                                        args.shots, args.probe_C, positive_class, tuple(args.feature_sets),
                                        args.representation, args.select_split)
    for note in results["kshot_skipped"]:
        logger.warning("k-shot k = %d skipped: %s", note["k"], note["reason"])
    results = {"model_dir": args.model_dir, "dataset_dir": args.dataset_dir, "train_split": args.splits[0],
               "eval_splits": args.splits[1:], "label_names": label_names, "pauc_class": label_names[positive_class],
               "seeds": list(args.seeds), "num_seeds": len(args.seeds), "shots": list(args.shots), "splits": splits,
               "feature_sets": list(args.feature_sets), "representation": args.representation,
               **results, "args": asdict(args)}
    output = write_report(results, curves, label_names, positive_class, args.output_dir)
    logger.info("wrote %s", output / "results.md")
    return results


if __name__ == "__main__":
    print(Path(run_cli(main)["args"]["output_dir"], "results.md").read_text())
