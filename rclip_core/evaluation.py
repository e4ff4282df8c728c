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
    ``metrics`` (AP, AP50, AP75, APs, APm, APl and COCO's AR@1/10/100, ARs/m/l@100; LVIS: the APs, APr, APc,
        APf and AR@300, ARs/m/l@300),
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

from rclip_core.data.categories import split_ids
from rclip_core.errors import RclipError
from rclip_core.io import read_json

log = logging.getLogger(__name__)

AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# COCOeval.stats in order: the six APs, then recall at 1 / 10 / 100 detections per image and by size (at 100).
COCO_METRICS = (*AP_METRICS, "AR@1", "AR@10", "AR@100", "ARs@100", "ARm@100", "ARl@100")
LVIS_METRICS = (*AP_METRICS, "APr", "APc", "APf", "AR@300", "ARs@300", "ARm@300", "ARl@300")
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

    splits = split_ids(gt["categories"])
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
    metrics = {k: _percent(v) for k, v in zip(COCO_METRICS, ev.stats, strict=True)}

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

    splits = split_ids(gt["categories"])  # LVIS: rare = novel, common + frequent = base
    rare, base = splits["novel"], splits["base"]
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


# ---------------------------------------------------------------------------------------------------------------
# proposal recall

PROPOSAL_LIMITS = (100, 300, 1000)
RECALL_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50:0.95, as COCO AR


def evaluate_proposal_files(gt_path: str | os.PathLike, proposals_path: str | os.PathLike, *,
                            limits: Sequence[int] = PROPOSAL_LIMITS) -> dict[str, Any]:
    """Class-agnostic recall of a proposals file (``rclip rpn propose``) against a COCO/LVIS ground truth.

    See :func:`evaluate_proposals`.
    """
    gt = read_json(gt_path, what="ground-truth file")
    proposals = read_json(proposals_path, what="proposals file")
    return evaluate_proposals(gt, proposals, gt_source=str(gt_path), proposals_source=str(proposals_path),
                              limits=limits)


def evaluate_proposals(gt: Any, proposals: Any, *, gt_source: str = "ground truth",
                       proposals_source: str = "proposals", limits: Sequence[int] = PROPOSAL_LIMITS
                       ) -> dict[str, Any]:
    """Average recall of class-agnostic proposals, overall and for base vs novel categories.

    Computed directly with ``torchvision.ops.box_iou``, with detectron2's proposal-evaluation matching (the
    original's ``COCOEvaluator`` box-proposal metrics): per image, the top-``limit`` proposals by objectness are
    matched one-to-one to the non-crowd ground-truth boxes greedily, best IoU pair first; each box's matched IoU then
    counts as recalled at every threshold it reaches. ``AR@k`` is the mean recall over IoU 0.50:0.95 (COCO's AR),
    ``R50@k`` the recall at IoU 0.5. A split's recall matches proposals against that split's boxes only. Images
    without a proposals entry have no proposals; entries for images not in the ground truth are ignored (counted).

    Args:
        gt: a COCO/LVIS instances dict. Splits: LVIS frequency (novel = rare, base = common + frequent), else
            a ``split`` field or COCO's 48/17 names (``data.categories.category_splits``).
        proposals: a list (or ``{"proposals": [...]}``) of ``{"image_id", "boxes" (xyxy), "objectness"}``.
        limits: proposals per image to evaluate at.

    Returns:
        ``{"format": "proposals", "num_images", "num_images_with_proposals", "entries_ignored",
        "num_boxes": {group: n}, "recall": {group: {"AR@k": %, "R50@k": %, ...}}, "split_sizes"}`` with groups
        ``all`` and, when the categories have a split, ``base`` and ``novel``; values in percent, None without boxes.
    """
    import torch
    from torchvision.ops import box_iou

    from rclip_core.boxes import xywh_to_xyxy

    fmt = detect_format(gt, source=gt_source)
    _check_gt(gt, fmt, gt_source)
    by_image = _proposals_by_image(proposals, proposals_source)
    groups = {k: set(v) for k, v in split_ids(gt["categories"]).items() if k != "all"}
    gt_boxes: dict[Any, list[tuple[list[float], Any]]] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        if a.get("iscrowd", 0) or a["image_id"] not in gt_boxes:
            continue
        gt_boxes[a["image_id"]].append(([float(v) for v in a["bbox"]], a["category_id"]))  # xywh as in the file

    limits = sorted(int(k) for k in limits)
    names = ["all", *groups]
    # Matched IoU of every ground-truth box, per group and limit (0 when unmatched).
    overlaps: dict[str, dict[int, list]] = {g: {k: [] for k in limits} for g in names}
    for image_id, items in gt_boxes.items():
        if not items:
            continue
        boxes = xywh_to_xyxy(torch.tensor([b for b, _ in items], dtype=torch.float32))  # (G, 4)
        cats = [c for _, c in items]
        props = by_image.get(image_id, torch.zeros((0, 4)))  # (P, 4), best first
        ious = box_iou(props[: limits[-1]], boxes)  # (P, G)
        for g in names:
            cols = [j for j, c in enumerate(cats) if g == "all" or c in groups[g]]
            if not cols:
                continue
            for k in limits:
                overlaps[g][k].append(_greedy_matched_ious(ious[:k, cols]))
    recall: dict[str, dict[str, float | None]] = {}
    num_boxes: dict[str, int] = {}
    for g in names:
        ar, r50 = {}, {}
        for k in limits:
            ovr = torch.cat(overlaps[g][k]) if overlaps[g][k] else torch.zeros(0)
            num_boxes[g] = int(ovr.numel())
            rec = [float((ovr >= t).float().mean()) * 100.0 if ovr.numel() else None for t in RECALL_IOUS]
            ar[f"AR@{k}"] = None if rec[0] is None else float(np.mean(rec))
            r50[f"R50@{k}"] = rec[0]
        recall[g] = {**ar, **r50}
    ignored = sum(1 for i in by_image if i not in gt_boxes)
    if ignored:
        log.warning("%s: %d entries name images that are not in %s; ignored", proposals_source, ignored, gt_source)
    return {"format": "proposals", "num_images": len(gt["images"]),
            "num_images_with_proposals": sum(1 for i in gt_boxes if i in by_image), "entries_ignored": ignored,
            "num_boxes": num_boxes, "recall": recall, "split_sizes": {g: len(ids) for g, ids in groups.items()}}


