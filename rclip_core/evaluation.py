"""Box AP of COCO-format detections: COCO (pycocotools) and LVIS (lvis), with open-vocabulary breakdowns.

RegionCLIP reports (paper Tables 1, 2, 4; regionclip_facts.md §3.7, §6):

- **COCO**: AP50 over the 17 novel ("target") classes, the 48 base classes and all 65 (``AP50_split_target/base/all``
  in the original's logs), next to the usual AP, AP50, AP75, APs, APm, APl.
- **LVIS**: AP, APr, APc, APf; rare classes are the novel ones, common + frequent (866) the base ones.

Both toolkits do the matching; this module only validates the files, runs them quietly and slices their precision
arrays. Splitting by category is exact: with per-category evaluation (``useCats``), each category's precision is
computed independently, so a mean over a subset of categories equals a run restricted to that subset.

Inputs:
    ground truth: a COCO-format instances file (``images``, ``annotations`` with ``bbox`` xywh and ``area``,
        ``categories``). It is LVIS when its categories carry ``frequency``; LVIS images then also need
        ``neg_category_ids`` and ``not_exhaustive_category_ids`` (federated evaluation). A COCO category may carry
        ``"split": "base" | "novel"`` to define its own open-vocabulary split (e.g. the toy world); otherwise the
        COCO 48/17 split is found by category name, which works for both 65- and 80-class files.
    detections: COCO results JSON, a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

Result (a plain, JSON-ready dict; AP values in percent, 0-100; ``None`` where a value is undefined because no
ground truth falls in it):
    ``format`` ("coco" | "lvis"), ``num_images``, ``num_categories``, ``num_detections``,
    ``metrics`` (AP, AP50, AP75, APs, APm, APl; LVIS adds APr, APc, APf),
    ``splits`` (COCO: AP50_novel, AP50_base, AP50_all; LVIS: AP_rare, AP_base; empty when no split applies),
    ``split_sizes`` (categories per split), ``per_category`` (category name -> AP).

Example:
    >>> from rclip_core.evaluation import evaluate_files
    >>> result = evaluate_files("instances_val2017.json", "dets.json")  # doctest: +SKIP
    >>> result["metrics"]["AP50"], result["splits"]["AP50_novel"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rclip_core.data.categories import COCO_OVD_BASE, COCO_OVD_NOVEL
from rclip_core.errors import RclipError
from rclip_core.io import read_json

log = logging.getLogger(__name__)

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = (*COCO_METRICS, "APr", "APc", "APf")
COCO_SPLIT_METRICS = ("AP50_novel", "AP50_base", "AP50_all")
LVIS_SPLIT_METRICS = ("AP_rare", "AP_base")

# Keys each record must have for the toolkits to run (they would otherwise die with a bare KeyError).
_GT_KEYS = {
    "coco": {"images": ("id",), "annotations": ("id", "image_id", "category_id", "bbox", "area"),
             "categories": ("id", "name")},
    "lvis": {"images": ("id", "neg_category_ids", "not_exhaustive_category_ids"),
             "annotations": ("id", "image_id", "category_id", "bbox", "area"),
             "categories": ("id", "name", "frequency")},
}
_DET_KEYS = ("image_id", "category_id", "bbox", "score")


def evaluate_files(gt_path: str | os.PathLike, dets_path: str | os.PathLike) -> dict[str, Any]:
    """Evaluate a detections file against a ground-truth file (format detected from the ground truth).

    Args:
        gt_path: COCO- or LVIS-format instances JSON.
        dets_path: COCO results JSON (a list of detections).

    Returns:
        The result dict described in the module docstring.

    Raises:
        RclipError: a missing or malformed file, a missing key, or a detection naming an unknown image or category.
    """
    gt = read_json(gt_path, what="ground-truth file")
    dets = read_json(dets_path, what="detections file")
    return evaluate(gt, dets, gt_source=str(gt_path), dets_source=str(dets_path))


def evaluate(gt: Any, dets: Any, *, gt_source: str = "ground truth", dets_source: str = "detections"
             ) -> dict[str, Any]:
    """Evaluate parsed detections against parsed ground truth. Neither input is modified.

    Args:
        gt: a COCO/LVIS instances dict.
        dets: a list of COCO result dicts.
        gt_source, dets_source: names used in error messages (usually the file paths).

    Returns:
        The result dict described in the module docstring.
    """
    fmt = detect_format(gt, source=gt_source)
    _check_gt(gt, fmt, gt_source)
    _check_dets(dets, gt, dets_source, gt_source)
    if fmt == "lvis":
        return _evaluate_lvis(gt, dets)
    return _evaluate_coco(gt, dets)


def detect_format(gt: Any, *, source: str = "ground truth") -> str:
    """``"lvis"`` when the ground truth's categories carry ``frequency``, else ``"coco"``."""
    if not isinstance(gt, dict):
        raise RclipError(f"{source}: expected a COCO-format object with 'images', 'annotations', 'categories'")
    cats = gt.get("categories")
    if not isinstance(cats, list):
        raise RclipError(f"{source} lacks key 'categories' (a list)")
    return "lvis" if any(isinstance(c, dict) and "frequency" in c for c in cats) else "coco"


