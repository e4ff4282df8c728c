"""Region pretraining and finetuning on the toy world, at full length (issues 8 and 9: their claims, checked as far
as they were measured to hold; each test's measurements are beside it or below).

Runs ``rclip demo``'s chain once on the crowded toy world where README "The toy world" measures the claims (up to
six shapes per scene, ``toyworld.max_objects=6``; the demo itself draws at most three), toy-world seed 0: toy world,
teacher, concept pool, RPN, the demo's shortened student; then a student trained with the image-text loss alone at
the demo's budget, a student trained with its own recipe (600 steps), the same with caption-restricted pseudo labels
and a detector finetuned from the plain full-recipe student, all scored on the path ``rclip zeroshot --gt-boxes`` /
``--rpn`` + ``rclip eval`` ship. Last, ``rclip demo``'s own default chain (at most three shapes per scene) against the
demo's goal. About twenty minutes on 2 CPU cores, hence ``slow``.

At the demo's budget, measured with ``python benchmarks/toyworld_pretraining.py --seeds 0 1 2 --variants imgtxt full
--demo-budget --demo-set toyworld.max_objects=6`` (the same chain and recipes), held-out GT-box accuracy % / COCO AP50:

    seed   teacher       image-text only   full student (the demo's)
    0      64.0 / 55.8   46.9 / 33.7       60.5 / 53.3
    1      59.6 / 47.7   44.7 / 37.8       61.6 / 52.7
    2      47.2 / 39.3   45.3 / 39.3       45.9 / 41.1
    (the earlier toy world, web images shrunk from the scenes, six runs: teacher 35.8-48.2, image-text only
    20.1-41.7, full 40.0-46.6; full minus image-text +3.0 to +20.0, teacher minus full -4.3 to +3.5)

What held in all nine runs, and is checked here:
- the full student (distillation + concept contrastive + image-text) is not behind the image-text-only one
  (+0.6 to +20.0 points; on seed 2 of the current toy world only +0.6);
- the full student keeps most of its teacher's recognition (at worst 3.5 points lower).
The bounds sit below the smallest margin over the runs, so one seed's luck does not decide them.
"""

from __future__ import annotations

import contextlib
import copy

import pytest

from rclip_core.demo import evaluate_model, existing_world, run_demo, train_student
from rclip_core.recipes import load_recipe

pytestmark = pytest.mark.slow

# The world of README "The toy world"'s claim tables, where every measurement below was made: up to six shapes per
# scene, half of all boxes in scenes of four or more, where the teacher is weakest.
CROWDED_WORLD = "toyworld.max_objects=6"

# Percentage points; measured margins in the docstring (smallest gain 0.6, largest drop 3.5).
MIN_ACC_GAIN_OVER_IMGTXT = 0.0
MAX_ACC_DROP_FROM_TEACHER = 5.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's chain on the crowded world, once for the module (the finetuning check starts from its student)."""
    recipe = load_recipe("demo_tiny_toyworld", [CROWDED_WORLD])
    out = tmp_path_factory.mktemp("claim") / "demo"
    return recipe, run_demo(recipe, out)


def _student(demo_run, out_dir, *overrides: str, full_recipe: bool = False):
    """Another student of the demo's teacher, concept pool and RPN: at the demo's budget, or with ``full_recipe``
    at its own recipe's (600 steps; the demo's is shortened)."""
    recipe, result = demo_run
    if full_recipe:
        recipe = copy.deepcopy(recipe)  # the fixture's is shared
        recipe.demo.student_set = []
    out = result.out
    return train_student(recipe, existing_world(out), out_dir, teacher=out / "teacher" / "checkpoint.pt",
                         concepts=out / "concepts.pt", rpn=out / "rpn" / "checkpoint.pt", device="cpu",
                         bar=lambda description, total: contextlib.nullcontext(None), overrides=list(overrides))


def test_region_losses_help_and_the_student_keeps_most_of_its_teachers_recognition(demo_run, tmp_path):
    recipe, result = demo_run
    out = result.out
    teacher, full = result.scores["teacher"], result.scores["student"]
    world = existing_world(out)  # the demo's toy world, for the extra student
    ckpt = _student(demo_run, tmp_path / "imgtxt", "pretrain.loss_region_distill=0",
                    "pretrain.loss_concept_contrastive=0")
    _, imgtxt = evaluate_model(ckpt, recipe, world, tmp_path / "dets_imgtxt.json", device="cpu")
    assert 100 * (full.accuracy - imgtxt.accuracy) >= MIN_ACC_GAIN_OVER_IMGTXT, (full, imgtxt)
    assert 100 * (teacher.accuracy - full.accuracy) <= MAX_ACC_DROP_FROM_TEACHER, (teacher, full)
    assert full.accuracy > 2 * full.chance



