"""How much of the machine a run may use: the CPU cores this process is allowed on, and the thread pool and
DataLoader workers sized from them (issue 11 "no collapse under load").

``os.cpu_count()`` counts the machine's cores, not the ones this process may run on: under ``taskset``, a batch
scheduler's CPU set or a container's CPU quota it overstates them, and a pool of that many threads (or loader
workers) fights itself for the cores it shares, so a busy machine slows a run far more than its share of the CPU.
Every command (``rclip_cli.main``) and the training engine size their pools here, and nowhere else.
"""

from __future__ import annotations

import logging
import math
import os
import sys

log = logging.getLogger(__name__)

# More loader workers than this only add memory: decoding and resizing one image is far cheaper than its forward.
MAX_WORKERS = 4


def _cgroup_quota_cores() -> int | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``, v1 ``cfs_quota_us``) in whole cores, or None."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file, encoding="ascii") as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file, encoding="ascii") as f:
                    fields = fields[:1] + f.read().split()[:1]
        except (OSError, ValueError):
            continue
        if len(fields) >= 2 and fields[0] not in ("max", "-1"):
            try:
                return max(1, math.ceil(int(fields[0]) / int(fields[1])))
            except (ValueError, ZeroDivisionError):
                return None
    return None


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (``os.sched_getaffinity``), capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores()
    return max(1, min(cores, quota) if quota is not None else cores)


def num_workers(requested: int | None, *, training: bool = False) -> int:
    """DataLoader workers: ``requested``, or one per available core beyond the first (the main process computes on
    that one), at most :data:`MAX_WORKERS`. Two cores give one worker, one core none.

    ``training``: the training engine's loader, which on two cores or fewer gets no worker: a worker forked beside a
    training process shares both cores with its compute threads, and on 2 cores it made RN50 pretraining slower per
    step than decoding in the main process (measured in README "Pretraining throughput"), decoding being a small
    part of a training step."""
    if requested is not None:
        return max(0, int(requested))
    cores = available_cores()
    if training and cores <= 2:
        return 0
    return max(0, min(MAX_WORKERS, cores - 1))


def num_threads() -> int:
    """Intra-op threads for torch: one per available core."""
    return available_cores()


def configure_threads() -> int:
    """Size torch's thread pools from the available cores; returns the intra-op thread count.

    Before torch is imported (the commands call this first) it sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
    unless the user has, so the pools start at the right size; once torch is loaded it lowers
    ``torch.set_num_threads`` when the pool is larger than the cores available (never raises a user's choice).
    """
    n = num_threads()
    if "torch" not in sys.modules:
        user = os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")
        if user:  # the user's choice (torch takes the smaller of the two when both are set)
            return int(user) if user.isdigit() else n
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
        return n
    import torch

    if torch.get_num_threads() > n:
        log.debug("torch threads %d -> %d (available cores)", torch.get_num_threads(), n)
        torch.set_num_threads(n)
    return torch.get_num_threads()


def set_thread_waiting_default(environ: dict = os.environ) -> None:
    """Make torch's OpenMP threads sleep, not spin, while they wait for work (``OMP_WAIT_POLICY=PASSIVE``) unless the
    user chose a policy. OpenMP reads it once, when torch loads: call this before torch is imported
    (``rclip_cli.main`` does at import; the tests' conftest too).

    Why: on a machine busy with other work, spinning threads burn the share of CPU the command gets.
    ``benchmarks/under_load.py`` (2 cores, 2 spinning processes beside a tiny CLIP training step): spinning threads
    kept 0.25 of their speed alone, sleeping ones 0.47 (fair share 0.50), at a 4 % cost on a quiet machine. Results
    are unchanged (same threads, same work split)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
