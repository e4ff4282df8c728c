"""Region-text pretraining as a stage (rclip_core.pretrain) and as a command (`rclip pretrain`): what trains and what
stays frozen, the empty cases (an image without proposals, a batch of one), the proposal cache, the student
checkpoint as an ordinary CLIP checkpoint for `rclip embed` / `rclip zeroshot`, and the refused inputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import skip_unless_ci

from rclip_cli.main import cli
from rclip_core.checkpoint import save_checkpoint
from rclip_core.data.toyworld import SHAPES, generate_toyworld
from rclip_core.errors import RclipError
from rclip_core.recipes import load_recipe, recipe_to_dict


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.rpn.model import build_rpn
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    root = tmp_path_factory.mktemp("pretrain")
    world = generate_toyworld(root, num_images=8, image_size=64, seed=5, max_objects=3)
    # The concept pool of the random tiny CLIP that student and teacher both start from here.
    save_embeddings(embed_names(TextEncoder(create_clip("tiny")), list(SHAPES), templates=["a photo of a {}."]),
                    root / "concepts.pt")
    rpn_recipe = load_recipe("rpn_r10c4_toyworld_base")
    save_checkpoint(root / "rpn.pt", build_rpn(rpn_recipe.rpn, seed=0), recipe=recipe_to_dict(rpn_recipe))
    sets = [f"pretrain.captions={world.captions_json}", f"pretrain.images={world.images_dir}",
            f"pretrain.concepts={root / 'concepts.pt'}", f"pretrain.rpn={root / 'rpn.pt'}",
            "pretrain.regions_per_image=4", "pretrain.batch_size=2", "pretrain.steps=2", "pretrain.min_sizes=[64]",
            "pretrain.max_size=128", "pretrain.checkpoint_every=0", "pretrain.num_workers=0",
            "pretrain.warmup_steps=1", "pretrain.temperature=0.07", "pretrain.teacher_temperature=0.07"]
    return {"root": root, "world": world, "sets": sets}


def _stage(toy, *extra: str):
    from rclip_core.pretrain import build_stage

    recipe = load_recipe("pretrain_tiny_toyworld", [*toy["sets"], *extra])
    return build_stage(recipe)


def _batch(dataset, n: int) -> list[dict]:
    return [dataset[(i, 1000 + i)] for i in range(n)]


def test_student_trains_above_res2_while_teacher_text_and_rpn_stay_frozen(toy):
    from rclip_core.pretrain import compute_losses

    model, dataset = _stage(toy)
    model.train()
    losses = compute_losses(model, _batch(dataset, 2))
    assert set(losses) == {"loss_img_txt", "loss_region_distill", "loss_concept_contrastive",
                           "count_images_skipped"}
    assert float(losses.pop("count_images_skipped")) == 0  # counted, never added to the loss (engine.COUNT_PREFIX)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    visual = model.student.visual
    for name in ("conv1", "bn1", "layer1"):  # stem and res2: FREEZE_AT 2
        assert all(p.grad is None and not p.requires_grad for p in getattr(visual, name).parameters()), name
    for name in ("layer2", "layer3", "layer4", "attnpool"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(visual, name).parameters()), name
    assert all(p.grad is None for p in model.teacher.parameters()) and not model.teacher.training
    assert all(p.grad is None for p in model.rpn.parameters()) and not model.rpn.training
    text = [p for n, p in model.student.named_parameters() if not n.startswith("visual.")]
    assert text and all(p.grad is None for p in text)
    # FrozenBN: the student's norms keep their statistics in training mode.
    assert all(not m.training for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_an_image_without_proposals_and_a_batch_of_one(toy):
    from rclip_core.pretrain import compute_losses

    model, dataset = _stage(toy)
    model.train()
    batch = _batch(dataset, 2)
    for item in batch:  # cached proposals: none at all for either image
        item["proposals"], item["objectness"] = torch.zeros((0, 4)), torch.zeros(0)
    losses = compute_losses(model, batch)
    losses.pop("count_images_skipped")
    assert float(losses["loss_region_distill"].detach()) == 0.0
    assert float(losses["loss_concept_contrastive"].detach()) == 0.0
    assert float(losses["loss_img_txt"].detach()) > 0
    sum(losses.values()).backward()

    one = compute_losses(model, _batch(dataset, 1))
    assert float(one["loss_img_txt"].detach()) == 0.0  # one image: its caption is the only candidate
    assert torch.isfinite(one["loss_region_distill"])


def test_caption_concepts_restrict_each_image_regions_to_its_caption(toy, monkeypatch):
    import rclip_core.pretrain as P
    from rclip_core.pseudo_labels import pseudo_labels
    from rclip_core.vocab.extract import load_extractor

    try:
        extractor = load_extractor()
    except RclipError as e:
        skip_unless_ci(f"no trained spaCy pipeline: {e}")
    model, dataset = _stage(toy, "pretrain.caption_concepts=true")
    batch = _batch(dataset, 2)
    boxes = torch.tensor([[0, 0, 30, 30], [10, 10, 50, 40], [20, 5, 60, 60], [5, 30, 40, 63], [0, 0, 63, 63.0]])
    for item, n in zip(batch, (5, 3)):  # cached proposals; the second image has fewer than regions_per_image
        item["proposals"], item["objectness"] = boxes[:n], torch.zeros(n)
    with torch.no_grad():
        out = model(batch)
    names = list(SHAPES)
    sizes = [4, 3]  # regions_per_image 4
    assert out.allowed.shape == (sum(sizes), len(names))
    rows = out.allowed.split(sizes)
    for item, r in zip(batch, rows):
        said = {c for c in extractor.concepts(extractor.nlp(item["caption"])) if c in names}
        assert said, item["caption"]
        assert all(row.tolist() == [n in said for n in names] for row in r), item["caption"]
    pl = pseudo_labels(out.teacher_regions, model.concepts, temperature=0.07, threshold=0.0, allowed=out.allowed)
    assert all(bool(out.allowed[i, t]) for i, t in enumerate(pl.targets.tolist()))
    seen = []
    monkeypatch.setattr(P, "pseudo_labels", lambda *a, **kw: seen.append(kw["allowed"]) or pseudo_labels(*a, **kw))
    P.compute_losses(model, batch)  # the losses use the restricted labels
    assert torch.equal(seen[0], out.allowed)
    batch[0]["proposals"], batch[0]["objectness"] = torch.zeros((0, 4)), torch.zeros(0)  # an image with no region
    with torch.no_grad():
        assert model(batch).allowed.shape == (3, len(names))
        assert all(torch.isfinite(v) for v in P.compute_losses(model, batch).values())
    plain, _ = _stage(toy)
    assert plain.caption_concepts is None  # off by default, as the original


def test_regions_are_drawn_from_the_rpn_top_k_with_the_item_seed(toy):
    model, dataset = _stage(toy, "pretrain.rpn_topk=6", "pretrain.regions_per_image=3")
    model.eval()
    batch = _batch(dataset, 2)
    proposals = model.rpn(batch, None, None).boxes
    regions = model._regions(batch, [tuple(b["image"].shape[-2:]) for b in batch])
    for r, p in zip(regions, proposals):
        assert r.shape[0] == min(3, p[:6].shape[0])
        assert all(any(torch.equal(box, q) for q in p[:6]) for box in r)  # a subset of the top 6
    again = model._regions(batch, [tuple(b["image"].shape[-2:]) for b in batch])
    assert all(torch.equal(a, b) for a, b in zip(regions, again))


def _pretrain(toy, out, *extra: str, sets=None):
    args = ["pretrain", "pretrain_tiny_toyworld", "--out", str(out), *extra]
    for s in sets if sets is not None else toy["sets"]:
        args += ["--set", s]
    return CliRunner().invoke(cli, args)


def test_command_writes_a_plain_clip_checkpoint_that_embed_and_zeroshot_load(toy, tmp_path):
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    res = _pretrain(toy, run, "--cache-proposals", str(cache))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "recipe.yaml"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["complete"] and meta["inputs"]["rpn_topk"] == 300
    # A second run reuses the cache (the same inputs); other inputs are refused by name.
    assert _pretrain(toy, tmp_path / "run2", "--cache-proposals", str(cache)).exit_code == 0
    other = _pretrain(toy, tmp_path / "run3", "--cache-proposals", str(cache), "--set", "pretrain.rpn_topk=50")
    assert other.exit_code == 1 and "rpn_topk" in other.output

    world = toy["world"]
    emb = tmp_path / "shapes.pt"
    res = CliRunner().invoke(cli, ["embed", "--classes", ",".join(SHAPES), "--weights", str(run / "checkpoint.pt"),
                                   "--out", str(emb)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["zeroshot", "--gt-boxes", str(world.instances_json), "--images",
                                   str(world.images_dir), "--embeddings", str(emb), "--weights",
                                   str(run / "checkpoint.pt"), "--out", str(tmp_path / "dets.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "dets.json").read_text())


def test_finished_runs_resume_and_recipe_changes_are_guarded(toy, tmp_path):
    run = tmp_path / "run"
    assert _pretrain(toy, run).exit_code == 0
    again = _pretrain(toy, run)
    assert again.exit_code == 1 and "already holds a run" in again.output
    longer = [s for s in toy["sets"] if not s.startswith("pretrain.steps=")] + ["pretrain.steps=3"]
    refused = _pretrain(toy, run, "--resume", sets=longer)
    assert refused.exit_code == 1 and "pretrain.steps" in refused.output
    resumed = _pretrain(toy, run, "--resume", "--force", sets=longer)
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3

    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    corrupt = _pretrain(toy, run, "--resume", sets=longer)
    assert corrupt.exit_code == 1 and "checkpoint.pt" in corrupt.output
    assert len(corrupt.output.strip().splitlines()) == 1


def test_bad_inputs_are_one_line_and_write_nothing(toy, tmp_path):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    world, root = toy["world"], toy["root"]
    base = [s for s in toy["sets"] if not s.startswith(("pretrain.captions=", "pretrain.concepts="))]

    def refused(sets, *needles):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        res = _pretrain(toy, out, sets=sets)
        assert res.exit_code == 1, res.output
        last = res.output.strip().splitlines()[-1]
        assert last.startswith("Error:") and "Traceback" not in res.output, res.output
        # no empty progress bar ("pretrain  0/2  0:00:00") above an error found while building the stage
        assert not re.search(r" 0/\d+ ", res.output), res.output
        for n in needles:
            assert n in last, last
        assert not (out / "checkpoint.pt").exists()

    # every missing path in one message
    refused([*base, "pretrain.captions=nope.json", "pretrain.concepts=missing.pt"], "nope.json", "missing.pt")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    refused([*base, f"pretrain.captions={empty}", f"pretrain.concepts={root / 'concepts.pt'}"], "empty.tsv")
    missing_images = tmp_path / "gone.jsonl"
    missing_images.write_text('{"image": "a.png", "caption": "a star"}\n{"image": "b.png", "caption": "a ring"}\n')
    refused([*base, f"pretrain.captions={missing_images}", f"pretrain.concepts={root / 'concepts.pt'}"], "gone.jsonl")
    # concepts of another text tower: a trained-looking perturbation changes the fingerprint
    other = create_clip("tiny")
    with torch.no_grad():
        other.token_embedding.weight.add_(0.01)
    save_embeddings(embed_names(TextEncoder(other), ["star", "ring"], templates=["a photo of a {}."]),
                    tmp_path / "other.pt")
    refused([*base, f"pretrain.captions={world.captions_json}", f"pretrain.concepts={tmp_path / 'other.pt'}"],
            "other.pt")


@pytest.mark.parametrize("name,variant", [("pretrain_rn50_cc3m", "RN50"), ("pretrain_rn50x4_cc3m", "RN50x4"),
                                          ("pretrain_rn50_cococap", "RN50")])
def test_paper_recipes_hold_the_original_solver_and_region_settings(name, variant):
    # configs/pretrain/RegionCLIP_RN50(x4).yaml and detectron2's solver defaults (regionclip_facts.md §2, §4).
    r = load_recipe(name)
    p = r.pretrain
    assert r.model.variant == variant and r.model.weights == "openai"
    assert (p.optimizer, p.lr, p.momentum, p.weight_decay, p.batch_size) == ("sgd", 0.002, 0.9, 1e-4, 96)
    assert (p.steps, p.lr_steps, p.lr_gamma, p.schedule) == (600000, [300000, 525000], 0.1, "multistep")
    assert (p.warmup_steps, p.warmup_factor, p.grad_clip) == (1000, 0.001, 5.0)
    assert (p.regions_per_image, p.rpn_topk, p.rpn_nms_thresh, p.regions) == (100, 300, 0.5, "rpn")
    assert (p.temperature, p.teacher_temperature, p.concept_thresh) == (0.01, 0.01, 0.1)
    assert (p.loss_region_distill, p.loss_concept_contrastive, p.loss_image_text) == (1.0, 1.0, 1.0)
    assert (p.freeze_at, p.frozen_bn, p.train_text, p.global_box_min_scale) == (2, True, False, 1.0)
    assert p.min_sizes == [640, 672, 704, 736, 768, 800] and p.max_size == 1333


def test_unreadable_images_are_replaced_and_counted(toy, tmp_path):
    world = toy["world"]
    pairs = json.loads(world.captions_json.read_text())
    lines = [json.dumps({"image": im["file_name"], "caption": "a photo of a shape."}) for im in pairs["images"]]
    lines.insert(1, json.dumps({"image": "missing.png", "caption": "a photo of a ring."}))
    captions = tmp_path / "pairs.jsonl"
    captions.write_text("\n".join(lines) + "\n")
    sets = [s for s in toy["sets"] if not s.startswith(("pretrain.captions=", "pretrain.steps=", "pretrain.batch"))]
    sets += [f"pretrain.captions={captions}", "pretrain.steps=3", "pretrain.batch_size=3"]  # 9 draws of 9 pairs
    res = _pretrain(toy, tmp_path / "run", sets=sets)
    assert res.exit_code == 0, res.output
    counts = [json.loads(line)["count_images_skipped"] for line in (tmp_path / "run/metrics.jsonl").read_text()
              .splitlines()]
    assert sum(counts) == 1, counts  # every pair drawn once per epoch: the missing image was met once
    assert "1 unreadable images skipped" in res.output
