"""COCO / LVIS evaluation: equal to pycocotools and lvis called directly, split breakdowns, bad inputs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging

import numpy as np
import pytest

from rclip_core.data.categories import coco_categories, coco_ovd_categories, lvis_categories
from rclip_core.errors import RclipError
from rclip_core.evaluation import COCO_METRICS, LVIS_METRICS, detect_format, evaluate, evaluate_files

W, H = 640, 480


def _box(rng: np.random.Generator) -> list[float]:
    # Side lengths from 8 to 300 px, so small, medium and large areas all occur.
    w, h = (float(v) for v in np.exp(rng.uniform(np.log(8), np.log(300), size=2)))
    return [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), w, h]


ORIGINAL_NOVEL = ["airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
                  "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"]
ORIGINAL_BASE = ["person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
                 "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
                 "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
                 "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven",
                 "toaster", "refrigerator", "book", "clock", "vase", "toothbrush"]


def make_gt(categories: list[dict], *, n_images: int = 16, seed: int = 0, lvis: bool = False) -> dict:
    """A random COCO- (or LVIS-) format ground truth over ``categories``."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in categories]
    images, anns = [], []
    for img_id in range(1, n_images + 1):
        present = set()
        for _ in range(int(rng.integers(1, 7))):
            box, cid = _box(rng), int(rng.choice(cat_ids))
            present.add(cid)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cid, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
        img = {"id": img_id, "width": W, "height": H, "file_name": f"{img_id:06d}.jpg"}
        if lvis:
            absent = [c for c in cat_ids if c not in present]
            img["neg_category_ids"] = [int(c) for c in rng.choice(absent, size=min(5, len(absent)), replace=False)]
            img["not_exhaustive_category_ids"] = sorted(present)[:1] if img_id % 4 == 0 else []
        images.append(img)
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(categories)}


