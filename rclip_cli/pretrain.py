"""``rclip pretrain RECIPE``: region-text pretraining with teacher pseudo-labels (RegionCLIP §3.2-3.3)."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import TrainingProgress, console, device_option, get_device, training_run_options


@click.command()
@training_run_options("Run folder: checkpoint.pt (the latest; a plain CLIP checkpoint of the student), "
                      "metrics.jsonl, recipe.yaml.", "pretrain")
@device_option
@click.option("--cache-proposals", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run the RPN once over the caption set, keep its proposals in this folder and reuse them in later "
                   "epochs and runs.")
def pretrain(recipe_path: str, out: Path, resume: bool, force: bool, overrides: tuple[str, ...],
             cache_proposals: Path | None) -> None:
    """Pretrain a CLIP visual encoder on image regions (RegionCLIP): a frozen teacher names RPN proposals with
    concepts (pseudo labels); the student learns from them (distillation + region-concept contrastive loss) and from
    the captions (image-text contrastive loss). RECIPE is a YAML file or a shipped recipe name; its `pretrain`
    section names the data (captions, images, concepts, rpn). Multi-process: prefix with
    `torchrun --nproc_per_node N -m rclip_cli.main`.

    \b
    The toy-world chain (see `rclip demo`, which runs it in one go):
      rclip vocab build toy/captions_train.json --out concepts.txt --min-freq 5
      rclip embed --classes concepts.txt --weights teacher/checkpoint.pt --variant tiny --out concepts.pt
      rclip rpn train --recipe rpn_r10c4_toyworld_base --annotations toy/instances_train.json --images toy/images \\
          --out rpn
      rclip pretrain pretrain_tiny_toyworld --out student --set model.weights=teacher/checkpoint.pt \\
          --set pretrain.captions=toy/captions_train.json --set pretrain.images=toy/images \\
          --set pretrain.concepts=concepts.pt --set pretrain.rpn=rpn/checkpoint.pt
    """
    from rclip_core.run_dir import prepare_run_dir

    def check_inputs(recipe) -> None:  # the run folder is checked first, before torch is imported
        from rclip_core.pretrain import check_inputs

        check_inputs(recipe)

    recipe = prepare_run_dir(out, recipe_path, overrides, resume=resume, force=force, check=check_inputs)
    from rclip_core import distributed as D
    from rclip_core.pretrain import run_pretrain

    device = get_device()
    with TrainingProgress("pretrain", recipe.pretrain.steps) as bar:
        result = run_pretrain(recipe, out_dir=out, resume=resume, device=device, hooks=[bar],
                              cache_proposals=cache_proposals)
    if D.is_main():
        last = result.history[-1] if result.history else {}
        losses = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith("loss"))
        skipped = sum(r.get("count_images_skipped", 0) for r in result.history if r["step"] > result.start_step)
        console.print(f"pretrained steps {result.start_step + 1}..{result.step} ({losses}; {skipped} unreadable "
                      f"images skipped); wrote {out / 'checkpoint.pt'} and {out / 'metrics.jsonl'}")
