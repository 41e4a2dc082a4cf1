"""Representation quality of SLIMP beside its baselines, the ISIC 2024 tabular recipe and a supervised image model.

    python bench/quality.py                                      # the README numbers -> bench/results/quality/
    python bench/quality.py --curve_steps 0 100 300 1000 --variants slimp_mean simclr --anchors false \\
        --label curve --output_dir bench/results/quality-curve  # the budget curve
    python bench/quality.py --variants slimp_mean --seeds 0 --extra_args "--feature_dropout 0.3" \\
        --label fd03 --output_dir /tmp/ablation                  # an ablation: any pretrain.py arguments
    python bench/quality.py --dataset_dir data/isic2024 --model_size small --max_steps 5000   # any converted dataset
    python bench/quality.py --quick --output_dir /tmp/quality-quick                          # minutes: the smoke test's run

The data: by default a synthetic SLICE-3D of 500 patients from `training/data/synthetic.py`, calibrated to the
published facts about the real ISIC 2024 train set (`python -m training.data.synthetic report`).

Pre-training variants, each with the same steps, batch (P patients x up to K lesions), model preset,
resolution, learning-rate schedule and data (the train split only; pre-training never sees labels):

| variant | pretrain.py arguments | what it is |
|---|---|---|
| `random` | none: an untrained SLIMPModel | the floor (same initialisation as the others at that seed) |
| `simclr` | `--image_ssl_weight 1` | image-only SimCLR (metadata towers stay untrained) |
| `clip_flat` | `--lesion_loss_weight 1` | flat lesion-level image <-> metadata CLIP (patient tower untrained) |
| `slimp_mean` | `--lesion_loss_weight 0.5 --patient_aggregation mean` | SLIMP as in the paper |
| `slimp_attention` | `--lesion_loss_weight 0.5 --patient_aggregation attention` | SLIMP with gated attention pooling |
| `slimp_ssl` | `--lesion_loss_weight 0.5 --image_ssl_weight 0.3` | SLIMP + image self-supervision |
| `slimp_noext` (not run by default) | `--lesion_loss_weight 0.5 --exclude_features` the `*ext` colour columns | SLIMP without the colour of the surrounding skin |

Evaluation of each checkpoint (`training/embeddings.py` once per split, `training/evaluate.py` protocol):
logistic-regression probes on the frozen features of the train split (L2 strength picked on the validation
split from `training/evaluate.py`'s grid), scored on the patient-disjoint test split, full and k-shot
(1/5/10/50 per class), for the feature sets of `training/probe.py` (`image`, the paper's SLIMP_Image row;
`image+context`; `image+metadata`; `image+metadata+context`) read from both representations (`tower` outputs
before the projections, `projection` embeddings); AUROC, the ISIC 2024 pAUC above 80% TPR, the ISIC 2024
patient metric (top-15 sensitivity); image -> lesion-metadata retrieval recall@k; and the ISIC 2024 winners'
stack: the tabular recipe (`bench/anchors.py`: LightGBM on raw + patient-relative metadata) with the variant's
image-only probe score as one more input (out-of-fold on the training rows), beside the recipe with the image
features themselves and the rank average of the two scores. Reference rows: logistic regression and LightGBM
on the raw metadata (absolute, patient-relative, both), and the ceiling, a supervised image model (the same
backbone, untrained, fine-tuned end to end with the labels by `training/finetune.py` for the same steps and
batch). The headline representation is the one with the better mean *validation* AUROC of the context probe;
"best configuration" is the SLIMP variant with the best validation AUROC of the image-only probe (the protocol
of the targets): test numbers never choose anything.

The k-shot draws depend on the pre-training seed only, so every variant of one seed sees the same draws
and the same initialisation: the comparisons are paired. Tables give mean ± sample std over the seeds and
a paired table of SLIMP minus each baseline. With `--curve_steps`, each variant is pre-trained once per
seed for the largest step count and its checkpoints at each listed step are evaluated (step 0 = the
untrained model): probe quality against the pre-training budget.

Writes `quality.json` (every run's metrics and wall time, the aggregates, the command line and the
environment), `quality.md` (the tables) and `kshot.png` (or `curve.png`) into `--output_dir`; datasets and
checkpoints go to `--work_dir` (default `outputs/bench-quality`, git-ignored).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser


from bench._common import environment
from training.metrics import probability_metrics
from training.probe import PROBE_C_GRID, evaluate_features, probe_inputs, summarise
from bench.quality_report import (
    CEILING, CONTEXT, DEFAULT_VARIANTS, REPRESENTATIONS, SPLITS, VARIANTS, aggregate, best_configuration,
    choose_representation, paired_differences, plot, render_markdown, targets)
from training.data.calibration import rank_average
from training.results import write_json
from training.tabular import fit_and_score

logger = logging.getLogger("bench.quality")

@dataclass
class QualityArguments:
    output_dir: str = field(default="bench/results/quality", metadata={"help": "Where quality.json, quality.md and the plot go."})
    work_dir: str | None = field(default=None, metadata={"help": "Datasets and checkpoints (default outputs/bench-quality[-quick])."})
    dataset_dir: str | None = field(default=None, metadata={"help": "A converted dataset to use instead of building the synthetic one."})
    patients: int = field(default=500, metadata={"help": "Patients of the synthetic dataset (split 70/10/20 by patient)."})
    lesions_per_patient: float = field(default=40, metadata={"help": "Median lesions per patient of the synthetic dataset (the generator's default)."})
    malignant_patient_share: float = field(default=259 / 1042, metadata={"help": "Share of synthetic patients with a cancer (the generator's default, ISIC 2024's)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the synthetic dataset."})
    dataset_image_size: int | None = field(default=None, metadata={"help": "Side of the synthetic images (default: the generator's)."})
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS), metadata={"help": f"Any of {list(VARIANTS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Pre-training seeds."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps of every pre-training run."})
    curve_steps: list[int] = field(default_factory=list, metadata={"help": "Evaluate the checkpoints at these steps of one run of max(curve_steps) steps (a budget curve)."})
    warmup_steps: int = field(default=50, metadata={"help": "Warm-up steps of every run."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate of every run."})
    patients_per_batch: int = field(default=16, metadata={"help": "P of every run."})
    max_lesions_per_patient: int = field(default=8, metadata={"help": "K of every run."})
    model_size: str = field(default="tiny", metadata={"help": "Model preset."})
    image_size: int = field(default=64, metadata={"help": "Model resolution (the tiny preset's is 64)."})
    num_workers: int = field(default=1, metadata={"help": "DataLoader workers of pre-training."})
    extra_args: str = field(default="", metadata={"help": "More pretrain.py arguments for every pre-trained variant (ablations), e.g. \"--feature_dropout 0.3\"."})
    label: str = field(default="", metadata={"help": "A name for this configuration (runs are stored under it)."})
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 50], metadata={"help": "k of the k-shot probes."})
    kshot_draws: int = field(default=1, metadata={"help": "k-shot draws (probe seeds) per checkpoint; seed s uses draws s*n .. s*n+n-1."})
    anchors: bool = field(default=True, metadata={"help": "Also the tabular rows (logistic regression / LightGBM on raw metadata) and the winners' stack of each variant (needs lightgbm)."})
    representations: list[str] = field(default_factory=lambda: ["tower"], metadata={"help": f"Which features the probes read, any of {list(REPRESENTATIONS)} (tower outputs before the projections, or the projected embeddings; the tower validated better in every earlier run, and each one more doubles the probes' cost)."})
    ceiling: bool = field(default=True, metadata={"help": "Also the supervised image model: the same backbone trained with the labels, same steps and batch (training/finetune.py --mode full --classifier_features image from the untrained model)."})
    reuse_runs: bool = field(default=False, metadata={"help": "Reuse a run whose record in work_dir has the same arguments."})
    quick: bool = field(default=False, metadata={"help": "Smoke-test preset: 24 patients, 1 seed, 2 steps, 32 px."})

    def __post_init__(self):
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"--variants must be a non-empty subset of {list(VARIANTS)}, got {self.variants}")
        if not self.representations or set(self.representations) - set(REPRESENTATIONS):
            raise ValueError(f"--representations must be a non-empty subset of {list(REPRESENTATIONS)}, got {self.representations}")
        if not self.seeds or self.kshot_draws < 1:
            raise ValueError("--seeds needs at least one seed and --kshot_draws at least 1")
        if self.curve_steps and (min(self.curve_steps) < 0 or len(set(self.curve_steps)) != len(self.curve_steps)):
            raise ValueError(f"--curve_steps must be distinct and >= 0, got {self.curve_steps}")
        self.work_dir = self.work_dir or ("outputs/bench-quality-quick" if self.quick else "outputs/bench-quality")


QUICK = dict(patients=24, dataset_image_size=48, seeds=[0], max_steps=2, warmup_steps=1, patients_per_batch=4,
             max_lesions_per_patient=4, image_size=32, num_workers=0, lesions_per_patient=10, malignant_patient_share=0.6)


# ----- runs -----

def build_dataset(args: QualityArguments) -> str:
    """The synthetic dataset in work_dir (reused when already built with the same options)."""
    if args.dataset_dir:
        return args.dataset_dir
    name = (f"synthetic-p{args.patients}-seed{args.dataset_seed}-l{args.lesions_per_patient:g}-m{args.malignant_patient_share:.3f}"
            + (f"-{args.dataset_image_size}px" if args.dataset_image_size else ""))
    directory = Path(args.work_dir) / "data" / name
    if not (directory / "summary.json").is_file():
        from training.data import convert

        command = ["synthetic", "--patients", str(args.patients), "--seed", str(args.dataset_seed), "--output-dir", str(directory),
                   "--lesions-per-patient", str(args.lesions_per_patient), "--malignant-patient-share", str(args.malignant_patient_share)]
        if args.dataset_image_size:
            command += ["--image-size", str(args.dataset_image_size)]
        convert.main(command + (["--overwrite"] if directory.exists() else []))
    return str(directory)


def pretrain_argv(args: QualityArguments, variant: str, dataset_dir: str, model_dir: Path, seed: int) -> list[str]:
    steps = max(args.curve_steps) if args.curve_steps else args.max_steps
    save = ["--save_steps", str(math.gcd(*[s for s in args.curve_steps if s > 0])), "--save_total_limit", "0"] \
        if args.curve_steps else ["--save_steps", "0"]
    return ["--dataset_dir", dataset_dir, "--output_dir", str(model_dir), "--model_size", args.model_size,
            "--image_size", str(args.image_size), "--max_steps", str(steps), "--warmup_steps", str(args.warmup_steps),
            "--learning_rate", str(args.learning_rate), "--patients_per_batch", str(args.patients_per_batch),
            "--max_lesions_per_patient", str(args.max_lesions_per_patient), "--num_workers", str(args.num_workers),
            "--seed", str(seed), "--eval_steps", "0", *save, "--linear_probe", "false",
            "--logging_steps", str(max(1, steps // 20)), *VARIANTS[variant][0], *shlex.split(args.extra_args)]


def initial_model(args: QualityArguments, dataset_dir: str, seed: int, variant: str = "random"):
    """The model pretrain.py starts from at this seed (and its processor), untouched."""
    from training.data.dataset import load_slimp_dataset
    from training.presets import build_processor, model_arguments, seeded_model

    argv = pretrain_argv(args, variant if VARIANTS[variant][0] else "slimp_mean", dataset_dir, Path("unused"), seed)
    model_args = model_arguments(argv)
    if VARIANTS[variant][0] is None:  # the random variant: the pre-training arguments of SLIMP, never trained
        model_args.lesion_loss_weight, model_args.image_ssl_weight = 0.5, 0.0
    train_split, schema = load_slimp_dataset(dataset_dir, "train")
    model = seeded_model(model_args, schema, train_split, seed)  # seeded and built as pretrain.py does
    return model, build_processor(model, model_args)


def checkpoints_of(args: QualityArguments, variant: str, dataset_dir: str, run_dir: Path, seed: int):
    """(step, model, processor) for each step to evaluate: the final model, or the curve's checkpoints."""
    from safetensors.torch import load_file

    from modeling_slimp import SLIMPModel, SLIMPProcessor

    if VARIANTS[variant][0] is None:
        yield 0, *initial_model(args, dataset_dir, seed, variant)
        return
    if not args.curve_steps:
        yield args.max_steps, SLIMPModel.from_pretrained(run_dir / "model"), SLIMPProcessor.from_pretrained(run_dir / "model")
        return
    for step in sorted(args.curve_steps):
        model, processor = initial_model(args, dataset_dir, seed, variant)
        if step > 0:
            model.load_state_dict(load_file(str(run_dir / "model-checkpoints" / f"step-{step:07d}" / "model.safetensors")))
        yield step, model, processor


