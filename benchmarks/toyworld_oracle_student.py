"""How much could region training add on the toy world if the teacher's pseudo labels were right?

On one seed's run of ``benchmarks/toyworld_pretraining.py`` (its folder holds the toy world and the teacher), an
*oracle student*: the teacher's weights trained, like the demo's student, by the engine with the student recipe's
solver (``pretrain_tiny_toyworld``: steps, lr, batch, warm-up, clipping; ``--demo-budget``: as ``rclip demo`` trains
it, 150 steps at lr 0.002; ``--set`` changes them), but on the
training scenes' base-shape GT boxes with their true names (cross-entropy over the base shapes' text embeddings at
the recipe's temperature) instead of RPN proposals with the teacher's pseudo labels. It is then scored as every
student is (held-out GT boxes, all eight shape names, the path of ``rclip zeroshot --gt-boxes``).

It separates the two limits of the demo's student: what its training budget can change at all, and what the
quality of its labels allows. A diagnosis, not a pretraining method: the region labels are the annotations the
pretraining stage never sees.

    python benchmarks/toyworld_oracle_student.py runs/ablation/seed0 [--seed 0] [--labels true|teacher]
        [--demo-budget] [--set pretrain.lr=0.01 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class OracleStudent(nn.Module):
    """A CLIP's region path (res4 → RoIAlign → res5 → attention pool) scored against fixed class embeddings."""

    def __init__(self, clip: nn.Module, class_embeddings: torch.Tensor, *, temperature: float, freeze_at: int,
                 pixel_mean, pixel_std) -> None:
        from rclip_core.clip_backbone import CLIPTrunk, RegionHead, pooler_resolution_for
        from rclip_core.data.transforms import clip_normalizer

        super().__init__()
        self.clip = clip
        clip.requires_grad_(False)  # the text tower and the temperature are not part of the region path
        clip.visual.requires_grad_(True)
        self.trunk = CLIPTrunk(clip.visual)
        self.trunk.freeze(freeze_at)
        self.head = RegionHead(clip.visual.layer4, clip.visual.attnpool,
                               pooler_resolution=pooler_resolution_for("tiny"))
        for m in clip.visual.modules():  # FrozenBN, as the student's recipe
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
        self.register_buffer("classes", F.normalize(class_embeddings.float(), dim=-1))  # (K_base, D)
        self.temperature = temperature
        self.normalise = clip_normalizer(pixel_mean, pixel_std)

    def train(self, mode: bool = True) -> OracleStudent:
        super().train(mode)
        for m in self.clip.visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, batch: list[dict]) -> torch.Tensor:
        """(R, K_base) logits of every GT box of the batch."""
        images = self.normalise([item["image"] for item in batch]).tensors
        feats = self.head(self.trunk(images), [item["boxes"].float() for item in batch])
        return F.normalize(feats, dim=-1) @ self.classes.T / self.temperature


class KeyedDetections(torch.utils.data.Dataset):
    """A detection dataset indexed by the engine's ``(index, sample_seed)`` keys, images without boxes skipped."""

    def __init__(self, dataset, base_index: dict[int, int]) -> None:
        self.items = []
        for i in range(len(dataset)):
            item = dataset[i]
            keep = torch.tensor([int(c) in base_index for c in item["labels"]], dtype=torch.bool)
            if item["image"] is not None and bool(keep.any()):
                item["boxes"] = item["boxes"][keep]
                item["targets"] = torch.tensor([base_index[int(c)] for c in item["labels"][keep]])
                self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        return self.items[key[0] if isinstance(key, tuple) else key]


@torch.no_grad()
def relabel_with_teacher(data: KeyedDetections, model: OracleStudent) -> None:
    """Replace every target by the teacher's (the untrained model's) best base shape."""
    model.eval()
    right = total = 0
    for item in data.items:
        guess = model([item]).argmax(dim=1)
        right += int((guess == item["targets"]).sum())
        total += int(guess.shape[0])
        item["targets"] = guess
    print(f"teacher labels: {100 * right / total:.1f} % of {total} training boxes right")


