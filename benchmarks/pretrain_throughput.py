"""Pretraining throughput: the engine against a bare loop over the same forward and backward, and the teacher's
pseudo labelling, prepared for inference against the plain teacher.

engine = ``rclip_core.engine.train`` as `rclip pretrain` runs it (step sampler, DataLoader and its workers, AMP
         context, loss checks and all-reduce, gradient clipping, scheduler, metrics records), steps/s from the end
         of the first step to the end of the last (steady state; the call's one-time start-up is printed apart);
bare   = the same model, ``compute_losses``, backward, gradient clipping and SGD step over batches read beforehand,
         nothing else;
teacher = pseudo labels of one batch's regions (teacher RoIAlign → res5 → attention pool, softmax over the concept
         pool, threshold): the stage's teacher (folded norms, channels-last, first-token attention pool,
         ``inference_mode``) against the plain one (unfolded, open_clip's attention pool, ``no_grad``), regions/s and
         the largest difference of the teacher's distributions.
Interleaved repeats, best of each; peak memory of each training path in a fresh subprocess (VmHWM).
Regions are the original's RANDOM boxes (no RPN: its frozen forward is the same for both paths).

    python benchmarks/pretrain_throughput.py [--quick] [--variant tiny|RN50] [--workers N] [--compare-workers N]

``--compare-workers N`` measures only the engine, with N loader workers against the engine's default, interleaved
in one run (steady steps/s as above): what a forked loader worker costs or saves on this machine.

Each recipe's own data settings: tiny (pretrain_tiny_toyworld): 128 px images, 16 per step, 8 regions each, decoded
images cached in memory and no loader workers (so the first repeat decodes, later ones read the cache: best-of
measures the steady state); RN50: batch 2 of 640×480 images kept
at that size (pretrain.min_sizes [480]; the paper's 640-800 would upsample them), 100 regions each (the paper's),
the engine's default loader workers (none on two cores or fewer; ``--workers N`` sets the count, e.g. 1 to
measure a forked worker beside the training process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_line, peak_rss_mib  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "moon"]


def make_data(root: Path, variant: str, n_images: int) -> None:
    """Images with coloured blobs, a caption each (jsonl), and a concept pool embedded with the (seeded, random)
    text tower that student and teacher share."""
    from rclip_core.clip_backbone import create_clip
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    rng = np.random.default_rng(0)
    h, w = (128, 128) if variant == "tiny" else (480, 640)
    (root / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    lines = []
    for i in range(n_images):
        img = rng.normal(120, 20, (h, w, 3))
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(h / 12, h / 4)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{i}.jpg", quality=90)
        caption = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} next to a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        lines.append(json.dumps({"image": f"{i}.jpg", "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    concepts = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    save_embeddings(embed_names(TextEncoder(create_clip(variant, log_random_init=False)), concepts,
                    templates=["a photo of a {}."]), root / "concepts.pt")


def recipe_for(root: Path, variant: str, steps: int, workers: int | None = None):
    """The benchmark's recipe; ``workers`` overrides ``pretrain.num_workers`` (None keeps the recipe's)."""
    from rclip_core.recipes import load_recipe

    common = [*([f"pretrain.num_workers={workers}"] if workers is not None else []),
              f"pretrain.captions={root / 'captions.jsonl'}", f"pretrain.images={root / 'images'}",
              f"pretrain.concepts={root / 'concepts.pt'}", "pretrain.regions=random", f"pretrain.steps={steps}",
              "pretrain.checkpoint_every=0", "pretrain.warmup_steps=0"]
    if variant == "tiny":
        return load_recipe("pretrain_tiny_toyworld", common)
    return load_recipe(None, ["model.variant=RN50", "pretrain.batch_size=2", "pretrain.regions_per_image=100",
                              "pretrain.min_sizes=[480]", "pretrain.max_size=640", *common])


def build(root: Path, variant: str, steps: int, workers: int | None = None):
    from rclip_core.pretrain import build_stage

    recipe = recipe_for(root, variant, steps, workers)
    torch.manual_seed(0)
    model, dataset = build_stage(recipe)
    return recipe, model, dataset


class _StepClock:
    """Engine hook: the time at which each step ended."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def after_step(self, info) -> None:
        self.ends.append(time.perf_counter())