def make_dets(gt: dict, *, seed: int = 1) -> list[dict]:
    """Jittered true positives (some with the wrong class, some missed) plus random false positives."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
        cid = a["category_id"] if rng.random() < 0.8 else int(rng.choice(cat_ids))
        dets.append({"image_id": a["image_id"], "category_id": cid,
                     "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                     "score": float(rng.uniform(0.2, 1.0))})
    for img in gt["images"]:
        for _ in range(3):
            dets.append({"image_id": img["id"], "category_id": int(rng.choice(cat_ids)), "bbox": _box(rng),
                         "score": float(rng.uniform(0.0, 0.7))})
    return dets


def _write(tmp_path, gt: dict, dets: list) -> tuple[str, str]:
    gt_path, dets_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    dets_path.write_text(json.dumps(dets))
    return str(gt_path), str(dets_path)


def _pct(x: float) -> float | None:
    return None if x < 0 else x * 100


def _pycocotools(gt_path: str, dets_path: str, cat_ids: list[int] | None = None) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        ev = COCOeval(gt, gt.loadRes(dets_path), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _lvis(gt_path: str, dets_path: str, cat_ids: list[int] | None = None) -> dict:
    from lvis import LVISEval

    ev = LVISEval(gt_path, dets_path, "bbox")
    if cat_ids is not None:
        ev.params.cat_ids = cat_ids
    ev.run()
    return ev.get_results()


# ---------------------------------------------------------------------------------------------------------------
# equal to the toolkits


def test_coco_equals_pycocotools(tmp_path, capsys):
    gt = make_gt(coco_categories(), n_images=24)
    gt_path, dets_path = _write(tmp_path, gt, make_dets(gt))
    res = evaluate_files(gt_path, dets_path)
    assert capsys.readouterr().out == ""  # the library does not print, pycocotools' chatter included

    stats = _pycocotools(gt_path, dets_path)
    assert res["format"] == "coco" and res["num_images"] == 24 and res["num_categories"] == 80
    for k, key in enumerate(COCO_METRICS):
        assert res["metrics"][key] == pytest.approx(_pct(stats[k]), rel=1e-12), key
    assert 5 < res["metrics"]["AP"] < 95  # a non-trivial case

    # Splits: AP50 of a run restricted to each split's categories, found here from an independent literal of the
    # original's 17 novel names (detectron2/data/datasets/coco_zeroshot_categories.py) and the 48 base ones.
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    splits = {"novel": sorted(by_name[n] for n in ORIGINAL_NOVEL), "base": sorted(by_name[n] for n in ORIGINAL_BASE)}
    splits["all"] = sorted(splits["novel"] + splits["base"])
    assert res["split_sizes"] == {"novel": 17, "base": 48, "all": 65}
    for split, ids in splits.items():
        assert res["splits"][f"AP50_{split}"] == pytest.approx(_pct(_pycocotools(gt_path, dets_path, ids)[1]))

    # Per-category AP: a run restricted to that one category.
    names = {c["id"]: c["name"] for c in gt["categories"]}
    present = sorted({a["category_id"] for a in gt["annotations"]})
    for cid in present[:4]:
        assert res["per_category"][names[cid]] == pytest.approx(_pct(_pycocotools(gt_path, dets_path, [cid])[0]))
    absent = next(c for c in names if c not in present)
    assert res["per_category"][names[absent]] is None and len(res["per_category"]) == 80


def _lvis_subset() -> list[dict]:
    cats = lvis_categories()
    by_freq = {f: [c for c in cats if c["frequency"] == f] for f in "rcf"}
    return sorted(by_freq["r"][:8] + by_freq["c"][:8] + by_freq["f"][:8], key=lambda c: c["id"])


def test_lvis_equals_lvis_package(tmp_path, capsys):
    gt = make_gt(_lvis_subset(), n_images=24, lvis=True)
    gt_path, dets_path = _write(tmp_path, gt, make_dets(gt))
    res = evaluate_files(gt_path, dets_path)  # first: it installs the np.float alias lvis needs
    assert capsys.readouterr().out == ""

    direct = _lvis(gt_path, dets_path)
    assert res["format"] == "lvis"
    for key in LVIS_METRICS:
        assert res["metrics"][key] == pytest.approx(_pct(direct[key]), rel=1e-12), key
    assert 5 < res["metrics"]["AP"] < 95
    assert res["splits"]["AP_rare"] == pytest.approx(res["metrics"]["APr"])
    base = [c["id"] for c in gt["categories"] if c["frequency"] != "r"]
    assert res["splits"]["AP_base"] == pytest.approx(_pct(_lvis(gt_path, dets_path, base)["AP"]))
    assert res["split_sizes"] == {"rare": 8, "base": 16}


# ---------------------------------------------------------------------------------------------------------------
# constructed split cases


def _one_of_each(categories: list[dict], **extra_image_keys) -> dict:
    """One image per category holding one instance of it."""
    images = [{"id": k + 1, "width": W, "height": H, **extra_image_keys} for k in range(len(categories))]
    anns = [{"id": k + 1, "image_id": k + 1, "category_id": c["id"], "bbox": [50.0, 60.0, 120.0, 90.0],
             "area": 120.0 * 90.0, "iscrowd": 0} for k, c in enumerate(categories)]
    return {"images": images, "annotations": anns, "categories": categories}


def _perfect(gt: dict, keep) -> list[dict]:
    cats = {c["id"]: c for c in gt["categories"]}
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"] if keep(cats[a["category_id"]])]


def test_coco_split_perfect_on_novel_only():
    gt = _one_of_each(coco_ovd_categories())
    res = evaluate(gt, _perfect(gt, lambda c: c["split"] == "novel"))
    assert res["splits"]["AP50_novel"] == pytest.approx(100.0)
    assert res["splits"]["AP50_base"] == pytest.approx(0.0)
    assert res["splits"]["AP50_all"] == pytest.approx(100.0 * 17 / 65)
    assert res["metrics"]["AP50"] == pytest.approx(100.0 * 17 / 65)  # a 65-class file: "all" is every class


def test_coco_80_file_splits_by_name_and_leaves_the_15_others_out():
    gt = _one_of_each(coco_categories())
    res = evaluate(gt, _perfect(gt, lambda c: c["name"] != "airplane"))
    assert res["split_sizes"] == {"novel": 17, "base": 48, "all": 65}
    assert res["splits"]["AP50_novel"] == pytest.approx(100.0 * 16 / 17)
    assert res["splits"]["AP50_base"] == pytest.approx(100.0)


def test_a_file_sharing_a_few_coco_names_has_no_breakdown():
    """Base/novel rows only for COCO-65/80 (or LVIS, or 'split'-carrying) files: a custom set that happens to
    contain 'person' and 'airplane' is not COCO's open-vocabulary benchmark."""
    gt = _one_of_each([{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 10, "name": "traffic light"}])
    res = evaluate(gt, _perfect(gt, lambda c: c["name"] != "airplane"))
    assert res["splits"] == {} and res["split_sizes"] == {}


def test_coco_split_from_category_field():
    cats = [{"id": 1, "name": "red circle", "split": "base"}, {"id": 2, "name": "blue star", "split": "novel"},
            {"id": 3, "name": "green square", "split": "base"}]
    gt = _one_of_each(cats)
    res = evaluate(gt, _perfect(gt, lambda c: c["id"] in (1, 2)))
    assert res["split_sizes"] == {"novel": 1, "base": 2, "all": 3}
    assert res["splits"] == pytest.approx({"AP50_novel": 100.0, "AP50_base": 50.0, "AP50_all": 100.0 * 2 / 3})
    assert res["per_category"] == pytest.approx({"red circle": 100.0, "blue star": 100.0, "green square": 0.0})


