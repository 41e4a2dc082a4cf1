"""Representation quality of SLIMP beside its baselines: same data, same budget, several seeds (SPEC section 5).

    python bench/quality.py                                     # the README numbers -> bench/results/quality/
    python bench/quality.py --max_steps 400 --patients 500 --output_dir /tmp/quality
    python bench/quality.py --dataset_dir data/isic2024 --model_size small --max_steps 5000   # any converted dataset
    python bench/quality.py --quick --output_dir /tmp/quality-quick                          # ~2 min: the smoke test's run

Pre-training variants, each with the same steps, batch (P patients x up to K lesions), model preset,
resolution, learning-rate schedule and data (the train split only; pre-training never sees labels):

| variant | pretrain.py arguments | what it is |
|---|---|---|
| `random` | none: an untrained SLIMPModel, saved with `save_pretrained` | the floor (same initialisation as the others at that seed) |
| `simclr` | `--image_ssl_weight 1` | image-only SimCLR (metadata towers stay untrained) |
| `clip_flat` | `--lesion_loss_weight 1` | flat lesion-level image <-> metadata CLIP (patient tower untrained) |
| `slimp_mean` | `--lesion_loss_weight 0.5 --patient_aggregation mean` | SLIMP as in the paper |
| `slimp_attention` | `--lesion_loss_weight 0.5 --patient_aggregation attention` | SLIMP with gated attention pooling |

Each checkpoint is then evaluated by `training/evaluate.py` (`main`): logistic-regression probes on the
frozen features of the train split, scored on the patient-disjoint test split, full and k-shot (k lesions
per class), for the `image` and `image+metadata` feature sets (AUROC and the ISIC 2024 pAUC above 80%
TPR), and image -> lesion-metadata retrieval recall@k on the test split. The k-shot draws depend on the
pre-training seed only (`--kshot_draws` draws per checkpoint), so every variant of one seed sees the same
draws and the same initialisation: the comparisons are paired. Each checkpoint's numbers are averaged
over its draws; the tables give mean ± sample std over the pre-training seeds, and a paired table of
SLIMP minus each baseline (per-seed differences). Nothing here is a significance test: with 3 seeds, a
difference smaller than its std is noise.

Writes `quality.json` (every run's metrics and wall time, the aggregates, the exact command line and the
environment), `quality.md` (the tables) and `kshot.png` into `--output_dir`; datasets and checkpoints go
to `--work_dir` (default `outputs/bench-quality`, git-ignored). Prints the JSON path and the tables.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import environment  # noqa: E402
from training.results import to_jsonable  # noqa: E402
from training.evaluate import summarise  # noqa: E402
from training.probe import FEATURE_SETS  # noqa: E402

logger = logging.getLogger("bench.quality")

# name -> pretrain.py arguments (None: no pre-training) and a one-line description.
VARIANTS: dict[str, tuple[list[str] | None, str]] = {
    "random": (None, "untrained SLIMPModel (same config and initialisation)"),
    "simclr": (["--image_ssl_weight", "1"], "image-only SimCLR"),
    "clip_flat": (["--lesion_loss_weight", "1"], "flat lesion-level image-metadata CLIP (λ = 1)"),
    "slimp_mean": (["--lesion_loss_weight", "0.5", "--patient_aggregation", "mean"], "SLIMP, mean pooling (λ = 0.5)"),
    "slimp_attention": (["--lesion_loss_weight", "0.5", "--patient_aggregation", "attention"], "SLIMP, attention pooling (λ = 0.5)"),
}
SLIMP_VARIANTS = ("slimp_mean", "slimp_attention")
EVAL_SPLIT = "test"

# (metric key, column title) of the main table.
HEADLINE = [
    ("probe/image/auroc", "probe AUROC (image)"),
    ("probe/image+metadata/auroc", "probe AUROC (image+meta)"),
    ("probe/image/pauc_80tpr", "pAUC (image)"),
    ("probe/image+metadata/pauc_80tpr", "pAUC (image+meta)"),
    ("kshot/image/10/auroc", "10-shot AUROC (image)"),
    ("kshot/image+metadata/10/auroc", "10-shot AUROC (image+meta)"),
    ("retrieval/image_to_metadata_recall@10", "recall@10 image→meta"),
]


@dataclass
class QualityArguments:
    output_dir: str = field(default="bench/results/quality", metadata={"help": "Where quality.json, quality.md and kshot.png go."})
    work_dir: str | None = field(default=None, metadata={"help": "Datasets and checkpoints (default outputs/bench-quality[-quick])."})
    dataset_dir: str | None = field(default=None, metadata={"help": "A converted dataset to use instead of building the synthetic one."})
    patients: int = field(default=500, metadata={"help": "Patients of the synthetic dataset (split 70/10/20 by patient)."})
    dataset_seed: int = 0
    dataset_image_size: int | None = field(default=None, metadata={"help": "Side of the synthetic images (default: the generator's)."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": f"Any of {list(VARIANTS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Pre-training seeds."})
    max_steps: int = field(default=80, metadata={"help": "Optimizer steps of every pre-training run."})
    warmup_steps: int = 10
    learning_rate: float = 1e-3
    patients_per_batch: int = 16
    max_lesions_per_patient: int = 8
    model_size: str = "tiny"
    image_size: int = field(default=64, metadata={"help": "Model resolution (the tiny preset's is 64)."})
    num_workers: int = field(default=1, metadata={"help": "DataLoader workers of pre-training."})
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 50], metadata={"help": "k of the k-shot probes."})
    kshot_draws: int = field(default=1, metadata={"help": "k-shot draws (probe seeds) per checkpoint; seed s uses draws s*n .. s*n+n-1."})
    reuse_runs: bool = field(default=False, metadata={"help": "Reuse a run whose record in work_dir has the same arguments."})
    quick: bool = field(default=False, metadata={"help": "Smoke-test preset: 24 patients, 1 seed, 2 steps, 32 px."})


QUICK = dict(patients=24, dataset_image_size=48, seeds=[0], max_steps=2, warmup_steps=1, patients_per_batch=4,
             max_lesions_per_patient=4, image_size=32, num_workers=0)


def parse_args(argv: list[str]) -> QualityArguments:
    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(args=argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise ValueError(f"--variants must be a non-empty subset of {list(VARIANTS)}, got {args.variants}")
    if not args.seeds or args.kshot_draws < 1:
        raise ValueError("--seeds needs at least one seed and --kshot_draws at least 1")
    args.work_dir = args.work_dir or ("outputs/bench-quality-quick" if args.quick else "outputs/bench-quality")
    return args


# ----- runs -----

def build_dataset(args: QualityArguments) -> str:
    """The synthetic dataset in work_dir (reused when already built with the same options)."""
    if args.dataset_dir:
        return args.dataset_dir
    name = f"synthetic-p{args.patients}-seed{args.dataset_seed}" + (f"-{args.dataset_image_size}px" if args.dataset_image_size else "")
    directory = Path(args.work_dir) / "data" / name
    if not (directory / "summary.json").is_file():
        from training.data import convert as prepare_data

        command = ["synthetic", "--patients", str(args.patients), "--seed", str(args.dataset_seed), "--output-dir", str(directory)]
        if args.dataset_image_size:
            command += ["--image-size", str(args.dataset_image_size)]
        prepare_data.main(command + (["--overwrite"] if directory.exists() else []))
    return str(directory)


def pretrain_argv(args: QualityArguments, variant: str, dataset_dir: str, model_dir: Path, seed: int) -> list[str]:
    return ["--dataset_dir", dataset_dir, "--output_dir", str(model_dir), "--model_size", args.model_size,
            "--image_size", str(args.image_size), "--max_steps", str(args.max_steps), "--warmup_steps", str(args.warmup_steps),
            "--learning_rate", str(args.learning_rate), "--patients_per_batch", str(args.patients_per_batch),
            "--max_lesions_per_patient", str(args.max_lesions_per_patient), "--num_workers", str(args.num_workers),
            "--seed", str(seed), "--eval_steps", "0", "--save_steps", "0", "--linear_probe", "false",
            "--logging_steps", str(max(1, args.max_steps // 10)), *VARIANTS[variant][0]]


def save_untrained(args: QualityArguments, dataset_dir: str, model_dir: Path, seed: int) -> None:
    """The `random` variant: the model pretrain.py would start from at this seed, saved untouched."""
    from accelerate.utils import set_seed
    from transformers import ViTImageProcessorPil

    from modeling_slimp import SLIMPProcessor
    from training.data.dataset import load_slimp_dataset
    from training.pretrain import ModelArguments, build_model

    set_seed(seed)  # as pretrain.main does before building its model
    train_split, schema = load_slimp_dataset(dataset_dir, "train")
    model = build_model(ModelArguments(model_size=args.model_size, image_size=args.image_size), schema, train_split)
    size = model.config.vision_config.image_size if hasattr(model.config.vision_config, "image_size") else args.image_size
    model.save_pretrained(model_dir)
    SLIMPProcessor(ViTImageProcessorPil(size={"height": size, "width": size}), model.config).save_pretrained(model_dir)


def run_metrics(results: dict) -> dict[str, float]:
    """evaluate.py's results on the test split -> flat `{key: value}`, each value averaged over the draws."""
    metrics = {}
    for feature_set, by_metric in results["linear_probe"][EVAL_SPLIT].items():
        for name, summary in by_metric.items():
            metrics[f"probe/{feature_set}/{name}"] = summary["mean"]
    for feature_set, by_k in results["kshot"].get(EVAL_SPLIT, {}).items():
        for k, by_metric in by_k.items():
            for name, summary in by_metric.items():
                metrics[f"kshot/{feature_set}/{k}/{name}"] = summary["mean"]
    for name, value in results["retrieval"][EVAL_SPLIT].items():
        metrics[f"retrieval/{name}"] = value
    return metrics


