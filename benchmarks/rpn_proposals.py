"""RPN proposal throughput: the `rclip rpn propose` path vs a bare forward loop over the same model.

ours = ``rclip_core.rpn.run_proposals`` as the command runs it: images decoded from disk (RGB, EXIF), resized like
       the CLIP branch (shorter side 800, longer at most 1333), normalised and padded, backbone + RPN head, anchors,
       decoding, top-k / NMS filtering, boxes scaled back to the original pixels, and the JSON text of the records;
bare = ``model([image])`` on uint8 tensors decoded and resized beforehand, nothing else.
Both run interleaved in one process, several repeats, best of each. The model is the original's R50-FPN (or R50-C4)
with random weights whose frozen norms are set from one image's statistics, so activations and proposal counts are
realistic (hundreds per image) rather than degenerate.

    python benchmarks/rpn_proposals.py [--quick] [--layout fpn|c4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_line  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    """Photo-sized JPEGs (640×480) with smooth blobs on noise, so that the RPN finds varied boxes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        img = rng.normal(120, 20, (480, 640, 3))
        for _ in range(8):
            cx, cy, r = rng.uniform(0, 640), rng.uniform(0, 480), rng.uniform(20, 120)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)


def build_model(layout: str):
    from torchvision.ops import FrozenBatchNorm2d

    from rclip_core.recipes import load_recipe
    from rclip_core.rpn import build_rpn

    recipe = load_recipe(None, [f"rpn.layout={layout}", "rpn.imagenet_init=false"])
    torch.manual_seed(0)
    model = build_rpn(recipe.rpn).eval()

    def set_stats(module, args):
        module.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(args[0].var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model([torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8)])
    for h in hooks:
        h.remove()
    return recipe, model


def run_ours(model, dataset) -> tuple[float, int]:
    from rclip_core.rpn import run_proposals

    start = time.perf_counter()
    records, summary = run_proposals(model, dataset, with_file_names=True)
    json.dumps(records)
    return len(dataset) / (time.perf_counter() - start), summary.regions


def run_bare(model, prepared: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for image in prepared:
            model([image])
    return len(prepared) / (time.perf_counter() - start)


def main() -> None:
    from rclip_core.data.coco import DetectionDataset, images_in_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 images, 2 repeats")
    ap.add_argument("--layout", choices=["fpn", "c4"], default="fpn")
    args = ap.parse_args()
    n_images, repeats = (3, 2) if args.quick else (8, 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, n_images)
        recipe, model = build_model(args.layout)
        dataset = DetectionDataset(images_in_folder(folder), folder, min_sizes=recipe.input.min_size,
                                   max_size=recipe.input.max_size)
        prepared = [dataset[i]["image"] for i in range(len(dataset))]
        run_bare(model, prepared[:1])  # warm-up
        ours, bare, counts = [], [], []
        for _ in range(repeats):
            bare.append(run_bare(model, prepared))
            rate, proposals = run_ours(model, dataset)
            ours.append(rate)
            counts.append(proposals / n_images)
        size = tuple(prepared[0].shape[1:])
        print(bench_line(f"rpn_proposals_r50{args.layout}", max(ours), max(bare), "img/s")
              + f"  [{n_images} images 640x480 -> {size[1]}x{size[0]}, {counts[-1]:.0f} proposals/image]")


if __name__ == "__main__":
    main()
