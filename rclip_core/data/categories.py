"""Built-in category lists: COCO-80, LVIS v1 (1203) and the open-vocabulary splits used by RegionCLIP.

- **COCO**: the 80 detection classes under their COCO ids (1..90, with gaps) and the short detectron2-style names
  that RegionCLIP prompts with ('tv', 'couch', 'dining table', ...).
- **COCO open-vocabulary** (OVR-CNN's split, used by RegionCLIP; regionclip_facts.md §6): 48 base classes seen with
  boxes at training time and 17 novel ones; the 65-class list is the COCO id order restricted to these.
- **LVIS v1**: 1203 categories with their ids and image-frequency groups ('r' rare: < 10 training images, 'c' common:
  10-99, 'f' frequent: >= 100). RegionCLIP trains on base = common + frequent (866) and reports rare as novel.
  The list lives in ``lvis_v1_categories.json`` beside this file and is read on first use, not at import.

Every function returns fresh lists of fresh dicts, so callers may modify what they get.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = [
    "COCO_OVD_BASE",
    "COCO_OVD_NOVEL",
    "coco_categories",
    "coco_ovd_categories",
    "is_coco_ovd_file",
    "lvis_categories",
]

_LVIS_FILE = Path(__file__).with_name("lvis_v1_categories.json")

# (COCO id, name). Ids 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are unused in the detection task.
_COCO: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)

# Novel ("target") classes: no box annotations at training time; their AP50 is the headline open-vocabulary number.
COCO_OVD_NOVEL: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup",
    "knife", "cake", "couch", "keyboard", "sink", "scissors",
)

# Base classes: trained with boxes.
COCO_OVD_BASE: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep", "bear",
    "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard", "bottle", "fork",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock",
    "vase", "toothbrush",
)


def coco_categories() -> list[dict]:
    """The 80 COCO detection classes in id order.

    Returns:
        ``[{"id": int, "name": str}, ...]`` (80 entries, ids 1..90 with gaps).

    Example:
        >>> [c["name"] for c in coco_categories()][:3]
        ['person', 'bicycle', 'car']
    """
    return [{"id": i, "name": n} for i, n in _COCO]


def coco_ovd_categories() -> list[dict]:
    """The 65 COCO open-vocabulary classes (48 base + 17 novel) in COCO id order.

    Returns:
        ``[{"id": int, "name": str, "split": "base" | "novel"}, ...]`` (65 entries).

    Example:
        >>> cats = coco_ovd_categories()
        >>> len(cats), sum(c["split"] == "novel" for c in cats)
        (65, 17)
    """
    novel, base = set(COCO_OVD_NOVEL), set(COCO_OVD_BASE)
    return [
        {"id": i, "name": n, "split": "novel" if n in novel else "base"} for i, n in _COCO if n in novel or n in base
    ]


@functools.cache
def _lvis_table() -> tuple[tuple[int, str, str], ...]:
    # Cached as immutable tuples; the public function hands out fresh dicts built from them.
    with open(_LVIS_FILE, encoding="utf-8") as f:
        return tuple((int(c["id"]), str(c["name"]), str(c["frequency"])) for c in json.load(f))


def lvis_categories() -> list[dict]:
    """The 1203 LVIS v1 categories in id order, with their frequency group.

    Returns:
        ``[{"id": int, "name": str, "frequency": "r" | "c" | "f"}, ...]`` (ids 1..1203; 337 rare, 461 common,
        405 frequent). Names are LVIS's own (``'aerosol_can'``, ``'bow-tie'``); prompt builders clean them.

    Example:
        >>> lvis_categories()[0]
        {'id': 1, 'name': 'aerosol_can', 'frequency': 'c'}
    """
    return [{"id": i, "name": n, "frequency": f} for i, n, f in _lvis_table()]


# ---------------------------------------------------------------------------------------------------------------
# base / novel: the one rule, used by evaluation, RPN training and finetuning


def is_coco_ovd_file(categories: list[dict]) -> bool:
    """True when ``categories`` are COCO's 65 open-vocabulary classes or all 80 (by case-folded name): the files the
    48/17 split is defined for. A file that merely shares a few names (a custom "cat, dog, car" set) is not one."""
    names = {str(c["name"]).strip().lower() for c in categories}
    return set(COCO_OVD_BASE) | set(COCO_OVD_NOVEL) <= names <= {n for _, n in _COCO}


def category_splits(categories: list[dict]) -> dict[int, str | None]:
    """Each category id's open-vocabulary split, ``"base"``, ``"novel"`` or None (in neither).

    The one rule, in order: LVIS categories (a ``frequency`` field) are novel when rare (``"r"``) and base otherwise
    (the 866 common + frequent); an explicit ``"split": "base" | "novel"`` field on the categories comes next; else,
    in a COCO-65 or COCO-80 file (:func:`is_coco_ovd_file`), COCO's 48 base / 17 novel classes by (case-folded)
    name, the other 15 in neither. Any other file has no split (every category None).

    Example:
        >>> splits = category_splits(coco_categories())
        >>> splits[17], splits[1], splits[10]  # cat, person, traffic light
        ('novel', 'base', None)
        >>> category_splits([{"id": 17, "name": "cat"}, {"id": 1, "name": "person"}])
        {17: None, 1: None}
    """
    if any("frequency" in c for c in categories):
        return {int(c["id"]): "novel" if c.get("frequency") == "r" else "base" for c in categories}
    if any("split" in c for c in categories):
        return {int(c["id"]): c.get("split") if c.get("split") in ("base", "novel") else None for c in categories}
    if not is_coco_ovd_file(categories):
        return {int(c["id"]): None for c in categories}
    by_name = {**{n: "base" for n in COCO_OVD_BASE}, **{n: "novel" for n in COCO_OVD_NOVEL}}
    return {int(c["id"]): by_name.get(str(c["name"]).strip().lower()) for c in categories}


def split_rule(categories: list[dict]) -> str:
    """Which branch of :func:`category_splits` applies, in words (for logs and summaries)."""
    if any("frequency" in c for c in categories):
        return "LVIS frequency: rare = novel, common + frequent = base"
    if any("split" in c for c in categories):
        return "the categories' 'split' field"
    if is_coco_ovd_file(categories):
        return "COCO's 48 base / 17 novel classes by name"
    return "no base/novel split (not a COCO-65/80 or LVIS file, no 'split' field): every category"


def split_ids(categories: list[dict]) -> dict[str, list[int]]:
    """``{"novel": [...], "base": [...], "all": novel + base}`` sorted ids, or ``{}`` when no category is in a split."""
    splits = category_splits(categories)
    novel = sorted(i for i, s in splits.items() if s == "novel")
    base = sorted(i for i, s in splits.items() if s == "base")
    return {"novel": novel, "base": base, "all": sorted(novel + base)} if novel or base else {}
