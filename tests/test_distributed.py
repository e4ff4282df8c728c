"""``torchrun --nproc_per_node 2 -m rclip_cli.main pretrain ...`` on CPU (gloo): the run completes, rank 0 alone
writes, ``--resume`` works, and the losses equal a one-process run with the same global batch (the image-text
features are all-gathered with their gradients, batch norms share the global batch's statistics, so the two runs
take the same steps).

The recipe is the demo's teacher training (image-text from random weights, both towers, batch norm in training
mode) with the region losses on top (random boxes, every region kept, so the distillation loss is global too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rclip_core.data.toyworld import generate_toyworld


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rclip_core.clip_backbone import create_clip
    from rclip_core.data.toyworld import SHAPES
    from rclip_core.text_embed import embed_names, save_embeddings
    from rclip_core.text_encoder import TextEncoder

    root = tmp_path_factory.mktemp("ddp")
    world = generate_toyworld(root, num_images=16, image_size=64, seed=3)
    # Concepts from the random tiny CLIP both runs start from (teacher = student = the seeded random init).
    save_embeddings(embed_names(TextEncoder(create_clip("tiny")), list(SHAPES), templates=["a photo of a {}."]),
                    root / "concepts.pt")
    sets = [f"pretrain.captions={world.captions_json}", f"pretrain.images={world.images_dir}",
            f"pretrain.concepts={root / 'concepts.pt'}", "pretrain.regions=random", "pretrain.regions_per_image=4",
            "pretrain.concept_thresh=0.0", "pretrain.batch_size=4", "pretrain.steps=3", "pretrain.min_sizes=[64]",
            "pretrain.max_size=128", "pretrain.checkpoint_every=0", "pretrain.num_workers=0", "pretrain.freeze_at=1",
            "pretrain.warmup_steps=1"]
    return root, sets


def _run(launcher: list[str], out, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    args = [*launcher, "-m", "rclip_cli.main", "pretrain", "pretrain_tiny_toyworld_teacher", "--out", str(out), *extra]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_two_gloo_processes_train_exactly_like_one(setup):
    root, sets = setup
    one = _run([sys.executable], root / "one", sets)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(TORCHRUN, root / "two", sets)
    assert two.returncode == 0, two.stderr[-2000:]

    m1, m2 = _metrics(root / "one"), _metrics(root / "two")
    assert [r["step"] for r in m2] == [1, 2, 3]  # rank 0 alone appended its lines
    for key in ("loss_img_txt", "loss_region_distill"):  # the global losses
        assert m2[0][key] == pytest.approx(m1[0][key], abs=1e-5), key
    # the same gradients: later steps agree too, and so do the final weights
    for a, b in zip(m1[1:], m2[1:]):
        assert b["loss_img_txt"] == pytest.approx(a["loss_img_txt"], abs=1e-4)
    w1 = torch.load(root / "one" / "checkpoint.pt", weights_only=True)["model"]
    w2 = torch.load(root / "two" / "checkpoint.pt", weights_only=True)["model"]
    assert all(not k.startswith("module.") for k in w2)
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), atol=1e-4), k
    assert sorted(p.name for p in (root / "two").iterdir()) == ["checkpoint.pt", "metrics.jsonl", "recipe.yaml"]

    more = [s for s in sets if not s.startswith("pretrain.steps=")] + ["pretrain.steps=5"]
    refused = _run(TORCHRUN, root / "two", more, "--resume")
    assert refused.returncode != 0 and "pretrain.steps" in refused.stderr
    resumed = _run(TORCHRUN, root / "two", more, "--resume", "--force")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in _metrics(root / "two")] == [1, 2, 3, 4, 5]
    assert torch.load(root / "two" / "checkpoint.pt", weights_only=True)["step"] == 5
