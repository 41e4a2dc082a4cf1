"""Shared helpers of the SLIMP benchmarks: alternating timing, peak memory of a subprocess, JSON + Markdown.

The development machines are shared and noisy (2 cores, other jobs running), so absolute times drift.
Every comparison is therefore measured side by side in one run, the contenders alternating round by
round (the starting contender rotates each round: A B, B A, A B, ... so that neither always runs
first), and reported as a ratio of medians, with the median of the per-round ratios beside it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def synchronize(device: str) -> None:
    """Wait for queued GPU work (timing on CUDA); a no-op on the CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def alternate(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
              device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Timings of each call of each contender, `repeats` rounds, contenders alternating within a round.

    Each contender first runs `warmup` untimed calls. Round r starts with contender r mod C. Returns
    `{name: {"wall": [s, ...], "cpu": [s, ...]}}`: wall-clock seconds, and CPU seconds of this process
    (all its threads). On a shared CPU the CPU time leaves out the time spent waiting for a core, so it
    is the steadier measure there; on a GPU only the wall time means anything.
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
        synchronize(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def summary(timings: dict[str, list[float]]) -> dict:
    """Median and min of wall and CPU seconds (`alternate`'s timings of one contender)."""
    return {"median_s": statistics.median(timings["wall"]), "min_s": min(timings["wall"]),
            "median_cpu_s": statistics.median(timings["cpu"]), "min_cpu_s": min(timings["cpu"]),
            "n": len(timings["wall"]), "wall_s": timings["wall"], "cpu_s": timings["cpu"]}


def ratio(numerator: dict[str, list[float]], denominator: dict[str, list[float]]) -> dict:
    """numerator / denominator from alternating timings: ratios of the medians and of the minima (wall
    and CPU time), and the median of the per-round ratios (same round index) of the wall time."""
    result = {}
    for kind, suffix in (("wall", ""), ("cpu", "_cpu")):
        a, b = numerator[kind], denominator[kind]
        result[f"ratio_of_medians{suffix}"] = statistics.median(a) / statistics.median(b)
        result[f"ratio_of_minima{suffix}"] = min(a) / min(b)
        result[f"median_paired_ratio{suffix}"] = statistics.median(x / y for x, y in zip(a, b))
    return result


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (or since `reset_peak_rss`), MiB.

    Linux: VmHWM of /proc/self/status, which `reset_peak_rss` can lower; elsewhere getrusage's ru_maxrss
    (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Lower the peak RSS to the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs), after
    handing the heap's free memory back to the system (glibc `malloc_trim`).

    Without it the peak is the process's high-water mark so far (imports, model building), and freed
    memory the heap kept would absorb a later step's allocations: a difference of peaks would then
    underestimate what the step needs. Returns whether the reset worked.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_json_subprocess(command: Sequence[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `command` (which prints one JSON object as its last stdout line) and return that object."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def environment(threads: int | None = None) -> dict:
    """What the numbers were measured on (no host names)."""
    import torch
    import transformers

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(result: dict, tables: str, output: str | None) -> None:
    """JSON to `output` (or stdout) and the Markdown tables to stderr (after the JSON when both go to a terminal)."""
    text = json.dumps(result, indent=2, default=float)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    else:
        print(text, flush=True)
    print(tables, file=sys.stderr, flush=True)