def evaluate_checkpoint(model, processor, splits: dict, label_names: list[str], args: QualityArguments, draws: list[int],
                        tabular: dict | None) -> tuple[dict, dict]:
    """Every number of one checkpoint: probes (both representations), k-shot, retrieval, recipe + features."""
    from training.data.collate import DecodingCollator
    from training.embeddings import embed_split

    collator = DecodingCollator(processor, train=False)
    features = {name: embed_split(model, split, collator) for name, split in splits.items()}
    metrics, skipped = {}, []
    image_probe_scores = {}
    for representation in args.representations:
        results, curves = evaluate_features(features, "train", ["validation", "test"], label_names, draws, args.shots,
                                            C=list(PROBE_C_GRID), representation=representation)
        skipped = results["kshot_skipped"]
        scores, classes = curves["scores"]["image"]  # the full image-only probe on the test split (first draw)
        image_probe_scores[representation] = (results["probe_C"]["image"], scores[:, classes.index(1)])
        metrics.update({f"{representation}/probe_C/{fs}": c for fs, c in results["probe_C"].items()})
        for split, by_set in results["linear_probe"].items():
            for feature_set, by_metric in by_set.items():
                for name, summary in by_metric.items():
                    metrics[f"{representation}/probe/{feature_set}/{name}@{split}"] = summary["mean"]
        for feature_set, by_k in results["kshot"].get("test", {}).items():
            for k, by_metric in by_k.items():
                for name, summary in by_metric.items():
                    metrics[f"{representation}/kshot/{feature_set}/{k}/{name}"] = summary["mean"]
        if representation == args.representations[0]:
            metrics.update({f"retrieval/{k}": v for k, v in results["retrieval"]["test"].items()})
    if tabular is not None:
        labels, patients = features["test"]["labels"], features["test"]["patient_ids"]
        if not np.array_equal(labels, tabular["labels"]["test"]):
            raise RuntimeError("the embedded test split is not in the dataset's row order: the stacks would mix lesions")
        recipe = tabular["recipe_scores"][draws[0]]
        train_labels, both = features["train"]["labels"], tabular["matrices"]["both"]
        for representation in args.representations:
            image = {s: probe_inputs(features[s], "image", representation) for s in ("train", "test")}
            C, test_score = image_probe_scores[representation]
            # The ISIC 2024 winners' stack: the recipe (LightGBM) with the image model's score as one more input;
            # the training rows get out-of-fold probe scores, so the stacker never sees a score fitted on its row.
            train_score = cross_fitted_scores(image["train"], train_labels, features["train"]["patient_ids"], C, draws[0])
            x = {"train": np.c_[both["train"], train_score], "test": np.c_[both["test"], test_score]}
            (score,) = fit_and_score("lightgbm", x["train"], train_labels, [x["test"]], seed=draws[0])
            for name, value in _scores(labels, score, patients).items():
                metrics[f"{representation}/stack/{name}"] = value
            # ... the study's parameter-free stack: the recipe's score rank-averaged with the image probe's;
            for name, value in _scores(labels, rank_average(recipe, test_score), patients).items():
                metrics[f"{representation}/rank_average/{name}"] = value
    return metrics, {"kshot_skipped": skipped}


