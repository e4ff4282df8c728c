"""``rclip embed``: names × prompt templates → a text-embedding file."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import (
    console,
    force_option,
    get_device,
    load_clip,
    make_progress,
    model_options,
    progress_callback,
    recipe_options,
    save_outputs_recipe,
)
from rclip_core.errors import RclipError


@click.command()
@click.option("--names", "names_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Text file, one name per line (e.g. concepts.txt from `rclip vocab build`).")
@click.option("--classes-from", type=click.Path(dir_okay=False, path_type=Path),
              help="Take the categories of a COCO/LVIS annotation JSON (in id order, ids kept).")
@click.option("--builtin", type=click.Choice(["coco80", "coco65", "coco48", "coco17", "lvis1203", "lvis866"]),
              help="A built-in class list (COCO-80, COCO open-vocabulary 65/48 base/17 novel, LVIS 1203/866 base).")
@click.option("--templates", type=click.Choice(["single", "ensemble"]), default=None,
              help="'single': \"a photo of a {}.\"; 'ensemble': the original's 81 templates, averaged. "
                   "Default: the recipe's (single).")
@click.option("--import-bare", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of encoding, import an original-release [K, D] tensor file; --names gives its names.")
@click.option("--export-bare", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the original release's format (a bare [K, D] tensor) to this path.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .pt file.")
@force_option
@recipe_options
@model_options
def embed(names_file, classes_from, builtin, templates, import_bare, export_bare, out, force, recipe) -> None:
    """Encode class names or concepts with the CLIP text tower into an embedding file.

    The file holds the names, the L2-normalised embeddings [K, D], the templates and a fingerprint of the text
    tower, which `rclip zeroshot` checks against its model. Example:

        rclip embed --builtin coco80 --weights openai --out coco80.pt
    """
    from rclip_core import text_embed as te
    from rclip_core.io import check_writable

    if sum(x is not None for x in (names_file, classes_from, builtin)) != 1:
        raise RclipError("give exactly one of --names, --classes-from, --builtin")
    check_writable(out, force=force)
    if export_bare:
        check_writable(export_bare, force=force)
    ids = None
    if names_file:
        names = te.names_from_text(names_file)
    elif classes_from:
        names, ids = te.categories_from_json(classes_from)
    else:
        names, ids = te.builtin_names(builtin)
    if import_bare:
        emb = te.import_bare(import_bare, names)
        emb.category_ids = ids
    else:
        if templates:
            recipe.text.templates = templates
        from rclip_core.text_encoder import TextEncoder

        encoder = TextEncoder(load_clip(recipe, get_device()))
        tpl = te.TEMPLATE_SETS[recipe.text.templates]
        with make_progress() as progress:
            task = progress.add_task(f"embedding × {len(tpl)} templates", total=len(names), rate="")
            emb = te.embed_names(encoder, names, templates=tpl, batch_size=recipe.text.batch_size,
                                 truncate=recipe.text.truncate, category_ids=ids,
                                 progress=progress_callback(progress, task, "names"))
    te.save_embeddings(emb, out, force=force)
    save_outputs_recipe(recipe, out)
    if export_bare:
        te.export_bare(emb, export_bare, force=force)
    console.print(f"wrote {out}: {len(emb.names)} names × D={emb.dim} ({emb.model})")