def coco_ovd_splits(categories: Sequence[dict]) -> dict[str, list[int]]:
    """Category ids of the open-vocabulary splits present in a COCO-format category list.

    An explicit ``"split"`` field on the categories wins; otherwise the COCO 48 base / 17 novel classes are found by
    name. Returns ``{"novel": [...], "base": [...], "all": [...]}``, or ``{}`` when no category belongs to a split.
    """
    if any("split" in c for c in categories):
        split_of = {c["id"]: c.get("split") for c in categories}
    else:
        by_name = {**{n: "base" for n in COCO_OVD_BASE}, **{n: "novel" for n in COCO_OVD_NOVEL}}
        split_of = {c["id"]: by_name.get(str(c["name"]).strip().lower()) for c in categories}
    novel = sorted(i for i, s in split_of.items() if s == "novel")
    base = sorted(i for i, s in split_of.items() if s == "base")
    return {"novel": novel, "base": base, "all": sorted(novel + base)} if novel or base else {}


# ---------------------------------------------------------------------------------------------------------------
# validation


def _check_gt(gt: dict, fmt: str, source: str) -> None:
    for section, keys in _GT_KEYS[fmt].items():
        records = gt.get(section)
        if not isinstance(records, list):
            raise RclipError(f"{source} lacks key '{section}' (a list)")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise RclipError(f"{source}: {section}[{i}] is not an object")
            for key in keys:
                if key not in rec:
                    raise RclipError(f"{source}: {section}[{i}] lacks key '{key}'")
    for c in gt["categories"]:
        if fmt == "lvis" and c["frequency"] not in ("r", "c", "f"):
            raise RclipError(f"{source}: category {c['id']} has frequency {c['frequency']!r}; expected r, c or f")