def run_one(args: QualityArguments, variant: str, seed: int, dataset_dir: str) -> dict:
    """Pre-train (or save the untrained model), evaluate, and return the run's record."""
    from training import evaluate, pretrain

    run_dir = Path(args.work_dir) / "runs" / f"{variant}-seed{seed}"
    model_dir, record_file = run_dir / "model", run_dir / "record.json"
    train_argv = None if VARIANTS[variant][0] is None else pretrain_argv(args, variant, dataset_dir, model_dir, seed)
    draws = [seed * args.kshot_draws + i for i in range(args.kshot_draws)]
    eval_argv = ["--model_dir", str(model_dir), "--dataset_dir", dataset_dir, "--output_dir", str(run_dir / "eval"),
                 "--seeds", *map(str, draws), "--shots", *map(str, args.shots), "--splits", "train", EVAL_SPLIT]
    identity = {"variant": variant, "seed": seed, "pretrain_argv": train_argv, "evaluate_argv": eval_argv,
                "model_size": args.model_size, "image_size": args.image_size}
    if args.reuse_runs and record_file.is_file():
        record = json.loads(record_file.read_text())
        if all(record.get(k) == v for k, v in identity.items()):
            logger.info("%s seed %d: reusing %s", variant, seed, record_file)
            return record

    start = time.perf_counter()
    pretrained = {}
    if train_argv is None:
        save_untrained(args, dataset_dir, model_dir, seed)
    else:
        outcome = pretrain.main(train_argv)
        last = outcome["history"][-1] if outcome["history"] else {}
        pretrained = {"global_step": outcome["global_step"], "final_train": last, "validation": outcome.get("validation")}
    pretrain_s = time.perf_counter() - start
    results = evaluate.main(eval_argv)
    evaluate_s = time.perf_counter() - start - pretrain_s
    record = {**identity, "pretrain": pretrained, "metrics": run_metrics(results), "kshot_skipped": results["kshot_skipped"],
              "test_split": results["splits"][EVAL_SPLIT], "wall_s": {"pretrain": pretrain_s, "evaluate": evaluate_s}}
    record_file.write_text(json.dumps(record, indent=1, default=float))
    logger.info("%s seed %d: pre-training %.0f s, evaluation %.0f s, probe AUROC image %.3f / image+metadata %.3f",
                variant, seed, pretrain_s, evaluate_s, record["metrics"]["probe/image/auroc"],
                record["metrics"]["probe/image+metadata/auroc"])
    return record


