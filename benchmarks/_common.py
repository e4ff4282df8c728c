"""Helpers shared by the benchmarks: the machine line, the fixed-form BENCH line, peak memory."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    import torch

    return f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__.split('+')[0]}, " \
           f"{torch.get_num_threads()} threads"


def bench_line(name: str, ours: float, bare: float, unit: str, *, baseline: str = "bare") -> str:
    """``BENCH name  ours=X unit  bare=Y unit  ratio=ours/bare  (machine)`` — the form design.md §7 fixes;
    ``baseline`` names the reference (``plain`` where it is the unoptimised eager path rather than a bare loop)."""
    return (f"BENCH {name}  ours={ours:.3f} {unit}  {baseline}={bare:.3f} {unit}  ratio={ours / bare:.2f}  "
            f"({machine()})")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