def cross_fitted_scores(x: np.ndarray, labels: np.ndarray, patients, C: float, seed: int, folds: int = 5) -> np.ndarray:
    """Out-of-fold positive scores of the linear probe on the rows of one split (patient-grouped folds)."""
    from training.data.calibration import patient_folds
    from training.probe import fit_probe

    scores = np.zeros(len(labels))
    for train, held_out in patient_folds(labels, np.asarray(patients), folds, seed):
        probe = fit_probe(x[train], labels[train], seed=seed, C=C)
        scores[held_out] = probe.predict_proba(x[held_out])[:, list(probe.classes_).index(1)]
    return scores


def _scores(labels: np.ndarray, score: np.ndarray, patient_ids) -> dict[str, float]:
    """The metric bundle of positive-class probabilities `score` (N,)."""
    return probability_metrics(labels, np.stack([1 - score, score], 1), [0, 1], patient_ids=patient_ids)


def run_one(args: QualityArguments, variant: str, seed: int, dataset_dir: str, splits: dict, tabular: dict | None) -> list[dict]:
    """Pre-train (or take the untrained model), evaluate each step, and return one record per step."""
    from training import pretrain

    run_dir = Path(args.work_dir) / "runs" / (args.label or "default") / f"{variant}-seed{seed}"
    record_file = run_dir / "records.json"
    train_argv = None if VARIANTS[variant][0] is None else pretrain_argv(args, variant, dataset_dir, run_dir / "model", seed)
    draws = [seed * args.kshot_draws + i for i in range(args.kshot_draws)]
    identity = {"variant": variant, "seed": seed, "pretrain_argv": train_argv, "curve_steps": args.curve_steps,
                "shots": args.shots, "draws": draws, "anchors": args.anchors, "representations": args.representations}
    if args.reuse_runs and record_file.is_file():
        records = json.loads(record_file.read_text())
        if all(records[0].get(k) == v for k, v in identity.items()):
            logger.info("%s seed %d: reusing %s", variant, seed, record_file)
            return records
    start = time.perf_counter()
    pretrained = {}
    if train_argv is not None:
        outcome = pretrain.main(train_argv)
        tail = outcome["history"][-3:]
        pretrained = {"global_step": outcome["global_step"], "final_train": outcome["history"][-1] if tail else {},
                      "patient_loss_last": float(np.mean([r["train/patient_loss"] for r in tail])) if tail else None,
                      "chance_patient_loss": math.log(outcome["data_args"]["patients_per_batch"]),
                      "validation": outcome.get("validation")}
    pretrain_s = time.perf_counter() - start
    label_names = list(splits["train"].features["label"].names)
    records = []
    for step, model, processor in checkpoints_of(args, variant, dataset_dir, run_dir, seed):
        begin = time.perf_counter()
        metrics, notes = evaluate_checkpoint(model, processor, splits, label_names, args, draws, tabular)
        records.append({**identity, "step": step, "pretrain": pretrained, "metrics": metrics, **notes,
                        "wall_s": {"pretrain": pretrain_s, "evaluate": time.perf_counter() - begin}})
        logger.info("%s seed %d step %d (%.0f s): test AUROC, image probe / context probe: %s", variant, seed, step,
                    time.perf_counter() - begin, ", ".join(
                        f"{r} {metrics[f'{r}/probe/image/auroc@test']:.3f} / {metrics[f'{r}/probe/{CONTEXT}/auroc@test']:.3f}"
                        for r in args.representations))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(record_file, records)
    return records


