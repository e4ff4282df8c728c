"""Open-vocabulary transfer on the toy world (README "finetune"; issue: `rclip finetune`, item 6).

From an ``rclip demo --out DEMO`` run (its toy world, region-pretrained student and base-shape RPN), per seed: the
detector finetuned on the base shapes' boxes only (``finetune_tiny_toyworld``, ``finetune.seed`` = the seed), then
AP50 on the held-out scenes, base and novel shapes apart, of

- **finetuned**: the detector naming all eight shapes by their text embeddings;
- **(a) random novel**: the same detector with random unit vectors in place of the novel shapes' embeddings;
- **(b) zero-shot RPN**: the pretrained student without finetuning, on the same RPN's proposals (the
  ``rclip zeroshot --rpn`` path, the original's zero-shot settings, the same 100 proposals per image), and the same
  with the objectness fused as the toy detector's recipe fuses it (``zeroshot_rpn_sigmoid``).

    rclip demo --out runs/demo
    python benchmarks/toyworld_finetune.py --demo runs/demo --seeds 0 1 2 --out runs/toyworld_finetune

The README's numbers start from the full pretraining recipe's student instead of the demo's shortened one (``--init``),
one toy-world seed at a time:

    python benchmarks/toyworld_pretraining.py --seeds 0 1 2 --variants full --out runs/claim
    python benchmarks/toyworld_finetune.py --demo runs/claim/seed0 --init runs/claim/seed0/student_full/checkpoint.pt \
        --seeds 0

Prints one ``RESULT`` line per (seed, model) and a mean ± spread table (the spread covers the finetuning's
randomness; the pretraining chain is the demo's one run). A few minutes per seed on 2 CPU cores.

Also prints, per seed, how much room the training classes' text embeddings leave for the background: the mean
cosine between two of them, and the largest cosine with a training class of the region direction that is farthest
from all of them. The original's background embedding is all-zero (logit 0), so a region is named background only
where every training class's cosine is negative; when that best direction still scores near zero, almost no region
can be.

``--curve N`` also evaluates every N steps during finetuning (AP50 base / novel on the held-out scenes, the engine's
``eval_stepN.json``) and prints, per evaluation, how many of the sampled training regions the classifier got right
since the last one, foreground and background apart (``count_*_right`` in ``metrics.jsonl``): where the detector
trades one for the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    # Import every stage now: a long run must not pick up half-edited modules later (the stages import lazily).
    import rclip_core.detector  # noqa: E401, F401
    import rclip_core.evaluation
    import rclip_core.finetune
    import rclip_core.zeroshot  # noqa: E401, F401
    from rclip_core.demo import detect_shapes, existing_world, train_toy_detector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="an `rclip demo --out` folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_finetune"))
    ap.add_argument("--init", type=Path, default=None,
                    help="the pretrained encoder to finetune and to run zero-shot (default: DEMO/student)")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="finetune recipe overrides")
    ap.add_argument("--curve", type=int, default=0, metavar="N", help="evaluate every N finetuning steps")
    args = ap.parse_args()
    world = existing_world(args.demo)
    student = args.init or args.demo / "student" / "checkpoint.pt"
    rpn = args.demo / "rpn" / "checkpoint.pt"
    rows: dict[str, list[dict]] = {}
    zs = detect_shapes(student, world, rpn=rpn, recipe_name="demo_tiny_toyworld",
                       overrides=["zeroshot.num_proposals=100"])
    print("RESULT", json.dumps({"model": "zeroshot_rpn", **zs}), flush=True)
    # The same, with the objectness fused as the toy detector's recipe fuses it (sigmoid, not the raw logit).
    zs_sigmoid = detect_shapes(student, world, rpn=rpn, recipe_name="demo_tiny_toyworld",
                               overrides=["zeroshot.num_proposals=100", "zeroshot.score_fusion=sigmoid"])
    print("RESULT", json.dumps({"model": "zeroshot_rpn_sigmoid", **zs_sigmoid}), flush=True)
    for seed in args.seeds:
        det = args.out / f"seed{seed}" / "checkpoint.pt"
        if not det.exists():
            curve = [f"finetune.eval_every={args.curve}", f"finetune.val_annotations={world.val.instances_json}",
                     f"finetune.val_images={world.val.images_dir}"] if args.curve else []
            train_toy_detector(world, det.parent, student=student, rpn=rpn, seed=seed,
                               overrides=[*args.overrides, *curve])
        if args.curve:
            print_curve(det.parent)
        pairwise, best = background_room(det)
        print(f"background room: mean cosine between two training classes {pairwise:.3f}; the region direction "
              f"farthest from all of them still has cosine {best:.3f} with the nearest", flush=True)
        for name, kw in (("finetuned", {}), ("random_novel", {"random_novel_seed": seed})):
            r = detect_shapes(det, world, rpn=rpn, recipe_name="finetune_tiny_toyworld", **kw)
            rows.setdefault(name, []).append(r)
            print("RESULT", json.dumps({"seed": seed, "model": name, **r}), flush=True)
    rows["zeroshot_rpn"] = [zs]
    rows["zeroshot_rpn_sigmoid"] = [zs_sigmoid]
    print(f"\n{'model':<14} {'AP50 novel':>16} {'AP50 base':>16} {'AP50 all':>16}   (n seeds)")
    for name, rs in rows.items():
        cells = []
        for key in ("ap50_novel", "ap50_base", "ap50"):
            vals = [r[key] for r in rs if r[key] is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):6.1f} ± {sd:4.1f}" if vals else "n/a")
        print(f"{name:<14} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}   ({len(rs)})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


def background_room(detector: Path) -> tuple[float, float]:
    """For a detector checkpoint's training class embeddings E (K, D): the mean pairwise cosine, and
    min over unit x of max_k cos(x, E_k), which is minus the distance from the origin to E's convex hull (the unit
    vector opposite the hull's nearest point); negative means some direction lies below every class."""
    import torch

    emb = torch.load(detector, map_location="cpu", weights_only=False)["model"]["classifier.class_embeddings"]
    e = torch.nn.functional.normalize(emb.double(), dim=-1)  # (K, D)
    k = e.shape[0]
    pairwise = float(((e @ e.t()).sum() - k) / (k * k - k))
    # The hull's point nearest the origin: minimise |w @ e|^2 over the simplex, w = softmax(z) (a small problem,
    # K <= a few thousand; Adam to convergence is plenty and needs no solver dependency).
    z = torch.zeros(k, dtype=torch.double, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        (z.softmax(0) @ e).pow(2).sum().backward()
        opt.step()
    nearest = (z.softmax(0) @ e).detach()
    away = -nearest / nearest.norm()
    return pairwise, float((e @ away).max())


def print_curve(run: Path) -> None:
    """Per evaluation of a ``--curve`` run: AP50 base / novel and the sampled regions' accuracy since the last."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"{'step':>6} {'AP50 base':>10} {'AP50 novel':>11} {'fg right %':>11} {'bg right %':>11}")
    last = 0
    for path in sorted(run.glob("eval_step*.json")):
        ev = json.loads(path.read_text())
        step, splits = ev["step"], ev["splits"]
        window = [r for r in rows if last < r["step"] <= step]
        last = step

        pct = {kind: _percent_right(window, kind) for kind in ("foreground", "background")}
        nan = float("nan")
        print(f"{step:>6} {splits.get('AP50_base', nan):>10.1f} {splits.get('AP50_novel', nan):>11.1f}"
              f" {pct['foreground']:>11.1f} {pct['background']:>11.1f}", flush=True)


def _percent_right(rows: list[dict], kind: str) -> float:
    n = sum(r[f"count_{kind}_regions"] for r in rows)
    return 100.0 * sum(r[f"count_{kind}_right"] for r in rows) / n if n else float("nan")


if __name__ == "__main__":
    main()
