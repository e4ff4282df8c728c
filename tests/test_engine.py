"""rclip_core.engine: schedule, sampler, exact resume, Ctrl-C, divergence, metrics, the caller's random state."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from torch import nn

from rclip_core import engine
from rclip_core.errors import RclipError
from rclip_core.recipes import SolverCfg


class Noisy(torch.utils.data.Dataset):
    """Items whose content depends on the sample seed (like an augmentation)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        index, seed = key
        g = torch.Generator().manual_seed(seed % (2**63))
        return {"x": 0.1 * torch.randn(4, generator=g) + index / 10, "y": torch.tensor(index / 5)}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))

    def forward(self, x):
        return self.fc(x).squeeze(-1)


def losses(model, batch):
    x = torch.stack([b["x"] for b in batch])
    y = torch.stack([b["y"] for b in batch])
    # Dropout draws from torch's global generator: resuming must restore it for the run to match.
    return {"loss_mse": ((model(x) - y) ** 2).mean()}


CFG = SolverCfg(steps=6, batch_size=4, lr=0.05, warmup_steps=2, lr_steps=[4], checkpoint_every=0, num_workers=0)


def test_lr_factor_warmup_then_steps_or_cosine():
    f = engine.lr_factor(dataclasses.replace(CFG, steps=100, warmup_steps=10, warmup_factor=0.001, lr_steps=[50, 80]))
    assert f(0) == pytest.approx(0.001) and f(5) == pytest.approx(0.001 * 0.5 + 0.5) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    c = engine.lr_factor(dataclasses.replace(CFG, steps=100, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1))
    assert c(0) == 1.0 and c(50) == pytest.approx(0.55) and c(100) == pytest.approx(0.1)


def test_sampler_shards_the_global_batch_and_replays_any_step():
    one = list(engine.StepSampler(10, global_batch=4, steps=7, seed=3))
    assert len(one) == 7 and all(len(b) == 4 for b in one)
    # two ranks see the same global batches, split in halves, with the same per-sample seeds
    ranks = [list(engine.StepSampler(10, global_batch=4, steps=7, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one
    assert list(engine.StepSampler(10, global_batch=4, steps=7, seed=3, start_step=4)) == one[4:]
    # an epoch is a permutation (the last incomplete batch dropped)
    first_epoch = [i for batch in one[:2] for i, _ in batch]
    assert len(set(first_epoch)) == 8
    assert list(engine.StepSampler(10, global_batch=4, steps=2, seed=4)) != one[:2]
    with pytest.raises(RclipError, match="multiple of the number of processes"):
        engine.StepSampler(10, global_batch=3, steps=2, seed=0, world_size=2)
    tiny = list(engine.StepSampler(2, global_batch=5, steps=1, seed=0))[0]  # fewer items than a batch
    assert len(tiny) == 5


def _train(tmp_path, name, cfg=CFG, **kw):
    model = Net()
    result = engine.train(model, losses, Noisy(), cfg, out_dir=tmp_path / name, recipe={"solver": "test"}, **kw)
    return model, result


def test_resume_after_an_interruption_is_bit_exact(tmp_path):
    straight, _ = _train(tmp_path, "a")

    class Stop:
        def after_step(self, info):
            if info.step == 4:
                raise KeyboardInterrupt  # after step 4 is done, before its (absent) checkpoint

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "b", dataclasses.replace(CFG, checkpoint_every=3), hooks=[Stop()])
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and not ckpt["finished"] and ckpt["recipe"] == {"solver": "test"}
    assert {"optimizer", "scheduler", "rng", "model", "rclip_version"} <= set(ckpt)
    resumed, result = _train(tmp_path, "b", dataclasses.replace(CFG, checkpoint_every=3), resume=True)
    assert result.start_step == 3 and result.step == 6 and result.finished
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 4 of the interrupted run was rewritten, not repeated


def test_workers_give_the_same_training(tmp_path):
    zero, _ = _train(tmp_path, "w0")
    two, _ = _train(tmp_path, "w2", dataclasses.replace(CFG, num_workers=2))
    for a, b in zip(zero.state_dict().values(), two.state_dict().values()):
        assert torch.equal(a, b)


def test_ctrl_c_stops_after_the_step_and_writes_its_checkpoint(tmp_path):
    class SigInt:
        def after_step(self, info):
            if info.step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(engine.Interrupted) as caught:
        _train(tmp_path, "c", hooks=[SigInt()])
    assert caught.value.step == 2
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_non_finite_loss_stops_naming_the_step(tmp_path):
    calls = []

    def exploding(model, batch):
        calls.append(1)
        out = losses(model, batch)
        return {"loss_mse": out["loss_mse"] * (float("nan") if len(calls) == 3 else 1.0)}

    with pytest.raises(RclipError, match=r"step 3: the loss is not finite \(loss_mse=nan.*lower train.lr"):
        engine.train(Net(), exploding, Noisy(), CFG, out_dir=None, recipe={})


def test_callers_random_state_is_untouched_and_losses_fall(tmp_path):
    model = Net()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    result = engine.train(model, losses, Noisy(), dataclasses.replace(CFG, steps=60, lr_steps=[]), out_dir=None,
                          recipe={})
    assert torch.equal(torch.get_rng_state(), before)
    first = sum(r["loss"] for r in result.history[:10])
    last = sum(r["loss"] for r in result.history[-10:])
    assert last < 0.5 * first
    assert [r["step"] for r in result.history] == list(range(1, 61))
    assert result.history[0]["lr"] == pytest.approx(0.05 * 0.001)


def test_adamw_groups_and_bad_solver_values(tmp_path):
    model = Net()
    opt = engine.build_optimizer([{"params": model.fc[0].parameters(), "lr_scale": 2.0},
                                  {"params": model.fc[3].parameters(), "weight_decay": 0.0}],
                                 dataclasses.replace(CFG, optimizer="adamw", weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05] and opt.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(RclipError, match="train.lr must be a positive number"):
        engine.train(Net(), losses, Noisy(), dataclasses.replace(CFG, lr=0.0), out_dir=None, recipe={})
    with pytest.raises(RclipError, match="nothing to resume"):
        engine.train(Net(), losses, Noisy(), CFG, out_dir=tmp_path / "none", recipe={}, resume=True)
    frozen = Net().requires_grad_(False)
    with pytest.raises(RclipError, match="nothing to train"):
        engine.train(frozen, losses, Noisy(), CFG, out_dir=None, recipe={})


def test_default_workers_follow_the_available_cores():
    assert engine.default_num_workers(3) == 3
    assert 0 <= engine.default_num_workers(None) <= max(0, len(os.sched_getaffinity(0)) - 1)