def steady(start: float, ends: list[float]) -> tuple[float, float]:
    """(steps/s after the first step, seconds of the whole call beyond that rate). The first step carries the loop's
    one-time start-up (the loader's worker, the optimizer's state), paid once per run, not per step."""
    rate = (len(ends) - 1) / (ends[-1] - ends[0])
    return rate, (ends[-1] - start) - len(ends) / rate


def run_engine(model, dataset, cfg) -> tuple[float, float]:
    """Steady steps/s of one ``engine.train`` call and its start-up seconds (see :func:`steady`)."""
    from rclip_core import engine
    from rclip_core.pretrain import compute_losses, param_groups

    clock = _StepClock()
    start = time.perf_counter()
    engine.train(model, compute_losses, dataset, cfg, out_dir=None, recipe={}, section="pretrain",
                 param_groups=param_groups(model), checkpoint_module=model.student, hooks=[clock])
    return steady(start, clock.ends)


def prepared_batches(dataset, cfg, steps: int) -> list[list[dict]]:
    from rclip_core.engine import StepSampler

    return [[dataset[key] for key in keys] for keys in StepSampler(len(dataset), global_batch=cfg.batch_size,
                                                                   steps=steps, seed=cfg.seed)]


def run_bare(model, batches, cfg) -> tuple[float, float]:
    """Steady steps/s of the bare loop (forward, losses, backward, clipping, SGD step) and its start-up seconds."""
    from rclip_core.engine import COUNT_PREFIX, build_optimizer
    from rclip_core.pretrain import compute_losses, param_groups

    optimizer = build_optimizer(param_groups(model), cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    start, ends = time.perf_counter(), []
    for batch in batches:
        losses = compute_losses(model, batch)
        total = sum(v for k, v in losses.items() if not k.startswith(COUNT_PREFIX))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        ends.append(time.perf_counter())
    return steady(start, ends)


def teacher_pair(model, batches, repeats: int) -> tuple[float, float, float]:
    """(prepared regions/s, plain regions/s, max |Δprob|) of pseudo labelling the batches' regions."""
    from rclip_core.clip_backbone import build_region_encoder, create_clip
    from rclip_core.pseudo_labels import pseudo_labels

    cfg = model.cfg
    plain = build_region_encoder(create_clip(model.student.rclip_variant, log_random_init=False),
                                 model.student.rclip_variant).requires_grad_(False).eval()
    plain.head.full_attention = True
    prepared = model.teacher
    inputs = []
    for batch in batches:
        images = model.transform([item["image"] for item in batch])
        regions = model._regions(batch, images.image_sizes)
        inputs.append((images.tensors, regions))

    def label(teacher, ctx):
        out = []
        with ctx():
            for images, regions in inputs:
                feats = teacher(images, regions)
                out.append(pseudo_labels(feats, model.concepts, temperature=cfg.teacher_temperature,
                                         threshold=cfg.concept_thresh).teacher_probs)
        return out

    n_regions = sum(sum(int(r.shape[0]) for r in regions) for _, regions in inputs)
    diff = max(float((a - b).abs().max()) for a, b in zip(label(prepared, torch.inference_mode),
                                                          label(plain, torch.no_grad)))
    best = {"prepared": float("inf"), "plain": float("inf")}
    for _ in range(repeats):
        for name, teacher, ctx in (("plain", plain, torch.no_grad), ("prepared", prepared, torch.inference_mode)):
            start = time.perf_counter()
            label(teacher, ctx)
            best[name] = min(best[name], time.perf_counter() - start)
    return n_regions / best["prepared"], n_regions / best["plain"], diff


def compare_workers(model, dataset, cfg, workers: int, repeats: int, name: str, what: str) -> None:
    """The engine with ``workers`` loader workers against the engine as ``cfg`` sets it, interleaved, best of each."""
    from rclip_core.engine import default_num_workers

    other = dataclasses.replace(cfg, num_workers=workers)
    base = default_num_workers(cfg.num_workers)
    ours, ref = [], []
    for _ in range(repeats):
        ours.append(run_engine(model, dataset, other))
        ref.append(run_engine(model, dataset, cfg))
    (rate_ours, up_ours), (rate_ref, up_ref) = max(ours), max(ref)
    print(bench_line(f"{name}_engine_workers{workers}", rate_ours, rate_ref, "it/s", baseline=f"workers{base}")
          + f"  [{what}; steps 2-{cfg.steps}, best of {repeats}; start-up once per run: {workers} workers "
          f"{up_ours:.1f} s, {base} workers {up_ref:.1f} s]", flush=True)


def child(root: Path, variant: str, which: str, steps: int, workers: int | None) -> None:
    recipe, model, dataset = build(root, variant, steps, workers)
    cfg = recipe.pretrain
    if which == "engine":
        run_engine(model, dataset, cfg)
    else:
        run_bare(model, prepared_batches(dataset, cfg, steps), cfg)
    print(json.dumps({"peak_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and one repeat (a smoke run)")
    ap.add_argument("--variant", default="tiny", choices=["tiny", "RN50"])
    ap.add_argument("--steps", type=int, help="steps per timed run (default: tiny 20, RN50 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, help="the engine's loader workers (default: the recipe's)")
    ap.add_argument("--compare-workers", type=int, metavar="N",
                    help="only the engine: N loader workers against the --workers/default setting, in one run")
    ap.add_argument("--child", choices=["engine", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Steady rates are taken after the first step (see steady), so a run needs two steps at least.
    steps = max(2, args.steps or (20 if args.variant == "tiny" else 3))
    repeats = args.repeats
    if args.quick:
        steps, repeats = max(2, steps // 4), 1
    if args.child:
        return child(args.root, args.variant, args.child, steps, args.workers)
    name = f"pretrain_{args.variant.lower()}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe0 = recipe_for(root, args.variant, steps)
        make_data(root, args.variant, n_images=max(8, 2 * recipe0.pretrain.batch_size))
        recipe, model, dataset = build(root, args.variant, steps, args.workers)
        cfg = recipe.pretrain
        from rclip_core.engine import default_num_workers

        what = (f"batch {cfg.batch_size}, {cfg.regions_per_image} regions/image, "
                f"{'128 px' if args.variant == 'tiny' else '640x480'}, {steps} steps/run, "
                f"{default_num_workers(cfg.num_workers)} loader workers")
        print(f"# {what}; load {os.getloadavg()[0]:.2f}", flush=True)
        if args.compare_workers is not None:
            return compare_workers(model, dataset, cfg, args.compare_workers, repeats, name, what)
        batches = prepared_batches(dataset, cfg, steps)
        run_bare(model, batches[:2], cfg)  # warm-up
        ours, bare = [], []
        for _ in range(repeats):
            bare.append(run_bare(model, batches, cfg))
            ours.append(run_engine(model, dataset, cfg))
        (rate_ours, up_ours), (rate_bare, up_bare) = max(ours), max(bare)
        print(bench_line(f"{name}_engine", rate_ours, rate_bare, "it/s") + f"  [{what}; steps 2-{steps}, "
              f"best of {repeats}; start-up once per run: engine {up_ours:.1f} s, bare {up_bare:.1f} s]", flush=True)
        t_ours, t_plain, diff = teacher_pair(model, batches, repeats)
        print(bench_line(f"{name}_pseudo_labels", t_ours, t_plain, "regions/s", baseline="plain")
              + f"  [teacher prepared vs plain; max |dprob| {diff:.1e}]", flush=True)
        peaks = {}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                         os.environ.get("PYTHONPATH")]))}
        for which in ("engine", "bare"):
            out = subprocess.run([sys.executable, __file__, "--child", which, "--root", str(root), "--variant",
                                  args.variant, "--steps", str(steps),
                                  *(["--workers", str(args.workers)] if args.workers is not None else [])],
                                 capture_output=True, text=True, check=True,
                                 env=env)
            peaks[which] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        print(bench_line(f"{name}_peak_mem", peaks["engine"], peaks["bare"], "MiB") + f"  [{what}]")
        print(f"# load {os.getloadavg()[0]:.2f} at the end", flush=True)


if __name__ == "__main__":
    main()
