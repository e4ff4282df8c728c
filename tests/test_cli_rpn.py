"""``rclip rpn train / propose / convert`` and ``rclip eval --proposals`` through the real Click group, on a
generated toy world; then the proposals file feeds ``rclip zeroshot --proposals``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rclip_cli.main import cli
from rclip_core.data.toyworld import generate_toyworld
from rclip_core.recipes import load_recipe
from rclip_core.rpn import build_rpn, load_rpn, to_detectron2_state_dict

TOY_RECIPE = "rpn_r10c4_toyworld_base"  # a shipped recipe, by name


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    train = generate_toyworld(root, num_images=24, image_size=128, seed=0, prefix="train")
    val = generate_toyworld(root, num_images=6, image_size=128, seed=1, prefix="val")
    return {"root": root, "train": train.instances_json, "val": val.instances_json, "images": train.images_dir}


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "rpn"
    result = run("rpn", "train", "--recipe", TOY_RECIPE, "--train-ann", world["train"], "--images", world["images"],
                 "--out", out, "--steps", 3, "--set", "rpn.train.batch_size=4", "--set", "rpn.train.checkpoint_every=2")
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_checkpoint_recipe_history_and_resumes(world, trained):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and {"optimizer", "scheduler", "rng", "finished"} <= set(ckpt)
    assert ckpt["recipe"]["rpn"]["layout"] == "c4" and ckpt["recipe"]["rpn"]["train"]["batch_size"] == 4
    assert load_recipe(trained / "recipe.yaml").rpn.depth == 10
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all("loss_rpn_cls" in r for r in lines)

    base = ["rpn", "train", "--train-ann", world["train"], "--images", world["images"], "--out", trained]
    one_line_error(run(*base, "--recipe", TOY_RECIPE), "already holds a run", "--resume", "--force")
    one_line_error(run(*base, "--resume", "--set", "rpn.train.lr=1"), "the recipe differs", "rpn.train.lr", "--force")
    resumed = run(*base, "--resume", "--steps", 4)
    assert resumed.exit_code == 0, resumed.output
    assert "trained steps 4..4" in resumed.output
    assert torch.load(trained / "checkpoint.pt", weights_only=True)["step"] == 4
    done = run(*base, "--resume")
    assert done.exit_code == 0 and "already at step 4" in done.output
    one_line_error(run("rpn", "train", "--train-ann", world["train"], "--images", world["images"], "--out",
                       trained.parent / "elsewhere", "--resume"), "nothing to resume")


def test_train_bad_input_is_one_line(world, tmp_path):
    base = ["rpn", "train", "--recipe", TOY_RECIPE, "--images", world["images"], "--out", tmp_path / "r"]
    one_line_error(run(*base, "--train-ann", tmp_path / "none.json"), "--annotations: file not found")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"images\": [")
    one_line_error(run(*base, "--train-ann", bad), "malformed JSON")
    one_line_error(run(*base, "--train-ann", world["train"], "--set", "rpn.nope=1"), "unknown recipe key 'rpn.nope'")
    one_line_error(run("rpn", "train", "--recipe", TOY_RECIPE, "--train-ann", world["train"], "--images",
                       tmp_path, "--out", tmp_path / "r"), "training image(s) not found")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rpn:\n  train:\n    stepz: 3\n")
    one_line_error(run(*base, "--train-ann", world["train"], "--recipe", recipe), "rpn.train.stepz")


def test_propose_with_annotations_then_eval_then_zeroshot(world, trained, tmp_path):
    out = tmp_path / "proposals.json"
    args = ["rpn", "propose", "--images", world["images"], "--annotations", world["val"],
            "--checkpoint", trained / "checkpoint.pt", "--out", out]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "6 images →" in result.output and (tmp_path / "proposals.json.recipe.yaml").is_file()
    props = json.loads(out.read_text())
    val_ids = [im["id"] for im in json.loads(world["val"].read_text())["images"]]
    assert [p["image_id"] for p in props] == val_ids and "file_name" not in props[0]
    for p in props:
        assert len(p["boxes"]) == len(p["objectness"]) > 0
        assert all(0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128 for x1, y1, x2, y2 in p["boxes"])
        assert p["objectness"] == sorted(p["objectness"], reverse=True)

    one_line_error(run(*args), "already exists", "--force")
    capped = run(*args, "--force", "--set", "rpn.post_nms_topk_test=5")  # over the checkpoint's own recipe
    assert capped.exit_code == 0, capped.output
    assert max(len(p["boxes"]) for p in json.loads(out.read_text())) == 5

    ev = run("eval", "--gt", world["val"], "--proposals", out)
    assert ev.exit_code == 0, ev.output
    assert "AR@100" in ev.stdout and "novel" in ev.stdout and "R50@1000" in ev.stdout
    metrics = json.loads((tmp_path / "proposals.metrics.json").read_text())
    assert metrics["format"] == "proposals" and set(metrics["recall"]) == {"all", "base", "novel"}
    one_line_error(run("eval", "--gt", world["val"], "--proposals", out, "--dets", out), "exactly one of")
    one_line_error(run("eval", "--gt", world["val"], "--proposals", out), "already exists")
    broken = tmp_path / "broken.json"
    broken.write_text("[{\"image_id\": 1,")
    one_line_error(run("eval", "--gt", world["val"], "--proposals", broken), "malformed JSON")
    broken.write_text(json.dumps([{"image_id": 1, "boxes": [[0, 0, 1, 1]]}]))
    one_line_error(run("eval", "--gt", world["val"], "--proposals", broken, "--force"), "lacks key 'objectness'")
    one_line_error(run("eval", "--gt", world["val"], "--proposals", tmp_path / "none.json"), "not found")

    # The file is what `rclip zeroshot --proposals` reads.
    emb = tmp_path / "shapes.pt"
    assert run("embed", "--classes-from", world["val"], "--variant", "tiny", "--out", emb).exit_code == 0
    dets = tmp_path / "dets.json"
    zs = run("zeroshot", "--proposals", out, "--annotations", world["val"], "--images", world["images"],
             "--embeddings", emb, "--variant", "tiny", "--out", dets, "--set", "input.min_size=128",
             "--set", "input.max_size=256", "--set", "zeroshot.score_fusion=sigmoid")
    assert zs.exit_code == 0, zs.output
    assert "6 images, 30 regions" in zs.output and json.loads(dets.read_text())


def test_propose_on_a_folder_writes_file_names(world, trained, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.png", "a.png"):
        (folder / name).write_bytes((world["images"] / "val_000001.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "p.json"
    result = run("rpn", "propose", "--images", folder, "--checkpoint", trained / "checkpoint.pt", "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable" in result.output
    props = json.loads(out.read_text())
    assert [(p["image_id"], p["file_name"]) for p in props] == [(1, "a.png"), (2, "b.png")]
    assert props[0]["boxes"] == props[1]["boxes"]
    strict = run("rpn", "propose", "--images", folder, "--checkpoint", trained / "checkpoint.pt", "--out", out,
                 "--force", "--strict")
    assert strict.exit_code == 1  # a mid-run error follows the progress bar's last state: one Error line, last
    last = strict.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "broken.png: not a readable image" in last


def test_propose_bad_checkpoints_are_one_line(world, tmp_path, trained):
    base = ["rpn", "propose", "--images", world["images"], "--out", tmp_path / "p.json"]
    one_line_error(run(*base, "--checkpoint", tmp_path / "none.pt"), "--rpn: file not found")
    bad_ann = tmp_path / "ann.json"
    bad_ann.write_text("{\"images\": [}")
    one_line_error(run(*base, "--checkpoint", trained / "checkpoint.pt", "--annotations", bad_ann), "malformed JSON")
    one_line_error(run(*base, "--checkpoint", trained / "checkpoint.pt", "--recipe", tmp_path / "none.yaml"),
                   "recipe not found")
    clip_ckpt = tmp_path / "clip.pt"
    torch.save({"model": {"visual.conv1.weight": torch.zeros(1)}, "recipe": {"model": {}}}, clip_ckpt)
    one_line_error(run(*base, "--checkpoint", clip_ckpt), "not an rclip RPN checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01garbage")
    one_line_error(run(*base, "--checkpoint", garbage), "not a readable RPN checkpoint (not a PyTorch file)")
    one_line_error(run(*base, "--checkpoint", trained / "checkpoint.pt", "--set", "rpn.layout=fpn"),
                   "rpn.anchor_sizes: the fpn layout has 5 levels")
    fpn = ["--set", "rpn.layout=fpn", "--set", "rpn.anchor_sizes=[8,16,32,64,128]"]
    one_line_error(run(*base, "--checkpoint", trained / "checkpoint.pt", *fpn), "does not fit the model",
                   "missing: backbone.body.layer4")


def test_convert_a_release_rpn(tmp_path, world):
    cfg = load_recipe(None, ["rpn.layout=c4", "rpn.depth=18", "rpn.imagenet_init=false"]).rpn
    model = build_rpn(cfg)
    src = tmp_path / "rpn_coco_48.pth"
    torch.save({"model": {**to_detectron2_state_dict(model, cfg), "roi_heads.box_predictor.cls_score.weight":
                          torch.zeros(49, 2048)}}, src)
    dst = tmp_path / "rpn_coco_48.rclip.pt"
    result = run("rpn", "convert", src, "--out", dst)
    assert result.exit_code == 0, result.output
    assert "R18-C4" in result.output and "rpn.layout: fpn -> c4" in result.output and "wrote" in result.output
    assert torch.equal(load_rpn(dst).rpn.head.cls_logits.weight, model.rpn.head.cls_logits.weight)
    one_line_error(run("rpn", "convert", src, "--out", dst), "already exists", "--force")
    assert run("rpn", "convert", src, "--out", dst, "--force").exit_code == 0
    one_line_error(run("rpn", "convert", tmp_path / "none.pth", "--out", tmp_path / "x.pt"), "not found")
    one_line_error(run("rpn", "convert", src, "--out", tmp_path / "y.pt", "--set", "rpn.anchor_sizes=[32]"),
                   "shape mismatch: rpn.head.cls_logits.weight")
    props = tmp_path / "p.json"
    proposed = run("rpn", "propose", "--images", world["images"], "--annotations", world["val"], "--checkpoint", dst,
                   "--out", props, "--set", "input.min_size=128", "--limit", 2)
    assert proposed.exit_code == 0, proposed.output
    assert len(json.loads(props.read_text())) == 2


def test_zeroshot_and_visualize_with_the_rpn_on_a_bare_folder(world, trained, tmp_path):
    """`--rpn` proposes and classifies in one command, on a folder without annotations; `visualize --rpn` draws."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted(world["images"].glob("val_*.png"))[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "unreadable.jpg").write_bytes(b"nope")
    common = ["--variant", "tiny", "--set", "input.min_size=128", "--set", "input.max_size=256",
              "--set", "zeroshot.score_fusion=sigmoid"]
    dets = tmp_path / "dets.json"
    emb = tmp_path / "shapes.pt"
    assert run("embed", "--classes-from", world["val"], "--variant", "tiny", "--out", emb).exit_code == 0
    zs = run("zeroshot", "--rpn", trained / "checkpoint.pt", "--images", folder, "--embeddings", emb, "--out", dets,
             *common)
    assert zs.exit_code == 0, zs.output
    listing = json.loads((tmp_path / "dets.images.json").read_text())
    assert [im["file_name"] for im in listing["images"]][0] == "unreadable.jpg"  # sorted listing, ids 1..4
    summary = json.loads((tmp_path / "dets.summary.json").read_text())
    assert summary["mode"] == "rpn" and summary["images"] == 3 and len(summary["images_skipped"]) == 1
    assert {d["image_id"] for d in json.loads(dets.read_text())} <= {2, 3, 4}

    vis = tmp_path / "vis"
    res = run("visualize", folder, "--classes", "circle,square,star", "--rpn", trained / "checkpoint.pt",
              "--out", vis, "--score-thresh", "0", "--topk", "3", "--html", "--set", "zeroshot.score_thresh=0",
              *common)  # random weights score below the detector's 0.001 threshold: keep them, to see them drawn
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in vis.glob("*.png"))
    assert len(pngs) == 3 and "1 unreadable skipped" in res.output
    from PIL import Image

    first = sorted(folder.glob("val_*.png"))[0]
    drawn = Image.open(vis / (first.stem + ".png")).convert("RGB")
    band = drawn.height - 256  # the random-weights notice, above the picture
    assert drawn.width == 256 and 10 < band < 40  # small images are enlarged so labels stay legible
    drawn = drawn.crop((0, band, 256, drawn.height))
    original = Image.open(first).convert("RGB").resize((256, 256), Image.NEAREST)
    assert list(drawn.getdata()) != list(original.getdata())  # boxes drawn on the picture itself
    assert (vis / "index.html").read_text().count("<figure>") == 3


def test_the_same_command_twice_gives_the_same_numbers(world, tmp_path):
    """Reproducible runs (issue 10, item 8): the same `rclip rpn train` command with the same seed gives the same
    losses and weights bit for bit, and DataLoader workers do not change them (batches are drawn by step and seed,
    not by worker timing)."""
    def train(out, *extra):
        result = run("rpn", "train", "--recipe", TOY_RECIPE, "--annotations", world["train"], "--images",
                     world["images"], "--out", out, "--steps", 3, "--set", "rpn.train.batch_size=4", *extra)
        assert result.exit_code == 0, result.output
        losses = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                  for x in (out / "metrics.jsonl").read_text().splitlines()]
        return losses, torch.load(out / "checkpoint.pt", weights_only=True)["model"]

    first, weights = train(tmp_path / "a")
    second, weights2 = train(tmp_path / "b")
    workers, weights3 = train(tmp_path / "c", "--set", "rpn.train.num_workers=2")
    assert first == second == workers and len(first) == 3
    for name, value in weights.items():
        assert torch.equal(value, weights2[name]) and torch.equal(value, weights3[name]), name
