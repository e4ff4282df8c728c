"""Region pretraining on the toy world, at full length (issue 8's claim, checked as far as it was measured to hold).

Runs ``rclip demo``'s default chain (toy world, teacher, concept pool, RPN, student; toy-world seed 0) and a second
student trained with the image-text loss alone, and scores all three on the path ``rclip zeroshot --gt-boxes`` +
``rclip eval`` ship. Several minutes on 2 CPU cores, hence ``slow``.

Measured with ``python benchmarks/toyworld_pretraining.py --seeds 0 1 2 --variants imgtxt full`` (the same chain
and recipes), held-out GT-box accuracy % / COCO AP50:

    seed   teacher       image-text only   full student (the demo's)
    0      47.4 / 36.2   39.8 / 30.5       46.6 / 36.5
    1      43.0 / 34.4   35.0 / 24.9       42.4 / 36.0
    2      42.9 / 32.9   26.7 / 22.5       40.0 / 33.7
    base-shape AP50, teacher → full: 34.9 → 37.2, 37.9 → 38.9, 32.4 → 35.5

What held on every seed, and is checked here:
- the region losses (distillation + concept contrastive) matter: the full student beats the image-text-only one;
- the full student keeps its teacher's recognition (accuracy at most 2.9 points lower) and scores base shapes
  slightly better (base AP50 +1.0 to +3.1); it does not *clearly* beat its teacher: see the README's toy-world
  section for why, with numbers.
The bounds sit below the smallest margin over the three seeds, so one seed's luck does not decide them.
"""

from __future__ import annotations

import contextlib

import pytest

from rclip_core.demo import evaluate_model, make_world, run_demo, train_student
from rclip_core.recipes import load_recipe

pytestmark = pytest.mark.slow

# Percentage points; measured margins in the docstring (smallest gains 6.8 and 5.9, largest drop 2.9).
MIN_ACC_GAIN_OVER_IMGTXT = 3.0
MIN_AP50_GAIN_OVER_IMGTXT = 3.0
MAX_ACC_DROP_FROM_TEACHER = 4.0


def test_region_losses_help_and_the_student_keeps_its_teachers_recognition(tmp_path):
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
    assert full.ap50 - imgtxt.ap50 >= MIN_AP50_GAIN_OVER_IMGTXT, (full, imgtxt)
    assert 100 * (teacher.accuracy - full.accuracy) <= MAX_ACC_DROP_FROM_TEACHER, (teacher, full)
    assert full.ap50_base > teacher.ap50_base, (teacher, full)
    assert full.accuracy > 2 * full.chance
