"""Training the RPN on base-category boxes: detectron2's solver (SGD, linear warm-up, step decay), resumable.

The original trains its RPNs as part of a Mask R-CNN on base categories only (regionclip_facts.md §1.2): R50-C4 on
COCO's 48 base classes, R50-FPN on LVIS's 866 common + frequent ones. Here the RPN trains alone: the losses are the
RPN's (:meth:`rclip_core.rpn.model.LogitRPN.compute_loss`), the schedule and optimizer are the same.

Checkpoints (``rclip_core.checkpoint.save_checkpoint``) hold the model, optimizer, scheduler, step, torch's random
state (the anchor sampler draws from it) and the loss history, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from rclip_core.checkpoint import check_state_dict, save_checkpoint
from rclip_core.data.coco import collate_list
from rclip_core.errors import RclipError
from rclip_core.recipes import RpnTrainCfg
from rclip_core.rpn.data import RpnTrainDataset, StepBatches
from rclip_core.rpn.model import RPNModel, freeze_stages

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict[str, float]], None]


def lr_factor(cfg: RpnTrainCfg) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` after ``step`` optimizer steps: linear warm-up from ``warmup_factor``, then
    ``lr_gamma`` at each of ``lr_steps`` (detectron2's WarmupMultiStepLR)."""
    milestones = sorted(cfg.lr_steps)

    def f(step: int) -> float:
        warm = 1.0
        if step < cfg.warmup_steps:
            alpha = step / cfg.warmup_steps
            warm = cfg.warmup_factor * (1 - alpha) + alpha
        return warm * cfg.lr_gamma ** bisect.bisect_right(milestones, step)

    return f


def _read_resume(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RclipError(f"checkpoint to resume from not found: {path}") from None
    except Exception as e:
        raise RclipError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    needed = ("model", "optimizer", "scheduler", "step")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise RclipError(f"{path}: not a resumable RPN training checkpoint (needs {', '.join(needed)})")
    return ckpt


def train_rpn(model: RPNModel, dataset: RpnTrainDataset, cfg: RpnTrainCfg, *, recipe: dict | None = None,
              device: str | torch.device = "cpu", progress: ProgressFn | None = None,
              checkpoint_path: str | os.PathLike | None = None,
              resume_from: str | os.PathLike | None = None) -> dict:
    """Train ``model`` in place on ``dataset`` for ``cfg.steps`` steps; return it to eval mode.

    Args:
        model: an :class:`RPNModel`; stages up to ``cfg.freeze_at`` are frozen.
        dataset: base-category images and boxes.
        cfg: solver, schedule, augmentation, seed.
        recipe: the resolved recipe dict, stored in checkpoints (so ``rclip rpn propose`` can rebuild the model).
        device: where to train.
        progress: ``progress(step, total, {"loss": ..., "loss_rpn_cls": ..., "loss_rpn_box": ..., "lr": ...})``
            after every step (``step`` counts from 1).
        checkpoint_path: written every ``cfg.checkpoint_every`` steps and at the end.
        resume_from: a checkpoint written here; training continues at its step with its optimizer, scheduler and
            random state, over the same batches.

    Returns:
        History: ``{"step": [...], "loss": [...], "loss_rpn_cls": [...], "loss_rpn_box": [...], "lr": [...],
        "start_step": int, "seconds": float}``.

    Raises:
        RclipError: the loss becomes non-finite (training diverged), or an unusable resume checkpoint.
    """
    freeze_stages(model, cfg.freeze_at)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    history: dict = {"step": [], "loss": [], "loss_rpn_cls": [], "loss_rpn_box": [], "lr": []}
    start_step = 0
    if resume_from is not None:
        ckpt = _read_resume(resume_from)
        check_state_dict(model, ckpt["model"], str(resume_from))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step = int(ckpt["step"])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"])
        history = {k: list(v) for k, v in (ckpt.get("history") or history).items() if isinstance(v, list)}
        log.info("resuming RPN training at step %d of %d from %s", start_step, cfg.steps, resume_from)
    history["start_step"] = start_step

    batches = StepBatches(len(dataset), batch_size=cfg.batch_size, steps=cfg.steps, min_sizes=cfg.min_sizes,
                          hflip=cfg.hflip, seed=cfg.seed, start_step=start_step)
    # A private generator: the loader must not draw from torch's global state, which resuming restores exactly.
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_list, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))

    def save(step: int) -> None:
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, model, recipe=recipe, step=step, force=True,
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            rng=torch.get_rng_state(), history=history)

    model.train()
    start = time.perf_counter()
    step = start_step
    for step, batch in enumerate(loader, start=start_step + 1):
        images = [item["image"].to(device) for item in batch]
        targets = [{"boxes": item["boxes"].to(device)} for item in batch]
        lr = optimizer.param_groups[0]["lr"]
        try:
            losses = model(images, targets)
        except FloatingPointError as e:
            raise RclipError(f"step {step}: {e}; lower rpn.train.lr or lengthen rpn.train.warmup_steps") from None
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise RclipError(f"step {step}: the loss is {loss.item()}: training diverged; lower rpn.train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        values = {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}, "lr": lr}
        history["step"].append(step)
        for key in ("loss", "loss_rpn_cls", "loss_rpn_box", "lr"):
            history[key].append(values[key])
        if progress is not None:
            progress(step, cfg.steps, values)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save(step)
    history["seconds"] = time.perf_counter() - start
    save(max(step, start_step))
    model.eval()
    return history
