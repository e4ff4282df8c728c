"""rclip_core.runtime: thread pools and DataLoader workers sized from the cores this process may use (a
monkeypatched CPU affinity stands in for taskset / a batch scheduler's CPU set)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from rclip_core import engine, runtime
from rclip_core.recipes import RpnTrainCfg, load_recipe


@pytest.fixture()
def cores(monkeypatch):
    """Set how many cores the process may use: ``cores(2)``."""
    monkeypatch.setattr(runtime, "_cgroup_quota_cores", lambda: None)

    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))

    return set_cores


def test_workers_are_one_per_core_beyond_the_first_at_most_four(cores):
    for n, expected in ((1, 0), (2, 1), (3, 2), (5, 4), (64, 4)):
        cores(n)
        assert runtime.available_cores() == n
        assert runtime.num_workers(None) == expected, n
    assert runtime.num_workers(3) == 3 and runtime.num_workers(0) == 0  # an explicit choice is kept


def test_training_loads_in_its_own_process_on_two_cores_or_fewer(cores):
    for n, expected in ((1, 0), (2, 0), (3, 2), (5, 4), (64, 4)):
        cores(n)
        assert runtime.num_workers(None, training=True) == expected, n
    cores(2)
    assert runtime.num_workers(1, training=True) == 1  # an explicit choice is kept
    from rclip_core.engine import default_num_workers

    assert default_num_workers(None) == 0 and default_num_workers(2) == 2  # the engine asks as a training loader


def test_a_cgroup_quota_caps_the_cores(cores, monkeypatch):
    cores(16)
    monkeypatch.setattr(runtime, "_cgroup_quota_cores", lambda: 2)
    assert runtime.available_cores() == 2 and runtime.num_workers(None) == 1


def test_cgroup_files_are_read_as_whole_cores(monkeypatch, tmp_path):
    import builtins

    files = {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if str(path).startswith("/sys/fs/cgroup"):
            if str(path) not in files:
                raise FileNotFoundError(path)
            p = tmp_path / "f"
            p.write_text(files[str(path)])
            return real_open(p, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert runtime._cgroup_quota_cores() == 2  # 1.5 cores of quota: two threads can use it
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert runtime._cgroup_quota_cores() is None


def test_training_engine_sizes_its_workers_from_the_available_cores(cores, monkeypatch):
    """`rclip rpn train` (and every training stage) loads data through the engine: on 2 cores in the main process,
    on 3 with two workers, never the machine's count."""
    from tests.test_engine import CFG, Net, Noisy, losses

    assert RpnTrainCfg().num_workers is None and load_recipe(None, []).rpn.num_workers is None
    seen = []
    real = engine.DataLoader

    def recording(*args, **kwargs):
        seen.append(kwargs["num_workers"])
        return real(*args, **{**kwargs, "num_workers": 0, "multiprocessing_context": None})

    monkeypatch.setattr(engine, "DataLoader", recording)
    threads = torch.get_num_threads()
    try:
        for n in (2, 3):
            cores(n)
            engine.train(Net(), losses, Noisy(), dataclasses.replace(CFG, steps=1, num_workers=None), out_dir=None,
                         recipe={})
    finally:
        torch.set_num_threads(threads)
    assert seen == [0, 2]


def test_torch_threads_are_lowered_to_the_available_cores(cores):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cores(1)
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
        cores(8)
        assert runtime.configure_threads() == 1  # never raised above what was set
    finally:
        torch.set_num_threads(threads)


def test_commands_size_the_pools_before_torch_starts():
    """Before torch is imported, the pools' environment variables are set from the affinity (unless the user set
    them): what every command does first (rclip_cli.main)."""
    code = ("import os; os.sched_getaffinity = lambda pid: {0}\n"
            "from rclip_core.runtime import configure_threads; configure_threads()\n"
            "import torch; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1"]
    env["OMP_NUM_THREADS"] = "2"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["2", "2"]
