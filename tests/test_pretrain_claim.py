"""Region pretraining on the toy world, at full length (issue 8's claim, checked as far as it was measured to hold).

Runs ``rclip demo``'s default chain (toy world, teacher, concept pool, RPN, student; toy-world seed 0) and a second
student trained with the image-text loss alone, and scores all three on the path ``rclip zeroshot --gt-boxes`` +
``rclip eval`` ship. Several minutes on 2 CPU cores, hence ``slow``.

Measured with ``python benchmarks/toyworld_pretraining.py --seeds 0 1 2 --variants imgtxt full`` (the same chain
and recipes), held-out GT-box accuracy % / COCO AP50:

    seed   teacher       image-text only   full student (the demo's)
    0      64.0 / 55.8   46.9 / 33.7       60.5 / 53.3
    1      59.6 / 47.7   44.7 / 37.8       61.6 / 52.7
    2      47.2 / 39.3   45.3 / 39.3       45.9 / 41.1
    (the earlier toy world, web images shrunk from the scenes, six runs: teacher 35.8-48.2, image-text only
    20.1-41.7, full 40.0-46.6; full minus image-text +3.0 to +20.0, teacher minus full -4.3 to +3.5)

What held in all nine runs, and is checked here:
- the full student (distillation + concept contrastive + image-text) is not behind the image-text-only one
  (+0.6 to +20.0 points; on seed 2 of the current toy world only +0.6);
- the full student keeps most of its teacher's recognition (at worst 3.5 points lower). It does not reliably beat
  its teacher overall (it does on novel shapes): see the README's toy-world section.
The bounds sit below the smallest margin over the runs, so one seed's luck does not decide them.
"""

from __future__ import annotations

import contextlib

import pytest

from rclip_core.demo import evaluate_model, make_world, run_demo, train_student
from rclip_core.recipes import load_recipe

pytestmark = pytest.mark.slow

# Percentage points; measured margins in the docstring (smallest gain 0.6, largest drop 3.5).
MIN_ACC_GAIN_OVER_IMGTXT = 0.0
MAX_ACC_DROP_FROM_TEACHER = 5.0


def test_region_losses_help_and_the_student_keeps_most_of_its_teachers_recognition(tmp_path):
    recipe = load_recipe("demo_tiny_toyworld")
    out = tmp_path / "demo"
    result = run_demo(recipe, out)
    teacher, full = result.scores["teacher"], result.scores["student"]
    world = make_world(recipe, out, force=True)  # the same files again (seeded), for the extra student
    ckpt = train_student(recipe, world, tmp_path / "imgtxt", teacher=out / "teacher" / "checkpoint.pt",
                         concepts=out / "concepts.pt", rpn=out / "rpn" / "checkpoint.pt", device="cpu",
                         bar=lambda description, total: contextlib.nullcontext(None),
                         overrides=["pretrain.loss_region_distill=0", "pretrain.loss_concept_contrastive=0"])
    _, imgtxt = evaluate_model(ckpt, recipe, world, tmp_path / "dets_imgtxt.json", device="cpu")
    assert 100 * (full.accuracy - imgtxt.accuracy) >= MIN_ACC_GAIN_OVER_IMGTXT, (full, imgtxt)
    assert 100 * (teacher.accuracy - full.accuracy) <= MAX_ACC_DROP_FROM_TEACHER, (teacher, full)
    assert full.accuracy > 2 * full.chance
