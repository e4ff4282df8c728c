import json

import pytest
import torch
from click.testing import CliRunner

from rclip_cli.main import cli

TINY = ["--variant", "tiny"]


@pytest.fixture()
def runner():
    return CliRunner()


def _embed(runner, small_coco, *extra):
    out = small_coco["dir"] / "classes.pt"
    res = runner.invoke(cli, ["embed", "--classes-from", str(small_coco["ann"]), "--out", str(out), *TINY, *extra])
    assert res.exit_code == 0, res.output
    return out


def _zeroshot(runner, small_coco, emb, *extra, out_name="dets.json"):
    out = small_coco["dir"] / out_name
    args = ["zeroshot", "--gt-boxes", str(small_coco["ann"]), "--images", str(small_coco["images"]),
            "--embeddings", str(emb), "--out", str(out), *TINY, "--set", "input.min_size=96",
            # random weights: keep every class score, however small, so each box yields both classes
            "--set", "zeroshot.score_thresh=0.0", *extra]
    return runner.invoke(cli, args), out


def test_help_lists_commands(runner):
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    for cmd in ("demo", "embed", "eval", "vocab", "weights", "zeroshot"):
        assert cmd in res.output


def test_embed_writes_file_recipe_and_bare_export(runner, small_coco):
    bare = small_coco["dir"] / "bare.pth"
    out = _embed(runner, small_coco, "--templates", "ensemble", "--export-bare", str(bare))
    obj = torch.load(out)
    assert obj["names"] == ["cat", "dog"] and obj["category_ids"] == [1, 3] and len(obj["templates"]) == 81
    assert torch.load(bare).shape == (2, 32)
    assert (out.parent / "classes.pt.recipe.yaml").read_text().count("templates: ensemble") == 1
    # import the bare file back with names
    names = small_coco["dir"] / "names.txt"
    names.write_text("cat\ndog\n")
    res = runner.invoke(cli, ["embed", "--import-bare", str(bare), "--names", str(names),
                              "--out", str(small_coco["dir"] / "imported.pt")])
    assert res.exit_code == 0, res.output
    assert torch.allclose(torch.load(small_coco["dir"] / "imported.pt")["embeddings"], obj["embeddings"], atol=1e-6)


def test_embed_refuses_overwrite_and_bad_input(runner, small_coco):
    out = _embed(runner, small_coco)
    before = out.read_bytes()
    res = runner.invoke(cli, ["embed", "--classes-from", str(small_coco["ann"]), "--out", str(out), *TINY])
    assert res.exit_code == 1 and "already exists" in res.output and out.read_bytes() == before
    empty = small_coco["dir"] / "empty.txt"
    empty.write_text("")
    res = runner.invoke(cli, ["embed", "--names", str(empty), "--out", str(small_coco["dir"] / "e.pt"), *TINY])
    assert res.exit_code == 1 and "empty" in res.output and not (small_coco["dir"] / "e.pt").exists()
    res = runner.invoke(cli, ["embed", "--builtin", "coco80", "--names", str(empty), "--out", "x.pt"])
    assert res.exit_code == 1 and "exactly one" in res.output
    res = runner.invoke(cli, ["embed", "--builtin", "coco80", "--out", str(small_coco["dir"] / "y.pt"),
                              "--variant", "RN9000"])
    assert res.exit_code == 1 and "unknown CLIP variant 'RN9000'" in res.output
    res = runner.invoke(cli, ["embed", "--builtin", "coco80", "--out", "z.pt", "--set", "text.tmpl=single"])
    assert res.exit_code == 1 and "unknown recipe key 'text.tmpl'" in res.output
    assert "Traceback" not in res.output


def test_zeroshot_gt_boxes_end_to_end(runner, small_coco):
    emb = _embed(runner, small_coco)
    res, out = _zeroshot(runner, small_coco, emb)
    assert res.exit_code == 0, res.output
    dets = json.loads(out.read_text())
    summary = json.loads((out.parent / "dets.summary.json").read_text())
    assert summary["images"] == 3 and summary["regions"] == 6 and len(summary["images_skipped"]) == 1
    assert "broken.png" in summary["images_skipped"][0]
    assert {d["category_id"] for d in dets} <= {1, 3} and {d["image_id"] for d in dets} == {1, 2, 3}
    # boxes come back in original-image pixels: every detection is one of the GT boxes
    gt = {(8.0, 8.0, 40.0, 30.0), (60.0, 40.0, 50.0, 50.0)}
    assert all(tuple(round(v, 2) for v in d["bbox"]) in gt for d in dets)
    # both classes scored for each box (different classes never suppress each other)
    assert len(dets) == summary["detections"] > 0
    assert (out.parent / "dets.json.recipe.yaml").exists()
    # eval reads it
    res = runner.invoke(cli, ["eval", "--gt", str(small_coco["ann"]), "--dets", str(out)])
    assert res.exit_code == 0, res.output


