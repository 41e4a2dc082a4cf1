"""The synthetic ISIC 2024 layout and the converter's speed and memory: sections 1 and 2 of `bench/data.py`.

    layout = synthetic_layout(args, work)              # train-metadata.csv + train-image.hdf5, reused when present
    converter = converter_section(args, layout, work)  # python -m training.prepare_data isic2024 at each size

Each converter run is a subprocess whose own peak RSS (VmHWM) is recorded, with its anonymous (heap) and
file-backed (memory-mapped Arrow) parts sampled from /proc, so that the flat-memory claim (the peak at
the largest size within 10% of the smallest's) is measured, not assumed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench._common import REPO_ROOT

ISIC2024_ROWS = 401059  # images of the real ISIC 2024 training set (SLICE-3D)


# ----- 1. synthetic layout -----
def patients_for(images: int, seed: int) -> int:
    """Fewest synthetic patients whose lesions number at least `images`."""
    from training.data.synthetic import sample_patient

    total, patients = 0, 0
    while total < images:
        total += sample_patient(seed, patients).num_lesions
        patients += 1
    return patients


def synthetic_layout(args, work: Path) -> dict:
    """Write (or reuse) the Kaggle layout of at least `args.images` images; returns counts and timings."""
    from training.data.synthetic import write_kaggle_layout

    folder = work / "kaggle"
    key = {"images": args.images, "seed": args.seed, "image_size": args.image_size}
    record = folder / "bench.json"
    if record.is_file() and json.loads(record.read_text()).get("key") == key:
        return {**json.loads(record.read_text())["result"], "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    patients = patients_for(args.images, args.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    counts = write_kaggle_layout(folder, patients, seed=args.seed, image_size=args.image_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"patients": patients, "lesions": counts["lesions"], "seconds": wall, "cpu_seconds": cpu,
              "images_per_s": counts["lesions"] / wall, "hdf5_mib": Path(counts["image_hdf5"]).stat().st_size / 2**20,
              "metadata_csv": counts["metadata_csv"], "image_hdf5": counts["image_hdf5"]}
    record.write_text(json.dumps({"key": key, "result": result}))
    return {**result, "reused": False}


def subset_layout(layout: dict, rows: int, folder: Path) -> tuple[Path, Path]:
    """A layout of `rows` rows: the first `rows` of the generated one (CSV text and JPEG bytes unchanged), or,
    for more rows than were generated, the whole layout repeated with new ids (`isic_id`, `patient_id`
    and `lesion_id` suffixed `_r1`, `_r2`, ...): new patients with the same images, so whole patients stay
    whole. The converter's work per row does not depend on which JPEG a row holds."""
    import h5py
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    base = pd.read_csv(layout["metadata_csv"], dtype=str, keep_default_na=False)
    copies = []
    for repeat in range(-(-rows // len(base))):
        copy = base.iloc[: rows - repeat * len(base)].copy()
        copy["source_id"] = copy["isic_id"]
        if repeat:
            for column in ("isic_id", "patient_id", "lesion_id"):
                if column in copy:
                    present = copy[column] != ""
                    copy.loc[present, column] = copy.loc[present, column] + f"_r{repeat}"
        copies.append(copy)
    frame = pd.concat(copies, ignore_index=True)
    csv_path, hdf5_path = folder / "train-metadata.csv", folder / "train-image.hdf5"
    frame.drop(columns="source_id").to_csv(csv_path, index=False)
    with h5py.File(layout["image_hdf5"], "r") as source, h5py.File(hdf5_path, "w") as target:
        for isic_id, source_id in zip(frame["isic_id"], frame["source_id"]):
            target.create_dataset(isic_id, data=source[source_id][()])
    return csv_path, hdf5_path


# ----- 2. converter -----
# Runs `python -m MODULE ARGS...` and, at exit, writes its own peak RSS (VmHWM: the peak of this process's
# memory since exec) to a JSON file. `os.wait4`'s ru_maxrss would not do: Linux starts a child's maxrss
# at the RSS of the process it was forked from (here the benchmark, with torch loaded).
_PEAK_LAUNCHER = """
import atexit, json, resource, runpy, sys
output, module = sys.argv[1], sys.argv[2]
def record():
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        peak, measure = int(fields["VmHWM"].split()[0]) / 1024, "VmHWM"
    except OSError:
        peak, measure = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"
    json.dump({"peak_rss_mib": peak, "measure": measure}, open(output, "w"))
atexit.register(record)
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_measured(module: str, args: list[str], log: Path) -> dict:
    """Run `python -m module args...`: wall time, CPU time (`os.wait4`) and its own peak RSS.

    On Linux a thread also samples the child's /proc status every 20 ms for the peaks of anonymous
    memory (the heap: what the process really holds) and of file-backed memory (pages of memory-mapped
    files, e.g. the Arrow files `datasets` maps, which the kernel can drop), both parts of the RSS.
    """
    import threading

    peak_file = log.with_suffix(".peak.json")
    sampled = {"RssAnon": 0.0, "RssFile": 0.0}
    with open(log, "w") as sink:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", _PEAK_LAUNCHER, str(peak_file), module, *args], stdout=sink,
                                   stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        done = threading.Event()

        def sample() -> None:
            status = Path(f"/proc/{process.pid}/status")
            while not done.is_set():
                try:
                    for line in status.read_text().splitlines():
                        key = line.split(":")[0]
                        if key in sampled:
                            sampled[key] = max(sampled[key], int(line.split()[1]) / 1024)
                except (OSError, ValueError, IndexError):
                    return
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({returncode}); log:\n{log.read_text()[-4000:]}")
    peak = json.loads(peak_file.read_text())
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak["peak_rss_mib"],
            "peak_measure": peak["measure"], "sampled_peak_anon_mib": sampled["RssAnon"] or None,
            "sampled_peak_file_mib": sampled["RssFile"] or None}


def converter_section(args, layout: dict, work: Path) -> dict:
    baseline = run_measured("training.prepare_data", ["--help"], work / "import.log")  # imports, parses, exits
    runs = []
    for rows in sorted(args.sizes):
        csv_path, hdf5_path = subset_layout(layout, rows, work / f"subset-{rows}")
        output = work / f"converted-{rows}"
        measured = run_measured("training.prepare_data", ["isic2024", "--metadata", str(csv_path), "--images", str(hdf5_path),
                                                          "--output-dir", str(output), "--overwrite", "--seed", str(args.seed)],
                                work / f"convert-{rows}.log")
        summary = json.loads((output / "summary.json").read_text())
        written = sum(split["lesions"] for split in summary["splits"].values())
        runs.append({"rows": rows, "rows_written": written, **measured, "rows_per_s": rows / measured["seconds"],
                     "rows_per_cpu_s": rows / measured["cpu_seconds"],
                     "peak_above_import_mib": measured["peak_rss_mib"] - baseline["peak_rss_mib"],
                     "output_dir": str(output)})
    small, large = runs[0], runs[-1]
    result = {"import_only": baseline, "runs": runs,
              "peak_ratio_largest_over_smallest": large["peak_rss_mib"] / small["peak_rss_mib"],
              "peak_above_import_ratio": large["peak_above_import_mib"] / max(small["peak_above_import_mib"], 1e-9),
              "rows_ratio": large["rows"] / small["rows"]}
    result["flat_memory_target_met"] = large["peak_rss_mib"] <= 1.10 * small["peak_rss_mib"]  # within 10%
    if large["rows"] > small["rows"]:  # linear extrapolation to the real ISIC 2024 (401,059 rows)
        for key, name in (("peak_rss_mib", "rss"), ("sampled_peak_anon_mib", "anon"), ("sampled_peak_file_mib", "file")):
            if large[key] is not None and small[key] is not None:
                per_row = (large[key] - small[key]) / (large["rows"] - small["rows"])
                result[f"{name}_growth_kib_per_1000_rows"] = per_row * 1000 * 1024
                result[f"{name}_extrapolated_mib_at_{ISIC2024_ROWS}_rows"] = large[key] + per_row * (ISIC2024_ROWS - large["rows"])
    return result


__all__ = ["ISIC2024_ROWS", "patients_for", "synthetic_layout", "subset_layout", "run_measured", "converter_section"]
