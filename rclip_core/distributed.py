"""Data-parallel training on torch's own launcher (``torchrun``): set-up, rank-0 I/O, gathers for contrastive losses.

``torchrun --nproc_per_node N -m rclip_cli.main pretrain RECIPE ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`init_distributed` joins them (gloo on CPU, nccl on CUDA). Multi-node
runs use torchrun's rendezvous flags (``--nnodes``, ``--rdzv-endpoint``). Rank 0 alone logs and writes files; every
rank computes. Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op.

:func:`all_gather` carries gradients back to every rank's own tensor, as the original's ``gather_tensors`` does (it
uses ``diffdist``'s differentiable all-gather, detectron2/utils/comm.py), so an N-process run with the same global
batch computes the same loss and the same gradients as one process; ``grad="local"`` keeps only the local gradient.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun job when there is one (idempotent); return this process's :class:`DistInfo`.

    Args:
        device: the device the command runs on; CUDA selects nccl and this rank's GPU (``LOCAL_RANK``), else gloo.
    """
    if env_world_size() <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = (device or "").startswith("cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        log.debug("joined process group: rank %d of %d", dist.get_rank(), dist.get_world_size())
    return get_info()


def get_info() -> DistInfo:
    """The current :class:`DistInfo` (rank 0 of 1 outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    """True on rank 0 (and outside a process group): the process that logs and writes."""
    return get_info().is_main


def barrier() -> None:
    if get_info().enabled:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (e.g. an error found by rank 0 alone)."""
    if not get_info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one outside a process group)."""
    info = get_info()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor; no gradient)."""
    t = t.detach().clone()
    if get_info().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends each rank the summed gradient of its own slice (what diffdist does). Written
    here because torch.distributed.nn's version needs reduce_scatter, which gloo (the CPU backend) lacks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather(x: Tensor, *, grad: Literal["all", "local"] = "all") -> Tensor:
    """Concatenate every rank's (N, ...) ``x`` along dim 0, in rank order (N must be the same on every rank).

    ``grad="all"``: the gradient of the gathered tensor reaches every rank's own ``x``, summed over ranks (the
    original's behaviour; with every rank computing the same global loss and DDP averaging, the gradients equal a
    one-process run on the whole batch). ``grad="local"``: other ranks' rows are constants; only this rank's rows
    keep their gradient.
    """
    info = get_info()
    if not info.enabled:
        return x
    if grad == "all":
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts, dim=0)


class _SyncBatchNormCPU(nn.BatchNorm2d):
    """Batch norm with statistics over the whole global batch, for gloo (CPU) jobs: torch's ``SyncBatchNorm``
    runs only on GPUs. Same parameters and buffers as ``BatchNorm2d``, so state dicts are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and get_info().enabled):
            return super().forward(x)
        n = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), n])  # (2C + 1,)
        stats = _AllReduceWithGrad.apply(stats)
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = stats[c:2 * c] / count - mean * mean  # biased, as batch norm normalises with
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * count / max(float(count) - 1, 1.0))
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def sync_batch_norm(model: nn.Module, device: str | torch.device) -> int:
    """Make every ``BatchNorm2d`` in training mode use statistics of the global batch (so N processes train like one):
    torch's ``SyncBatchNorm`` on CUDA, :class:`_SyncBatchNormCPU` (same parameters, in place) on CPU. Returns how
    many layers changed. Call before the optimizer is built."""
    if not get_info().enabled:
        return 0
    if str(device).startswith("cuda"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place (model is not a BN itself)
        return sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    changed = 0
    for m in model.modules():
        # Every batch norm, trained or not: one in training mode normalises by the batch even when frozen.
        if type(m) is nn.BatchNorm2d:
            m.__class__ = _SyncBatchNormCPU  # same attributes; only forward differs
            changed += 1
    return changed


def wrap_ddp(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` in a process group (``find_unused_parameters`` so stages may leave a head
    unused in a step), else ``model`` itself."""
    if not get_info().enabled:
        return model
    ids = [torch.device(device).index or 0] if str(device).startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper, so no ``module.`` prefix ever reaches a checkpoint."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
