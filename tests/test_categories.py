"""Built-in category lists: sizes, ids, frequency groups and the COCO open-vocabulary split."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from importlib import resources

from rclip_core.data import categories as C


def test_coco80_ids_and_detectron2_names():
    cats = C.coco_categories()
    ids = [c["id"] for c in cats]
    assert len(cats) == 80 and ids == sorted(set(ids)) and ids[0] == 1 and ids[-1] == 90
    assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    by_name = {c["name"]: c["id"] for c in cats}
    assert len(by_name) == 80
    assert by_name["tv"] == 72 and by_name["couch"] == 63 and by_name["dining table"] == 67
    assert by_name["motorcycle"] == 4 and by_name["airplane"] == 5 and by_name["toothbrush"] == 90


# OVR-CNN's 17 novel COCO classes (RegionCLIP's "target" split), written out here independently of the library, so
# that two classes exchanged between its novel and base lists (counts kept) fail this test.
PUBLISHED_NOVEL = {
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife",
    "cake", "couch", "keyboard", "sink", "scissors",
}
# The 15 COCO classes in neither split.
PUBLISHED_UNUSED = {
    "traffic light", "fire hydrant", "stop sign", "parking meter", "baseball bat", "baseball glove", "sports ball",
    "tennis racket", "wine glass", "hot dog", "dining table", "potted plant", "cell phone", "hair drier", "teddy bear",
}


def test_coco_ovd_split_equals_the_published_literal():
    assert set(C.COCO_OVD_NOVEL) == PUBLISHED_NOVEL
    everything = {c["name"] for c in C.coco_categories()}
    assert set(C.COCO_OVD_BASE) == everything - PUBLISHED_NOVEL - PUBLISHED_UNUSED
    splits = C.category_splits(C.coco_categories())
    names = {c["id"]: c["name"] for c in C.coco_categories()}
    assert {names[i] for i, s in splits.items() if s == "novel"} == PUBLISHED_NOVEL


def test_coco_ovd_split_is_the_published_one():
    assert len(C.COCO_OVD_NOVEL) == 17 and len(C.COCO_OVD_BASE) == 48
    assert not set(C.COCO_OVD_NOVEL) & set(C.COCO_OVD_BASE)
    coco_names = {c["name"] for c in C.coco_categories()}
    assert set(C.COCO_OVD_NOVEL) <= coco_names and set(C.COCO_OVD_BASE) <= coco_names
    ovd = C.coco_ovd_categories()
    assert len(ovd) == 65
    assert [c["id"] for c in ovd] == sorted(c["id"] for c in ovd)  # COCO id order
    assert {c["name"] for c in ovd if c["split"] == "novel"} == set(C.COCO_OVD_NOVEL)
    assert {c["name"] for c in ovd if c["split"] == "base"} == set(C.COCO_OVD_BASE)
    assert ovd[0] == {"id": 1, "name": "person", "split": "base"}
    assert {"id": 5, "name": "airplane", "split": "novel"} in ovd
    # The 15 classes outside the split (e.g. 'traffic light', 'hot dog') are not in the 65.
    assert "traffic light" not in {c["name"] for c in ovd} and "hot dog" not in {c["name"] for c in ovd}


def test_lvis_v1_counts_and_ids():
    cats = C.lvis_categories()
    assert len(cats) == 1203
    assert [c["id"] for c in cats] == list(range(1, 1204))
    assert Counter(c["frequency"] for c in cats) == {"r": 337, "c": 461, "f": 405}
    assert len({c["name"] for c in cats}) == 1203
    assert cats[0] == {"id": 1, "name": "aerosol_can", "frequency": "c"}
    assert cats[-1] == {"id": 1203, "name": "zucchini", "frequency": "c"}
    assert {"id": 793, "name": "person", "frequency": "f"} in cats
    assert sum(c["frequency"] != "r" for c in cats) == 866  # RegionCLIP's LVIS base classes


def test_lvis_package_data_file_is_shipped():
    data = json.loads(resources.files("rclip_core.data").joinpath("lvis_v1_categories.json").read_text("utf-8"))
    assert len(data) == 1203 and set(data[0]) == {"id", "name", "frequency"}


def test_results_are_fresh_copies():
    C.lvis_categories()[0]["name"] = "changed"
    C.coco_categories()[0]["name"] = "changed"
    C.coco_ovd_categories()[0]["split"] = "changed"
    assert C.lvis_categories()[0]["name"] == "aerosol_can"
    assert C.coco_categories()[0]["name"] == "person"
    assert C.coco_ovd_categories()[0]["split"] == "base"


def test_import_is_light():
    code = "import sys, rclip_core.data.categories; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
