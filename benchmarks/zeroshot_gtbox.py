"""GT-box zero-shot throughput: the `rclip zeroshot` pipeline vs a bare loop over the same model forward.

ours  = ``rclip_core.inference.run_detection`` as the command runs it: images decoded from disk, resized,
        normalised, region embeddings, classification, NMS, COCO records (the command's steady state);
e2e   = the whole `rclip zeroshot` command in-process (model build, fingerprint check, writing files included);
bare  = ``encoder(images, boxes)`` + classifier on tensors prepared beforehand, nothing else.
Both run interleaved in one process, several repeats, best of each. Peak memory is measured in fresh
subprocesses (``--child``), one per path.

    python benchmarks/zeroshot_gtbox.py [--quick] [--variant RN50]
"""

from __future__ import annotations

import argparse
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


def make_data(root: Path, n_images: int, n_boxes: int, n_classes: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(n_boxes):
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            w, h = rng.uniform(20, 140), rng.uniform(20, 130)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, n_classes + 1)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": k + 1, "name": f"class {k}"} for k in range(n_classes)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "ann.json"


def setup(root: Path, variant: str):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.coco import DetectionDataset, load_detection_annotations
    from rclip_core.detector import GivenBoxes, build_region_detector
    from rclip_core.recipes import load_recipe
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    recipe = load_recipe(None, [f"model.variant={variant}"])
    clip = create_clip(variant)
    records, cats, _ = load_detection_annotations(root / "ann.json")
    emb_path = root / "classes.pt"
    if not emb_path.exists():
        emb = embed_names(TextEncoder(clip), [c["name"] for c in cats], templates=["a photo of a {}."])
        save_embeddings(emb, emb_path)
    emb = torch.load(emb_path)["embeddings"]
    detector = build_region_detector(clip, emb, recipe, GivenBoxes("boxes")).eval()
    inp = recipe.input
    ds = DetectionDataset(records, root / "images", min_sizes=inp.min_size, max_size=inp.max_size)
    return recipe, detector, ds, [c["id"] for c in cats]


def run_ours(detector, ds, cat_ids) -> float:
    from rclip_core.inference import run_detection

    _, summary = run_detection(detector, ds, category_ids=cat_ids)
    return summary.images / summary.seconds


def run_bare(detector, prepared) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for image, boxes in prepared:
            res4 = detector.backbone(image[None])
            detector.classifier(detector.roi_heads.head(res4, [boxes]))
    return len(prepared) / (time.perf_counter() - start)


def prepare(detector, ds) -> list:
    """Normalised image tensors and boxes, made before timing the bare path."""
    items = [ds[i] for i in range(len(ds))]
    return [(detector.transform([it["image"]]).tensors[0], it["boxes"]) for it in items]


def run_e2e(root: Path, variant: str, n: int) -> float:
    from click.testing import CliRunner

    from rclip_cli.main import cli

    out = root / "dets.json"
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["zeroshot", "--gt-boxes", str(root / "ann.json"), "--images", str(root / "images"),
                                   "--embeddings", str(root / "classes.pt"), "--out", str(out), "--variant", variant,
                                   "--force"])
    assert res.exit_code == 0, res.output
    return n / (time.perf_counter() - start)


def child(root: Path, variant: str, which: str) -> None:
    _, detector, ds, cat_ids = setup(root, variant)
    if which == "ours":
        run_ours(detector, ds, cat_ids)
    else:
        run_bare(detector, prepare(detector, ds))
    print(json.dumps({"peak_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 images, 2 repeats (about a minute on 2 cores)")
    ap.add_argument("--variant", default="RN50")
    ap.add_argument("--child", choices=["ours", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.root, args.variant, args.child)
    n_images, repeats = (4, 2) if args.quick else (12, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, n_images, n_boxes=20, n_classes=65)
        _, detector, ds, cat_ids = setup(root, args.variant)
        prepared = prepare(detector, ds)
        run_bare(detector, prepared[:1])  # warm-up
        ours, bare, e2e = [], [], []
        for _ in range(repeats):
            bare.append(run_bare(detector, prepared))
            ours.append(run_ours(detector, ds, cat_ids))
            e2e.append(run_e2e(root, args.variant, n_images))
        best_bare = max(bare)
        print(bench_line(f"zeroshot_gtbox_{args.variant.lower()}", max(ours), best_bare, "img/s"))
        print(bench_line(f"zeroshot_gtbox_{args.variant.lower()}_e2e", max(e2e), best_bare, "img/s")
              + f"  [whole command incl. model build, {n_images} images]")
        peaks = {}
        for which in ("ours", "bare"):
            out = subprocess.run([sys.executable, __file__, "--child", which, "--root", str(root), "--variant",
                                  args.variant], capture_output=True, text=True, check=True)
            peaks[which] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        print(bench_line(f"zeroshot_gtbox_{args.variant.lower()}_peak_mem", peaks["ours"], peaks["bare"], "MiB"))


if __name__ == "__main__":
    main()
