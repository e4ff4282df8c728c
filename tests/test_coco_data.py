import json

import numpy as np
import pytest
import torch
from PIL import Image

from rclip_core.data.coco import BoxStats, RegionDataset, attach_proposals, images_in_folder, load_detection_annotations
from rclip_core.data.transforms import pad_batch, read_image, resize_shortest_edge, shortest_edge_size
from rclip_core.errors import RclipError


def _ann(tmp_path, **over):
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [90, 70, 30, 30]},   # partly outside
                            {"id": 3, "image_id": 1, "category_id": 4, "bbox": [50, 50, 0, 10]},    # degenerate
                            {"id": 4, "image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5], "iscrowd": 1}],
            "categories": [{"id": 4, "name": "dog"}, {"id": 3, "name": "cat"}]}
    data.update(over)
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p


def test_annotations_become_xyxy_with_clipping_and_counts(tmp_path):
    recs, cats, stats = load_detection_annotations(_ann(tmp_path))
    assert [c["id"] for c in cats] == [3, 4]
    assert recs[0].gt_boxes.tolist() == [[10, 20, 40, 60], [90, 70, 100, 80]]
    assert recs[0].gt_labels.tolist() == [3, 3]
    assert (stats.clipped, stats.dropped, stats.crowd_skipped) == (1, 1, 1)


def test_bad_annotation_files(tmp_path):
    with pytest.raises(RclipError, match="lacks key 'annotations'"):
        load_detection_annotations(_write(tmp_path, {"images": []}))
    with pytest.raises(RclipError, match=r"annotations\[0\] lacks key 'bbox'"):
        load_detection_annotations(_ann(tmp_path, annotations=[{"image_id": 1, "category_id": 3}]))
    with pytest.raises(RclipError, match="image_id 7"):
        bad = [{"image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1]}]
        load_detection_annotations(_ann(tmp_path, annotations=bad))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RclipError, match="malformed JSON at line 1"):
        load_detection_annotations(tmp_path / "bad.json")
    with pytest.raises(RclipError, match="not found"):
        load_detection_annotations(tmp_path / "none.json")


def _write(tmp_path, obj):
    p = tmp_path / "x.json"
    p.write_text(json.dumps(obj))
    return p


def test_lvis_style_images_without_file_name(tmp_path):
    p = _ann(tmp_path, images=[{"id": 1, "coco_url": "http://x/val2017/000000000139.jpg", "width": 100, "height": 80}])
    assert load_detection_annotations(p)[0][0].file_name == "000000000139.jpg"


def test_resize_rule():
    assert shortest_edge_size(640, 480, 800, 1333) == (1067, 800)
    assert shortest_edge_size(2000, 500, 800, 1333) == (1333, 333)
    img = Image.new("RGB", (64, 32))
    assert resize_shortest_edge(img, 32, 100) is img


def test_read_image_modes_and_errors(tmp_path):
    Image.new("L", (20, 10), 128).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").mode == "RGB"
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert read_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    im = Image.new("RGB", (30, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").size == (10, 30)
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(RclipError, match="not a readable image"):
        read_image(tmp_path / "c.jpg")
    with pytest.raises(RclipError, match="image not found"):
        read_image(tmp_path / "none.png")


def test_dataset_scales_boxes_and_flags_bad_images(tmp_path):
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / "a.png")
    recs, _, _ = load_detection_annotations(_ann(tmp_path))
    ds = RegionDataset(recs, tmp_path, min_size=160, max_size=1000, pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3)
    item = ds[0]
    assert item["image"].shape == (3, 160, 200) and item["scale"] == (2.0, 2.0)
    assert item["boxes"].tolist() == [[20, 40, 80, 120], [180, 140, 200, 160]]
    assert torch.allclose(item["image"], torch.full_like(item["image"], -1.0))
    recs[0].file_name = "missing.png"
    assert "image not found" in ds[0]["error"]


def test_proposals_are_attached_clipped_and_topk(tmp_path):
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / "a.png")
    recs, _, _ = load_detection_annotations(_ann(tmp_path))
    props = [{"image_id": 1, "boxes": [[0, 0, 10, 10], [5, 5, 200, 60], [3, 3, 3, 9]], "objectness": [0.1, 2.0, 5.0]},
             {"image_id": 99, "boxes": [], "objectness": []}]
    stats = BoxStats()
    attach_proposals(recs, _write(tmp_path, props), stats)
    assert recs[0].proposals.tolist() == [[0, 0, 10, 10], [5, 5, 100, 60]] and stats.dropped == 1
    ds = RegionDataset(recs, tmp_path, min_size=80, max_size=1000, pixel_mean=[0] * 3, pixel_std=[1] * 3,
                       use_proposals=True, num_proposals=1)
    assert ds[0]["boxes"].tolist() == [[5, 5, 100, 60]] and ds[0]["objectness"].tolist() == [2.0]
    with pytest.raises(RclipError, match="2 boxes but 1 objectness"):
        attach_proposals(recs, _write(tmp_path, [{"image_id": 1, "boxes": [[0, 0, 1, 1]] * 2, "objectness": [1]}]),
                         stats)


def test_folder_listing_and_padding(tmp_path):
    for n in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / n).write_bytes(b"")
    assert [r.file_name for r in images_in_folder(tmp_path)] == ["a.jpg", "b.png"]
    with pytest.raises(RclipError, match="no image files"):
        images_in_folder(_empty(tmp_path))
    batch = pad_batch([torch.ones(3, 10, 20), torch.ones(3, 33, 5)])
    assert batch.shape == (2, 3, 64, 32) and batch[0, :, 10:].abs().sum() == 0


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