# The paper's claim with the student's own recipe (pretrain_tiny_toyworld: 600 steps at lr 0.01, where the demo runs
# 150 at 0.002). Measured with `python benchmarks/toyworld_pretraining.py --seeds 0 1 2 3 4 --variants full
# --demo-set toyworld.max_objects=6`,
# teacher -> student, AP50 base / novel and accuracy % base / novel:
#
#     seed   AP50 base     AP50 novel    acc base      acc novel
#     0      54.1 -> 62.7  61.0 -> 62.8  65.2 -> 59.9  61.0 -> 57.0
#     1      47.1 -> 63.3  49.5 -> 67.2  61.8 -> 64.0  52.4 -> 68.3
#     2      40.6 -> 48.4  35.5 -> 46.9  45.4 -> 51.1  52.7 -> 57.0
#     3      37.7 -> 44.6  41.6 -> 54.3  52.3 -> 51.6  48.9 -> 55.7
#     4      53.6 -> 59.0  52.3 -> 66.2  58.5 -> 62.6  70.1 -> 69.0
#
# Held on every seed (3 and 4 measured after the recipe was set on 0-2): AP50 up on base shapes (+5.3 to +16.2) and on
# novel ones (+1.8 to +17.7; seed 0, the one run here, has the smallest margin). Not held: accuracy (seed 0: 4.9
# points down overall, 5.2 base, 4.0 novel), so it is only checked not to fall far.
MIN_AP50_BASE_GAIN = 4.0
MIN_AP50_NOVEL_GAIN = 0.0
MAX_ACC_DROP_FULL_RECIPE = 8.0


@pytest.fixture(scope="module")
def full_student(demo_run, tmp_path_factory):
    """A student of the demo's teacher trained with its own recipe (600 steps; the demo's is shortened), once."""
    return _student(demo_run, tmp_path_factory.mktemp("full"), full_recipe=True)


def test_student_of_the_full_recipe_beats_its_teacher_in_ap50_on_base_and_novel_shapes(demo_run, full_student,
                                                                                        tmp_path):
    recipe, result = demo_run
    teacher = result.scores["teacher"]
    world = existing_world(result.out)
    _, student = evaluate_model(full_student, recipe, world, tmp_path / "dets_full.json", device="cpu")
    assert student.ap50_base - teacher.ap50_base >= MIN_AP50_BASE_GAIN, (teacher, student)
    assert student.ap50_novel - teacher.ap50_novel >= MIN_AP50_NOVEL_GAIN, (teacher, student)
    assert 100 * (teacher.accuracy - student.accuracy) <= MAX_ACC_DROP_FULL_RECIPE, (teacher, student)


# The same with pseudo labels restricted to the concepts of the image's caption (pretrain.caption_concepts, not the
# original's). Measured with `python benchmarks/toyworld_pretraining.py --seeds 0 1 2 3 4 --variants full
# --student-set pretrain.caption_concepts=true --demo-set toyworld.max_objects=6`, teacher -> student:
#
#     seed   AP50 base     AP50 novel    acc base      acc novel     acc all
#     0      54.1 -> 67.1  61.0 -> 73.8  65.2 -> 62.5  61.0 -> 68.0  64.0 -> 64.0
#     1      47.1 -> 70.0  49.5 -> 71.6  61.8 -> 62.9  52.4 -> 72.0  59.6 -> 65.0
#     2      40.6 -> 54.6  35.5 -> 59.1  45.4 -> 52.5  52.7 -> 62.4  47.2 -> 54.9
#     3      37.7 -> 59.6  41.6 -> 66.4  52.3 -> 58.6  48.9 -> 68.2  51.5 -> 60.9
#     4      53.6 -> 62.2  52.3 -> 73.1  58.5 -> 63.0  70.1 -> 77.0  61.6 -> 66.7
#
# Held on every seed: AP50 up on base shapes (+8.6 to +22.9) and novel ones (+12.8 to +24.8), novel accuracy up
# (+6.9 to +19.5), overall accuracy not down (+0.0 to +9.4; seed 0, the one run here, has the smallest margin). Base
# accuracy rose on four seeds and fell 2.6 points on seed 0. The original's whole-pool labels (the student above) fail
# the novel checks on seed 0 (AP50 +1.8, accuracy -4.0).
CAPTION_MIN_AP50_BASE_GAIN = 6.0
CAPTION_MIN_AP50_NOVEL_GAIN = 8.0
CAPTION_MIN_ACC_NOVEL_GAIN = 3.0
CAPTION_MAX_ACC_DROP = 2.0
CAPTION_MAX_ACC_BASE_DROP = 5.0


def test_student_with_caption_concepts_beats_its_teacher_on_novel_shapes_and_keeps_base_ones(demo_run, tmp_path):
    recipe, result = demo_run
    teacher, world = result.scores["teacher"], existing_world(result.out)
    ckpt = _student(demo_run, tmp_path / "caption", "pretrain.caption_concepts=true", full_recipe=True)
    _, student = evaluate_model(ckpt, recipe, world, tmp_path / "dets_caption.json", device="cpu")
    assert student.ap50_base - teacher.ap50_base >= CAPTION_MIN_AP50_BASE_GAIN, (teacher, student)
    assert student.ap50_novel - teacher.ap50_novel >= CAPTION_MIN_AP50_NOVEL_GAIN, (teacher, student)
    assert 100 * (student.accuracy_novel - teacher.accuracy_novel) >= CAPTION_MIN_ACC_NOVEL_GAIN, (teacher, student)
    assert 100 * (teacher.accuracy - student.accuracy) <= CAPTION_MAX_ACC_DROP, (teacher, student)
    assert 100 * (teacher.accuracy_base - student.accuracy_base) <= CAPTION_MAX_ACC_BASE_DROP, (teacher, student)


