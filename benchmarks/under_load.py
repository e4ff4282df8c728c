"""Training under other people's load: OpenMP threads that spin (``OMP_WAIT_POLICY=ACTIVE``, the usual default)
against threads that sleep (``PASSIVE``, what ``rclip`` sets before torch loads; ``rclip_cli.main``).

One child process per measurement times steps of the demo teacher's work (tiny CLIP, region path: RoIAlign → res5 →
attention pool on a 32-image batch, forward + backward + SGD), with torch's default thread count, alone and then beside
``--busy`` processes that spin on the CPU (the load). With B busy processes on C cores and T threads of ours, our fair
share of the machine is about T / (T + B) of C cores, so the slowdown we should see is about
``(T + B) / T`` when T ≤ C; a policy that collapses shows much more.

    python benchmarks/under_load.py [--busy 2] [--steps 8]

Prints ``BENCH under_load_{active,passive}`` lines: ours = steps/s under load, bare = steps/s alone, and the
expected fair-share ratio beside them. Run it on an otherwise quiet machine: the load must be the one it makes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import sys, time, torch
from rclip_core.clip_backbone import CLIPTrunk, RegionHead, create_clip, pooler_resolution_for
torch.manual_seed(0)
clip = create_clip("tiny", log_random_init=False)
visual = clip.visual
trunk = CLIPTrunk(visual)
head = RegionHead(visual.layer4, visual.attnpool, pooler_resolution=pooler_resolution_for("tiny"))
x = torch.randn(32, 3, 128, 128)
boxes = [torch.tensor([[8.0, 8.0, 100.0, 110.0], [30.0, 20.0, 90.0, 70.0]]) for _ in range(32)]
opt = torch.optim.SGD(clip.parameters(), lr=1e-3)
def step():
    opt.zero_grad()
    head(trunk(x), boxes).pow(2).mean().backward()
    opt.step()
step()
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print((time.perf_counter() - t) / int(sys.argv[1]), torch.get_num_threads())
"""


def _spin(stop) -> None:  # a busy process: other people's work
    while not stop.is_set():
        sum(i * i for i in range(10000))


def seconds_per_step(policy: str, steps: int) -> tuple[float, int]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    from _common import bench_line

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=2, help="spinning processes that make the load")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    alone = {p: seconds_per_step(p, args.steps) for p in ("ACTIVE", "PASSIVE")}
    stop = mp.Event()
    busy = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for b in busy:
        b.start()
    try:
        loaded = {p: seconds_per_step(p, args.steps) for p in ("ACTIVE", "PASSIVE")}
    finally:
        stop.set()
        for b in busy:
            b.join()
    for policy in ("ACTIVE", "PASSIVE"):
        (quiet, threads), (busy_s, _) = alone[policy], loaded[policy]
        # Our threads get cores / (threads + busy) of a core each once the machine is oversubscribed.
        fair = threads * min(1.0, cores / (threads + args.busy)) / min(threads, cores)
        print(bench_line(f"under_load_{policy.lower()}", 1 / busy_s, 1 / quiet, "steps/s")
              + f"  [{args.busy} busy processes on {cores} cores, {threads} threads; fair-share ratio {fair:.2f}]")


if __name__ == "__main__":
    main()
