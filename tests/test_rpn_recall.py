"""Proposal recall (``rclip_core.evaluation.evaluate_proposals``): AR over IoU 0.50:0.95 and recall at 0.5, at
100/300/1000 proposals, with one-to-one matching and base/novel groups."""

from __future__ import annotations

import pytest
import torch

from rclip_core.errors import RclipError
from rclip_core.evaluation import _greedy_matched_ious, evaluate_proposals


def _gt(boxes_by_image, categories=None, crowd=()):
    """COCO dict; boxes_by_image: {image_id: [(xywh, category_id), ...]}."""
    cats = categories or [{"id": 1, "name": "a", "split": "base"}, {"id": 2, "name": "b", "split": "novel"}]
    images = [{"id": i, "width": 200, "height": 200} for i in boxes_by_image]
    anns = []
    for i, items in boxes_by_image.items():
        for box, cat in items:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": list(box),
                         "area": box[2] * box[3], "iscrowd": int(len(anns) + 1 in crowd)})
    return {"images": images, "annotations": anns, "categories": cats}


def _xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def test_perfect_proposals_recall_everything():
    gt = _gt({1: [((10, 10, 50, 40), 1), ((100, 100, 30, 30), 2)], 2: [((0, 0, 20, 20), 1)]})
    props = [{"image_id": 1, "boxes": [_xyxy((100, 100, 30, 30)), _xyxy((10, 10, 50, 40))], "objectness": [1.0, 2.0]},
             {"image_id": 2, "boxes": [_xyxy((0, 0, 20, 20))], "objectness": [-3.0]}]
    r = evaluate_proposals(gt, props)
    assert r["num_boxes"] == {"all": 3, "base": 2, "novel": 1} and r["split_sizes"] == {"base": 1, "novel": 1}
    for group in ("all", "base", "novel"):
        assert all(v == pytest.approx(100.0) for v in r["recall"][group].values())
    assert list(r["recall"]["all"]) == ["AR@100", "AR@300", "AR@1000", "R50@100", "R50@300", "R50@1000"]


def test_partial_overlap_counts_at_thresholds_it_reaches():
    # A proposal covering 60 % of the box (IoU 0.6): recalled at 0.50 and 0.55 and 0.60, not above.
    gt = _gt({1: [((0, 0, 100, 100), 1)]})
    r = evaluate_proposals(gt, [{"image_id": 1, "boxes": [[0, 0, 100, 60]], "objectness": [0.0]}], limits=(10,))
    assert r["recall"]["all"]["R50@10"] == pytest.approx(100.0)
    assert r["recall"]["all"]["AR@10"] == pytest.approx(30.0)  # 3 of 10 thresholds
    assert r["recall"]["novel"]["AR@10"] is None and r["num_boxes"]["novel"] == 0


def test_limits_take_the_best_proposals_and_matching_is_one_to_one():
    gt = _gt({1: [((0, 0, 50, 50), 1), ((2, 2, 50, 50), 1)]})
    # The best proposal covers both boxes well; it may recall only one of them.
    props = [{"image_id": 1, "boxes": [[1, 1, 51, 51], [150, 150, 160, 160]], "objectness": [5.0, 1.0]}]
    r = evaluate_proposals(gt, props, limits=(1, 2))
    assert r["recall"]["all"]["R50@1"] == pytest.approx(50.0) and r["recall"]["all"]["R50@2"] == pytest.approx(50.0)
    props[0]["objectness"] = [1.0, 5.0]  # the useless box ranks first: the top-1 finds nothing
    assert evaluate_proposals(gt, props, limits=(1,))["recall"]["all"]["R50@1"] == pytest.approx(0.0)
    ious = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    assert torch.allclose(_greedy_matched_ious(ious), torch.tensor([0.9, 0.1]))  # best pair first, then the rest
    assert _greedy_matched_ious(torch.zeros(0, 3)).tolist() == [0.0, 0.0, 0.0]


def test_images_without_entries_crowds_and_unknown_images():
    gt = _gt({1: [((0, 0, 10, 10), 1)], 2: [((0, 0, 10, 10), 1), ((50, 50, 10, 10), 2)]}, crowd=(3,))
    props = [{"image_id": 1, "boxes": [[0, 0, 10, 10]], "objectness": [0.5]},
             {"image_id": 99, "boxes": [[0, 0, 10, 10]], "objectness": [0.5]}]
    r = evaluate_proposals(gt, props)
    assert r["num_boxes"]["all"] == 2  # the crowd box is not counted
    assert r["recall"]["all"]["R50@100"] == pytest.approx(50.0) and r["entries_ignored"] == 1
    assert r["num_images_with_proposals"] == 1


def test_lvis_groups_are_rare_vs_common_frequent():
    cats = [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "f"}]
    gt = _gt({1: [((0, 0, 10, 10), 1), ((50, 50, 10, 10), 2)]}, categories=cats)
    for img in gt["images"]:
        img.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    r = evaluate_proposals(gt, [{"image_id": 1, "boxes": [[50, 50, 60, 60]], "objectness": [1.0]}])
    assert r["recall"]["novel"]["R50@100"] == pytest.approx(0.0) and r["recall"]["base"]["R50@100"] == 100.0


@pytest.mark.parametrize(("props", "message"), [
    ({"x": 1}, "expected a list"),
    ([3], r"proposals\[0\] is not an object"),
    ([{"image_id": 1, "boxes": []}], "lacks key 'objectness'"),
    ([{"image_id": 1, "boxes": [[0, 0, 1, 1]], "objectness": [1, 2]}], "1 boxes but 2 objectness values"),
    ([{"image_id": 1, "boxes": [[0, 0, 1]], "objectness": [1]}], "boxes must be"),
    ([{"image_id": 1, "boxes": [], "objectness": []}] * 2, "appears twice"),
])
def test_malformed_proposals_name_the_entry(props, message):
    with pytest.raises(RclipError, match=message):
        evaluate_proposals(_gt({1: [((0, 0, 10, 10), 1)]}), props, proposals_source="p.json")
