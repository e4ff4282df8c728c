"""``rclip pretrain --cache-proposals DIR``: run the RPN once over a caption source and reuse its boxes afterwards.

The original runs its offline RPN on every training image at every step. Proposals do not change while the student
trains (the RPN is frozen), so computing them once saves the RPN's forward pass in every later epoch and run. Boxes
are stored in original-image pixels (memory-mapped ``.npy`` files, see :class:`~rclip_core.data.captions.
ProposalCache`) and scaled to each step's drawn training size; they are computed at the largest training size.

The folder's ``meta.json`` records what the proposals were made from (caption file, RPN checkpoint, top-k, NMS,
size); a folder made from other inputs is refused, and an interrupted computation continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rclip_core import boxes as B
from rclip_core import distributed as D
from rclip_core.data.captions import CaptionDataset, CaptionSource, ProposalCache
from rclip_core.errors import RclipError
from rclip_core.io import write_json
from rclip_core.recipes import PretrainCfg

log = logging.getLogger(__name__)


def _fingerprint(path: str | os.PathLike) -> dict:
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime)}


def cache_meta(source: CaptionSource, cfg: PretrainCfg) -> dict:
    """What a cache of ``source`` under ``cfg`` depends on."""
    return {"captions": _fingerprint(source.path), "images": str(source.images_dir.resolve()), "pairs": len(source),
            "rpn": _fingerprint(cfg.rpn), "rpn_topk": cfg.rpn_topk, "rpn_nms_thresh": cfg.rpn_nms_thresh,
            "min_size": max(cfg.min_sizes), "max_size": cfg.max_size}


def ensure_proposal_cache(folder: str | os.PathLike, source: CaptionSource, rpn: nn.Module, cfg: PretrainCfg, *,
                          device: str | torch.device = "cpu",
                          progress: Callable[[int, int], None] | None = None) -> ProposalCache:
    """Open the cache in ``folder``, computing (or finishing) it first when needed. Rank 0 computes; others wait.

    Raises:
        RclipError: the folder holds a cache made from other inputs.
    """
    root = Path(folder)
    meta = cache_meta(source, cfg)
    meta_path = ProposalCache.meta_path(root)
    if D.is_main():
        if meta_path.is_file():
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            stored = old.get("inputs", {})
            differs = sorted(k for k in set(meta) | set(stored) if stored.get(k) != meta.get(k))
            if differs:
                raise RclipError(f"{root} holds proposals made from other inputs (differing: {', '.join(differs)}); "
                                 "give another --cache-proposals folder or delete this one")
        elif root.is_dir() and any(root.iterdir()):
            raise RclipError(f"{root} is not empty and holds no proposal cache; give an empty or new folder")
        _compute(root, meta, source, rpn, cfg, device=device, progress=progress)
    D.barrier()
    return ProposalCache(root)


def _compute(root: Path, meta: dict, source: CaptionSource, rpn: nn.Module, cfg: PretrainCfg, *,
             device: str | torch.device, progress: Callable[[int, int], None] | None) -> None:
    n, k = len(source), cfg.rpn_topk
    root.mkdir(parents=True, exist_ok=True)
    files = {name: root / f"{name}.npy" for name in ("boxes", "objectness", "counts")}
    meta_path = ProposalCache.meta_path(root)
    if meta_path.is_file() and json.loads(meta_path.read_text(encoding="utf-8")).get("complete"):
        return
    if not all(f.is_file() for f in files.values()):
        np.lib.format.open_memmap(files["boxes"], mode="w+", dtype=np.float32, shape=(n, k, 4)).flush()
        np.lib.format.open_memmap(files["objectness"], mode="w+", dtype=np.float32, shape=(n, k)).flush()
        counts = np.lib.format.open_memmap(files["counts"], mode="w+", dtype=np.int32, shape=(n,))
        counts[:] = -1  # not computed yet
        counts.flush()
        write_json(meta_path, {"inputs": meta, "complete": False})
    boxes = np.load(files["boxes"], mmap_mode="r+")
    logits = np.load(files["objectness"], mmap_mode="r+")
    counts = np.load(files["counts"], mmap_mode="r+")
    todo = np.flatnonzero(counts < 0)
    log.info("proposal cache %s: %d of %d images to propose on", root, len(todo), n)
    loader = CaptionDataset(source, min_sizes=[max(cfg.min_sizes)], max_size=cfg.max_size)
    rpn = rpn.eval().to(device)
    with torch.no_grad():
        for done, i in enumerate(todo, start=1):
            item, reason = loader.load(int(i), max(cfg.min_sizes))
            if item is None:
                log.warning("proposal cache: %s", reason)
                counts[i] = 0
            else:
                out = rpn([item["image"].to(device)])
                b = B.unscale_boxes(out.boxes[0][:k], *item["scale"]).float().numpy()
                boxes[i, : len(b)] = b
                logits[i, : len(b)] = out.objectness[0][:k].float().cpu().numpy()
                counts[i] = len(b)
            if done % 256 == 0 or done == len(todo):
                boxes.flush()
                logits.flush()
                counts.flush()  # last: a count marks its boxes as written
            if progress is not None:
                progress(done, len(todo))
    write_json(meta_path, {"inputs": meta, "complete": True})
