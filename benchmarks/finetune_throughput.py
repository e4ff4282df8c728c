"""Finetuning and finetuned-detector throughput: ours vs a bare loop over the same forward (and backward).

train ours = ``rclip_core.engine.train`` running the finetune stage (``finetune.compute_losses``): step sampler,
             DataLoader, loss bookkeeping, all-reduce of the logged values, LR schedule, metrics records;
train bare = the same model, optimizer and batches (decoded by the same dataset): forward, losses, backward, step;
infer ours = ``rclip_core.inference.run_detection`` with the finetuned detector prepared as ``rclip zeroshot``
             and ``rclip visualize`` prepare it (``zeroshot.run_zeroshot``: batch norms folded into the
             convolutions, channels-last weights), images decoded from disk (the next one in a background
             thread), RPN, RoI heads, box regression, gaussian soft-NMS, COCO records in original pixels: what
             the command does per image;
infer bare = ``detector(batch)`` on the detector as built (RPN + RoI heads, the same items prepared beforehand), no
             post-processing;
infer overhead line = ours against a bare forward of the same *prepared* detector: the cost of the loop alone
             (decoding, post-processing, records), with the preparation's gain taken out.

Both paths run interleaved in one process, several repeats, best of each. Random weights, generated toy-world
images (128 px, tiny) or 640 px images (RN50).

    python benchmarks/finetune_throughput.py [--quick] [--variant tiny|RN50] [--skip train|infer] [--infer-repeats N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_line  # noqa: E402


def setup(root: Path, variant: str, n_images: int, steps: int, batch: int):
    from rclip_core.checkpoint import save_checkpoint
    from rclip_core.data.toyworld import generate_toyworld
    from rclip_core.finetune import build_stage
    from rclip_core.recipes import load_recipe, recipe_to_dict
    from rclip_core.rpn.model import build_rpn

    size = 128 if variant == "tiny" else 640
    world = generate_toyworld(root, num_images=n_images, image_size=size, seed=0, max_objects=6, force=True)
    rpn_recipe = load_recipe("rpn_r10c4_toyworld_base")
    save_checkpoint(root / "rpn.pt", build_rpn(rpn_recipe.rpn, seed=0), recipe=recipe_to_dict(rpn_recipe))
    recipe = load_recipe("finetune_tiny_toyworld", [
        f"model.variant={variant}", f"finetune.annotations={world.instances_json}",
        f"finetune.images={world.images_dir}", f"finetune.rpn={root / 'rpn.pt'}", f"finetune.steps={steps}",
        f"finetune.batch_size={batch}", f"finetune.min_sizes=[{size}]", f"input.min_size={size}",
        "finetune.checkpoint_every=0", "finetune.warmup_steps=1"])
    return recipe, build_stage(recipe), world


def train_ours(stage, recipe) -> float:
    from rclip_core import engine
    from rclip_core.finetune import compute_losses

    model = copy.deepcopy(stage.model)
    result = engine.train(model, compute_losses, stage.dataset, recipe.finetune, out_dir=None, recipe={},
                          section="finetune")
    return (result.step - result.start_step) / result.seconds


def train_bare(stage, recipe) -> float:
    from rclip_core.engine import StepSampler, build_optimizer
    from rclip_core.finetune import compute_losses

    cfg = recipe.finetune
    model = copy.deepcopy(stage.model).train()
    opt = build_optimizer([{"params": list(model.parameters())}], cfg)
    sampler = StepSampler(len(stage.dataset), global_batch=cfg.batch_size, steps=cfg.steps, seed=cfg.seed)
    start = time.perf_counter()
    for keys in sampler:
        batch = [stage.dataset[k] for k in keys]
        losses = compute_losses(model, batch)
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return cfg.steps / (time.perf_counter() - start)


def detector_of(stage, recipe, *, prepared: bool = False):
    """The finetuned detector, on its own copy of the weights; ``prepared``: as ``rclip zeroshot`` runs it."""
    from rclip_core.clip_backbone import prepare_for_inference
    from rclip_core.finetune import DetectorParts, build_detector

    w = stage.model.weights
    clip = copy.deepcopy(w.clip)
    if prepared:
        prepare_for_inference(clip, fold_bn=recipe.zeroshot.fold_bn, channels_last=recipe.zeroshot.channels_last)
    parts = DetectorParts(w.classifier.class_embeddings, [], w.classifier.bg_embedding.detach(),
                          {k: v.detach() for k, v in w.box_regressor.state_dict().items()}, {})
    return build_detector(clip, w.classifier.class_embeddings, recipe, stage.model.detector.proposal_generator,
                          parts).eval()


def infer_ours(detector, dataset, n_classes: int) -> float:
    from rclip_core.inference import run_detection

    _, summary = run_detection(detector, dataset, category_ids=list(range(1, n_classes + 1)))
    return summary.images / summary.seconds


def infer_bare(detector, items) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for item in items:
            detector([item])
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and images, 2 repeats")
    ap.add_argument("--variant", default="tiny", choices=["tiny", "RN50"])
    ap.add_argument("--skip", choices=["train", "infer"], help="measure only one of the two comparisons")
    ap.add_argument("--infer-repeats", type=int, default=None,
                    help="inference repeats (default: as training; more are cheap and steady the best-of)")
    args = ap.parse_args()
    steps, n_images, repeats = (6, 8, 2) if args.quick else (20, 16, 3)
    infer_repeats = args.infer_repeats or repeats
    batch = 4 if args.variant == "tiny" else 2
    with tempfile.TemporaryDirectory() as tmp:
        from rclip_core.data.coco import DetectionDataset

        recipe, stage, world = setup(Path(tmp), args.variant, n_images, steps, batch)
        detector, prepared = detector_of(stage, recipe), detector_of(stage, recipe, prepared=True)
        dataset = DetectionDataset(stage.training_set.records, world.images_dir, min_sizes=recipe.input.min_size,
                                   max_size=recipe.input.max_size)
        items = [dataset[i] for i in range(len(dataset))]
        infer_bare(detector, items[:1])  # warm-up
        infer_bare(prepared, items[:1])
        k = detector.classifier.num_classes
        t_ours, t_bare, i_ours, i_bare, i_bare_prepared = [], [], [], [], []
        print(f"# load {os.getloadavg()[0]:.2f}", flush=True)
        for i in range(max(repeats, infer_repeats)):
            if args.skip != "train" and i < repeats:
                t_bare.append(train_bare(stage, recipe))
                t_ours.append(train_ours(stage, recipe))
            if args.skip != "infer" and i < infer_repeats:
                i_bare.append(infer_bare(detector, items))
                i_ours.append(infer_ours(prepared, dataset, k))
                i_bare_prepared.append(infer_bare(prepared, items))
        name = args.variant.lower()
        if t_ours:
            print(bench_line(f"finetune_train_{name}", max(t_ours), max(t_bare), "it/s")
                  + f"  [batch {batch}, {steps} steps/run, best of {repeats}]")
        if i_ours:
            print(bench_line(f"finetune_infer_{name}", max(i_ours), max(i_bare), "img/s")
                  + f"  [{len(items)} images, best of {infer_repeats}; the command's path vs a bare forward]")
            print(bench_line(f"finetune_infer_{name}_overhead", max(i_ours), max(i_bare_prepared), "img/s")
                  + f"  [{len(items)} images, best of {infer_repeats}; both prepared: the loop's cost alone]")
        print(f"# load {os.getloadavg()[0]:.2f} at the end", flush=True)


if __name__ == "__main__":
    main()