def compute_losses(model: nn.Module, batch: list[dict]) -> dict[str, torch.Tensor]:
    logits = model(batch)
    return {"loss_cls": F.cross_entropy(logits, torch.cat([item["targets"] for item in batch]))}


def main() -> None:
    from rclip_core import engine
    from rclip_core.checkpoint import save_checkpoint
    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.coco import DetectionDataset, load_detection_annotations
    from rclip_core.demo import evaluate_model, existing_world
    from rclip_core.recipes import load_recipe, recipe_to_dict
    from rclip_core.text_embed import TEMPLATE_SETS, embed_names
    from rclip_core.text_encoder import TextEncoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="one seed's folder of benchmarks/toyworld_pretraining.py")
    ap.add_argument("--seed", type=int, default=0, help="its toy-world seed")
    ap.add_argument("--set", dest="sets", nargs="*", default=[], help="overrides of the student recipe")
    ap.add_argument("--out", type=Path, default=None, help="where the oracle goes (default RUN/oracle)")
    ap.add_argument("--labels", choices=["true", "teacher"], default="true",
                    help="the boxes' true shapes, or the teacher's best base shape for each (the same boxes and loss "
                         "with the teacher's errors: label quality alone)")
    ap.add_argument("--demo-budget", action="store_true", help="the student's budget in rclip demo (demo.student_set)")
    args = ap.parse_args()
    demo = load_recipe("demo_tiny_toyworld", [f"toyworld.seed={args.seed}"])
    recipe = load_recipe(demo.demo.student, [*(demo.demo.student_set if args.demo_budget else []), *args.sets])
    cfg = recipe.pretrain
    cfg.seed = args.seed
    world = existing_world(args.run)
    out = args.out or args.run / "oracle"
    clip = create_clip(None, str(args.run / "teacher" / "checkpoint.pt"))
    records, categories, _ = load_detection_annotations(world.train.instances_json)
    base = [c for c in categories if c.get("split") != "novel"]
    emb = embed_names(TextEncoder(clip), [c["name"] for c in base], templates=TEMPLATE_SETS[demo.text.templates])
    model = OracleStudent(clip, emb.embeddings, temperature=cfg.temperature, freeze_at=cfg.freeze_at,
                          pixel_mean=recipe.input.pixel_mean, pixel_std=recipe.input.pixel_std)
    data = KeyedDetections(DetectionDataset(records, world.train.images_dir, min_sizes=cfg.min_sizes,
                                            max_size=cfg.max_size), {c["id"]: i for i, c in enumerate(base)})
    if args.labels == "teacher":
        relabel_with_teacher(data, model)
    result = engine.train(model, compute_losses, data, cfg, out_dir=None, recipe=recipe_to_dict(recipe),
                          section="pretrain")
    first, last = result.history[0]["loss_cls"], result.history[-1]["loss_cls"]
    clip.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", clip, recipe=recipe_to_dict(recipe))
    trained = "oracle" if args.labels == "true" else "teacher_labels"
    rows = {}
    for name, ckpt in (("teacher", args.run / "teacher" / "checkpoint.pt"), (trained, out / "checkpoint.pt")):
        with contextlib.redirect_stdout(None):
            _, s = evaluate_model(ckpt, demo, world, out / f"dets_{name}.json", device="cpu")
        rows[name] = {"seed": args.seed, "model": name, "acc": 100 * s.accuracy, "acc_base": 100 * s.accuracy_base,
                      "acc_novel": 100 * s.accuracy_novel, "ap50": s.ap50, "ap50_base": s.ap50_base,
                      "ap50_novel": s.ap50_novel}
        print("RESULT " + json.dumps(rows[name]), flush=True)
    print(f"{trained}: {result.step} steps, lr {cfg.lr}, loss {first:.2f} -> {last:.2f}; accuracy (base / novel) "
          f"{rows['teacher']['acc_base']:.1f} / {rows['teacher']['acc_novel']:.1f} -> "
          f"{rows[trained]['acc_base']:.1f} / {rows[trained]['acc_novel']:.1f}")


if __name__ == "__main__":
    main()
