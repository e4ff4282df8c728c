"""``rclip eval`` through the real Click group, on small generated COCO / LVIS files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rclip_cli.main import cli
from rclip_core.data.categories import coco_ovd_categories, lvis_categories


def _files(tmp_path, *, lvis: bool = False):
    """One image per category with one box; perfect detections on the novel (or rare) classes only."""
    if lvis:
        cats = [c for c in lvis_categories() if c["id"] <= 40]
        extra = {"neg_category_ids": [], "not_exhaustive_category_ids": []}
        novel = {c["id"] for c in cats if c["frequency"] == "r"}
    else:
        cats, extra = coco_ovd_categories(), {}
        novel = {c["id"] for c in cats if c["split"] == "novel"}
    images = [{"id": k + 1, "width": 320, "height": 240, **extra} for k in range(len(cats))]
    anns = [{"id": k + 1, "image_id": k + 1, "category_id": c["id"], "bbox": [10.0, 20.0, 80.0, 60.0],
             "area": 4800.0, "iscrowd": 0} for k, c in enumerate(cats)]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.8}
            for a in anns if a["category_id"] in novel]
    gt_path, dets_path = tmp_path / "gt.json", tmp_path / "run1.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    dets_path.write_text(json.dumps(dets))
    return gt_path, dets_path


def _run(*args: str):
    return CliRunner().invoke(cli, ["eval", *args])


def test_coco_table_and_default_output(tmp_path):
    gt, dets = _files(tmp_path)
    result = _run("--gt", str(gt), "--dets", str(dets))
    assert result.exit_code == 0, result.output
    assert "AP50 novel (17 classes)" in result.stdout and "AP50 base (48 classes)" in result.stdout
    assert "100.0" in result.stdout and "26.2" in result.stdout  # all 65: 17/65 of the classes found
    out = tmp_path / "run1.metrics.json"
    saved = json.loads(out.read_text())
    assert saved["format"] == "coco" and saved["splits"]["AP50_novel"] == pytest.approx(100.0)
    assert saved["splits"]["AP50_base"] == pytest.approx(0.0) and len(saved["per_category"]) == 65


def test_lvis_table(tmp_path):
    gt, dets = _files(tmp_path, lvis=True)
    out = tmp_path / "sub" / "m.json"
    result = _run("--gt", str(gt), "--dets", str(dets), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "APr" in result.stdout and "AP base (c+f)" in result.stdout and "LVIS" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["metrics"]["APr"] == pytest.approx(100.0) and saved["splits"]["AP_base"] == pytest.approx(0.0)


def test_refuses_to_overwrite_without_force(tmp_path):
    gt, dets = _files(tmp_path)
    out = tmp_path / "m.json"
    out.write_text("keep me")
    result = _run("--gt", str(gt), "--dets", str(dets), "--out", str(out))
    assert result.exit_code == 1 and "Error:" in result.output and "--force" in result.output
    assert out.read_text() == "keep me"
    assert _run("--gt", str(gt), "--dets", str(dets), "--out", str(out), "--force").exit_code == 0
    assert json.loads(out.read_text())["format"] == "coco"


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_malformed_json(tmp_path):
    gt, dets = _files(tmp_path)
    dets.write_text("[{")
    _assert_one_line_error(_run("--gt", str(gt), "--dets", str(dets)), "run1.json", "malformed JSON")
    assert not (tmp_path / "run1.metrics.json").exists()


def test_unknown_ids(tmp_path):
    gt, dets = _files(tmp_path)
    d = json.loads(dets.read_text())
    d[1]["category_id"] = 12345
    dets.write_text(json.dumps(d))
    _assert_one_line_error(_run("--gt", str(gt), "--dets", str(dets)), "detection 1", "category_id 12345")


def test_missing_gt_key(tmp_path):
    gt, dets = _files(tmp_path)
    g = json.loads(gt.read_text())
    del g["annotations"][0]["bbox"]
    gt.write_text(json.dumps(g))
    _assert_one_line_error(_run("--gt", str(gt), "--dets", str(dets)), "gt.json", "annotations[0] lacks key 'bbox'")


def test_empty_detections_still_writes_zeros(tmp_path):
    gt, dets = _files(tmp_path)
    dets.write_text("[]")
    result = _run("--gt", str(gt), "--dets", str(dets))
    assert result.exit_code == 0, result.output
    assert "no detections" in result.stderr
    assert json.loads((tmp_path / "run1.metrics.json").read_text())["metrics"]["AP"] == 0.0


def test_help_explains_the_metrics():
    result = _run("--help")
    assert result.exit_code == 0
    for word in ("AP50", "novel", "base", "APr/APc/APf", "LVIS", "pycocotools", "--force", "metrics.json"):
        assert word in result.output, word