def test_zeroshot_limit_strict_and_overwrite(runner, small_coco):
    emb = _embed(runner, small_coco)
    res, out = _zeroshot(runner, small_coco, emb, "--limit", "2")
    assert res.exit_code == 0, res.output
    assert {d["image_id"] for d in json.loads(out.read_text())} == {1, 2}
    res, _ = _zeroshot(runner, small_coco, emb)
    assert res.exit_code == 1 and "already exists" in res.output
    res, out2 = _zeroshot(runner, small_coco, emb, "--strict", out_name="strict.json")
    assert res.exit_code == 1 and "broken.png" in res.output and not out2.exists()


def test_zeroshot_rejects_mismatched_embeddings(runner, small_coco, tmp_path):
    from rclip_core.text_embed import Embeddings, save_embeddings

    wrong_dim = Embeddings(["cat", "dog"], torch.randn(2, 64), ["{}."], "D64-x")
    save_embeddings(wrong_dim, tmp_path / "wrong.pt")
    res, _ = _zeroshot(runner, small_coco, tmp_path / "wrong.pt")
    assert res.exit_code == 1 and "dimension 64" in res.output
    other_tower = Embeddings(["cat", "dog"], torch.randn(2, 32), ["{}."], "D32-deadbeef")
    save_embeddings(other_tower, tmp_path / "other.pt")
    res, _ = _zeroshot(runner, small_coco, tmp_path / "other.pt")
    assert res.exit_code == 1 and "text tower D32-deadbeef" in res.output
    unknown = Embeddings(["cat", "zebra"], torch.randn(2, 32), ["{}."], "imported")
    save_embeddings(unknown, tmp_path / "unknown.pt")
    res, _ = _zeroshot(runner, small_coco, tmp_path / "unknown.pt")
    assert res.exit_code == 1 and "'zebra'" in res.output
    res, _ = _zeroshot(runner, small_coco, tmp_path / "missing.pt")
    assert res.exit_code == 1 and "not found" in res.output


def test_zeroshot_with_proposals_fuses_objectness(runner, small_coco):
    emb = _embed(runner, small_coco)
    props = [{"image_id": i, "boxes": [[8, 8, 48, 38], [60, 40, 110, 90], [0, 0, 20, 20]],
              "objectness": [4.0, 1.0, -2.0]} for i in (1, 2, 3)]
    pfile = small_coco["dir"] / "props.json"
    pfile.write_text(json.dumps(props))
    base = ["zeroshot", "--proposals", str(pfile), "--annotations", str(small_coco["ann"]), "--images",
            str(small_coco["images"]), "--embeddings", str(emb), *TINY, "--set", "input.min_size=96",
            # without the background column the two class probabilities sum to 1, so raw-logit fusion shows
            "--set", "zeroshot.background=false"]
    res = CliRunner().invoke(cli, [*base, "--out", str(small_coco["dir"] / "p.json")])
    assert res.exit_code == 0, res.output
    dets = json.loads((small_coco["dir"] / "p.json").read_text())
    # raw-logit fusion (the original's): the negative-logit proposal gives NaN and is dropped; scores can exceed 1
    assert all(d["bbox"] != [0, 0, 20, 20] for d in dets) and max(d["score"] for d in dets) > 1.0
    res = CliRunner().invoke(cli, [*base, "--out", str(small_coco["dir"] / "s.json"),
                                   "--set", "zeroshot.score_fusion=sigmoid"])
    assert res.exit_code == 0, res.output
    sig = json.loads((small_coco["dir"] / "s.json").read_text())
    assert max(d["score"] for d in sig) <= 1.0 and any(d["bbox"] == [0, 0, 20, 20] for d in sig)
    # Folder mode: no annotation file; ids follow the sorted folder listing, file names must agree.
    folder = ["zeroshot", "--proposals", str(pfile), *base[5:]]
    res = CliRunner().invoke(cli, [*folder, "--out", str(small_coco["dir"] / "f.json")])
    assert res.exit_code == 0, res.output
    listing = json.loads((small_coco["dir"] / "f.images.json").read_text())
    assert [im["file_name"] for im in listing["images"]] == ["1.png", "2.png", "3.png", "broken.png"]
    assert [c["name"] for c in listing["categories"]] == ["cat", "dog"]
    props[0]["file_name"] = "2.png"
    pfile.write_text(json.dumps(props))
    res = CliRunner().invoke(cli, [*folder, "--out", str(small_coco["dir"] / "g.json")])
    assert res.exit_code == 1 and "'2.png' there but '1.png' here" in res.output
    res = CliRunner().invoke(cli, [*folder, "--gt-boxes", str(small_coco["ann"]), "--out", "h.json"])
    assert res.exit_code == 1 and "give one region source" in res.output
