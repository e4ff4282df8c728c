"""Why the toy-world student does not name more shapes: how good is its teacher, where, and at what?

On one seed's run of ``benchmarks/toyworld_pretraining.py`` (its folder holds the toy world, the teacher and the
concept pool), the teacher's zero-shot GT-box accuracy (the path of ``rclip zeroshot --gt-boxes``):

- on its own single-object web images at the size it trained on (64 px) and at the scenes' size (128 px);
- on the training and held-out scenes' GT boxes (128 px, as the demo evaluates), the held-out ones also by the
  number of objects in the scene;

the held-out accuracy again with each box cut out of the scene and encoded as a whole image (a 64-px window at the
box's centre, the web images' size and scale, and the box enlarged 1.5 times and resized to 64 px) instead of pooled
from the scene's feature map, to tell whether the crowding or the pooling misleads it;

and its pseudo labels on the training scenes' GT boxes, as pretraining makes them (``pseudo_labels`` over the
concept pool at the student recipe's teacher temperature): how often the best concept is the box's shape, among
confident regions too, and how often it is no shape at all (a colour, "photo", ...); and how often with
``pretrain.caption_concepts`` (the teacher choosing among the concepts one caption of the image mentions; every
caption of the image counted once), by the number of objects in the scene.

    python benchmarks/toyworld_teacher_diagnosis.py runs/ablation/seed0 [--seed 0]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def by_object_count(gt_json: Path, dets_json: Path) -> None:
    """The held-out accuracy again, split by how many objects share the scene."""
    from collections import Counter

    from rclip_core.evaluation import gt_box_accuracy
    from rclip_core.io import read_json

    gt, dets = read_json(gt_json), read_json(dets_json)
    count = Counter(a["image_id"] for a in gt["annotations"])
    for lo, hi, label in ((1, 1, "1 object"), (2, 2, "2 objects"), (3, 3, "3 objects"), (4, 99, "4 or more")):
        ids = {i for i, n in count.items() if lo <= n <= hi}
        sub = {**gt, "images": [im for im in gt["images"] if im["id"] in ids],
               "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
        acc = gt_box_accuracy(sub, [d for d in dets if d["image_id"] in ids])
        print(f"  held-out scenes with {label}: {100 * acc['accuracy']:.1f} % of {acc['num_boxes']} boxes", flush=True)


def crop_accuracy(encoder, normalise, world: Path, split: str, embeddings, how: str) -> tuple[float, dict[str, float]]:
    """GT-box accuracy % of ``encoder`` on crops of the boxes, encoded as whole images, overall and by object count.

    ``how`` is ``window`` (a 64 × 64 window of scene pixels around the box's centre: the web images' size, with the
    objects at their scale) or ``box1.5`` (the box enlarged 1.5 times about its centre, made square, resized to 64).
    """
    from collections import Counter

    import torch
    from torchvision.ops import roi_align

    from rclip_core.data.coco import DetectionDataset, load_detection_annotations

    records, categories, _ = load_detection_annotations(world / f"instances_{split}.json")
    index = {c["id"]: i for i, c in enumerate(categories)}
    data = DetectionDataset(records, world / "images", min_sizes=(128,), max_size=256)
    text = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    right, total = Counter(), Counter()
    with torch.inference_mode():
        for i in range(len(data)):
            item = data[i]
            if item["image"] is None or not len(item["boxes"]):
                continue
            boxes = item["boxes"].float()
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2
            side = boxes[:, 2:] - boxes[:, :2]
            longest = side.max(dim=1, keepdim=True).values
            half = torch.full_like(longest, 32.0) if how == "window" else 0.75 * longest
            # roi_align on the image itself cuts and resizes every square at once (bilinear, zeros outside).
            crops = roi_align(normalise([item["image"]]).tensors, [torch.cat([centre - half, centre + half], 1)],
                              output_size=(64, 64), sampling_ratio=2, aligned=True)
            pred = (torch.nn.functional.normalize(encoder.encode_image(crops), dim=-1) @ text.t()).argmax(dim=1)
            n = min(len(boxes), 4)
            total[n] += len(boxes)
            right[n] += sum(int(p) == index[c] for p, c in zip(pred.tolist(), item["labels"].tolist()))
    scenes = ("1 object", "2 objects", "3 objects", "4 or more")
    return 100 * sum(right.values()) / sum(total.values()), {scenes[n - 1]: 100 * right[n] / total[n]
                                                              for n in sorted(total)}


def main() -> None:
    import torch

    from rclip_core.clip_backbone import CLIPTrunk, RegionHead, build_region_encoder, create_clip, pooler_resolution_for
    from rclip_core.data.coco import DetectionDataset, load_detection_annotations
    from rclip_core.data.transforms import clip_normalizer
    from rclip_core.demo import score, zero_shot_on
    from rclip_core.io import read_json
    from rclip_core.pseudo_labels import CaptionConcepts, pseudo_labels
    from rclip_core.recipes import load_recipe
    from rclip_core.text_embed import load_embeddings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="one seed's folder of benchmarks/toyworld_pretraining.py")
    ap.add_argument("--seed", type=int, default=0, help="its toy-world seed")
    args = ap.parse_args()
    world, teacher = args.run / "toyworld", str(args.run / "teacher" / "checkpoint.pt")
    recipe = load_recipe("demo_tiny_toyworld", [f"toyworld.seed={args.seed}"])
    student = load_recipe(recipe.demo.student)
    out = args.run / "diagnosis"
    out.mkdir(exist_ok=True)

    def accuracy(split: str, size: int) -> float:
        r = load_recipe("demo_tiny_toyworld", [f"input.min_size={size}", f"input.max_size={2 * size}"])
        dets = zero_shot_on(create_clip(None, teacher), r, world / f"instances_{split}.json", world / "images",
                            out / f"dets_{split}_{size}.json", device="cpu")
        return 100 * score(world / f"instances_{split}.json", dets).accuracy

    for split, size in (("web", 64), ("web", 128), ("train", 128), ("val", 128)):
        print(f"teacher GT-box accuracy, {split} images at {size} px: {accuracy(split, size):.1f} %", flush=True)
    by_object_count(world / "instances_val.json", out / "dets_val_128.json")

    from rclip_core.text_embed import TEMPLATE_SETS, embed_names
    from rclip_core.text_encoder import TextEncoder

    clip = create_clip(None, teacher).eval()
    _, val_categories, _ = load_detection_annotations(world / "instances_val.json")
    names = embed_names(TextEncoder(clip), [c["name"] for c in val_categories],
                        templates=TEMPLATE_SETS[recipe.text.templates]).embeddings
    encoder = build_region_encoder(clip, "tiny").eval()
    normalise = clip_normalizer(recipe.input.pixel_mean, recipe.input.pixel_std)
    for how in ("window", "box1.5"):
        acc, by = crop_accuracy(encoder, normalise, world, "val", names, how)
        print(f"teacher GT-box accuracy on held-out crops ({how}) encoded as whole images: {acc:.1f} % ("
              + ", ".join(f"{v:.1f} % with {k}" for k, v in by.items()) + ")", flush=True)

    concepts = load_embeddings(args.run / "concepts.pt")
    records, categories, _ = load_detection_annotations(world / "instances_train.json")
    shape = {c["id"]: c["name"] for c in categories}
    data = DetectionDataset(records, world / "images", min_sizes=recipe.input.min_size, max_size=recipe.input.max_size)
    trunk = CLIPTrunk(clip.visual)
    head = RegionHead(clip.visual.layer4, clip.visual.attnpool, pooler_resolution=pooler_resolution_for("tiny"))
    right = confident = confident_right = no_shape = total = 0

    caps = read_json(world / "captions_train.json")
    file_of = {im["id"]: im["file_name"] for im in caps["images"]}
    captions_of: dict[str, list[str]] = {}
    for a in caps["annotations"]:
        captions_of.setdefault(file_of[a["image_id"]], []).append(a["caption"])
    matcher = CaptionConcepts(concepts.names)
    cap_right, cap_total = Counter(), Counter()
    tau = student.pretrain.teacher_temperature
    with torch.inference_mode():
        for i in range(len(data)):
            item = data[i]
            if item["image"] is None or not len(item["boxes"]):
                continue
            regions = head(trunk(normalise([item["image"]]).tensors), [item["boxes"].float()])
            pl = pseudo_labels(regions, concepts.embeddings, temperature=tau, threshold=0.0)
            best_p = pl.teacher_probs.max(dim=1).values
            n_obj = min(len(item["boxes"]), 4)
            for caption in captions_of[Path(records[i].file_name).name]:
                allowed = matcher.mask([caption]).expand(len(item["boxes"]), -1)
                restricted = pseudo_labels(regions, concepts.embeddings, temperature=tau, threshold=0.0,
                                           allowed=allowed)
                for label, target in zip(item["labels"].tolist(), restricted.targets.tolist()):
                    cap_total[n_obj] += 1
                    cap_right[n_obj] += concepts.names[target] == shape[label]
            for label, target, p in zip(item["labels"].tolist(), pl.targets.tolist(), best_p.tolist()):
                name = concepts.names[target]
                total += 1
                right += name == shape[label]
                no_shape += name not in shape.values()
                if p > 0.9:
                    confident += 1
                    confident_right += name == shape[label]
    print(f"pseudo labels of {total} training-scene GT boxes: {100 * right / total:.1f} % name the box's shape; "
          f"{100 * confident_right / max(confident, 1):.1f} % of the {confident} with p > 0.9; "
          f"{100 * no_shape / total:.1f} % name no shape at all")
    scenes = ("1 object", "2 objects", "3 objects", "4 or more")
    by_count = ", ".join(f"{100 * cap_right[n] / cap_total[n]:.1f} % with {scenes[n - 1]}"
                         for n in sorted(cap_total))
    print(f"pseudo labels restricted to one caption's concepts (pretrain.caption_concepts): "
          f"{100 * sum(cap_right.values()) / sum(cap_total.values()):.1f} % name the box's shape ({by_count})")


if __name__ == "__main__":
    main()
