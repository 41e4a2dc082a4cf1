"""What bench/quality.py measures and how it reports it: the variants, the headline metrics and targets, the
aggregation over seeds (paired differences, the best configuration) and the Markdown tables and plot.

A library module of the benchmark (the script, `bench/quality.py`, runs the variants and calls it), so that
the tables can be rebuilt from a `quality.json` without running anything:

    result = json.loads(Path("bench/results/quality/quality.json").read_text())
    print(render_markdown(result))
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from modeling_slimp.configuration_slimp import CLASSIFIER_REPRESENTATIONS

from training.probe import FEATURE_SETS, summarise

# The colour of the skin around the lesion (L*, a*, b*, chroma, hue and the std of L*): the image shows it too,
# so aligning images with these columns can teach the image tower skin colour instead of the lesion.
SKIN_COLOUR_COLUMNS = ("*ext", "*Ext")
# name -> pretrain.py arguments (None: no pre-training) and a one-line description.
VARIANTS: dict[str, tuple[list[str] | None, str]] = {
    "random": (None, "untrained SLIMPModel (same config and initialisation)"),
    "simclr": (["--image_ssl_weight", "1"], "image-only SimCLR"),
    "clip_flat": (["--lesion_loss_weight", "1"], "flat lesion-level image-metadata CLIP (λ = 1)"),
    "slimp_mean": (["--lesion_loss_weight", "0.5", "--patient_aggregation", "mean"], "SLIMP, mean pooling (λ = 0.5)"),
    "slimp_attention": (["--lesion_loss_weight", "0.5", "--patient_aggregation", "attention"], "SLIMP, attention pooling (λ = 0.5)"),
    "slimp_ssl": (["--lesion_loss_weight", "0.5", "--image_ssl_weight", "0.3"], "SLIMP + image self-supervision (w = 0.3)"),
    "slimp_noext": (["--lesion_loss_weight", "0.5", "--exclude_features", *SKIN_COLOUR_COLUMNS],
                    "SLIMP, mean pooling, without the six `*ext` colour-of-the-surrounding-skin columns (a skin-colour shortcut)"),
}
SLIMP_VARIANTS = ("slimp_mean", "slimp_attention", "slimp_ssl", "slimp_noext")
DEFAULT_VARIANTS = ("random", "simclr", "clip_flat", "slimp_mean", "slimp_attention", "slimp_ssl")
REPRESENTATIONS = CLASSIFIER_REPRESENTATIONS  # tower outputs before the projections, or the projected embeddings
SPLITS = ("train", "validation", "test")
CONTEXT = "image+metadata+context"  # the headline probe: what a dermatologist sees
# (metric key without the representation, column title) of the main table.
HEADLINE = [
    ("probe/image/auroc@test", "AUROC image"),
    ("probe/image/pauc_80tpr@test", "pAUC image"),
    ("probe/image+context/auroc@test", "AUROC image+context"),
    (f"probe/{CONTEXT}/auroc@test", "AUROC image+meta+context"),
    (f"probe/{CONTEXT}/pauc_80tpr@test", "pAUC image+meta+context"),
    ("stack/auroc", "AUROC winners' stack"),
    ("stack/pauc_80tpr", "pAUC winners' stack"),
    (f"probe/{CONTEXT}/top15_sensitivity@test", "top-15 image+meta+context"),
    ("kshot/image/10/auroc", "10-shot AUROC image"),
    (f"kshot/{CONTEXT}/10/auroc", "10-shot AUROC image+meta+context"),
]
# The targets: the best SLIMP configuration against these baselines, on these metrics.
TARGET_BASELINES = ("random", "simclr", "clip_flat")
TARGET_METRICS = (("probe/image/auroc@test", "image-only probe AUROC"), ("probe/image/pauc_80tpr@test", "image-only probe pAUC"),
                  ("stack/auroc", "winners' stack AUROC"), ("stack/pauc_80tpr", "winners' stack pAUC"))
RETRIEVAL = "retrieval/image_to_metadata_recall@10"
CEILING = "supervised image model (same backbone and budget, trained with the labels)"



# ----- aggregation -----

def key(representation: str, metric: str) -> str:
    return metric if metric.startswith("retrieval/") else f"{representation}/{metric}"


def aggregate(records: list[dict], variants: list[str]) -> dict:
    """Per variant and step: `{metric: summarise(values over seeds)}` and wall time."""
    out: dict = {}
    for variant in variants:
        for step in sorted({r["step"] for r in records if r["variant"] == variant}):
            mine = [r for r in records if r["variant"] == variant and r["step"] == step]
            names = sorted({k for r in mine for k in r["metrics"]})
            entry = {"description": VARIANTS[variant][1], "seeds": [r["seed"] for r in mine], "step": step,
                     "metrics": {k: summarise([r["metrics"].get(k, float("nan")) for r in mine]) for k in names},
                     "wall_s": sum(r["wall_s"]["pretrain"] + r["wall_s"]["evaluate"] for r in mine)}
            losses = [r["pretrain"].get("patient_loss_last") for r in mine if r["pretrain"]]
            if losses and all(v is not None for v in losses):
                entry["patient_loss_last"] = summarise(losses)
                entry["chance_patient_loss"] = mine[0]["pretrain"]["chance_patient_loss"]
            out.setdefault(variant, {})[str(step)] = entry
    return out


def choose_representation(aggregated: dict) -> dict:
    """The representation whose context probe validates better, averaged over variants (validation only)."""
    means = {}
    for representation in REPRESENTATIONS:
        values = [entry["metrics"][f"{representation}/probe/{CONTEXT}/auroc@validation"]["mean"]
                  for steps in aggregated.values() for entry in steps.values()
                  if f"{representation}/probe/{CONTEXT}/auroc@validation" in entry["metrics"]]
        if values:
            means[representation] = float(np.nanmean(values))
    return {"chosen": max(means, key=means.get), "validation_context_auroc": means}


def best_configuration(aggregated: dict, representation: str) -> str | None:
    """The SLIMP variant with the best mean validation AUROC of the image-only probe (at the final step): the
    protocol of the targets (image-only and the winners' stack, which stacks that probe)."""
    candidates = {v: steps[max(steps, key=int)]["metrics"][f"{representation}/probe/image/auroc@validation"]["mean"]
                  for v, steps in aggregated.items() if v in SLIMP_VARIANTS}
    return max(candidates, key=candidates.get) if candidates else None


def paired_differences(records: list[dict], variants: list[str], representation: str) -> dict:
    """SLIMP minus each baseline at the final step, per headline metric: summarise() of per-seed differences."""
    final = {(r["variant"], r["seed"]): r["metrics"] for r in records if r["step"] == max(x["step"] for x in records if x["variant"] == r["variant"])}
    seeds = sorted({r["seed"] for r in records})
    out = {}
    metrics = [metric for metric, _ in HEADLINE] + [RETRIEVAL]
    for slimp in [v for v in variants if v in SLIMP_VARIANTS]:
        for baseline in [v for v in variants if v not in SLIMP_VARIANTS]:
            out[f"{slimp} - {baseline}"] = {
                metric: summarise([final[slimp, s].get(key(representation, metric), float("nan"))
                                   - final[baseline, s].get(key(representation, metric), float("nan")) for s in seeds])
                for metric in metrics}
    return out


def verdict(difference: dict) -> str:
    """A plain word for a paired difference: better / WORSE only when the mean exceeds its std (2+ seeds)."""
    if difference["n"] < 2:
        return "one seed: no verdict" if difference["n"] else "n/a"
    if difference["mean"] > 0:
        return "better" if difference["mean"] > difference["std"] else "not separable (+)"
    return "WORSE" if -difference["mean"] > difference["std"] else "not better"


def targets(aggregated: dict, diffs: dict, best: str | None) -> list[dict]:
    """The acceptance checks: the best SLIMP configuration beats random init, SimCLR and flat CLIP by more than
    the seed std of the paired difference on each of `TARGET_METRICS`; and its patient loss ends below chance."""
    if best is None:
        return []
    checks = []
    for baseline in [b for b in TARGET_BASELINES if f"{best} - {b}" in diffs]:
        for metric, title in TARGET_METRICS:
            d = diffs[f"{best} - {baseline}"][metric]
            checks.append({"check": f"{best} beats {baseline} on {title} by more than the seed std",
                           "measured": f"{d['mean']:+.4f} ± {d['std']:.4f}", "met": verdict(d) == "better"})
    final = aggregated[best][max(aggregated[best], key=int)]
    if "patient_loss_last" in final:
        loss, chance = final["patient_loss_last"]["mean"], final["chance_patient_loss"]
        checks.append({"check": "the patient loss ends at least 10% below chance (ln P)", "measured": f"{loss:.3f} vs ln P = {chance:.3f}",
                       "met": loss <= 0.9 * chance})
    return checks


# ----- report -----

def cell(summary: dict | None, digits: int = 3) -> str:
    if not summary or summary["n"] == 0 or not math.isfinite(summary["mean"]):
        return "n/a"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def digits_of(metric: str) -> int:
    return 4 if "pauc" in metric else 3


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render_markdown(result: dict) -> str:
    args, aggregated = result["arguments"], result["variants"]
    representation, split = result["representation"]["chosen"], result["test_split"]
    variants = list(aggregated)
    lines = [
        "# SLIMP representation quality vs baselines and the ISIC 2024 tabular recipe", "",
        f"Dataset `{result['dataset_name']}`; test split: {split['patients']} patients, {split['lesions']} lesions "
        f"({', '.join(f'{n} {name}' for name, n in split['labels'].items())}), patient-disjoint from the train split. "
        f"Every variant: `{args['model_size']}` preset at {args['image_size']} px, "
        f"{max(args['curve_steps']) if args['curve_steps'] else args['max_steps']} steps of {args['patients_per_batch']} patients x up to "
        f"{args['max_lesions_per_patient']} lesions, lr {args['learning_rate']}"
        + (f", extra arguments `{args['extra_args']}`" if args["extra_args"] else "") + ". "
        f"Mean ± std over {len(args['seeds'])} pre-training seed(s) {args['seeds']}.", "",
        "Variants: " + "; ".join(f"`{v}`: {VARIANTS[v][1]}" for v in variants) + ".", "",
        f"Probes read the **{representation}** representation, the one whose context probe validates better "
        f"(validation AUROC of `{CONTEXT}`, mean over variants: "
        + ", ".join(f"{r} {v:.3f}" for r, v in result["representation"]["validation_context_auroc"].items()) + ").", ""]
    if args["curve_steps"]:
        lines += _curve_table(aggregated, representation)
    else:
        lines += _main_table(aggregated, representation)
    if result["anchors"]:
        lines += ["", "## Reference rows without pre-training (test split, mean ± std over seeds)", "",
                  "| model | AUROC | pAUC | top-15 sensitivity |", "|---|---|---|---|"]
        lines += [f"| {row} | {cell(m['auroc'])} | {cell(m['pauc_80tpr'], 4)} | {cell(m['top15_sensitivity'])} |"
                  for row, m in result["anchors"].items()]
        lines += ["", "The ISIC 2024 winners' recipe (LightGBM on raw + patient-relative metadata) with each variant's image "
                      f"({representation}): the **stack** (the variant's image-only probe score as one more input, out-of-fold on "
                      "the training rows) and the study's rank average of the two scores:", "",
                  "| variant | stack AUROC | stack pAUC | stack top-15 | rank average AUROC | rank average pAUC |",
                  "|---|---|---|---|---|---|"]
        for variant, steps in aggregated.items():
            m = steps[max(steps, key=int)]["metrics"]
            get = lambda name: m.get(f"{representation}/{name}")  # noqa: E731
            lines.append(f"| `{variant}` | {cell(get('stack/auroc'))} | {cell(get('stack/pauc_80tpr'), 4)} | "
                         f"{cell(get('stack/top15_sensitivity'))} | {cell(get('rank_average/auroc'))} | "
                         f"{cell(get('rank_average/pauc_80tpr'), 4)} |")
    if len(result["representation"]["validation_context_auroc"]) > 1:
        lines += _representation_table(aggregated)
    losses = [(v, s[max(s, key=int)]) for v, s in aggregated.items() if "patient_loss_last" in s[max(s, key=int)]]
    if losses:
        lines += ["", "Final training patient loss (mean of the last logged values) vs chance ln P: " + "; ".join(
            f"`{v}` {cell(e['patient_loss_last'])} (ln P = {e['chance_patient_loss']:.3f})" for v, e in losses) + "."]
    if result["paired_differences"]:
        lines += ["", "## Paired differences: SLIMP minus baseline (per-seed differences, mean ± std)", "",
                  "| comparison | " + " | ".join(t for _, t in HEADLINE) + " | recall@10 |", "|---|" + "---|" * (len(HEADLINE) + 1)]
        for comparison, by_metric in result["paired_differences"].items():
            lines.append(f"| {comparison} | " + " | ".join(
                f"{cell(by_metric[m], digits_of(m))} {verdict(by_metric[m])}" for m, _ in HEADLINE + [(RETRIEVAL, "")]) + " |")
    if result["targets"]:
        lines += ["", f"## Targets (best configuration by validation: `{result['best_configuration']}`)", "",
                  "| check | measured | met |", "|---|---|---|"]
        lines += [f"| {t['check']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]]
    lines += ["", f"Command: `{result['command']}`  ", f"Total wall time: {duration(result['wall_s'])} "
              f"(load average at the start {result['environment']['load_average_1m']} on {result['environment']['cpu_count']} cores)."]
    return "\n".join(lines) + "\n"


def _representation_table(aggregated: dict) -> list[str]:
    lines = ["", "## Representation: tower outputs vs projected embeddings (validation AUROC, final step)", "",
             "| variant | " + " | ".join(f"{fs} tower / projection" for fs in FEATURE_SETS) + " |", "|---|" + "---|" * len(FEATURE_SETS)]
    for variant, steps in aggregated.items():
        m = steps[max(steps, key=int)]["metrics"]
        lines.append(f"| `{variant}` | " + " | ".join(
            f"{cell(m.get(f'tower/probe/{fs}/auroc@validation'))} / {cell(m.get(f'projection/probe/{fs}/auroc@validation'))}"
            for fs in FEATURE_SETS) + " |")
    return lines


def _main_table(aggregated: dict, representation: str) -> list[str]:
    lines = ["| variant | " + " | ".join(t for _, t in HEADLINE) + " | recall@10 image→meta | wall time |",
             "|---|" + "---|" * (len(HEADLINE) + 2)]
    finals = {v: s[max(s, key=int)] for v, s in aggregated.items()}
    best = {m: max((e["metrics"].get(key(representation, m), {"mean": -math.inf})["mean"] for e in finals.values()),
                   default=None) for m, _ in HEADLINE + [(RETRIEVAL, "")]}
    for variant, entry in finals.items():
        cells = []
        for metric, _ in HEADLINE + [(RETRIEVAL, "")]:
            summary = entry["metrics"].get(key(representation, metric))
            text = cell(summary, digits_of(metric))
            cells.append(f"**{text}**" if summary and summary["n"] and summary["mean"] == best[metric] else text)
        lines.append(f"| `{variant}` | " + " | ".join(cells) + f" | {duration(entry['wall_s'])} |")
    lines += ["", "Bold: best mean of the column. pAUC ranges 0-0.2 (random ≈ 0.02); top-15: share of each patient's "
                  "malignant lesions among its 15 highest-scored, over patients with one."]
    return lines


def _curve_table(aggregated: dict, representation: str) -> list[str]:
    steps = sorted({int(s) for v in aggregated.values() for s in v})
    lines = ["## Probe AUROC against pre-training steps (test split)", "",
             "| variant | features | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for variant, by_step in aggregated.items():
        for feature_set in ("image", CONTEXT):
            cells = [cell(by_step.get(str(s), {}).get("metrics", {}).get(f"{representation}/probe/{feature_set}/auroc@test"))
                     for s in steps]
            lines.append(f"| `{variant}` | {feature_set} | " + " | ".join(cells) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    """Budget curve (AUROC vs steps) or the k-shot curve (AUROC vs k) of the context probe, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    representation, aggregated = result["representation"]["chosen"], result["variants"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, feature_set in zip(axes, ("image", CONTEXT)):
        for variant, by_step in aggregated.items():
            if result["arguments"]["curve_steps"]:
                xs = sorted(int(s) for s in by_step)
                ys = [by_step[str(s)]["metrics"][f"{representation}/probe/{feature_set}/auroc@test"] for s in xs]
                axis.set(xlabel="pre-training steps")
            else:
                final = by_step[max(by_step, key=int)]["metrics"]
                xs = sorted({int(k.split("/")[3]) for k in final if k.startswith(f"{representation}/kshot/{feature_set}/")})
                ys = [final[f"{representation}/kshot/{feature_set}/{k}/auroc"] for k in xs]
                axis.set(xlabel="k (lesions per class)", xscale="log")
            axis.errorbar(xs, [y["mean"] for y in ys], yerr=[y["std"] for y in ys], marker="o", capsize=3, label=variant)
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set(title=f"{feature_set} ({representation})")
    axes[0].set_ylabel("test AUROC (mean ± std over seeds)")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
