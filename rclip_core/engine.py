"""Training loop for image-text contrastive learning, and GT-box region accuracy.

Shapes: B images, R regions, K classes, D embedding dim.

:func:`train_image_text` is RegionCLIP's image-level loss (§3.3, ``loss_img_txt_level``) on its own: the whole image
goes through the *region* path (full-image box → RoIAlign → res5 → attention pool), as the original's "global"
proposal does, so that what is learned from captions is what region classification uses at test time. Unlike the
original, which starts from OpenAI CLIP with a frozen text tower, the demo trains both towers from random weights.

The loop is deliberately plain (nanoGPT-style): a seeded, resumable batch order, AdamW with linear warm-up and cosine
decay, gradient clipping, and an optional checkpoint holding the step, optimizer and scheduler.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rclip_core.checkpoint import save_checkpoint
from rclip_core.clip_backbone import CLIPRegionEncoder
from rclip_core.data.captions import CaptionDataset, load_image, normalize_image
from rclip_core.errors import RclipError
from rclip_core.io import read_json
from rclip_core.losses import image_text_contrastive
from rclip_core.recipes import CLIP_MEAN, CLIP_STD, TrainCfg, recipe_to_dict

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]

# Prompt for region accuracy; the same single template ``rclip embed`` uses by default.
PROMPT = "a photo of a {}."


def _tokenizer() -> Callable[[list[str]], Tensor]:
    import open_clip

    # Every CLIP ResNet, the tiny one included, uses OpenAI's BPE vocabulary; "RN50" selects it without a download.
    return open_clip.get_tokenizer("RN50")


def _param_groups(clip: nn.Module, cfg: TrainCfg) -> list[dict]:
    """AdamW groups: image tower at ``cfg.lr``, text tower (and logit scale) at ``cfg.lr * cfg.text_lr_scale``.

    Only matrices and conv kernels are decayed; biases, norms, embeddings and the logit scale are not (CLIP).
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in clip.named_parameters():
        if not p.requires_grad:
            continue
        visual = name.startswith("visual.")
        decay = p.ndim >= 2 and "embedding" not in name and "logit_scale" not in name
        groups.setdefault((visual, decay), []).append(p)
    return [{"params": ps, "lr": cfg.lr * (1.0 if visual else cfg.text_lr_scale),
             "weight_decay": cfg.weight_decay if decay else 0.0} for (visual, decay), ps in groups.items()]


def _lr_lambda(cfg: TrainCfg) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``cfg.min_lr_ratio`` at ``cfg.steps``."""
    warmup = max(0, min(cfg.warmup_steps, cfg.steps - 1))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _batch_indices(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(epoch, indices)`` for steps ``start_step, start_step + 1, ...`` forever.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)`` with the last incomplete batch dropped, so the
    batch of any step can be recomputed; that is what makes resuming exact.
    """
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
        for b in range(offset, per_epoch):
            yield epoch, order[b * batch_size:(b + 1) * batch_size]
            step += 1


def reset_residual_scales(clip: nn.Module) -> int:
    """Set the last norm scale of every residual block of a ``ModifiedResNet`` (``bn3.weight``) to 1.

    open_clip initialises them to zero so each block starts as the identity, which suits long runs; in a run of a few
    hundred steps from random weights the residual branches then stay nearly silent (their gradients are scaled by
    the zero), and the trunk learns shapes several times slower. Returns how many scales were reset.
    """
    n = 0
    with torch.no_grad():
        # Only the bottlenecks of layer1..4: the stem also has a ``bn3``, which is not a residual scale.
        for layer in (clip.visual.layer1, clip.visual.layer2, clip.visual.layer3, clip.visual.layer4):
            for name, p in layer.named_parameters():
                if name.endswith("bn3.weight"):
                    p.fill_(1.0)
                    n += 1
    return n


def random_global_boxes(n: int, height: int, width: int, min_scale: float, generator: torch.Generator) -> Tensor:
    """(n, 4) ``xyxy`` random boxes inside a ``height`` × ``width`` image, each side a uniform fraction in
    ``[min_scale, 1]`` of the image side (aspect ratio kept) at a uniform position; ``min_scale`` 1 gives the full box.
    """
    frac = min_scale + (1 - min_scale) * torch.rand(n, generator=generator)  # (n,)
    bw, bh = frac * width, frac * height
    x0 = torch.rand(n, generator=generator) * (width - bw)
    y0 = torch.rand(n, generator=generator) * (height - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)  # (n, 4)


def _same_caption(captions: list[str]) -> Tensor:
    """(B, B) bool: caption ``i`` and caption ``j`` are the same text."""
    ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    codes = torch.tensor([ids[c] for c in captions])
    return codes[:, None] == codes[None, :]


