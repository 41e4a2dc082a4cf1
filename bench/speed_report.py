"""What bench/speed.py measures, by name, and its Markdown report (the tables of bench/README.md), rebuilt from the
JSON the script writes:

    result = json.loads(Path("bench/results/speed.json").read_text())
    print(tables(result))
"""

from __future__ import annotations

from bench._common import markdown_table

SECTIONS = ("train", "inference", "memory", "scaling", "profile")
TRAIN_CONTENDERS = ("slimp", "backbone")
# slimp_full_with_loss: the forward pass as inference ran it before the loss moved behind return_loss=True.
INFERENCE_CONTENDERS = ("backbone", "slimp_image", "slimp_full", "slimp_full_with_loss")


def tables(result: dict) -> str:
    env, arguments = result["environment"], result["arguments"]
    parts = [f"# bench/speed.py ({env['date']}, {arguments['device']}, {arguments['dtype']}, "
             f"{env['torch_threads']} thread(s), load {env['load_average_1m']})"]
    for model_size, sections in result["results"].items():
        if "train" in sections:
            t = sections["train"]
            parts.append(f"\n## Training step, {model_size} ({arguments['vision_model_type']}), "
                         f"{t['lesions_per_step']} lesions / {t['patients_per_step']} patients, {t['slimp']['n']} alternating rounds\n")
            parts.append(markdown_table(
                ["contender", "median wall s", "median CPU s", "lesions/s (wall)", "parameters", "GFLOP/step"],
                [[name, t[name]["median_s"], t[name]["median_cpu_s"], t[name]["lesions_per_s"], t["parameters"][name],
                  t["flops"][name] / 1e9] for name in TRAIN_CONTENDERS]))
            parts.append(f"\nSLIMP / backbone FLOPs per step (forward + backward): **{t['flop_ratio']:.3f}**")
            parts.append(ratio_line("SLIMP / backbone step time", t["slimp_over_backbone"])
                         + f"; target <= 1.10 ({t['primary_measure']} time): {'met' if t['overhead_target_met'] else 'NOT met'}")
        if "inference" in sections:
            t = sections["inference"]
            parts.append(f"\n## Inference (torch.inference_mode), {model_size}, {t['lesions_per_step']} lesions per batch\n")
            parts.append(markdown_table(
                ["contender", "median wall s", "median CPU s", "lesions/s (wall)", "CPU time / backbone", "wall time / backbone"],
                [[name, t[name]["median_s"], t[name]["median_cpu_s"], t[name]["lesions_per_s"],
                  t[name]["median_cpu_s"] / t["backbone"]["median_cpu_s"], t[name]["median_s"] / t["backbone"]["median_s"]]
                 for name in INFERENCE_CONTENDERS]))
            parts.append(ratio_line("Inference forward now / as before (with the loss)", t["slimp_full_over_with_loss"])
                         + f"; no slower: {'yes' if t['inference_no_slower_than_before'] else 'NO'}")
        if "memory" in sections:
            m = sections["memory"]
            parts.append(f"\n## Peak memory, {model_size} ({m['train_slimp']['measure']}, MiB, one subprocess each)\n")
            parts.append(markdown_table(["contender", "resident before the steps", "peak", "the steps need"],
                                        [[k, v["before_step_mib"], v["peak_mib"], v["step_mib"]] for k, v in m.items() if isinstance(v, dict)]))
            parts.append(f"\nTraining: SLIMP / backbone memory the step needs {m['train_slimp_over_backbone_step_mib']:.3f}, "
                         f"peak {m['train_slimp_over_backbone_peak_mib']:.3f}; inference peak, full features / backbone "
                         f"{m['infer_full_over_backbone_peak_mib']:.3f}")
        if "profile" in sections:
            p = sections["profile"]
            parts.append(f"\n## Profile of the SLIMP step, {model_size}: {p['step_ms']:.1f} ms/step; forward time by module\n")
            parts.append(markdown_table(["module (forward only)", "ms", "share of step"],
                                        [[k, p["forward_ms_by_module"][k], v] for k, v in p["forward_share_by_module"].items()]))
    if "scaling" in result:
        s = result["scaling"]
        measure = s["rows"][0]["measure"]
        parts.append(f"\n## Loss + aggregation alone (D={s['projection_dim']}), forward + backward, median µs per lesion ({measure} time)\n")
        header = ["sweep", "lesions", "patients"] + [f"{a} {p}" for a in ("mean", "attention") for p in ("aggregation", "loss+aggregation")]
        cells: dict = {}
        for row in s["rows"]:
            cells.setdefault((row["sweep"], row["lesions"], row["patients"]), {})[f"{row['aggregation']} {row['part']}"] = row["us_per_lesion"]
        parts.append(markdown_table(header, [[*key, *(value[h] for h in header[3:])] for key, value in cells.items()]))
        parts.append("\nTime growth when lesions grow 4x at ~8 lesions per patient (4 = linear, 16 = quadratic):\n")
        parts.append(markdown_table(["aggregation", "part", "lesions", "time factor"],
                                    [[g["aggregation"], g["part"], f"{g['from_lesions']}→{g['to_lesions']}", g["time_factor"]] for g in s["growth"]]))
        parts.append("\nOne patient holding 3/4 of the lesions, the others one each, vs equal patients (same N and P), time ratio: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in s["skewed_over_uniform"].items()))
        if s["memory"]:
            parts.append("\nPeak memory of the loss + aggregation step (MiB above the resident memory before it):\n")
            parts.append(markdown_table(["sweep", "lesions", "patients", "aggregation", "step MiB"],
                                        [[m["sweep"], m["lesions"], m["patients"], m["aggregation"], m["step_mib"]] for m in s["memory"]]))
    return "\n".join(parts)


def ratio_line(label: str, r: dict) -> str:
    return (f"{label}: **{r['ratio_of_medians_cpu']:.3f}** (CPU time, ratio of medians; median of paired ratios "
            f"{r['median_paired_ratio_cpu']:.3f}); wall time: ratio of medians {r['ratio_of_medians']:.3f}, "
            f"median of paired ratios {r['median_paired_ratio']:.3f}")


__all__ = ["SECTIONS", "TRAIN_CONTENDERS", "INFERENCE_CONTENDERS", "tables", "ratio_line"]