# Finetuning (issue 9's toy proof, as far as it was measured to hold), from the full recipe's student. Measured with
# `python benchmarks/toyworld_finetune.py --demo runs/claim/seedN --init runs/claim/seedN/student_full/checkpoint.pt
# --seeds N` for N = 0, 1, 2 (after the five-seed pretraining command above; then finetune_tiny_toyworld), AP50 base /
# novel on the held-out scenes:
#
#     seed   finetuned     random novel embeddings   zero-shot RPN path (raw logit)   (sigmoid fusion)
#     0      26.3 / 25.3   24.7 / 4.9                11.9 / 15.1                      21.4 / 21.1
#     1      28.8 / 32.5   26.3 / 7.8                17.3 / 17.7                      25.7 / 28.5
#     2      27.2 / 27.4   25.7 / 1.3                12.7 / 16.9                      23.2 / 26.6
#
# (With the box regressor drawn from the recipe's seed; before, two runs of one recipe differed by several points.)
# Held on every seed: novel shapes are detected through their names (random embeddings in their place: 20.4 to 26.1
# points less); the detector is above the zero-shot path with the original's raw-logit fusion (+10.2 at the least) and
# with the same sigmoid fusion (+0.9 at the least) on base and novel shapes. (From the demo's shortened student it
# was not above the sigmoid-fused path on two seeds of three.)
# What this does not guard: the class labels. With every training label shifted by one class (tried on seed 0) the
# detector scores 27.3 / 25.6 (26.3 / 25.3 with the right ones) and passes every check here: the toy finetuning's
# gain over zero-shot comes from adapting the encoder to the scenes, soft-NMS and box regression, not from the names.
# Labels are guarded box by box by tests/test_finetune.py.
MIN_NOVEL_AP50_GAIN_OVER_RANDOM = 10.0
MIN_AP50_GAIN_OVER_ZEROSHOT_RAW = 5.0
MIN_AP50_GAIN_OVER_ZEROSHOT_SIGMOID = 0.0


def test_finetuned_detector_finds_novel_shapes_by_name(demo_run, full_student, tmp_path):
    from rclip_core.demo import detect_shapes, train_toy_detector

    _, result = demo_run
    world = existing_world(result.out)
    rpn = result.out / "rpn" / "checkpoint.pt"
    det = train_toy_detector(world, tmp_path / "det", student=full_student, rpn=rpn, seed=0)
    finetuned = detect_shapes(det, world, rpn=rpn, recipe_name="finetune_tiny_toyworld")
    random_novel = detect_shapes(det, world, rpn=rpn, recipe_name="finetune_tiny_toyworld", random_novel_seed=0)
    assert finetuned["ap50_novel"] - random_novel["ap50_novel"] >= MIN_NOVEL_AP50_GAIN_OVER_RANDOM, (
        finetuned, random_novel)
    for fusion, bound in (("raw_logit", MIN_AP50_GAIN_OVER_ZEROSHOT_RAW),
                          ("sigmoid", MIN_AP50_GAIN_OVER_ZEROSHOT_SIGMOID)):
        zeroshot = detect_shapes(full_student, world, rpn=rpn, recipe_name="demo_tiny_toyworld",
                                 overrides=["zeroshot.num_proposals=100", f"zeroshot.score_fusion={fusion}"])
        for split in ("ap50_base", "ap50_novel"):
            assert finetuned[split] - zeroshot[split] >= bound, (fusion, split, finetuned, zeroshot)


# The demo's goal (issue 8): its student names at least 70 % of held-out base-shape boxes and clearly more novel ones
# than chance (12.5 %). `rclip demo` draws at most three shapes per scene for it (demo_tiny_toyworld); measured with
# `python benchmarks/toyworld_pretraining.py --seeds 0 1 2 --variants full --demo-budget`, accuracy % base / novel:
#
#     seed   teacher       the demo's student
#     0      83.5 / 77.9   81.3 / 80.9      (rclip demo's own seed, the one run here)
#     1      75.8 / 71.2   77.4 / 80.8
#     2      62.8 / 73.4   61.8 / 75.0      (a weaker teacher: the goal is not met on this seed)
#
# On the crowded world (above) the same student named 59.9 % of base-shape boxes on seed 0, so this fails there.
DEMO_MIN_ACC_BASE = 70.0  # the goal, not a fitted bound
DEMO_MIN_ACC_NOVEL = 50.0  # four times chance; the smallest measured is 75.0


def test_demo_student_names_most_base_shapes_and_far_more_novel_ones_than_chance(tmp_path):
    recipe = load_recipe("demo_tiny_toyworld")
    student = run_demo(recipe, tmp_path / "demo").scores["student"]
    assert 100 * student.accuracy_base >= DEMO_MIN_ACC_BASE, student
    assert 100 * student.accuracy_novel >= DEMO_MIN_ACC_NOVEL, student
