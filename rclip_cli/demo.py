"""``rclip demo``: the whole chain on a generated toy world, on the CPU in a few minutes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from rclip_cli.common import TrainingProgress, console, device_option, force_option, get_device, raw_recipe_options

DEFAULT_RECIPE = "demo_tiny_toyworld"


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for the toy world, checkpoints, embeddings, detections, metrics and the picture.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Cap every training stage at this many steps (a quick smoke run; the numbers then mean little).")
@force_option
@device_option
@raw_recipe_options
def demo(out: Path, steps: int | None, force: bool, recipe_path: str | None, overrides: tuple[str, ...]) -> None:
    """RegionCLIP's chain on a generated toy world of coloured shapes: a teacher CLIP trained from scratch on
    single-object "web" images and their captions; a concept pool parsed from the scene captions; an RPN trained on
    the base shapes' boxes; region pretraining of a student from the teacher's pseudo labels; then both name every
    ground-truth box of held-out scenes zero-shot, side by side (GT-box accuracy and COCO AP50, base and novel
    shapes), and OUT/demo.png shows their labels, right and wrong.

    Novel shapes (star, heart) never appear as boxes in training, only as words in captions, as RegionCLIP's
    concepts do. Scenes hold one to three shapes (toyworld.max_objects; README "The toy world" also measures
    crowded scenes of up to six, with --set toyworld.max_objects=6).

    The recipe is demo_tiny_toyworld unless --recipe names another; --set changes its sections (input, zeroshot,
    toyworld, text, demo); each stage's own recipe keys go through demo.teacher_set / rpn_set / student_set.

    By default the student trains a quarter of its recipe's budget (demo.student_set: 150 steps at lr 0.002), so
    that the demo takes about four minutes on 2 CPU cores; it then stays level with its teacher. With --set
    'demo.student_set=[]' it trains as pretrain_tiny_toyworld says (600 steps at lr 0.01, about five and a half
    minutes in all), where students beat their teachers in AP50 (README, "The toy world").
    """
    from rclip_core.demo import check_demo, check_demo_recipe, run_demo
    from rclip_core.recipes import load_recipe

    check_demo_recipe(list(overrides))
    recipe = load_recipe(recipe_path or DEFAULT_RECIPE, overrides)
    check_demo(recipe, out, force=force)  # before torch is imported

    @contextlib.contextmanager
    def bar(description: str, total: int):
        with TrainingProgress(description, total) as hook:
            yield hook

    result = run_demo(recipe, out, device=get_device(), force=force, progress=bar, max_steps=steps)
    click.echo(scores_table(result.scores))  # the result table on stdout
    if recipe.demo.student_set:  # the default shortens the student to fit the demo's minutes: say so beside the table
        console.print(f"note: the student trained with demo.student_set ({', '.join(recipe.demo.student_set)}) over "
                      f"its recipe {recipe.demo.student}; --set 'demo.student_set=[]' trains it as that recipe says")
    console.print(f"picture: {result.picture}; all outputs in {result.out}")


def scores_table(scores: dict) -> str:
    """Held-out GT-box accuracy and AP50 of each model, side by side, as plain text (percentages)."""
    def pct(v: float | None, scale: float = 1.0) -> str:
        return "n/a" if v is None or v != v else f"{scale * v:.1f}"

    rows = [f"{'model':<10} {'acc':>6} {'base':>6} {'novel':>6}   {'AP50':>6} {'base':>6} {'novel':>6}"]
    for name, s in scores.items():
        accs = [pct(v, 100) for v in (s.accuracy, s.accuracy_base, s.accuracy_novel)]
        aps = [pct(v) for v in (s.ap50, s.ap50_base, s.ap50_novel)]
        rows.append(f"{name:<10} " + " ".join(f"{a:>6}" for a in accs) + "   " + " ".join(f"{a:>6}" for a in aps))
    first = next(iter(scores.values()))
    rows.append(f"held-out GT-box accuracy (%) on {first.num_boxes} boxes (chance {100 * first.chance:.1f}) and "
                "COCO AP50 (%) of the same detections")
    return "\n".join(rows)
