"""bf16 on a CPU: faster than fp32 only with AMX (Intel's matrix units, `amx_bf16`). Without them PyTorch runs
bf16 through conversions and vector code, and a step is slower than in fp32: on the 2-core development CPU,
which has `avx512_bf16` but no AMX, a tiny-ViT forward + backward under bf16 autocast took 2.0 s against
0.85-1.0 s in fp32, and the main job 8.4-9.5 s per step against 2.2 s."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

SLOW_BF16_HELP = ("On a CPU without AMX bf16 units (amx_bf16 in /proc/cpuinfo), bf16 is slower than fp32, "
                  "about 2-4x; a warning says so.")


def cpu_has_fast_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU has AMX bf16 units: PyTorch's CPU capability names AMX, or /proc/cpuinfo lists
    `amx_bf16`. Where neither can be read (not Linux), assumes it has (no false warning)."""
    if "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper():
        return True
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return True
    return "amx_bf16" in flags


def warn_if_slow_bf16(option: str, on_cpu: bool, logger: logging.Logger | logging.LoggerAdapter,
                      cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """One warning line (returns True) when bf16, asked for with `option`, will run on a CPU without AMX.
    Call it once per run, on the main process."""
    if not on_cpu or cpu_has_fast_bf16(cpuinfo):
        return False
    logger.warning("%s on a CPU without AMX bf16 units (no amx_bf16 in /proc/cpuinfo): bf16 runs slower than fp32 "
                   "here (2-4x measured); leave it out on this machine", option)
    return True


__all__ = ["SLOW_BF16_HELP", "cpu_has_fast_bf16", "warn_if_slow_bf16"]
