"""Text embedding with vs without EOT truncation (same features; the speed-up is the claim).

ours = TextEncoder with truncation (sequence cut after the last end-of-text token in each batch);
bare = the same encoder over full 77-token sequences (what open_clip's ``encode_text`` computes).

    python benchmarks/text_embed.py [--quick] [--variant RN50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variant", default="RN50")
    args = ap.parse_args()
    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.categories import coco_categories
    from rclip_core.text_embed import embed_names
    from rclip_core.text_encoder import TextEncoder

    enc = TextEncoder(create_clip(args.variant)).eval()
    names = [c["name"] for c in coco_categories()][: 20 if args.quick else 80]
    templates = ["a photo of a {}.", "a photo of many {}.", "a blurry photo of the {}.", "{}."]
    repeats = 2 if args.quick else 3

    def rate(truncate: bool) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        emb = embed_names(enc, names, templates=templates, batch_size=64, truncate=truncate)
        return len(names) * len(templates) / (time.perf_counter() - start), emb.embeddings

    ours, bare = [], []
    for _ in range(repeats):
        r, e_trunc = rate(True)
        ours.append(r)
        r, e_full = rate(False)
        bare.append(r)
    diff = (e_trunc - e_full).abs().max().item()
    print(bench_line(f"text_embed_{args.variant.lower()}_truncation", max(ours), max(bare), "prompts/s")
          + f"  [max |diff| {diff:.1e}]")


if __name__ == "__main__":
    main()
