"""The one training loop every stage uses (RPN training, image-text and region-text pretraining, finetuning).

A stage supplies a model, a pure ``compute_losses(model, batch) -> {"loss_*": Tensor}`` and a dataset indexed by
``(index, sample_seed)``; :func:`train` owns everything else:

- the optimizer (SGD with momentum or AdamW, over the stage's parameter groups) and one schedule (linear warm-up,
  then multi-step or cosine; :func:`lr_factor`), gradient-norm clipping, AMP on CUDA (bf16 also on capable CPUs);
- :class:`StepSampler`, a step-indexed, resumable, rank-sharded batch sampler feeding a real ``DataLoader`` with
  workers: the global batch of every step and each sample's augmentation seed follow from ``(seed, step)`` alone;
- randomness that never touches the caller's: the loop runs under ``torch.random.fork_rng`` with a per-rank seed,
  and each rank's random state is saved in checkpoints (torchvision's samplers draw from it);
- ``OUT/checkpoint.pt`` every ``checkpoint_every`` steps, at the end and on Ctrl-C (SIGINT stops after the step in
  progress), written atomically by rank 0 with the model, optimizer, scheduler, random states and the full resolved
  recipe; ``resume`` continues bit for bit on the CPU (tested); ``OUT/metrics.jsonl`` gets one line per step;
- a divergence check (a non-finite loss stops with an error naming the step and the loss);
- hooks (progress bars, evaluation) called on rank 0 after every step.

Under ``torchrun`` (``rclip_core.distributed``) the model is wrapped in DDP, trained batch norms share the global
batch's statistics, and rank 0 alone writes.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from rclip_core import distributed as D
from rclip_core.checkpoint import load_checkpoint, save_checkpoint
from rclip_core.data.coco import collate_list
from rclip_core.errors import RclipError
from rclip_core.recipes import SolverCfg, save_recipe
from rclip_core.run_dir import CHECKPOINT_NAME, METRICS_NAME, RECIPE_NAME

log = logging.getLogger(__name__)


ComputeLosses = Callable[[nn.Module, list], dict[str, Tensor]]
# Entries of compute_losses' dict named ``count_*`` are not losses: they are summed over ranks and logged per step
# (e.g. ``count_images_skipped``), never added to the loss.
COUNT_PREFIX = "count_"


# ---------------------------------------------------------------------------------------------------------------
# schedule and sampling


def lr_factor(cfg: SolverCfg) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` after ``step`` optimizer steps: linear warm-up from ``warmup_factor`` to 1 over
    ``warmup_steps``, times ``lr_gamma`` per passed ``lr_steps`` milestone (``multistep``, detectron2's
    WarmupMultiStepLR) or a cosine from 1 to ``min_lr_ratio`` at ``steps`` (``cosine``)."""
    milestones = sorted(cfg.lr_steps)

    def f(step: int) -> float:
        warm = 1.0
        if step < cfg.warmup_steps:
            alpha = step / cfg.warmup_steps
            warm = cfg.warmup_factor * (1 - alpha) + alpha
        if cfg.schedule == "cosine":
            progress = min(1.0, step / max(1, cfg.steps))
            decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = cfg.lr_gamma ** bisect.bisect_right(milestones, step)
        return warm * decay

    return f


