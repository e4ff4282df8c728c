import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture()
def astronaut(tmp_path):
    """scikit-image's astronaut photo as JPEG (EXIF-free), a grayscale copy, an RGBA copy, and a GT file."""
    arr = skimage_data.astronaut()  # (512, 512, 3)
    d = tmp_path / "photos"
    d.mkdir()
    Image.fromarray(arr).save(d / "astronaut.jpg", quality=95)
    Image.fromarray(arr).convert("L").save(d / "gray.png")
    Image.fromarray(arr).convert("RGBA").save(d / "rgba.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    boxes = {"face": [160, 30, 120, 140], "rocket": [380, 0, 132, 300]}
    ann = {"images": [{"id": i + 1, "file_name": n, "width": 512, "height": 512}
                      for i, n in enumerate(["astronaut.jpg", "gray.png", "rgba.png", "broken.jpg"])],
           "annotations": [{"id": k + 10 * i, "image_id": i + 1, "category_id": k + 1, "bbox": b, "iscrowd": 0,
                            "area": b[2] * b[3]} for i in range(4) for k, b in enumerate(boxes.values())],
           "categories": [{"id": 1, "name": "face"}, {"id": 2, "name": "rocket"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return {"dir": d, "ann": tmp_path / "ann.json", "boxes": boxes, "array": arr}


def test_gt_boxes_are_drawn_on_a_real_photo(astronaut, tmp_path):
    out = tmp_path / "vis"
    res = CliRunner().invoke(cli, ["visualize", str(astronaut["dir"]), "--gt-boxes", str(astronaut["ann"]),
                                   "--classes", "face,rocket,helmet", "--variant", "tiny", "--out", str(out),
                                   "--score-thresh", "0", "--html", "--set", "input.min_size=256"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.png")) == ["astronaut.png", "gray.png", "rgba.png"]
    assert "1 unreadable skipped" in res.output
    drawn = np.asarray(Image.open(out / "astronaut.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(astronaut["dir"] / "astronaut.jpg").convert("RGB")).astype(int)
    band = drawn.shape[0] - original.shape[0]  # the random-weights notice, a band added above the picture
    assert drawn.shape[1] == original.shape[1] and 10 < band < 60
    assert (drawn[:band, :, 0] > 180).mean() > 0.7  # red
    drawn = drawn[band:]
    x, y, w, h = astronaut["boxes"]["face"]
    edge = np.abs(drawn[y + 1, x + 5: x + w - 5] - original[y + 1, x + 5: x + w - 5]).sum()
    inside = np.abs(drawn[y + h // 2, x + w // 2] - original[y + h // 2, x + w // 2]).sum()
    far = np.abs(drawn[480:, :100] - original[480:, :100]).sum()
    assert edge > 1000 and inside == 0 and far == 0  # outline drawn, content and elsewhere untouched
    html = (out / "index.html").read_text()
    assert "astronaut.png" in html and "broken.jpg" not in html
    # overwriting needs --force
    again = CliRunner().invoke(cli, ["visualize", str(astronaut["dir"]), "--gt-boxes", str(astronaut["ann"]),
                                     "--classes", "face", "--variant", "tiny", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_bad_input(astronaut, tmp_path):
    base = ["visualize", str(astronaut["dir"]), "--variant", "tiny", "--out", str(tmp_path / "v")]
    res = CliRunner().invoke(cli, [*base, "--gt-boxes", str(astronaut["ann"]), "--classes", " , "])
    assert res.exit_code == 1 and "class list is empty" in res.output
    res = CliRunner().invoke(cli, [*base, "--classes", "cat", "--regions", "magic"])
    assert res.exit_code == 1 and "unknown region source 'magic'" in res.output
    res = CliRunner().invoke(cli, ["visualize", str(tmp_path / "nope"), "--gt-boxes", str(astronaut["ann"]),
                                   "--classes", "cat", "--variant", "tiny", "--out", str(tmp_path / "v")])
    assert res.exit_code == 1 and "no such image or folder" in res.output


def test_first_run_on_a_photo_with_no_flag_but_the_image(tmp_path, monkeypatch):
    """The usage line rclip is built around: ``rclip visualize photo.jpg`` on a package-shipped photo, no weights,
    no RPN, no classes: selective search regions, the COCO-80 names, a default output folder in the working
    directory, and the random-weights notice everywhere; then ``--classes`` with the HTML page."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.jpg", quality=95)  # 400 x 600
    res = CliRunner().invoke(cli, ["visualize", "coffee.jpg"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "rclip-vis"
    assert sorted(p.name for p in out.iterdir()) == ["coffee.png", "detections.json"]
    assert "selective search" in res.output and "80 classes" in res.output and "RANDOM WEIGHTS" in res.output
    report = json.loads((out / "detections.json").read_text())
    assert report["random_weights"] is True and len(report["classes"]) == 80 and report["summary"]["regions"] > 50
    banner = np.asarray(Image.open(out / "coffee.png").convert("RGB"))[2:6, :200].reshape(-1, 3).mean(0)
    assert banner[0] > 180 and banner[1] < 90  # the red notice across the top of the picture
    again = CliRunner().invoke(cli, ["visualize", "coffee.jpg"])
    assert again.exit_code == 1 and "already exists" in again.output  # never overwritten silently

    # random weights score every class below the detector's 0.001 threshold: keep them all, to see them drawn
    res = CliRunner().invoke(cli, ["visualize", "coffee.jpg", "--classes", "cup,saucer,spoon", "--score-thresh",
                                   "0", "--topk", "3", "--html", "--force", "--set", "zeroshot.score_thresh=0"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "detections.json").read_text())
    assert {d["category_id"] for d in report["detections"]} <= {1, 2, 3} and report["classes"][0] == "cup"
    drawn = np.asarray(Image.open(out / "coffee.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(tmp_path / "coffee.jpg").convert("RGB")).astype(int)
    drawn = drawn[drawn.shape[0] - original.shape[0]:]  # below the notice band
    best = max(report["detections"], key=lambda d: d["score"])
    x, y, w, h = (int(round(v)) for v in best["bbox"])
    ys = min(y + h // 2, 399)
    assert np.abs(drawn[ys, x:x + 3] - original[ys, x:x + 3]).sum() > 100  # its outline was drawn
    from rclip_core.visualize import class_color

    near = drawn[max(0, y - 40): y + 40, x: x + 80].reshape(-1, 3)
    assert (near == class_color(best["category_id"])).all(axis=1).sum() > 100  # its label's filled band
    html = (out / "index.html").read_text()
    best_name = report["classes"][best["category_id"] - 1]
    assert "RANDOM WEIGHTS" in html and 'type="range"' in html and f'<option value="{best_name}">' in html
    assert f'data-score="{round(best["score"], 4)}"' in html  # the page draws the boxes the slider filters
    assert 'href="coffee.png"' in html and str(tmp_path) not in html  # relative paths only


@pytest.mark.slow
def test_torchvision_rpn_regions_on_a_real_photo(tmp_path):
    """`--regions torchvision-rpn:FILE` on scikit-image's cat: torchvision's Faster R-CNN (ResNet-50 FPN) RPN, here
    with random weights saved as a file (the COCO weights cannot be downloaded on these machines), proposes
    `zeroshot.num_proposals` boxes inside the photo, in its own pixels, and the run says which source it used
    (about 40 s on 2 CPU cores: a 160 MB state dict and a ResNet-50 at 800 pixels)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "fasterrcnn_random.pth"
    torch.save(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(),
               weights)
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "chelsea.jpg", quality=95)  # 451 x 300
    out = tmp_path / "vis"
    res = CliRunner().invoke(cli, ["visualize", str(tmp_path / "chelsea.jpg"), "--regions",
                                   f"torchvision-rpn:{weights}", "--classes", "cat,dog", "--variant", "tiny",
                                   "--out", str(out), "--score-thresh", "0", "--set", "zeroshot.score_thresh=0",
                                   "--set", "zeroshot.num_proposals=200", "--html"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "detections.json").read_text())
    assert report["region_source"].startswith("torchvision's COCO Faster R-CNN RPN")
    assert report["summary"]["regions"] == 200
    boxes = np.array([d["bbox"] for d in report["detections"]])  # xywh, original pixels
    assert len(boxes) > 0 and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 451 + 1e-3).all() and (boxes[:, 1] + boxes[:, 3] <= 300 + 1e-3).all()
    assert "torchvision&#x27;s COCO Faster R-CNN RPN" in (out / "index.html").read_text()


def test_same_stems_umask_and_force_replacing_only_its_own_files(tmp_path):
    """Three inputs named pic (a/pic.jpg, a/pic.png, b/pic.jpg) give three pictures; outputs get the user's umask
    (not mkstemp's 0600); --force replaces the command's own files and nothing else in the folder."""
    import os
    import stat

    rng = np.random.default_rng(0)
    for rel in ("a/pic.jpg", "a/pic.png", "b/pic.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / rel)
    out = tmp_path / "vis"
    args = ["visualize", str(tmp_path / "a"), str(tmp_path / "b" / "pic.jpg"), str(tmp_path / "a" / "pic.png"),
            "--classes", "cat,dog", "--variant", "tiny", "--out", str(out), "--html", "--set", "input.min_size=64"]
    old = os.umask(0o027)
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_pic_jpg.png", "b_pic_jpg.png", "detections.json", "index.html", "pic_png.png"]
    assert {stat.S_IMODE((out / n).stat().st_mode) for n in written} == {0o640}
    report = json.loads((out / "detections.json").read_text())
    assert len(report["images"]) == 3  # a/pic.png given twice (in its folder and by name) runs once

    (out / "mine.txt").write_text("the user's")
    (out / "old.png").write_bytes(b"a picture of an earlier run with other inputs")
    before = (out / "a_pic_jpg.png").stat().st_mtime_ns
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    forced = CliRunner().invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "mine.txt").read_text() == "the user's" and (out / "old.png").is_file()
    assert (out / "a_pic_jpg.png").stat().st_mtime_ns >= before
    assert sorted(p.name for p in out.iterdir()) == sorted([*written, "mine.txt", "old.png"])
