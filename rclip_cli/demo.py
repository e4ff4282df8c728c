"""``rclip demo``: the whole chain on a generated toy world, on the CPU in a few minutes."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from rclip_cli.common import console, force_option, get_device, make_progress, recipe_options, save_outputs_recipe
from rclip_core.errors import RclipError


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for the toy world, the checkpoint, embeddings, detections, metrics and the picture.")
@click.option("--steps", type=int, default=None, help="Training steps (default: the recipe's train.steps).")
@force_option
@recipe_options
def demo(out: Path, steps: int | None, force: bool, recipe) -> None:
    """Generate a toy world of coloured shapes, train a tiny CLIP on its captions (image-text contrastive loss on
    the whole-image region), then embed the shape names, classify every ground-truth box of held-out images
    zero-shot, evaluate (COCO AP with base/novel split) and draw the detections to OUT/demo.png.

    Novel shapes never appear as boxes in training, only as words in captions, as RegionCLIP's concepts do.
    """
    import torch
    from PIL import Image

    from rclip_cli.eval import metrics_table
    from rclip_core import engine, inference
    from rclip_core.checkpoint import save_checkpoint
    from rclip_core.clip_backbone import build_region_encoder, create_clip
    from rclip_core.data.captions import CaptionDataset
    from rclip_core.data.coco import RegionDataset, load_detection_annotations
    from rclip_core.data.toyworld import generate_toyworld
    from rclip_core.detector import build_zeroshot_detector
    from rclip_core.evaluation import evaluate_files
    from rclip_core.io import write_json
    from rclip_core.recipes import recipe_to_dict
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    if out.exists() and any(out.iterdir()):
        if not force:
            raise RclipError(f"{out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    recipe.model.variant, recipe.model.weights = "tiny", None
    tw, train = recipe.toyworld, recipe.train
    train.steps = steps if steps is not None else train.steps
    # Toy images are small: run inference at their native size rather than upscaling to 800 px.
    recipe.input.min_size, recipe.input.max_size = tw.image_size, 2 * tw.image_size
    device = get_device()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    console.rule("1/5 toy world")
    world = out / "toyworld"
    tr = generate_toyworld(world, num_images=tw.num_train, image_size=tw.image_size, seed=tw.seed, prefix="train",
                           max_objects=tw.max_objects)
    va = generate_toyworld(world, num_images=tw.num_val, image_size=tw.image_size, seed=tw.seed + 1, prefix="val",
                           max_objects=tw.max_objects)
    console.print(f"{tr.num_images} training and {va.num_images} held-out images in {world}")

    console.rule("2/5 image-text training")
    clip = create_clip("tiny").to(device)
    encoder = build_region_encoder(clip, "tiny")
    dataset = CaptionDataset(tr.captions_json, tr.images_dir, image_size=train.image_size, seed=train.seed)
    with make_progress() as progress:
        task = progress.add_task("training", total=train.steps, rate="")
        history = engine.train_image_text(
            clip, encoder, dataset, train, device=device,
            progress=lambda step, total, loss: progress.update(task, completed=step, rate=f"loss {loss:.3f}"))
    ckpt = save_checkpoint(out / "model.pt", clip, recipe=recipe_to_dict(recipe), step=train.steps)
    console.print(f"loss {history['loss'][0]:.3f} → {history['loss'][-1]:.3f} in {history['seconds']:.0f} s; "
                  f"checkpoint {ckpt}")

    console.rule("3/5 embed shape names")
    records, categories, _ = load_detection_annotations(va.instances_json)
    names = [c["name"] for c in categories]
    emb = embed_names(TextEncoder(clip), names, templates=["a photo of a {}."], category_ids=[c["id"] for c in
                                                                                             categories])
    save_embeddings(emb, out / "classes.pt")

    console.rule("4/5 zero-shot with ground-truth boxes")
    detector = build_zeroshot_detector(clip, emb.embeddings, recipe)
    inp = recipe.input
    ds = RegionDataset(records, va.images_dir, min_size=inp.min_size, max_size=inp.max_size,
                       pixel_mean=inp.pixel_mean, pixel_std=inp.pixel_std)
    results, summary = inference.run_detection(detector, ds, category_ids=emb.category_ids, device=device,
                                               batch_size=recipe.zeroshot.batch_size)
    write_json(out / "dets.json", results, indent=None)
    save_outputs_recipe(recipe, out / "dets.json")
    acc = engine.region_accuracy(clip, encoder, va.instances_json, va.images_dir, device=device)

    console.rule("5/5 evaluation")
    metrics = evaluate_files(va.instances_json, out / "dets.json")
    write_json(out / "metrics.json", {**metrics, "region_accuracy": acc})
    console.print(metrics_table(metrics))
    splits = ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in acc["per_split"].items())
    console.print(f"region accuracy on {acc['num_boxes']} held-out GT boxes: {acc['accuracy']:.1%} "
                  f"(chance {acc['chance']:.1%}; {splits})")
    _draw(ds, results, {c["id"]: c["name"] for c in categories}, out / "demo.png", Image)
    console.print(f"picture: {out / 'demo.png'}; all outputs in {out}")


def _draw(ds, results: list[dict], names: dict[int, str], path: Path, Image, n: int = 8) -> None:
    """The top detection per GT box on the first ``n`` held-out images, tiled into one PNG."""
    import numpy as np
    import torch

    from rclip_core.data.transforms import read_image
    from rclip_core.io import atomic_open
    from rclip_core.visualize import draw_detections, tile

    tiles = []
    for rec in ds.records[:n]:
        pil = read_image(ds.image_dir / rec.file_name)
        zoom = max(1, 256 // max(pil.size))  # toy images are tiny: enlarge so the labels stay legible
        pil = pil.resize((pil.width * zoom, pil.height * zoom), Image.NEAREST)
        img = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
        dets = sorted((d for d in results if d["image_id"] == rec.id), key=lambda d: -d["score"])
        best: dict[tuple, dict] = {}
        for d in dets:  # one label per box: the highest-scoring class
            best.setdefault(tuple(d["bbox"]), d)
        boxes = zoom * torch.tensor([[x, y, x + w, y + h] for x, y, w, h in best], dtype=torch.float32).reshape(-1, 4)
        chosen = list(best.values())
        tiles.append(draw_detections(img, boxes, [names[d["category_id"]] for d in chosen],
                                     torch.tensor([d["score"] for d in chosen]),
                                     [d["category_id"] for d in chosen], width=2))
    grid = tile(tiles).permute(1, 2, 0).numpy()
    with atomic_open(path, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
