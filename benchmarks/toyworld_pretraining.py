"""Teacher vs student on the toy world, over seeds, with the paper-style ablation of the pretraining losses.

Per seed (the toy world's seed, which also seeds every training stage): the demo's world, teacher, concept pool and
RPN (``rclip_core.demo``), then one student per variant, each scored zero-shot on the held-out scenes' GT boxes
(the path ``rclip zeroshot --gt-boxes`` ships): accuracy and COCO AP50, base and novel shapes.

    python benchmarks/toyworld_pretraining.py --seeds 0 1 2 --out runs/ablation

Students train with their own recipe (``pretrain_tiny_toyworld``: 600 steps); ``--demo-budget`` trains them as
``rclip demo`` does instead (its ``demo.student_set``: 150 steps at lr 0.002, to fit four minutes).

Prints one ``RESULT`` line per (seed, model) and a mean ± spread table; a few minutes per seed per variant on
2 CPU cores. ``--variants full`` runs only the paper's student (all three losses).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

VARIANTS = {
    "imgtxt": ["pretrain.loss_region_distill=0", "pretrain.loss_concept_contrastive=0"],
    "distill": ["pretrain.loss_concept_contrastive=0", "pretrain.loss_image_text=0"],
    "contrastive": ["pretrain.loss_region_distill=0", "pretrain.loss_image_text=0"],
    "both": ["pretrain.loss_image_text=0"],
    "full": [],  # both + image-text: the paper's and the demo's
}


def main() -> None:
    # Import every stage now: a long run must not pick up half-edited modules later (the stages import lazily).
    import rclip_core.detector  # noqa: E401, F401
    import rclip_core.evaluation
    import rclip_core.pretrain
    import rclip_core.rpn.training
    import rclip_core.vocab  # noqa: E401, F401
    from rclip_core.clip_backbone import create_clip
    from rclip_core.demo import build_concepts, evaluate_model, make_world, train_student, train_teacher, train_toy_rpn
    from rclip_core.recipes import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("runs/toyworld_pretraining"))
    ap.add_argument("--student-set", nargs="*", default=[],
                    help="extra pretrain recipe overrides for every student (e.g. pretrain.concept_thresh=0.5)")
    ap.add_argument("--teacher-set", nargs="*", default=[], help="extra overrides of the teacher's recipe")
    ap.add_argument("--demo-set", nargs="*", default=[], help="overrides of the demo recipe (e.g. toyworld.*)")
    ap.add_argument("--demo-budget", action="store_true",
                    help="train students as rclip demo does (its demo.student_set), not with their own recipe")
    args = ap.parse_args()
    bar = lambda description, total: contextlib.nullcontext(None)  # noqa: E731
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        recipe = load_recipe("demo_tiny_toyworld", [f"toyworld.seed={seed}", *args.demo_set])
        recipe.demo.teacher_set = [*recipe.demo.teacher_set, *args.teacher_set]
        if not args.demo_budget:
            recipe.demo.student_set = []
        out = args.out / f"seed{seed}"
        world = make_world(recipe, out, force=True)
        teacher = out / "teacher" / "checkpoint.pt"
        if not teacher.exists():
            train_teacher(recipe, world, out / "teacher", device="cpu", bar=bar)
        concepts = out / "concepts.pt"
        if not concepts.exists():
            build_concepts(world.train.captions_json, create_clip(None, str(teacher)), concepts,
                           min_freq=recipe.demo.vocab_min_freq)
        rpn = out / "rpn" / "checkpoint.pt"
        if not rpn.exists():
            train_toy_rpn(recipe, world, out / "rpn", device="cpu", bar=bar)
        models = {"teacher": teacher}
        for v in args.variants:
            ckpt = out / f"student_{v}" / "checkpoint.pt"
            if not ckpt.exists():
                train_student(recipe, world, out / f"student_{v}", teacher=teacher, concepts=concepts, rpn=rpn,
                              device="cpu", bar=bar, overrides=[*VARIANTS[v], *args.student_set])
            models[f"student_{v}"] = ckpt
        for name, ckpt in models.items():
            _, s = evaluate_model(ckpt, recipe, world, out / f"dets_{name}.json", device="cpu")
            row = {"seed": seed, "model": name, "acc": 100 * s.accuracy, "acc_base": 100 * s.accuracy_base,
                   "acc_novel": 100 * s.accuracy_novel, "ap50": s.ap50, "ap50_base": s.ap50_base,
                   "ap50_novel": s.ap50_novel}
            rows.setdefault(name, []).append(row)
            print("RESULT " + json.dumps(row), flush=True)
    keys = ("acc", "acc_base", "acc_novel", "ap50", "ap50_base", "ap50_novel")
    print(f"{'model':<20}" + "".join(f"{k:>14}" for k in keys) + f"   (mean ± spread over seeds {args.seeds})")
    for name, rs in rows.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rs if r[k] is not None]
            spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):8.1f} ± {spread:3.1f}" if vals else f"{'n/a':>14}")
        print(f"{name:<20}" + "".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
