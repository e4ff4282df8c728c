"""``rclip weights``: convert original RegionCLIP / OpenAI CLIP checkpoints, and look inside checkpoint files."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import force_option


@click.group()
def weights() -> None:
    """Convert and inspect weight files (see the README's "Getting weights")."""


@weights.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "dst", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The rclip checkpoint to write (loadable with --set model.weights=DST).")
# A plain string: the library's variant table rejects unknown names with the valid list (one table, not two).
@click.option("--variant", default=None, metavar="NAME",
              help="Expected CLIP variant (RN50, RN50x4, tiny); inferred from shapes if left out, checked if given.")
@click.option("--text-from", default=None, metavar="FILE|TAG|random",
              help="Text tower for checkpoints without one (finetuned): a pretrained RegionCLIP or OpenAI CLIP file "
                   "of the same variant, an open_clip tag (openai), or 'random' when only precomputed class "
                   "embeddings will be used.")
@click.option("--detector", is_flag=True,
              help="SRC is a finetuned release (regionclip_finetuned-*.pth): write a detector checkpoint (CLIP, box "
                   "predictor, offline RPN) for rclip zeroshot/visualize --weights.")
@force_option
def convert(src: Path, dst: Path, variant: str | None, text_from: str | None, detector: bool, force: bool) -> None:
    """Convert a RegionCLIP release checkpoint (or OpenAI CLIP) SRC into an rclip checkpoint.

    \b
    backbone.* -> visual.*, lang_encoder.* -> the text tower; teacher_backbone.*, offline_*, roi_heads.box_predictor.*
    and roi_heads.mask_head.* are kept as separate entries; batch-norm counters and logit_scale (ln 100) are filled.
    """
    from rclip_core.io import check_outputs

    check_outputs(dst, force=force)  # before torch is imported
    if detector:
        from rclip_core.finetune import convert_release_detector

        for line in convert_release_detector(src, dst, variant=variant, text_from=text_from, force=force):
            click.echo(line)
        return
    from rclip_core.convert import convert_checkpoint

    report = convert_checkpoint(src, dst, variant=variant, text_from=text_from, force=force)
    for line in report.lines():
        click.echo(line)


@weights.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def inspect(file: Path) -> None:
    """List FILE's top-level key prefixes with counts, what conversion does with each, and the inferred variant."""
    from rclip_core.convert import inspect_checkpoint

    for line in inspect_checkpoint(file).lines():
        click.echo(line)
