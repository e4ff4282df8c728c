"""rclip_core.data.captions: TSV / JSONL / COCO caption sources read by index, caption draws, unreadable images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rclip_core.data.captions import CaptionDataset, open_captions
from rclip_core.errors import RclipError


@pytest.fixture()
def folder(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(np.full((30 + i, 40, 3), 50 * i, np.uint8)).save(imgs / f"{i}.png")
    (imgs / "broken.png").write_bytes(b"not an image")
    return tmp_path


def test_tsv_with_header_is_read_by_byte_offset(folder):
    tsv = folder / "cc.tsv"
    tsv.write_text("caption\turl\n" + "".join(f"a photo number {i}\t{i}.png\n" for i in range(4)) + "\n")
    src = open_captions(tsv, folder / "images")
    assert len(src) == 4 and src.kind == "tsv"
    assert src.get(2) == (folder / "images" / "2.png", ["a photo number 2"])
    assert src._lines.offsets.dtype == np.int64  # an index of offsets, not the lines themselves


def test_jsonl_and_coco_sources_with_several_captions(folder):
    jl = folder / "pairs.jsonl"
    jl.write_text(json.dumps({"image": "0.png", "captions": ["one", "two"]}) + "\n"
                  + json.dumps({"image": "1.png", "caption": "three"}) + "\n")
    src = open_captions(jl, folder / "images")
    assert src.get(0)[1] == ["one", "two"] and src.get(1)[1] == ["three"]
    coco = folder / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 5, "file_name": "3.png"}, {"id": 6, "file_name": "2.png"}],
                                "annotations": [{"image_id": 5, "caption": "x"}, {"image_id": 5, "caption": "y"}]}))
    src = open_captions(coco, folder / "images")
    assert len(src) == 1 and src.get(0) == (folder / "images" / "3.png", ["x", "y"])  # image 6 has no caption


def test_items_draw_caption_and_size_from_the_seed_and_replace_unreadable_images(folder):
    jl = folder / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"image": n, "captions": ["a", "b", "c"]}) + "\n"
                          for n in ["broken.png", "0.png", "1.png"]))
    ds = CaptionDataset(open_captions(jl, folder / "images"), min_sizes=[20, 40], max_size=100)
    draws = {(ds[(1, s)]["caption"], ds[(1, s)]["image"].shape[1]) for s in range(30)}
    assert {c for c, _ in draws} == {"a", "b", "c"} and {h for _, h in draws} == {20, 40}
    a, b = ds[(1, 9)], ds[(1, 9)]
    assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    item = ds[(0, 3)]  # broken: replaced by the next readable pair, counted
    assert item["index"] == 1 and item["skipped"] == 1 and item["image"].dtype == torch.uint8


def test_bad_caption_files_are_one_line_errors(folder):
    with pytest.raises(RclipError, match="caption file not found"):
        open_captions(folder / "none.tsv", folder)
    (folder / "empty.tsv").write_text("")
    with pytest.raises(RclipError, match="no image-caption pairs"):
        open_captions(folder / "empty.tsv", folder)
    (folder / "x.csv").write_text("a,b\n")
    with pytest.raises(RclipError, match="unknown caption file type"):
        open_captions(folder / "x.csv", folder)
    (folder / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(RclipError, match="not a COCO captions file"):
        open_captions(folder / "bad.json", folder)
    (folder / "oneword.tsv").write_text("just a caption without a path\n")
    with pytest.raises(RclipError, match="expected 'caption<TAB>image path'"):
        open_captions(folder / "oneword.tsv", folder).get(0)
    (folder / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(RclipError, match="pair 1: malformed JSON"):
        open_captions(folder / "bad.jsonl", folder).get(0)
    (folder / "missing.tsv").write_text("a cat\tnope.png\n")
    with pytest.raises(RclipError, match="none of the first 1 images exists"):
        open_captions(folder / "missing.tsv", folder / "images").check_images()
    all_broken = folder / "broken.jsonl"
    all_broken.write_text(json.dumps({"image": "broken.png", "caption": "x"}) + "\n")
    with pytest.raises(RclipError, match="could not be read"):
        CaptionDataset(open_captions(all_broken, folder / "images"), min_sizes=[20], max_size=40)[(0, 1)]
