import json

import numpy as np
import pytest
import torch
from PIL import Image

from rclip_core.data.coco import (
    BoxStats,
    DetectionDataset,
    attach_proposals,
    images_in_folder,
    load_detection_annotations,
)
from rclip_core.data.transforms import ImageNormalizer, pad_batch, read_image, resize_shortest_edge, shortest_edge_size
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
    Image.fromarray(np.full((80, 100, 3), 200, np.uint8)).save(tmp_path / "a.png")
    recs, _, _ = load_detection_annotations(_ann(tmp_path))
    ds = DetectionDataset(recs, tmp_path, min_sizes=160, max_size=1000)
    item = ds[0]
    assert item["image"].shape == (3, 160, 200) and item["image"].dtype == torch.uint8 and item["scale"] == (2.0, 2.0)
    assert item["boxes"].tolist() == [[20, 40, 80, 120], [180, 140, 200, 160]]
    assert item["labels"].tolist() == [3, 3] and item["proposals"] is None
    assert int(item["image"].min()) == int(item["image"].max()) == 200  # uint8 pixels, normalised by the model
    recs[0].file_name = "missing.png"
    assert "image not found" in ds[0]["error"]


def test_training_keys_draw_size_and_flip_from_the_sample_seed(tmp_path):
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / "a.png")
    recs, _, _ = load_detection_annotations(_ann(tmp_path))
    ds = DetectionDataset(recs, tmp_path, min_sizes=[40, 80], max_size=1000, hflip=True)
    seen = {(ds[(0, s)]["image"].shape[1], ds[(0, s)]["flipped"]) for s in range(40)}
    assert seen == {(40, False), (40, True), (80, False), (80, True)}
    a, b = ds[(0, 7)], ds[(0, 7)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])  # replayable
    flipped = next(ds[(0, s)] for s in range(40) if ds[(0, s)]["flipped"] and ds[(0, s)]["image"].shape[1] == 80)
    assert flipped["boxes"].tolist()[0] == [100 - 40, 20, 100 - 10, 60]


def test_too_small_images_are_skipped_like_unreadable_ones(tmp_path):
    Image.fromarray(np.zeros((5, 1000, 3), np.uint8)).save(tmp_path / "a.png")
    recs, _, _ = load_detection_annotations(_ann(tmp_path, images=[{"id": 1, "file_name": "a.png"}]))
    item = DetectionDataset(recs, tmp_path, min_sizes=800, max_size=1333)[0]
    assert item["image"] is None and "too small" in item["error"]


def test_normalizer_is_clip_rgb_order_and_pads_batches():
    norm = ImageNormalizer([0.1, 0.2, 0.3], [0.5, 0.25, 0.125], pixel_scale=255.0, size_divisibility=32)
    red = torch.zeros(3, 4, 6, dtype=torch.uint8)
    red[0] = 255
    out = norm([red])
    assert out.tensors.shape == (1, 3, 4, 6)  # one image stays unpadded
    assert torch.allclose(out.tensors[0, :, 0, 0], torch.tensor([(1 - 0.1) / 0.5, -0.2 / 0.25, -0.3 / 0.125]))
    bgr = ImageNormalizer([103.53, 116.28, 123.675], [1.0, 1.0, 1.0], pixel_scale=1.0, bgr=True)
    assert torch.allclose(bgr([red]).tensors[0, :, 0, 0], torch.tensor([-103.53, -116.28, 255 - 123.675]))
    two = norm([red, torch.zeros(3, 40, 3, dtype=torch.uint8)])
    assert two.tensors.shape == (2, 3, 64, 32) and two.image_sizes == [(4, 6), (40, 3)]


def test_proposals_are_attached_clipped_and_resized(tmp_path):
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / "a.png")
    recs, _, _ = load_detection_annotations(_ann(tmp_path))
    props = [{"image_id": 1, "boxes": [[0, 0, 10, 10], [5, 5, 200, 60], [3, 3, 3, 9]], "objectness": [0.1, 2.0, 5.0]},
             {"image_id": 99, "boxes": [], "objectness": []}]
    stats = BoxStats()
    attach_proposals(recs, _write(tmp_path, props), stats)
    assert recs[0].proposals.tolist() == [[0, 0, 10, 10], [5, 5, 100, 60]] and stats.dropped == 1
    item = DetectionDataset(recs, tmp_path, min_sizes=160, max_size=1000)[0]
    assert item["proposals"].tolist() == [[0, 0, 20, 20], [10, 10, 200, 120]]
    assert item["objectness"].tolist() == pytest.approx([0.1, 2.0])
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
    assert pad_batch([torch.ones(3, 10, 20)]).shape == (1, 3, 10, 20)
    assert pad_batch([torch.ones(3, 10, 20)], 32, pad_single=True).shape == (1, 3, 32, 32)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_clip_branch_normalisation_matches_open_clip_in_rgb_order():
    """A colour-asymmetric image through the one input path (read → uint8 → the model's normaliser) against
    open_clip's own preprocessing constants and torchvision's Normalize on the same pixels: a BGR flip or a
    mean/std of the wrong order fails here."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import functional as TF

    from rclip_core.data.transforms import clip_normalizer, to_uint8_tensor
    from rclip_core.recipes import load_recipe

    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 0] = 250  # strongly red, a little blue
    arr[..., 2] = 40
    img = Image.fromarray(arr)
    inp = load_recipe(None).input
    ours = clip_normalizer(inp.pixel_mean, inp.pixel_std)([to_uint8_tensor(img)]).tensors[0]
    ref = TF.normalize(TF.to_tensor(img), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert torch.allclose(ours, ref, atol=1e-6)
