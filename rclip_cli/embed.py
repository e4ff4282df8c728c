"""``rclip embed``: names × prompt templates → a text-embedding file."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import (
    check_inputs,
    classes_option,
    console,
    device_option,
    force_option,
    get_device,
    make_progress,
    model_options,
    progress_callback,
    random_weights_note,
    recipe_options,
    save_outputs_recipe,
)
from rclip_core.errors import RclipError
from rclip_core.io import check_outputs


@click.command()
@classes_option
@click.option("--templates", type=click.Choice(["single", "ensemble"]), default=None,
              help="'single': \"a photo of a {}.\"; 'ensemble': the original's 81 templates, averaged. "
                   "Default: the recipe's (single).")
@click.option("--import-bare", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of encoding, import an original-release [K, D] tensor file; --classes gives its names.")
@click.option("--export-bare", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the original release's format (a bare [K, D] tensor) to this path.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .pt file.")
@force_option
@device_option
@recipe_options
@model_options
def embed(classes, templates, import_bare, export_bare, out, force, recipe) -> None:
    """Encode class names or concepts with the CLIP text tower into an embedding file.

    The file holds the names, the L2-normalised embeddings [K, D], the templates and a fingerprint of the text
    tower, which `rclip zeroshot` checks against its model. Examples:

    \b
      rclip embed --classes coco80 --weights openai --out coco80.pt
      rclip embed --classes concepts.txt --weights regionclip_pretrained-cc_rn50.rclip.pt --out concepts.pt
      rclip embed --classes instances_val2017.json --variant tiny --out classes.pt
    """
    if classes is None:
        raise RclipError("give the names: --classes LIST|FILE|NAME")
    check_outputs(out, *((export_bare,) if export_bare else ()), force=force)
    check_inputs(("--import-bare", import_bare))
    from rclip_core.data.class_lists import resolve_classes

    spec = resolve_classes(classes)  # all before torch is imported
    from rclip_core import text_embed as te

    clip = None
    if import_bare:
        emb = te.import_bare(import_bare, spec.names)
        emb.category_ids = spec.category_ids
    else:
        if templates:
            recipe.text.templates = templates
        from rclip_cli.common import load_clip
        from rclip_core.text_encoder import TextEncoder

        clip = load_clip(recipe, get_device())
        text = recipe.text
        with make_progress() as progress:
            task = progress.add_task(f"embedding × {len(te.TEMPLATE_SETS[text.templates])} templates",
                                     total=len(spec.names), rate="")
            emb = te.class_embeddings(TextEncoder(clip), spec, None, templates=text.templates,
                                      batch_size=text.batch_size, truncate=text.truncate,
                                      progress=progress_callback(progress, task, "names"))
    te.save_embeddings(emb, out, force=force)
    save_outputs_recipe(recipe, out)
    if export_bare:
        te.export_bare(emb, export_bare, force=force)
    console.print(f"wrote {out}: {len(emb.names)} names ({spec.source}) × D={emb.dim} ({emb.model})"
                  f"{random_weights_note(clip)}")