def tabular_anchors(splits: dict, schema: dict, seeds: list[int]) -> tuple[dict, dict]:
    """The reference rows (no pre-training) on the test split, over the seeds: {row: {metric: summary}}, and
    what the stacks reuse: the matrices, the labels and the recipe's test scores per seed."""
    from bench.anchors import MODELS, RECIPE, VIEWS, tabular_matrices

    matrices = tabular_matrices(splits, schema)
    labels = {s: np.asarray(splits[s]["label"]) for s in ("train", "test")}
    rows, recipe_scores = {}, {}
    for view in VIEWS:
        for model in MODELS:
            values = []
            for seed in seeds:
                (score,) = fit_and_score(model, matrices[view]["train"], labels["train"], [matrices[view]["test"]], seed)
                values.append(_scores(labels["test"], score, splits["test"]["patient_id"]))
                if (model, view) == RECIPE:
                    recipe_scores[seed] = score
            rows[f"{model} / {view} metadata"] = {m: summarise([v[m] for v in values]) for m in values[0]}
    return rows, {"matrices": matrices, "labels": labels, "recipe_scores": recipe_scores}


def supervised_ceiling(args: QualityArguments, dataset_dir: str, seed: int) -> dict:
    """The image backbone trained with the labels (the reference no self-supervised variant should beat):
    the untrained model of this seed, fine-tuned end to end on images alone by `training/finetune.py`, with
    the pre-training budget (steps, patients per batch, lesions per patient, learning rate). Test metrics."""
    from training import finetune

    run_dir = Path(args.work_dir) / "runs" / (args.label or "default") / f"supervised-seed{seed}"
    record_file = run_dir / "records.json"
    identity = {"seed": seed, "max_steps": args.max_steps, "patients_per_batch": args.patients_per_batch,
                "max_lesions_per_patient": args.max_lesions_per_patient, "learning_rate": args.learning_rate,
                "model_size": args.model_size, "image_size": args.image_size, "dataset_dir": dataset_dir}
    if args.reuse_runs and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("identity") == identity:
            logger.info("supervised seed %d: reusing %s", seed, record_file)
            return record["metrics"]
    start = time.perf_counter()
    model, processor = initial_model(args, dataset_dir, seed)
    model.save_pretrained(run_dir / "init")
    processor.save_pretrained(run_dir / "init")
    outcome = finetune.main([
        "--model_dir", str(run_dir / "init"), "--dataset_dir", dataset_dir, "--output_dir", str(run_dir / "model"),
        "--mode", "full", "--classifier_features", "image", "--max_steps", str(args.max_steps),
        "--learning_rate", str(args.learning_rate), "--warmup_steps", str(args.warmup_steps),
        "--per_device_train_batch_size", str(args.patients_per_batch),
        "--max_lesions_per_patient", str(args.max_lesions_per_patient), "--seed", str(seed),
        "--save_strategy", "no", "--dataloader_num_workers", str(args.num_workers), "--report_to", "none"])
    metrics = {**outcome["classification"]["test"], "wall_s": time.perf_counter() - start}
    write_json(record_file, {"identity": identity, "metrics": metrics})
    return metrics


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from training.data.dataset import load_slimp_dataset

    start = time.perf_counter()
    env = environment()
    dataset_dir = build_dataset(args)
    splits = {name: load_slimp_dataset(dataset_dir, name)[0] for name in SPLITS}
    schema = load_slimp_dataset(dataset_dir, "train")[1]
    anchors, tabular = tabular_anchors(splits, schema, args.seeds) if args.anchors else ({}, None)
    records, ceiling = [], []
    with_ceiling = args.ceiling and not args.curve_steps
    plan = [(seed, variant) for seed in args.seeds for variant in args.variants + (["supervised"] if with_ceiling else [])]
    for number, (seed, variant) in enumerate(plan, 1):  # seed-major: a partial run has whole seeds
        logger.info("run %d/%d: %s, seed %d (%.0f s so far)", number, len(plan), variant, seed, time.perf_counter() - start)
        if variant == "supervised":
            ceiling.append(supervised_ceiling(args, dataset_dir, seed))
        else:
            records += run_one(args, variant, seed, dataset_dir, splits, tabular)
    if ceiling:
        anchors[CEILING] = {m: summarise([c[m] for c in ceiling]) for m in ("auroc", "pauc_80tpr", "top15_sensitivity")}
    aggregated = aggregate(records, args.variants)
    representation = choose_representation(aggregated)
    diffs = paired_differences(records, args.variants, representation["chosen"]) if not args.curve_steps else {}
    best = best_configuration(aggregated, representation["chosen"])
    test_labels = np.asarray(splits["test"]["label"])
    result = {
        "command": shlex.join(["python", "bench/quality.py", *argv]), "arguments": asdict(args), "environment": env,
        "dataset_name": Path(dataset_dir).name, "representation": representation, "best_configuration": best,
        "test_split": {"patients": len(set(splits["test"]["patient_id"])), "lesions": len(test_labels),
                       "labels": {n: int((test_labels == i).sum()) for i, n in enumerate(splits["test"].features["label"].names)}},
        "anchors": anchors, "variants": aggregated, "paired_differences": diffs,
        "targets": targets(aggregated, diffs, best) if diffs else [],
        "runs": records,
    }
    result["wall_s"] = time.perf_counter() - start
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "quality.json", result)
    table = render_markdown(result)
    (output / "quality.md").write_text(table)
    plot(result, output / ("curve.png" if args.curve_steps else "kshot.png"))
    print(output / "quality.json")
    print(table)
    return result


if __name__ == "__main__":
    main()
