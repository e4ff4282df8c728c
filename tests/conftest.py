"""Shared fixtures. Everything runs offline on the tiny CLIP config and generated data."""

from __future__ import annotations

import os

# A failed hub download otherwise retries for ~45 s; nothing in the tests may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip():
    """A random-weight tiny open_clip CLIP (seeded), in eval mode. Do not modify it in tests; deep-copy instead."""
    import torch

    from rclip_core.clip_backbone import create_clip

    torch.manual_seed(0)
    return create_clip("tiny")