def _greedy_matched_ious(ious: Any) -> Any:
    """(P, G) IoUs → (G,): repeatedly take the best remaining (proposal, box) pair and retire both; boxes left
    unmatched get 0 (detectron2's ``_evaluate_box_proposals`` matching)."""
    import torch

    num_props, num_gt = ious.shape
    out = torch.zeros(num_gt)
    if num_props == 0 or num_gt == 0:
        return out
    ious = ious.clone()
    for _ in range(min(num_props, num_gt)):
        best_iou_per_box, best_prop_per_box = ious.max(dim=0)  # (G,)
        iou, box = best_iou_per_box.max(dim=0)
        if iou < 0:  # every box already matched
            break
        out[box] = iou
        ious[best_prop_per_box[box], :] = -1
        ious[:, box] = -1
    return out


def _proposals_by_image(proposals: Any, source: str) -> dict[Any, Any]:
    """Validate a proposals file's entries; return image id → (P, 4) boxes sorted by objectness, best first."""
    import torch

    items = proposals.get("proposals") if isinstance(proposals, dict) else proposals
    if not isinstance(items, list):
        raise RclipError(f"{source}: expected a list of {{image_id, boxes, objectness}}")
    out: dict[Any, Any] = {}
    for j, item in enumerate(items):
        where = f"{source}: proposals[{j}]"
        if not isinstance(item, dict):
            raise RclipError(f"{where} is not an object")
        for key in ("image_id", "boxes", "objectness"):
            if key not in item:
                raise RclipError(f"{where} lacks key '{key}'")
        try:
            boxes = torch.tensor(item["boxes"], dtype=torch.float32).reshape(-1, 4)
            scores = torch.tensor(item["objectness"], dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise RclipError(f"{where}: boxes must be [[x1, y1, x2, y2], ...] and objectness a list of numbers"
                             ) from None
        if boxes.shape[0] != scores.shape[0]:
            raise RclipError(f"{where}: {boxes.shape[0]} boxes but {scores.shape[0]} objectness values")
        if not isinstance(item["image_id"], int | str):
            raise RclipError(f"{where} has image_id {item['image_id']!r}; expected an id")
        if item["image_id"] in out:
            raise RclipError(f"{where}: image_id {item['image_id']!r} appears twice")
        out[item["image_id"]] = boxes[scores.argsort(descending=True, stable=True)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# GT-box classification accuracy of zero-shot results


def gt_box_accuracy(gt: dict, dets: list[dict]) -> dict[str, Any]:
    """How often the best-scoring class of each ground-truth box is its true category, from the COCO results that
    ``rclip zeroshot --gt-boxes`` writes (each detection's box is one of the GT boxes, in original pixels).

    A box whose every detection was suppressed (class-specific NMS, the per-image cap) counts as wrong. Boxes are
    matched by coordinates rounded as the results are (3 decimals).

    Returns:
        ``{"accuracy", "num_boxes", "chance": 1 / categories, "per_split": {"base"|"novel": {"accuracy",
        "num_boxes"}}, "per_class": {name: {...}}}``; accuracies are fractions (NaN for an empty group).
    """
    from rclip_core.data.categories import category_splits

    def key(image_id: Any, bbox: Sequence[float]) -> tuple:
        return (image_id, *(round(float(v), 3) for v in bbox))

    best: dict[tuple, tuple[float, int]] = {}
    for d in dets:
        k = key(d["image_id"], d["bbox"])
        if k not in best or d["score"] > best[k][0]:
            best[k] = (float(d["score"]), int(d["category_id"]))
    splits = category_splits(gt["categories"])
    names = {int(c["id"]): c["name"] for c in gt["categories"]}
    rows = []  # (true id, hit)
    for a in gt["annotations"]:
        if a.get("iscrowd", 0):
            continue
        hit = best.get(key(a["image_id"], a["bbox"]), (0.0, -1))[1] == int(a["category_id"])
        rows.append((int(a["category_id"]), hit))

    def summary(selected: list[bool]) -> dict:
        n = len(selected)
        return {"accuracy": sum(selected) / n if n else float("nan"), "num_boxes": n}

    out = summary([h for _, h in rows])
    out["chance"] = 1.0 / max(1, len(gt["categories"]))
    out["per_split"] = {s: summary([h for c, h in rows if splits.get(c) == s]) for s in ("base", "novel")
                        if any(splits.get(c) == s for c, _ in rows)}
    out["per_class"] = {names[c]: summary([h for cc, h in rows if cc == c]) for c in sorted({c for c, _ in rows})}
    return out
