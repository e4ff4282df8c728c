"""Zero-shot region recognition over a set of images: which images, which regions, which detector (RegionCLIP §3.1
zero-shot inference). The commands ``rclip zeroshot`` and ``rclip visualize`` are thin wrappers around
:func:`prepare_images` and :func:`run_zeroshot`.

Region sources (:class:`RegionSource`):

- ``gt``: the ground-truth boxes of an annotation file (the paper's GT-box protocol);
- ``proposals``: a proposals file (``rclip rpn propose``), the best ``zeroshot.num_proposals`` per image;
- ``rpn``: an rclip / converted original RPN checkpoint, run on the same decoded, resized image;
- ``selective-search``: OpenCV's selective search, no weights at all (``region_sources.SelectiveSearch``);
- ``torchvision-rpn``: torchvision's COCO Faster R-CNN RPN (``region_sources.TorchvisionRPN``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rclip_core.data.coco import (
    BoxStats,
    DetectionDataset,
    ImageRecord,
    attach_proposals,
    images_from_paths,
    images_in_folder,
    load_detection_annotations,
)
from rclip_core.errors import RclipError
from rclip_core.region_spec import RegionSource
from rclip_core.summary import RunSummary


@dataclass
class ImageSet:
    """The images of a run, their categories, and the category id of each class row.

    ``folder_mode``: no annotation file; ids were generated 1..N in sorted order and categories from the class
    names (``OUT_STEM.images.json`` records them).
    """

    records: list[ImageRecord]
    categories: list[dict]
    category_ids: list[int]
    image_dir: Path
    folder_mode: bool
    box_stats: BoxStats = field(default_factory=BoxStats)

    def skeleton(self) -> dict:
        """A COCO skeleton of the images and categories (what ``OUT_STEM.images.json`` holds in folder mode)."""
        return {"images": [{"id": r.id, "file_name": r.file_name} for r in self.records], "categories": self.categories}


def prepare_images(names: Sequence[str], source: RegionSource, *, image_dir: str | os.PathLike | None = None,
                   inputs: Sequence[str | os.PathLike] | None = None, annotations: str | os.PathLike | None = None,
                   embedding_ids: list[int] | None = None, limit: int | None = None,
                   names_source: object = "embeddings", match_names: bool = True) -> ImageSet:
    """The images to run on and the category id of each class name.

    Args:
        names: K class names (the embedding rows).
        source: the region source; a ``gt`` source's file is the annotation file.
        image_dir: a folder the annotation file's (or its own) images are in, or
        inputs: image files and/or folders (``rclip visualize``); with annotations, matched by base name.
        annotations: a COCO/LVIS file listing images and categories (ids kept for evaluation); else folder mode.
        embedding_ids: category ids stored in the embedding file, used in folder mode (default 1..K).
        limit: only the first N images.
        match_names: map each class name to the annotation category of that name (results then carry the file's
            category ids, for evaluation); without it class ``k`` gets id ``k + 1`` (pictures of any vocabulary).
    """
    ann = source.path if source.kind == "gt" else annotations
    if source.kind == "gt" and annotations is not None and Path(annotations) != Path(source.path):
        raise RclipError("--annotations goes with --rpn/--proposals; --gt-boxes already names the annotation file")
    stats = BoxStats()
    if ann is not None:
        from rclip_core.inference import category_ids_for

        records, categories, stats = load_detection_annotations(ann)
        cat_ids = category_ids_for(list(names), categories, names_source) if match_names else list(
            range(1, len(names) + 1))
        folder_mode = False
        if inputs is not None:  # annotation names matched by base name to the given files
            found = {Path(r.file_name).name: r.file_name for r in images_from_paths(inputs)}
            records = [r for r in records if Path(r.file_name).name in found]
            for r in records:
                r.file_name = found[Path(r.file_name).name]
            if not records:
                raise RclipError(f"none of the given images is in {ann}")
    else:
        records = images_from_paths(inputs) if inputs is not None else images_in_folder(image_dir)
        cat_ids = list(embedding_ids) if embedding_ids else list(range(1, len(names) + 1))
        categories = [{"id": i, "name": n} for i, n in zip(cat_ids, names)]
        folder_mode = True
    if limit is not None:
        records = records[:limit]
    if source.kind == "gt" and not any(len(r.gt_boxes) for r in records):
        raise RclipError(f"{ann}: no boxes to name (its {len(records)} images hold no annotations)")
    root = Path(image_dir) if image_dir is not None else Path(".")  # absolute file names ignore the root
    if source.kind == "proposals":
        attach_proposals(records, source.path, stats)
    return ImageSet(records, categories, cat_ids, root, folder_mode, stats)


def build_proposal_generator(source: RegionSource, recipe) -> nn.Module:
    """The detector's proposal generator for ``source`` (top ``zeroshot.num_proposals`` by objectness)."""
    from rclip_core.detector import GivenBoxes, RPNProposals

    topk = recipe.zeroshot.num_proposals
    if source.kind == "gt":
        return GivenBoxes("boxes")
    if source.kind == "proposals":
        return GivenBoxes("proposals", topk=topk)
    if source.kind == "selective-search":
        from rclip_core.region_sources import SelectiveSearch

        return SelectiveSearch(mode=source.option, topk=recipe.zeroshot.selective_search_topk)
    if source.kind == "torchvision-rpn":
        from rclip_core.region_sources import TorchvisionRPN, torchvision_rpn_weights

        return TorchvisionRPN(torchvision_rpn_weights(source.path), topk=topk)
    from rclip_core.rpn import load_rpn

    return RPNProposals(load_rpn(source.path), topk=topk)


def run_zeroshot(clip: nn.Module, embeddings: torch.Tensor, images: ImageSet, source: RegionSource, recipe, *,
                 device: str | torch.device = "cpu", strict: bool = False,
                 progress: Callable[[int], None] | None = None) -> tuple[list[dict], RunSummary]:
    """COCO results (original pixels) and the run summary for ``images`` with regions from ``source``.

    ``clip``'s visual tower is prepared for inference in place (``zeroshot.fold_bn``, ``channels_last``): the
    caller hands over a model it will not train or save afterwards.
    """
    from rclip_core.clip_backbone import prepare_for_inference
    from rclip_core.detector import build_region_detector
    from rclip_core.engine import resolve_amp
    from rclip_core.inference import run_detection
    from rclip_core.runtime import num_workers

    zs = recipe.zeroshot
    zs.amp = resolve_amp(zs.amp, device, what="inference")
    if not getattr(clip, "rclip_folded", False):
        prepare_for_inference(clip, fold_bn=zs.fold_bn, channels_last=zs.channels_last)
    parts = getattr(clip, "rclip_detector", None)  # a finetuned detector's box regressor and background
    if parts is not None:
        from rclip_core.finetune import build_detector

        # GT boxes are named, never moved (the original forces NO_BOX_DELTA in GT mode).
        detector = build_detector(clip, embeddings, recipe, build_proposal_generator(source, recipe), parts,
                                  box_deltas=zs.box_deltas and source.kind != "gt")
    else:
        detector = build_region_detector(clip, embeddings, recipe, build_proposal_generator(source, recipe))
    if zs.compile:
        from rclip_core.inference import compile_detector

        compile_detector(detector)
    dataset = DetectionDataset(images.records, images.image_dir, min_sizes=recipe.input.min_size,
                               max_size=recipe.input.max_size)
    return run_detection(detector, dataset, category_ids=images.category_ids, batch_size=zs.batch_size,
                         num_workers=num_workers(zs.num_workers), device=device, strict=strict,
                         progress=progress)
