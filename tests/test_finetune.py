"""Open-vocabulary detector transfer as a stage (rclip_core.finetune) and as a command (`rclip finetune`): base
categories only (novel boxes removed, images kept, negatives counted), what trains and what stays frozen, the detector
checkpoint (loadable as a CLIP, as an RPN and as a detector), resume, the shipped recipes' original values, and the
refused inputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rclip_cli.main import cli
from rclip_core.checkpoint import save_checkpoint
from rclip_core.data.toyworld import generate_toyworld
from rclip_core.errors import RclipError
from rclip_core.recipes import load_recipe, recipe_to_dict

NOVEL_ID = 4  # star


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from rclip_core.rpn.model import build_rpn

    root = tmp_path_factory.mktemp("finetune")
    world = generate_toyworld(root, num_images=6, image_size=64, seed=5, max_objects=3)
    data = json.loads(world.instances_json.read_text())
    # Image 1 holds only novel boxes: it must stay in as a negative; one more novel box elsewhere is removed.
    first = data["images"][0]["id"]
    for a in data["annotations"]:
        if a["image_id"] == first:
            a["category_id"] = NOVEL_ID
    other = next(a for a in data["annotations"] if a["image_id"] != first)
    other["category_id"] = NOVEL_ID
    world.instances_json.write_text(json.dumps(data))
    rpn_recipe = load_recipe("rpn_r10c4_toyworld_base")
    save_checkpoint(root / "rpn.pt", build_rpn(rpn_recipe.rpn, seed=0), recipe=recipe_to_dict(rpn_recipe))
    sets = [f"finetune.annotations={world.instances_json}", f"finetune.images={world.images_dir}",
            f"finetune.rpn={root / 'rpn.pt'}", "finetune.steps=2", "finetune.batch_size=2",
            "finetune.min_sizes=[64]", "finetune.checkpoint_every=0", "finetune.warmup_steps=1",
            "finetune.rois_per_image=16", "finetune.rpn_topk=20", "zeroshot.num_proposals=20"]
    val = [f"finetune.val_annotations={world.instances_json}", f"finetune.val_images={world.images_dir}",
           "finetune.eval_limit=2"]
    return {"root": root, "world": world, "sets": sets, "val": val, "data": data, "first": first}


def _recipe(toy, *extra):
    return load_recipe("finetune_tiny_toyworld", [*toy["sets"], *extra])


def test_training_set_keeps_base_boxes_and_counts_negatives(toy):
    from rclip_core.finetune import load_training_set

    data = load_training_set(_recipe(toy).finetune)
    novel = sum(1 for a in toy["data"]["annotations"] if a["category_id"] == NOVEL_ID)
    assert data.boxes_removed == novel and data.boxes_kept == len(toy["data"]["annotations"]) - novel
    assert len(data.records) == len(toy["data"]["images"])  # images kept
    assert data.negative_images >= 1
    first = next(r for r in data.records if r.id == toy["first"])
    assert first.gt_boxes.shape == (0, 4)
    assert data.class_names == ["circle", "square", "triangle", "cross", "ring", "hexagon"]
    assert all(int(lab) < 6 for r in data.records for lab in r.gt_labels)  # contiguous training indices
    # Each kept box's label names the category its annotation gives (in file order, novel boxes dropped).
    names = {c["id"]: c["name"] for c in toy["data"]["categories"]}
    for rec in data.records:
        expected = [names[a["category_id"]] for a in toy["data"]["annotations"]
                    if a["image_id"] == rec.id and a["category_id"] != NOVEL_ID]
        assert [data.class_names[int(lab)] for lab in rec.gt_labels] == expected, rec.id
    named = load_training_set(_recipe(toy, "finetune.train_classes=circle,square").finetune)
    assert named.class_names == ["circle", "square"]


def test_one_step_trains_the_heads_and_upper_trunk_only(toy):
    from rclip_core.finetune import build_stage, compute_losses

    stage = build_stage(_recipe(toy))
    model = stage.model
    model.train()
    batch = [stage.dataset[(i, 100 + i)] for i in range(3)]
    losses = compute_losses(model, batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "count_negative_images", "count_foreground_regions",
                           "count_foreground_right", "count_background_regions", "count_background_right"}
    assert float(losses["count_negative_images"]) == sum(1 for b in batch if b["boxes"].shape[0] == 0)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    visual = model.clip.visual
    for name in ("conv1", "bn1", "layer1"):  # stem and res2 frozen
        assert all(not p.requires_grad and p.grad is None for p in getattr(visual, name).parameters()), name
    for name in ("layer2", "layer3", "layer4", "attnpool"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(visual, name).parameters()), name
    assert model.weights.box_regressor.weight.grad is not None
    assert all(p.grad is None for p in model.detector.proposal_generator.parameters())
    assert not model.detector.proposal_generator.rpn.training
    text = [p for n, p in model.clip.named_parameters() if not n.startswith("visual.")]
    assert text and all(p.grad is None and not p.requires_grad for p in text)
    clf = model.detector.classifier
    assert "class_embeddings" in dict(clf.named_buffers()) and "bg_embedding" in dict(clf.named_buffers())
    assert float(clf.bg_embedding.abs().sum()) == 0  # the original's all-zero frozen background
    assert all(not m.training for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_region_accuracy_counts_match_a_plain_count():
    from rclip_core.finetune import region_accuracy_counts

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 5, generator=g)  # K = 4, background = 4
    labels = torch.randint(0, 5, (40,), generator=g)
    counts = {k: int(v) for k, v in region_accuracy_counts(logits, labels).items()}
    fg_n = fg_right = bg_n = bg_right = 0
    for row, lab in zip(logits.tolist(), labels.tolist()):
        best = max(range(5), key=lambda j: row[j])
        if lab == 4:
            bg_n += 1
            bg_right += best == 4
        else:
            fg_n += 1
            fg_right += best == lab
    assert counts == {"count_foreground_regions": fg_n, "count_foreground_right": fg_right,
                      "count_background_regions": bg_n, "count_background_right": bg_right}
    assert 0 < fg_right < fg_n and 0 < bg_right < bg_n  # the case exercises both outcomes


def test_learnable_background_is_a_trained_parameter(toy):
    from rclip_core.finetune import build_stage, compute_losses

    stage = build_stage(_recipe(toy, "finetune.learn_background=true"))
    stage.model.train()
    losses = compute_losses(stage.model, [stage.dataset[(i, i)] for i in range(2)])
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    bg = stage.model.weights.classifier.bg_embedding
    assert isinstance(bg, torch.nn.Parameter) and bg.grad is not None and float(bg.grad.abs().sum()) > 0


def test_finetune_command_writes_a_detector_checkpoint_and_resumes(toy):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.finetune import read_detector
    from rclip_core.rpn import load_rpn

    out = toy["root"] / "run"
    args = ["finetune", "finetune_tiny_toyworld", "--out", str(out), *sum((["--set", s] for s in
                                                                          toy["sets"] + toy["val"]), [])]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "negatives" in r.output and "evaluation at step 2" in r.output
    assert (out / "eval_step0000002.json").is_file() and (out / "metrics.jsonl").is_file()
    ev = json.loads((out / "eval_step0000002.json").read_text())
    assert {"AP50_novel", "AP50_base", "AP50_all"} <= set(ev["splits"])
    clip = create_clip(None, str(out / "checkpoint.pt"))  # the CLIP part, as every command loads weights
    assert clip.rclip_variant == "tiny"
    assert load_rpn(out / "checkpoint.pt") is not None  # the offline RPN travels with the detector
    parts = read_detector(out / "checkpoint.pt")
    assert parts.class_embeddings.shape == (6, 32) and parts.box_regressor["weight"].shape == (4, 32)
    assert read_detector(toy["root"] / "rpn.pt") is None
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "already holds a run" in again.output
    resumed = CliRunner().invoke(cli, [*args, "--resume", "--force", "--set", "finetune.steps=3"])
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_two_runs_of_one_recipe_give_the_same_detector(toy):
    # The box regressor is drawn before the engine seeds its loop: unseeded, two runs of one recipe differed.
    def run(name):
        out = toy["root"] / name
        args = ["finetune", "finetune_tiny_toyworld", "--out", str(out), *sum((["--set", s] for s in toy["sets"]), [])]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        return torch.load(out / "checkpoint.pt", weights_only=True)["model"]

    a, b = run("same_a"), run("same_b")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("extra,message", [
    (["finetune.train_classes=circle,unicorn"], "not among the categories of"),
    (["model.variant=RN50"], "is a tiny checkpoint"),
])
def test_bad_recipe_inputs_are_one_line_errors(toy, extra, message):
    from rclip_core.finetune import build_stage

    recipe = _recipe(toy, *extra)
    if "model.variant=RN50" in extra:
        save_checkpoint(toy["root"] / "tiny.pt", _tiny_state(), recipe={"model": {"variant": "tiny"}})
        recipe.model.weights = str(toy["root"] / "tiny.pt")
    with pytest.raises(RclipError, match=message):
        build_stage(recipe)


def _tiny_state():
    from rclip_core.clip_backbone import create_clip

    return create_clip("tiny", log_random_init=False).state_dict()


def test_embedding_files_missing_a_category_or_of_another_dimension_are_refused(toy):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.finetune import build_stage
    from rclip_core.text_embed import Embeddings, embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    text = TextEncoder(create_clip("tiny", log_random_init=False))
    partial = embed_names(text, ["circle", "square"], templates=["a photo of a {}."])
    save_embeddings(partial, toy["root"] / "partial.pt", force=True)
    with pytest.raises(RclipError, match=r"misses training categories 'triangle'"):
        build_stage(_recipe(toy, f"finetune.train_embeddings={toy['root'] / 'partial.pt'}"))
    wide = Embeddings(names=["circle", "star"], embeddings=torch.nn.functional.normalize(torch.randn(2, 64), dim=1),
                      templates=[], model="imported")
    save_embeddings(wide, toy["root"] / "wide.pt", force=True)
    with pytest.raises(RclipError, match="dimension 64 does not match the model's 32"):
        build_stage(_recipe(toy, *toy["val"], f"finetune.test_embeddings={toy['root'] / 'wide.pt'}"))


def test_missing_inputs_are_listed_before_anything_is_built(toy, tmp_path):
    r = CliRunner().invoke(cli, ["finetune", "finetune_tiny_toyworld", "--out", str(tmp_path / "x"),
                                 "--set", "finetune.rpn=nope.pt"])
    assert r.exit_code != 0 and "finetune.annotations is not set" in r.output and "nope.pt not found" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()


def test_shipped_recipes_pin_the_original_values():
    coco = load_recipe("finetune_rn50_ovcoco")
    f = coco.finetune
    assert (f.batch_size, f.lr, f.steps, f.lr_steps, f.warmup_steps, f.min_sizes, f.max_size, f.hflip) == (
        16, 0.002, 90000, [60000, 80000], 5000, [640, 672, 704, 736, 768, 800], 1333, True)
    assert (f.bg_weight, f.focal_gamma, f.temperature, f.learn_background, f.freeze_at, f.frozen_bn) == (
        0.2, 0.5, 0.01, False, 2, True)
    assert (f.rois_per_image, f.positive_fraction, f.fg_iou_thresh, f.append_gt, f.smooth_l1_beta) == (
        512, 0.25, 0.5, True, 0.0)
    assert (f.optimizer, f.momentum, f.weight_decay, f.warmup_factor, f.lr_gamma) == ("sgd", 0.9, 1e-4, 0.001, 0.1)
    z = coco.zeroshot
    assert (z.nms, z.soft_nms_sigma, z.soft_nms_prune, z.score_thresh, z.max_dets, z.score_fusion, z.box_deltas) == (
        "soft", 0.5, 0.001, 0.001, 100, "none", True)
    assert f.train_classes == "coco48" and coco.model.variant == "RN50"
    x4 = load_recipe("finetune_rn50x4_ovcoco")
    assert x4.model.variant == "RN50x4" and recipe_to_dict(x4.finetune) | {"train_embeddings": None,
                                                                           "test_embeddings": None} == (
        recipe_to_dict(f) | {"train_embeddings": None, "test_embeddings": None})
    for name, variant in (("finetune_rn50_ovlvis", "RN50"), ("finetune_rn50x4_ovlvis", "RN50x4")):
        lvis = load_recipe(name)
        g = lvis.finetune
        assert lvis.model.variant == variant
        assert (g.steps, g.lr_steps, g.lr, g.batch_size, g.warmup_steps) == (180000, [120000, 160000], 0.002, 16, 5000)
        assert (g.bg_weight, g.focal_gamma, g.repeat_factor_thresh) == (0.8, None, 0.001)
        z = lvis.zeroshot
        assert (z.nms, z.score_thresh, z.max_dets, z.score_fusion) == ("soft", 0.02, 300, "raw_logit")


@pytest.fixture(scope="module")
def detector(toy):
    """A detector checkpoint finetuned for two steps (random tiny CLIP and RPN: the numbers mean nothing)."""
    from rclip_core.finetune import run_finetune

    # A large initial box regressor is not what finetuning gives, but makes moved boxes easy to see.
    run_finetune(_recipe(toy), out_dir=toy["root"] / "det")
    ckpt = toy["root"] / "det" / "checkpoint.pt"
    obj = torch.load(ckpt, weights_only=True)
    obj["model"]["box_regressor.bias"] = torch.tensor([0.5, -0.5, 0.3, 0.2])
    torch.save(obj, ckpt)
    return ckpt


def _zeroshot(toy, detector, tmp_path, *extra):
    out = tmp_path / "dets.json"
    names = "circle,square,triangle,star,cross,ring,hexagon,heart"
    r = CliRunner().invoke(cli, ["zeroshot", "--images", str(toy["world"].images_dir), "--annotations",
                                 str(toy["world"].instances_json), "--weights", str(detector), "--recipe",
                                 "finetune_tiny_toyworld", "--classes", names, "--out", str(out), "--limit", "2",
                                 *extra])
    return r, out


def test_zeroshot_runs_a_finetuned_detector_with_its_rpn_and_box_regression(toy, detector, tmp_path):
    r, out = _zeroshot(toy, detector, tmp_path)
    assert r.exit_code == 0, r.output
    summary = json.loads(out.with_name("dets.summary.json").read_text())
    assert summary["region_source"] == f"RPN {detector}" and summary["regions"] > 0
    moved = json.loads(out.read_text())
    assert moved and {d["category_id"] for d in moved} <= set(range(1, 9))
    r2, out2 = _zeroshot(toy, detector, tmp_path / "kept", "--set", "zeroshot.box_deltas=false")
    assert r2.exit_code == 0, r2.output
    kept = json.loads(out2.read_text())
    # Same regions, same classifier: with the regression off, boxes are the RPN's own and differ from the moved ones.
    assert {tuple(d["bbox"]) for d in moved} != {tuple(d["bbox"]) for d in kept}


def test_gt_boxes_with_a_finetuned_detector_are_named_not_moved(toy, detector, tmp_path):
    out = tmp_path / "gt.json"
    r = CliRunner().invoke(cli, ["zeroshot", "--images", str(toy["world"].images_dir), "--gt-boxes",
                                 str(toy["world"].instances_json), "--weights", str(detector), "--recipe",
                                 "finetune_tiny_toyworld", "--classes", "circle,square,star", "--out", str(out),
                                 "--set", "zeroshot.nms=hard", "--set", "zeroshot.score_thresh=0"])
    assert r.exit_code == 0, r.output
    gt = {(a["image_id"], tuple(round(v, 3) for v in a["bbox"])) for a in toy["data"]["annotations"]}
    dets = {(d["image_id"], tuple(d["bbox"])) for d in json.loads(out.read_text())}
    assert dets and dets <= gt


def test_a_test_time_embedding_file_of_another_dimension_is_refused(toy, detector, tmp_path):
    from rclip_core.text_embed import Embeddings, save_embeddings

    wide = Embeddings(names=["circle", "star"], embeddings=torch.nn.functional.normalize(torch.randn(2, 64), dim=1),
                      templates=[], model="imported")
    save_embeddings(wide, tmp_path / "wide.pt")
    r = CliRunner().invoke(cli, ["zeroshot", "--images", str(toy["world"].images_dir), "--annotations",
                                 str(toy["world"].instances_json), "--weights", str(detector), "--embeddings",
                                 str(tmp_path / "wide.pt"), "--out", str(tmp_path / "d.json")])
    assert r.exit_code != 0 and "dimension 64 does not match the model's 32" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "d.json").exists()


def _held_out_file(toy, path, names=("star", "heart")):
    data = toy["data"]
    keep = {c["id"] for c in data["categories"] if c["name"] in names}
    path.write_text(json.dumps({"images": data["images"], "categories": [c for c in data["categories"]
                                                                         if c["id"] in keep],
                                "annotations": [a for a in data["annotations"] if a["category_id"] in keep]}))
    return path


def test_retain_check_measures_held_out_accuracy_before_and_after(toy, tmp_path):
    from rclip_core.finetune import build_stage, load_retain_check

    ann = _held_out_file(toy, tmp_path / "held_out.json")
    out = tmp_path / "run"
    args = ["finetune", "finetune_tiny_toyworld", "--out", str(out), "--retain-check", str(ann),
            *sum((["--set", s] for s in toy["sets"] + [f"finetune.val_images={toy['world'].images_dir}"]), [])]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "held-out GT-box accuracy" in r.output and "points" in r.output
    before = json.loads((out / "retain_before.json").read_text())["accuracy"]
    ev = json.loads((out / "eval_step0000002.json").read_text())["retain"]
    assert ev["before"] == before and ev["change"] == pytest.approx(ev["accuracy"] - before)
    # "before" is the untrained model's accuracy; "accuracy" the finetuned one's, measured the same way.
    recipe = _recipe(toy, f"finetune.val_images={toy['world'].images_dir}")
    stage = build_stage(recipe)
    check = load_retain_check(ann, toy["world"].images_dir, stage.model.clip, recipe, stage.training_set.class_names)
    assert check.accuracy(stage.model, recipe) == pytest.approx(before)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    stage.model.weights.load_state_dict(state)
    assert check.accuracy(stage.model, recipe) == pytest.approx(ev["accuracy"])


def test_retain_check_refuses_trained_categories(toy, tmp_path):
    ann = _held_out_file(toy, tmp_path / "mixed.json", names=("star", "circle"))
    r = CliRunner().invoke(cli, ["finetune", "finetune_tiny_toyworld", "--out", str(tmp_path / "run"),
                                 "--retain-check", str(ann), *sum((["--set", s] for s in toy["sets"] + [
                                     f"finetune.val_images={toy['world'].images_dir}"]), [])])
    assert r.exit_code != 0 and "circle is trained on" in r.output and "Traceback" not in r.output


def test_evaluation_hook_reports_the_change_since_before(tmp_path):
    from rclip_core.engine import StepInfo
    from rclip_core.finetune import EvaluationHook

    class Held:
        annotations = "held.json"

        def accuracy(self, model, recipe, device):
            return 0.7

    hook = EvaluationHook(None, load_recipe(None, ["finetune.eval_every=5"]), tmp_path, device="cpu",
                          retain=Held(), retain_before=0.4)
    for step in range(1, 11):
        hook.after_step(StepInfo(step=step, total=12, start_step=0, losses={}, lr=0.1, seconds=1.0))
    assert [r["step"] for r in hook.results] == [5, 10]
    rec = json.loads((tmp_path / "eval_step0000010.json").read_text())["retain"]
    assert rec["accuracy"] == 0.7 and rec["before"] == 0.4 and rec["change"] == pytest.approx(0.3)
    hook.after_step(StepInfo(step=12, total=12, start_step=0, losses={}, lr=0.1, seconds=1.0))
    assert hook.results[-1]["step"] == 12  # the last step is always evaluated


def test_repeat_factor_sampling_repeats_images_of_rare_categories():
    from rclip_core.data.coco import ImageRecord
    from rclip_core.finetune import repeat_factor_indices

    # Of 11 images, category 0 is in 10 and category 1 in one: f = 10/11 and 1/11; with t = 4/11,
    # r = max(1, sqrt(t / f)) is 1 for the common images and 2 for the rare one (no stochastic rounding).
    records = [ImageRecord(id=i, file_name=f"{i}.png", gt_labels=torch.tensor([0])) for i in range(9)]
    records.append(ImageRecord(id=9, file_name="9.png", gt_labels=torch.tensor([1, 0])))
    records.append(ImageRecord(id=10, file_name="10.png"))  # a negative image: r = 1
    idx = repeat_factor_indices(records, 2, 4 / 11, seed=0)
    assert sorted(idx) == [*range(9), 9, 9, 10]
    # A fractional factor rounds stochastically: t = 2/11 gives sqrt(2) = 1.41 -> 2 copies in about 41 % of seeds.
    twos = sum(repeat_factor_indices(records, 2, 2 / 11, seed=s).count(9) == 2 for s in range(200))
    assert 50 < twos < 115


def test_without_a_recipe_a_detector_brings_its_own_test_settings(toy, detector, tmp_path):
    import yaml

    base = ["zeroshot", "--images", str(toy["world"].images_dir), "--annotations", str(toy["world"].instances_json),
            "--weights", str(detector), "--classes", "circle,star", "--limit", "1"]
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "a.json"), "--set", "zeroshot.max_dets=7"])
    assert r.exit_code == 0, r.output
    used = yaml.safe_load((tmp_path / "a.json.recipe.yaml").read_text())["zeroshot"]
    # Its stored recipe (finetune_tiny_toyworld + the fixture's --set) under this command's --set.
    assert (used["nms"], used["num_proposals"], used["temperature"], used["max_dets"]) == ("soft", 20, 0.07, 7)
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "b.json"), "--recipe", "zeroshot_rn50_coco_gt",
                                 "--variant", "tiny"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "b.json.recipe.yaml").read_text())["zeroshot"]["nms"] == "hard"  # as asked


def test_visualize_draws_a_finetuned_detectors_boxes_with_its_rpn(toy, detector, tmp_path):
    image = sorted(toy["world"].images_dir.iterdir())[0]
    r = CliRunner().invoke(cli, ["visualize", str(image), "--weights", str(detector), "--classes", "circle,star",
                                 "--score-thresh", "0", "--out", str(tmp_path / "vis")])
    assert r.exit_code == 0, r.output
    assert f"regions from RPN {detector}" in r.output and (tmp_path / "vis" / "detections.json").is_file()