# ----- aggregation -----

def aggregate(runs: list[dict], variants: list[str]) -> dict:
    """Per variant: `{key: summarise(values over pre-training seeds)}`, and its wall time."""
    out = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        keys = sorted({k for r in mine for k in r["metrics"]})
        out[variant] = {
            "description": VARIANTS[variant][1],
            "seeds": [r["seed"] for r in mine],
            "metrics": {k: summarise([r["metrics"].get(k, float("nan")) for r in mine]) for k in keys},
            "wall_s": {"pretrain": sum(r["wall_s"]["pretrain"] for r in mine), "evaluate": sum(r["wall_s"]["evaluate"] for r in mine),
                       "total": sum(r["wall_s"]["pretrain"] + r["wall_s"]["evaluate"] for r in mine)},
        }
    return out


def paired_differences(runs: list[dict], variants: list[str]) -> dict:
    """SLIMP minus each baseline, per headline metric: summarise() of the per-seed differences."""
    by = {(r["variant"], r["seed"]): r["metrics"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = {}
    for slimp in [v for v in variants if v in SLIMP_VARIANTS]:
        for baseline in [v for v in variants if v not in SLIMP_VARIANTS]:
            out[f"{slimp} - {baseline}"] = {
                key: summarise([by[slimp, s].get(key, float("nan")) - by[baseline, s].get(key, float("nan")) for s in seeds])
                for key, _ in HEADLINE}
    return out


def verdict(difference: dict) -> str:
    """A plain word for a paired difference: better / WORSE only when the mean exceeds its std (2+ seeds)."""
    if difference["n"] < 2:
        return "one seed: no verdict" if difference["n"] else "n/a"
    if difference["mean"] > 0:
        return "better" if difference["mean"] > difference["std"] else "not separable (+)"
    return "WORSE" if -difference["mean"] > difference["std"] else "not better"


# ----- report -----

def cell(summary: dict | None, digits: int = 3) -> str:
    if not summary or summary["n"] == 0:
        return "n/a"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def digits_of(key: str) -> int:
    return 4 if "pauc" in key else 3


def render_markdown(result: dict) -> str:
    args, aggregated, diffs = result["arguments"], result["variants"], result["paired_differences"]
    variants, split = list(aggregated), result["test_split"]
    seeds = args["seeds"]
    lines = [
        "# SLIMP representation quality vs baselines", "",
        f"Dataset `{result['dataset_dir']}`; test split: {split['patients']} patients, {split['lesions']} lesions "
        f"({', '.join(f'{n} {name}' for name, n in split['labels'].items())}), patient-disjoint from the train split. "
        f"Every variant: `{args['model_size']}` preset at {args['image_size']} px, {args['max_steps']} steps of "
        f"{args['patients_per_batch']} patients x up to {args['max_lesions_per_patient']} lesions, lr {args['learning_rate']}. "
        f"Mean ± std over {len(seeds)} pre-training seed(s) {seeds}; k-shot: {args['kshot_draws']} draw(s) per checkpoint, "
        "the same draws for every variant of a seed.", "",
        "Variants: " + "; ".join(f"`{v}`: {aggregated[v]['description']}" for v in variants) + ". "
        "`random` and `simclr` leave the metadata towers untrained (random features), `clip_flat` the patient tower.", "",
        "| variant | " + " | ".join(title for _, title in HEADLINE) + " | wall time |",
        "|---|" + "---|" * (len(HEADLINE) + 1)]
    best = {key: max(aggregated[v]["metrics"].get(key, {"mean": -math.inf})["mean"] for v in variants) for key, _ in HEADLINE}
    for variant in variants:
        metrics = aggregated[variant]["metrics"]
        cells = []
        for key, _ in HEADLINE:
            text = cell(metrics.get(key), digits_of(key))
            cells.append(f"**{text}**" if key in metrics and metrics[key]["n"] and metrics[key]["mean"] == best[key] else text)
        lines.append(f"| `{variant}` | " + " | ".join(cells) + f" | {duration(aggregated[variant]['wall_s']['total'])} |")
    chance = result["variants"][variants[0]]["metrics"].get("retrieval/chance_recall@10")
    lines += ["", f"Bold: best mean of the column. pAUC ranges 0-0.2 (random ≈ 0.02). Retrieval chance recall@10: "
                  f"{chance['mean']:.3f}." if chance else ""]

    ks = sorted({int(key.split("/")[2]) for v in variants for key in aggregated[v]["metrics"] if key.startswith("kshot/")})
    lines += ["", "## k-shot linear probe AUROC (k lesions per class) and the full probe", "",
              "| variant | features | " + " | ".join(f"k = {k}" for k in ks) + " | full |", "|---|---|" + "---|" * (len(ks) + 1)]
    for variant in variants:
        metrics = aggregated[variant]["metrics"]
        for feature_set in FEATURE_SETS:
            cells = [cell(metrics.get(f"kshot/{feature_set}/{k}/auroc")) for k in ks] + [cell(metrics.get(f"probe/{feature_set}/auroc"))]
            lines.append(f"| `{variant}` | {feature_set} | " + " | ".join(cells) + " |")
    skipped = {s["k"]: s["reason"] for r in result["runs"] for s in r["kshot_skipped"]}
    lines += [f"- k = {k} skipped: {reason}" for k, reason in sorted(skipped.items())]

    if diffs:
        lines += ["", "## Paired differences: SLIMP minus baseline (per-seed differences, mean ± std)", "",
                  "| comparison | " + " | ".join(title for _, title in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
        for comparison, by_key in diffs.items():
            lines.append(f"| {comparison} | " + " | ".join(
                f"{cell(by_key[key], digits_of(key))} {verdict(by_key[key])}" if by_key[key]["n"] else "n/a"
                for key, _ in HEADLINE) + " |")
        lines += ["", "better / WORSE: the mean difference exceeds its std over seeds; otherwise the difference is noise "
                      "(\"not separable (+)\" when SLIMP is ahead, \"not better\" when it is behind or tied).", "",
                  "## Where SLIMP does not beat a baseline", ""] + shortfalls(diffs)
    lines += ["", f"Command: `{result['command']}`  ", f"Total wall time: {duration(result['wall_s'])} "
              f"(load average at the start {result['environment']['load_average_1m']} on {result['environment']['cpu_count']} cores). "
              "Plot: `kshot.png`."]
    return "\n".join(lines) + "\n"


def shortfalls(diffs: dict) -> list[str]:
    """Plain sentences: per SLIMP variant, the columns where it beats every baseline by more than the noise,
    then per baseline where it is worse, where the difference is noise, and where it is better."""
    titles = dict(HEADLINE)
    lines = []
    for slimp in SLIMP_VARIANTS:
        mine = {c.split(" - ")[1]: by_key for c, by_key in diffs.items() if c.startswith(slimp + " - ")}
        if not mine:
            continue
        wins = [titles[key] for key, _ in HEADLINE if all(by_key[key]["n"] and verdict(by_key[key]) == "better" for by_key in mine.values())]
        lines.append(f"- `{slimp}` beats every baseline ({', '.join(mine)}) by more than the noise on {len(wins)} of {len(HEADLINE)} "
                     f"columns{': ' + ', '.join(wins) if wins else ''}.")
        for baseline, by_key in mine.items():
            groups = {"worse": [], "no clear difference": [], "better": []}
            for key, _ in HEADLINE:
                word = verdict(by_key[key])
                if word == "n/a":
                    continue
                group = "worse" if word == "WORSE" else "better" if word == "better" else "no clear difference"
                groups[group].append(f"{titles[key]} {by_key[key]['mean']:+.{digits_of(key)}f} ± {by_key[key]['std']:.{digits_of(key)}f}")
            parts = [f"{name} on {', '.join(items)}" for name, items in groups.items() if items]
            lines.append(f"  - vs `{baseline}`: " + "; ".join(parts) + ".")
    return lines


def plot_kshot(result: dict, path: Path) -> None:
    """AUROC vs k per variant (error bars: std over pre-training seeds), one panel per feature set, the
    full probe as the last point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregated = result["variants"]
    ks = sorted({int(key.split("/")[2]) for v in aggregated.values() for key in v["metrics"] if key.startswith("kshot/")})
    positions = np.arange(len(ks) + 1)
    figure, axes = plt.subplots(1, len(FEATURE_SETS), figsize=(10, 4), sharey=True)
    for axis, feature_set in zip(axes, FEATURE_SETS):
        for index, (variant, values) in enumerate(aggregated.items()):
            keys = [f"kshot/{feature_set}/{k}/auroc" for k in ks] + [f"probe/{feature_set}/auroc"]
            summaries = [values["metrics"].get(key, {"mean": np.nan, "std": np.nan}) for key in keys]
            offset = (index - (len(aggregated) - 1) / 2) * 0.06  # side by side, so the error bars stay readable
            axis.errorbar(positions + offset, [s["mean"] for s in summaries], yerr=[s["std"] for s in summaries],
                          marker="o", capsize=3, label=variant)
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set_xticks(positions, [str(k) for k in ks] + ["full"])
        axis.set(xlabel="k (lesions per class)", title=f"{feature_set} features, {EVAL_SPLIT} split")
    axes[0].set_ylabel("AUROC (mean ± std over seeds)")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    start = time.perf_counter()
    env = environment()
    dataset_dir = build_dataset(args)
    dataset_s = time.perf_counter() - start
    runs = []
    plan = [(seed, variant) for seed in args.seeds for variant in args.variants]  # seed-major: a partial run has whole seeds
    for number, (seed, variant) in enumerate(plan, 1):
        logger.info("run %d/%d: %s, seed %d (%.0f s so far)", number, len(plan), variant, seed, time.perf_counter() - start)
        runs.append(run_one(args, variant, seed, dataset_dir))
    result = {
        "command": shlex.join(["python", "bench/quality.py", *argv]),
        "arguments": asdict(args), "environment": env, "dataset_dir": dataset_dir, "test_split": runs[0]["test_split"],
        "variants": aggregate(runs, args.variants), "paired_differences": paired_differences(runs, args.variants),
        "runs": runs, "wall_s_dataset": dataset_s,
    }
    result["wall_s"] = time.perf_counter() - start
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "quality.json").write_text(json.dumps(to_jsonable(result), indent=1))
    table = render_markdown(result)
    (output / "quality.md").write_text(table)
    plot_kshot(result, output / "kshot.png")
    print(output / "quality.json")
    print(table)
    return result


if __name__ == "__main__":
    main()