def sample_seed(seed: int, step: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` in the global batch of ``step``: the same however many
    processes share the batch, and however often the step is replayed."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepSampler:
    """Batch sampler: for steps ``start_step + 1 .. steps``, this rank's share of the global batch, as
    ``(index, sample_seed)`` keys.

    Each epoch is a permutation seeded by ``(seed, epoch)`` with the last incomplete batch dropped (with fewer items
    than a batch, the permutation repeats to fill one). Rank r of N takes the r-th of N equal slices of every global
    batch, so N processes see exactly the batches one process would.
    """

    def __init__(self, num_items: int, *, global_batch: int, steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_items < 1:
            raise RclipError("the training set is empty")
        if global_batch < world_size or global_batch % world_size:
            raise RclipError(f"batch_size {global_batch} must be a multiple of the number of processes "
                             f"({world_size})")
        self.n, self.batch, self.steps, self.seed = num_items, global_batch, steps, seed
        self.start_step, self.rank, self.world = start_step, rank, world_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of the whole batch of ``step`` (1-based)."""
        per_epoch = max(1, self.n // self.batch)
        epoch, offset = divmod(step - 1, per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        order = order.repeat(-(-self.batch // self.n))
        return order[offset * self.batch:(offset + 1) * self.batch].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.batch // self.world
        for step in range(self.start_step + 1, self.steps + 1):
            idx = self.global_batch(step)
            first = self.rank * local
            yield [(idx[p], sample_seed(self.seed, step, p)) for p in range(first, first + local)]


def default_num_workers(requested: int | None) -> int:
    """``requested``, or the training loader's default (:func:`rclip_core.runtime.num_workers` with
    ``training=True``, the one home of this rule)."""
    from rclip_core.runtime import num_workers

    return num_workers(requested, training=True)


# ---------------------------------------------------------------------------------------------------------------
# hooks and results


@dataclass
class StepInfo:
    """What hooks see after each step (losses averaged over ranks)."""

    step: int
    total: int
    start_step: int
    losses: dict[str, float]
    lr: float
    seconds: float  # since this run (or resumption) started

    @property
    def eta_seconds(self) -> float | None:
        done = self.step - self.start_step
        return self.seconds / done * (self.total - self.step) if done > 0 else None


class Hook(Protocol):
    def after_step(self, info: StepInfo) -> None: ...


@dataclass
class TrainResult:
    start_step: int
    step: int
    total: int
    history: list[dict] = field(default_factory=list)  # this run's metrics lines
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.step >= self.total


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the checkpoint of the last finished step was written."""

    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted after step {step}" + (f"; checkpoint {path}" if path else ""))
        self.step, self.path = step, path


# ---------------------------------------------------------------------------------------------------------------
# the loop


def build_optimizer(groups: Sequence[dict], cfg: SolverCfg) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over parameter groups ``{"params", "lr_scale"?, "weight_decay"?}``."""
    param_groups = [{"params": [p for p in g["params"] if p.requires_grad],
                     "lr": cfg.lr * float(g.get("lr_scale", 1.0)),
                     "weight_decay": float(g.get("weight_decay", cfg.weight_decay))} for g in groups]
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups:
        raise RclipError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if len(cfg.betas) != 2:
        raise RclipError(f"betas must be two numbers, got {cfg.betas}")
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def check_solver(cfg: SolverCfg, section: str) -> None:
    """Reject values the loop cannot run with, naming the recipe key and the valid range."""
    problems = []
    if cfg.steps < 1:
        problems.append(f"{section}.steps must be at least 1, got {cfg.steps}")
    if cfg.batch_size < 1:
        problems.append(f"{section}.batch_size must be at least 1, got {cfg.batch_size}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        problems.append(f"{section}.lr must be a positive number, got {cfg.lr}")
    if cfg.warmup_steps < 0 or not 0 < cfg.warmup_factor <= 1:
        problems.append(f"{section}.warmup_steps must be >= 0 and warmup_factor in (0, 1]")
    if cfg.grad_clip < 0 or cfg.weight_decay < 0 or cfg.checkpoint_every < 0:
        problems.append(f"{section}.grad_clip, weight_decay and checkpoint_every must be >= 0")
    if problems:
        raise RclipError("; ".join(problems))


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    if amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device | str, *, what: str = "training") -> str:
    """The AMP mode that applies on ``device``: fp16 needs CUDA, bf16 on the CPU needs native support; one
    WARNING line says which fallback happened and why."""
    device = torch.device(device)
    if amp == "fp16" and device.type != "cuda":
        log.warning("amp fp16 needs a CUDA device: %s in fp32 on %s", what, device)
        return "off"
    if amp == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        log.warning("amp bf16: this CPU has no native bfloat16 (AVX512-BF16 / AMX): %s in fp32", what)
        return "off"
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("amp bf16: this GPU has no bfloat16 support: %s in fp32 on %s", what, device)
        return "off"
    return amp


class _StopFlag:
    """SIGINT → finish the step in progress, write the checkpoint, stop. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step (again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep the lines of steps up to ``step`` (a resumed run rewrites the rest); return them."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                kept.append(rec)
    from rclip_core.io import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def train(model: nn.Module, compute_losses: ComputeLosses, dataset: Dataset, cfg: SolverCfg, *,
          out_dir: str | os.PathLike | None, recipe: dict, resume: bool = False, section: str = "train",
          device: str | torch.device = "cpu", param_groups: Sequence[dict] | None = None,
          checkpoint_module: nn.Module | None = None, checkpoint_extra: dict | None = None,
          hooks: Sequence[Hook] = (), collate_fn: Callable = collate_list) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps.

    Args:
        model: the stage's model; ``compute_losses`` calls it (through DDP under torchrun).
        compute_losses: ``(model, batch) -> {"loss_name": 0-dim tensor}``; the engine sums them. A pure function of
            the model's outputs and the batch (a list of dataset items). ``count_*`` entries are logged, not summed.
        dataset: indexed by ``(index, sample_seed)`` keys (:class:`StepSampler`).
        cfg: the solver (any :class:`rclip_core.recipes.SolverCfg`).
        out_dir: where ``checkpoint.pt``, ``metrics.jsonl`` and ``recipe.yaml`` go (None: nothing is written).
        recipe: the full resolved recipe, stored in every checkpoint.
        resume: continue ``out_dir/checkpoint.pt`` (model, optimizer, scheduler, random states, step).
        section: the recipe section of ``cfg``, for messages (``rpn.train``, ``pretrain``).
        device: where to train.
        param_groups: ``[{"params": [...], "lr_scale"?: float, "weight_decay"?: float}]``; default: every
            trainable parameter of ``model`` in one group.
        checkpoint_module: the module whose state dict is the checkpoint's ``model`` (default ``model``), e.g. the
            student CLIP without the frozen teacher, so the checkpoint is an ordinary CLIP checkpoint.
        checkpoint_extra: more top-level entries for checkpoints (e.g. a text-tower fingerprint).
        hooks: objects with ``after_step(StepInfo)``, called on rank 0.
        collate_fn: batch assembly (default: a list of items).

    Returns:
        :class:`TrainResult` (steps done, this run's metrics, seconds).

    Raises:
        RclipError: a non-finite loss (naming the step and loss), an unusable checkpoint on resume.
        Interrupted: Ctrl-C; the checkpoint of the last finished step was written.
    """
    check_solver(cfg, section)
    dev = torch.device(device)
    info = D.get_info()
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    metrics_path = out / METRICS_NAME if out is not None else None
    save_module = checkpoint_module if checkpoint_module is not None else model
    amp = resolve_amp(cfg.amp, dev)
    from rclip_core.runtime import configure_threads

    configure_threads()  # torch's pool no larger than the cores this process may use

    model.to(dev)
    D.sync_batch_norm(model, dev)
    groups = list(param_groups) if param_groups is not None else [{"params": list(model.parameters())}]
    optimizer = build_optimizer(groups, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    start_step, rng_states = 0, None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise RclipError(f"nothing to resume: {ckpt_path} does not exist")
        ckpt = load_checkpoint(ckpt_path, module=save_module, training=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        states = ckpt.get("rng") or []
        rng_states = states[info.rank] if len(states) == info.world_size else None
        if states and rng_states is None:
            log.warning("%s was written by %d processes, this run has %d: random states start afresh",
                        ckpt_path, len(states), info.world_size)
        log.info("resuming at step %d of %d from %s", start_step, cfg.steps, ckpt_path)
    history = _truncate_metrics(metrics_path, start_step) if (metrics_path and info.is_main and resume) else []
    if metrics_path is not None and info.is_main and not resume and metrics_path.exists():
        metrics_path.unlink()  # a fresh run (the caller checked --force)
    this_run: list[dict] = []

    ddp_model = D.wrap_ddp(model, dev)
    sampler = StepSampler(len(dataset), global_batch=cfg.batch_size, steps=cfg.steps, seed=cfg.seed,
                          start_step=start_step, rank=info.rank, world_size=info.world_size)
    workers = default_num_workers(cfg.num_workers)
    # Its own generator: creating the loader's iterator must not draw from the global state a resume restores.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                        persistent_workers=False, multiprocessing_context="fork" if workers else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def save(step: int) -> None:
        states = D.gather_objects(_rng_state(dev))  # every rank takes part
        if ckpt_path is None or not info.is_main:
            return
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": states,
                 "finished": step >= cfg.steps, **({"scaler": scaler.state_dict()} if amp == "fp16" else {}),
                 **(checkpoint_extra or {})}
        save_checkpoint(ckpt_path, save_module, recipe=recipe, step=step, **extra)

    step = start_step
    start = time.perf_counter()
    if out is not None and info.is_main:  # the run's files appear once training starts, not before
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / RECIPE_NAME)
    # Appended line by line (flushed), so a crash keeps every finished step's record.
    metrics_file = open(metrics_path, "a", encoding="utf-8") if (metrics_path and info.is_main) else None  # noqa: SIM115
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), _StopFlag() as stop:
            torch.manual_seed(cfg.seed * 1009 + info.rank)  # per rank; the caller's random state is restored after
            if rng_states is not None:
                _set_rng_state(rng_states, dev)
            ddp_model.train()
            for step, batch in enumerate(loader, start=start_step + 1):
                lr = optimizer.param_groups[0]["lr"] / float(groups[0].get("lr_scale", 1.0))
                try:
                    with _autocast(dev, amp):
                        outputs = compute_losses(ddp_model, batch)
                except FloatingPointError as e:  # e.g. an RPN predicting non-finite boxes
                    raise RclipError(f"step {step}: {e}; training diverged; lower {section}.lr or lengthen "
                                     f"{section}.warmup_steps") from None
                losses = {k: v for k, v in outputs.items() if not k.startswith(COUNT_PREFIX)}
                counts = {k: torch.as_tensor(v, dtype=torch.float32).detach().cpu() for k, v in outputs.items()
                          if k.startswith(COUNT_PREFIX)}
                if not losses:
                    raise ValueError("compute_losses returned no loss")
                total = sum(losses.values())
                # A small all-reduce: the losses for the log, the counts and a non-finite flag, so every rank stops
                # together.
                values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach().float()])
                flag = torch.tensor([float(not torch.isfinite(values).all())])
                reduced = D.all_reduce_sum(torch.cat([values.cpu(), torch.stack(list(counts.values()) or
                                                                                [torch.zeros(())]).reshape(-1),
                                                      flag]))
                n = len(losses) + 1
                mean = (reduced[:n] / info.world_size).tolist()
                counted = dict(zip(counts, reduced[n:n + len(counts)].tolist()))
                if reduced[-1] > 0:
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, mean))
                    raise RclipError(f"step {step}: the loss is not finite ({shown}): training diverged; lower "
                                     f"{section}.lr or lengthen {section}.warmup_steps")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                record = {"step": step, "lr": lr, "loss": mean[-1], **dict(zip(losses, mean[:-1])),
                          **{k: int(v) for k, v in counted.items()}, "seconds": round(time.perf_counter() - start, 3)}
                this_run.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if info.is_main:
                    info_step = StepInfo(step=step, total=cfg.steps, start_step=start_step,
                                         losses={k: v for k, v in record.items() if k.startswith("loss")}, lr=lr,
                                         seconds=record["seconds"])
                    for hook in hooks:
                        hook.after_step(info_step)
                # Ctrl-C seen by any rank during this step: all save it and stop.
                interrupted = bool(D.all_reduce_sum(torch.tensor([float(stop.requested)]))[0] > 0)
                if step == cfg.steps or interrupted or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    save(step)
                if interrupted:
                    raise Interrupted(step, ckpt_path)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    model.eval()
    return TrainResult(start_step=start_step, step=step, total=cfg.steps, history=history + this_run,
                       seconds=time.perf_counter() - start)