def _temperature(clip: nn.Module, cfg: TrainCfg) -> Tensor | float:
    if cfg.learn_temperature:
        # open_clip keeps log(1 / temperature); clamp at 100 (temperature 0.01) as CLIP does.
        return 1.0 / clip.logit_scale.clamp(max=math.log(100)).exp()
    return cfg.temperature


def train_image_text(clip: nn.Module, encoder: CLIPRegionEncoder, dataset: CaptionDataset, cfg: TrainCfg, *,
                     device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                     checkpoint_path: str | os.PathLike | None = None,
                     resume_from: str | os.PathLike | None = None) -> dict:
    """Train ``clip`` (both towers) with the image-text contrastive loss on ``dataset``.

    Args:
        clip: an open_clip ``CLIP``; trained in place and returned to eval mode.
        encoder: region encoder over ``clip.visual``; images are encoded with :meth:`CLIPRegionEncoder.encode_image`.
        dataset: caption pairs returning caption strings (tokenised here with open_clip's tokenizer).
        cfg: steps, batch size, optimizer, schedule, temperature, seed.
        device: where to train.
        progress: called as ``progress(step, total, loss)`` after every step (``step`` counts from 1).
        checkpoint_path: when given, a checkpoint (model, optimizer, scheduler, step, recipe) is written there every
            ``cfg.checkpoint_every`` steps and at the end.
        resume_from: a checkpoint written by this function; training continues at its step, with its optimizer and
            scheduler state and the same batch order.

    Returns:
        History: ``{"step": [int], "loss": [float], "lr": [float], "start_step": int, "seconds": float}``.
    """
    if encoder.visual is not clip.visual:
        raise ValueError("encoder must wrap clip.visual (build it with build_region_encoder(clip, ...))")
    if cfg.batch_size < 2:
        raise RclipError(f"train.batch_size must be at least 2 for a contrastive loss, got {cfg.batch_size}")
    if len(dataset) < cfg.batch_size:
        raise RclipError(f"training set has {len(dataset)} images, fewer than train.batch_size={cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    tokenize = _tokenizer()
    clip.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(clip, cfg), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    start_step = 0
    if resume_from is not None:
        start_step = _resume(resume_from, clip, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, start_step)
    if start_step == 0:
        if cfg.scratch_init:
            reset_residual_scales(clip)
        if cfg.learn_temperature:
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(1.0 / cfg.temperature))
    clip.logit_scale.requires_grad_(cfg.learn_temperature)

    history: dict = {"step": [], "loss": [], "lr": [], "start_step": start_step}
    t0 = time.perf_counter()
    batches = _batch_indices(len(dataset), cfg.batch_size, cfg.seed, start_step)
    lr_at = _lr_lambda(cfg)
    for step in range(start_step, cfg.steps):
        epoch, idx = next(batches)
        dataset.set_epoch(epoch)
        items = [dataset[int(i)] for i in idx]
        images = torch.stack([im for im, _ in items]).to(device)  # (B, 3, S, S)
        captions = [str(c) for _, c in items]
        tokens = tokenize(captions).to(device)  # (B, L)

        if cfg.box_min_scale < 1:
            # Seeded per step, like the batch order, so a resumed run draws the same boxes.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            boxes = random_global_boxes(len(idx), images.shape[2], images.shape[3], cfg.box_min_scale,
                                        gen).to(device)  # (B, 4)
            image_emb = encoder(images, list(boxes.unsqueeze(1)))
        else:
            image_emb = encoder.encode_image(images)  # (B, D)
        positives = _same_caption(captions).to(device) if cfg.same_caption_positive else None
        loss = image_text_contrastive(image_emb, clip.encode_text(tokens), _temperature(clip, cfg),
                                      positives=positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(clip.parameters(), cfg.grad_clip)
        history["lr"].append(cfg.lr * lr_at(step))
        optimizer.step()
        scheduler.step()

        value = float(loss.detach())
        history["step"].append(step + 1)
        history["loss"].append(value)
        if progress is not None:
            progress(step + 1, cfg.steps, value)
        due = step + 1 == cfg.steps or (cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0)
        if checkpoint_path is not None and due:
            save_checkpoint(checkpoint_path, clip, recipe={"train": recipe_to_dict(cfg)}, step=step + 1,
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    history["seconds"] = time.perf_counter() - t0
    clip.eval()
    if history["loss"]:
        log.info("image-text training: steps %d..%d, loss %.3f → %.3f in %.1f s", start_step + 1, cfg.steps,
                 history["loss"][0], history["loss"][-1], history["seconds"])
    return history


def _resume(path: str | os.PathLike, clip: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load model, optimizer and scheduler state from a training checkpoint; return its step."""
    from rclip_core.checkpoint import check_state_dict

    p = Path(path)
    if not p.is_file():
        raise RclipError(f"checkpoint to resume from not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise RclipError(f"{p}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "step" not in ckpt:
        raise RclipError(f"{p}: not a training checkpoint (needs model, optimizer and step)")
    check_state_dict(clip, ckpt["model"], str(p))
    clip.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler"])
    return int(ckpt["step"])


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def encode_prompts(clip: nn.Module, class_names: Sequence[str], *, template: str = PROMPT,
                   device: str | torch.device = "cpu") -> Tensor:
    """(K, D) L2-normalised text embeddings of ``template.format(name)`` for each class name."""
    tokens = _tokenizer()([template.format(n) for n in class_names]).to(device)
    return F.normalize(clip.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def region_accuracy(clip: nn.Module, encoder: CLIPRegionEncoder, instances_json: str | os.PathLike,
                    images_dir: str | os.PathLike, class_names: Sequence[str] | None = None, *,
                    image_size: int | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 32) -> dict:
    """Zero-shot classification accuracy of GT boxes: cosine argmax of region vs prompt embeddings.

    Each GT box of ``instances_json`` is embedded with ``encoder(images, boxes_per_image)`` (images CLIP-normalised,
    resized to ``image_size`` with boxes scaled alike), each class name as ``"a photo of a {name}."`` with
    ``clip.encode_text``, and the predicted class is the most similar prompt among ``class_names``.

    Args:
        clip, encoder: the model (put in eval mode here).
        instances_json: COCO instances; categories may carry ``"split": "base"|"novel"``.
        images_dir: folder of the images.
        class_names: candidate names, in any order; default all categories of the file. Boxes whose category is not
            among them are skipped.
        image_size: square side to resize images to; None keeps the stored size.
        device: where to run.
        batch_size: images per forward pass.

    Returns:
        ``{"accuracy": float, "num_boxes": int, "chance": 1/K, "per_split": {split: {"accuracy", "num_boxes"}},
        "per_class": {name: {"accuracy", "num_boxes"}}}`` (a split or class appears when it has boxes).
    """
    data = read_json(instances_json, what="instances file")
    cats = {int(c["id"]): c for c in data.get("categories", [])}
    names = list(class_names) if class_names is not None else [c["name"] for c in cats.values()]
    if not names:
        raise RclipError(f"{instances_json}: no categories to classify")
    name_to_k = {n: k for k, n in enumerate(names)}
    boxes_by_image: dict[int, list[tuple[list[float], int, str]]] = {}
    for a in data["annotations"]:
        cat = cats.get(int(a["category_id"]))
        if cat is None or cat["name"] not in name_to_k:
            continue
        boxes_by_image.setdefault(int(a["image_id"]), []).append(
            (a["bbox"], name_to_k[cat["name"]], cat.get("split", "all")))
    images = [im for im in data["images"] if int(im["id"]) in boxes_by_image]

    clip.to(device).eval()
    text = encode_prompts(clip, names, device=device)  # (K, D)
    gt, pred, splits = [], [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        batch, boxes_per_image = [], []
        for im in chunk:
            pixels = load_image(Path(images_dir) / im["file_name"], image_size)  # (3, S, S)
            sx = pixels.shape[2] / float(im.get("width", pixels.shape[2]))
            sy = pixels.shape[1] / float(im.get("height", pixels.shape[1]))
            batch.append(normalize_image(pixels, CLIP_MEAN, CLIP_STD))
            entries = boxes_by_image[int(im["id"])]
            xywh = torch.tensor([e[0] for e in entries], dtype=torch.float32)  # (R_i, 4)
            boxes_per_image.append(torch.stack([xywh[:, 0] * sx, xywh[:, 1] * sy, (xywh[:, 0] + xywh[:, 2]) * sx,
                                                (xywh[:, 1] + xywh[:, 3]) * sy], dim=1))  # (R_i, 4) xyxy
            gt += [e[1] for e in entries]
            splits += [e[2] for e in entries]
        regions = F.normalize(encoder(torch.stack(batch).to(device), boxes_per_image).float(), dim=-1)  # (R, D)
        pred += (regions @ text.t()).argmax(dim=1).tolist()

    def summary(mask: list[bool]) -> dict:
        n = sum(mask)
        hits = sum(1 for m, g, p in zip(mask, gt, pred, strict=True) if m and g == p)
        return {"accuracy": hits / n if n else float("nan"), "num_boxes": n}

    result = summary([True] * len(gt))
    result["chance"] = 1.0 / len(names)
    result["per_split"] = {s: summary([x == s for x in splits]) for s in sorted(set(splits))}
    result["per_class"] = {n: summary([g == k for g in gt]) for k, n in enumerate(names) if k in set(gt)}
    return result
