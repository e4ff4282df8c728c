"""``rclip finetune RECIPE``: open-vocabulary detector transfer on base categories (RegionCLIP §3.4)."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli.common import TrainingProgress, console, device_option, get_device, training_run_options


@click.command()
@training_run_options("Run folder: checkpoint.pt (a detector checkpoint), metrics.jsonl, recipe.yaml, "
                      "eval_step*.json.", "finetune")
@click.option("--retain-check", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="ANN",
              help="Forgetting check: GT-box zero-shot accuracy of ANN's categories (held out of training; images in "
                   "finetune.val_images) before finetuning and at every evaluation.")
@device_option
def finetune(recipe_path: str, out: Path, resume: bool, force: bool, overrides: tuple[str, ...],
             retain_check: Path | None) -> None:
    """Finetune a detector from a (region-pretrained) CLIP on base categories: frozen offline RPN, RoI heads with
    res5 + attention pool, cosine classifier against frozen text embeddings (+ zero background), class-agnostic box
    regression. The detector then detects any class named by text: `rclip zeroshot --weights OUT/checkpoint.pt
    --recipe RECIPE --classes ...`. Multi-process: prefix with `torchrun --nproc_per_node N -m rclip_cli.main`.

    \b
      rclip finetune finetune_rn50_ovcoco --out runs/ovcoco --set model.weights=regionclip_pretrained-cc_rn50.rclip.pt
      rclip finetune finetune_tiny_toyworld --out det --set model.weights=student/checkpoint.pt \\
          --set finetune.rpn=rpn/checkpoint.pt --retain-check toy/instances_val_novel.json
    """
    from rclip_core.run_dir import prepare_run_dir

    def check_inputs(recipe) -> None:  # the run folder is checked first, before torch is imported
        from rclip_core.finetune import check_inputs

        check_inputs(recipe, retain_check)

    recipe = prepare_run_dir(out, recipe_path, overrides, resume=resume, force=force, check=check_inputs)
    from rclip_core import distributed as D
    from rclip_core.finetune import run_finetune

    with TrainingProgress("finetune", recipe.finetune.steps) as bar:
        result = run_finetune(recipe, out_dir=out, resume=resume, device=get_device(), hooks=[bar],
                              retain_check=retain_check)
    if not D.is_main():
        return
    train = result.train
    last = train.history[-1] if train.history else {}
    losses = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith("loss"))
    console.print(f"finetuned steps {train.start_step + 1}..{train.step} ({losses}); {result.training_set.summary()}; "
                  f"wrote {out / 'checkpoint.pt'} and {out / 'metrics.jsonl'}")
    if result.evaluations:
        final = result.evaluations[-1]
        shown = ", ".join(f"{k} {v:.1f}" for k, v in {**final.get("metrics", {}), **final.get("splits", {})}.items()
                          if (k.startswith(("AP50", "APr", "APc", "APf")) or k == "AP") and v is not None)
        retain = final.get("retain")
        if retain is not None:
            shown += (f"{'; ' if shown else ''}held-out GT-box accuracy {100 * retain['before']:.1f}% before → "
                      f"{100 * retain['accuracy']:.1f}% now ({100 * retain['change']:+.1f} points)")
        console.print(f"evaluation at step {final['step']}: {shown} (eval_step{final['step']:07d}.json)")