def test_coco_without_split_classes_has_no_breakdown():
    gt = _one_of_each([{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue star"}])
    res = evaluate(gt, _perfect(gt, lambda c: True))
    assert res["splits"] == {} and res["metrics"]["AP"] == pytest.approx(100.0)


def test_lvis_split_perfect_on_rare_only():
    cats = _lvis_subset()
    gt = _one_of_each(cats, neg_category_ids=[], not_exhaustive_category_ids=[])
    res = evaluate(gt, _perfect(gt, lambda c: c["frequency"] == "r"))
    assert res["metrics"]["APr"] == pytest.approx(100.0) and res["splits"]["AP_rare"] == pytest.approx(100.0)
    assert res["splits"]["AP_base"] == pytest.approx(0.0)
    assert res["metrics"]["APc"] == pytest.approx(0.0) and res["metrics"]["APf"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------
# edge cases and bad inputs


@pytest.mark.parametrize("lvis", [False, True])
def test_no_detections_gives_zeros_and_a_warning(tmp_path, caplog, lvis):
    cats = _lvis_subset() if lvis else coco_categories()
    gt_path, dets_path = _write(tmp_path, make_gt(cats, lvis=lvis), [])
    with caplog.at_level(logging.WARNING, logger="rclip_core"):
        res = evaluate_files(gt_path, dets_path)
    assert "no detections" in caplog.text
    assert res["num_detections"] == 0 and set(res["metrics"].values()) == {0.0}
    assert set(res["splits"].values()) == {0.0} and set(res["per_category"].values()) == {0.0}
    assert set(res["metrics"]) == set(LVIS_METRICS if lvis else COCO_METRICS)


def test_inputs_are_not_modified():
    gt = make_gt(coco_categories(), n_images=4)
    dets = make_dets(gt)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    evaluate(gt, dets)
    assert gt == gt_before and dets == dets_before


@pytest.mark.parametrize(("field", "bad", "message"), [
    ("image_id", 999, "detection 0 has image_id 999"),
    ("category_id", 12, "detection 0 has category_id 12"),  # 12 is not a COCO id
    ("image_id", [1], "detection 0 has image_id [1]"),
    ("bbox", [1, 2, 3], "detection 0 has bbox [1, 2, 3]"),
    ("score", "high", "detection 0 has score 'high'"),
])
def test_bad_detection_is_named(field, bad, message):
    gt = make_gt(coco_categories(), n_images=3)
    dets = make_dets(gt)
    dets[0][field] = bad
    with pytest.raises(RclipError, match=message.replace("[", r"\[").replace("]", r"\]")):
        evaluate(gt, dets, dets_source="d.json", gt_source="g.json")


def test_detection_missing_key():
    gt = make_gt(coco_categories(), n_images=3)
    dets = make_dets(gt)
    del dets[2]["score"]
    with pytest.raises(RclipError, match="d.json: detection 2 lacks key 'score'"):
        evaluate(gt, dets, dets_source="d.json")
    with pytest.raises(RclipError, match="expected a list of detections"):
        evaluate(gt, {"image_id": 1}, dets_source="d.json")


@pytest.mark.parametrize(("lvis", "section", "key"), [
    (False, "annotations", "area"), (False, "images", "id"), (False, "categories", "name"),
    (True, "images", "neg_category_ids"), (True, "images", "not_exhaustive_category_ids"),
])
def test_gt_missing_key_names_file_and_key(tmp_path, lvis, section, key):
    gt = make_gt(_lvis_subset() if lvis else coco_categories(), n_images=3, lvis=lvis)
    dets = make_dets(gt)
    del gt[section][1][key]
    gt_path, dets_path = _write(tmp_path, gt, dets)
    with pytest.raises(RclipError, match=rf"gt.json: {section}\[1\] lacks key '{key}'"):
        evaluate_files(gt_path, dets_path)


def test_gt_missing_section(tmp_path):
    gt = make_gt(coco_categories(), n_images=2)
    del gt["annotations"]
    gt_path, dets_path = _write(tmp_path, gt, [])
    with pytest.raises(RclipError, match="gt.json lacks key 'annotations'"):
        evaluate_files(gt_path, dets_path)


def test_malformed_and_missing_files(tmp_path):
    gt_path, dets_path = _write(tmp_path, make_gt(coco_categories(), n_images=2), [])
    (tmp_path / "dets.json").write_text('[{"image_id": 1,')
    with pytest.raises(RclipError, match="dets.json: malformed JSON at line 1"):
        evaluate_files(gt_path, dets_path)
    with pytest.raises(RclipError, match="ground-truth file not found"):
        evaluate_files(tmp_path / "nope.json", dets_path)


def test_format_detection():
    assert detect_format({"categories": [{"id": 1, "name": "a"}]}) == "coco"
    assert detect_format({"categories": [{"id": 1, "name": "a", "frequency": "r"}]}) == "lvis"
    with pytest.raises(RclipError, match="lacks key 'categories'"):
        detect_format({"images": []}, source="x.json")
    with pytest.raises(RclipError, match="expected a COCO-format object"):
        detect_format([1, 2])