def _check_dets(dets: Any, gt: dict, source: str, gt_source: str) -> None:
    if not isinstance(dets, list):
        raise RclipError(f"{source}: expected a list of detections (COCO results format)")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, d in enumerate(dets):
        if not isinstance(d, dict):
            raise RclipError(f"{source}: detection {i} is not an object")
        for key in _DET_KEYS:
            if key not in d:
                raise RclipError(f"{source}: detection {i} lacks key '{key}'")
        # An unhashable id (a list, say) cannot be in the ground truth either; test the type before the set.
        if not isinstance(d["image_id"], int | str) or d["image_id"] not in image_ids:
            raise RclipError(f"{source}: detection {i} has image_id {d['image_id']!r}, which is not in {gt_source}")
        if not isinstance(d["category_id"], int | str) or d["category_id"] not in cat_ids:
            raise RclipError(
                f"{source}: detection {i} has category_id {d['category_id']!r}, which is not in {gt_source}")
        box = d["bbox"]
        if not (isinstance(box, list | tuple) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise RclipError(f"{source}: detection {i} has bbox {box!r}; expected [x, y, width, height]")
        if not _is_number(d["score"]):
            raise RclipError(f"{source}: detection {i} has score {d['score']!r}; expected a number")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------------------
# running the toolkits


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow pycocotools' prints and lvis's info/warning logs: the library must not print."""
    lvis_log = logging.getLogger("lvis")
    level = lvis_log.level
    lvis_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        lvis_log.setLevel(level)


def _allow_numpy_float() -> None:
    """Restore ``np.float`` for lvis 0.5.3, which calls it in ``accumulate``; NumPy 1.24 removed the alias.

    It always meant the builtin ``float``, so aliasing it back changes nothing else. Call before importing lvis.
    """
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]


def _copy_records(gt: dict, dets: list[dict]) -> tuple[dict, list[dict]]:
    # Both toolkits write into annotation and detection dicts ('ignore', 'area', 'id', ...): copy one level deep
    # so the caller's data stays untouched, without paying for a deep copy of a large ground truth.
    gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    return gt, [dict(d) for d in dets]


def _percent(x: float) -> float | None:
    """A toolkit value (fraction, -1 for undefined) as percent or None."""
    return None if x < 0 else float(x) * 100.0


def _mean_precision(p: np.ndarray) -> float | None:
    """Mean of the defined (> -1) entries of a precision slice, in percent, as the toolkits' summaries do."""
    valid = p[p > -1]
    return float(np.mean(valid)) * 100.0 if valid.size else None


def _per_category(categories: list[dict], cat_ids: Sequence[int], values: Sequence[float | None]
                  ) -> dict[str, float | None]:
    names = {c["id"]: str(c["name"]) for c in categories}
    out: dict[str, float | None] = {}
    for cid, v in zip(cat_ids, values, strict=True):
        key = names[cid] if names[cid] not in out else f"{names[cid]} [{cid}]"  # keep duplicate names apart
        out[key] = v
    return out


def _result(fmt: str, gt: dict, dets: list, metrics: dict, splits: dict, sizes: dict, per_cat: dict) -> dict:
    return {"format": fmt, "num_images": len(gt["images"]), "num_categories": len(gt["categories"]),
            "num_detections": len(dets), "metrics": metrics, "splits": splits, "split_sizes": sizes,
            "per_category": per_cat}


def _no_detections(fmt: str, gt: dict, metric_keys: Sequence[str], split_keys: Sequence[str], sizes: dict) -> dict:
    # pycocotools' loadRes and lvis's LVISResults both index the first detection; answer without them.
    log.warning("no detections to evaluate; every AP is 0")
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    per_cat = _per_category(cats, [c["id"] for c in cats], [0.0] * len(cats))
    return _result(fmt, gt, [], dict.fromkeys(metric_keys, 0.0), dict.fromkeys(split_keys, 0.0), sizes, per_cat)


def _evaluate_coco(gt: dict, dets: list[dict]) -> dict[str, Any]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    splits = coco_ovd_splits(gt["categories"])
    split_keys = tuple(f"AP50_{s}" for s in splits)
    sizes = {s: len(ids) for s, ids in splits.items()}
    log.info("COCO box evaluation: %d images, %d categories, %d detections",
             len(gt["images"]), len(gt["categories"]), len(dets))
    if not dets:
        return _no_detections("coco", gt, COCO_METRICS, split_keys, sizes)

    gt, dets = _copy_records(gt, dets)
    with _quiet():
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {k: _percent(v) for k, v in zip(COCO_METRICS, ev.stats[:6], strict=True)}

    # precision: (IoU thresholds, recall thresholds, categories, area ranges, max-dets) -> area "all", 100 dets.
    precision = ev.eval["precision"][..., 0, -1]
    cat_ids = list(ev.params.catIds)
    column = {cid: k for k, cid in enumerate(cat_ids)}
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    split_metrics = {f"AP50_{s}": _mean_precision(precision[iou50][:, [column[i] for i in ids]])
                     for s, ids in splits.items()}
    per_cat = _per_category(gt["categories"], cat_ids, [_mean_precision(precision[:, :, k]) for k in column.values()])
    return _result("coco", gt, dets, metrics, split_metrics, sizes, per_cat)


def _evaluate_lvis(gt: dict, dets: list[dict]) -> dict[str, Any]:
    _allow_numpy_float()
    from lvis import LVIS, LVISEval, LVISResults

    class _ParsedLVIS(LVIS):
        """The LVIS API over an already-parsed dict, so a large file is not read twice."""

        def __init__(self, dataset: dict) -> None:
            self._parsed = dataset
            super().__init__("<parsed>")

        def _load_json(self, path: str) -> dict:
            return self._parsed

    rare = sorted(c["id"] for c in gt["categories"] if c["frequency"] == "r")
    base = sorted(c["id"] for c in gt["categories"] if c["frequency"] != "r")
    sizes = {"rare": len(rare), "base": len(base)}
    log.info("LVIS box evaluation: %d images, %d categories, %d detections",
             len(gt["images"]), len(gt["categories"]), len(dets))
    if not dets:
        return _no_detections("lvis", gt, LVIS_METRICS, LVIS_SPLIT_METRICS, sizes)

    gt, dets = _copy_records(gt, dets)
    with _quiet():
        lvis_gt = _ParsedLVIS(gt)
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets), iou_type="bbox")
        ev.run()
    results = ev.get_results()
    metrics = {k: _percent(results[k]) for k in LVIS_METRICS}

    # precision: (IoU thresholds, recall thresholds, categories, area ranges) -> area "all".
    precision = ev.eval["precision"][..., 0]
    cat_ids = list(ev.params.cat_ids)
    column = {cid: k for k, cid in enumerate(cat_ids)}
    split_metrics = {"AP_rare": _mean_precision(precision[:, :, [column[i] for i in rare]]),
                     "AP_base": _mean_precision(precision[:, :, [column[i] for i in base]])}
    per_cat = _per_category(gt["categories"], cat_ids, [_mean_precision(precision[:, :, k]) for k in column.values()])
    return _result("lvis", gt, dets, metrics, split_metrics, sizes, per_cat)
