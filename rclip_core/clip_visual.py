"""CLIP's ResNet visual tower alone, in open_clip's module and key layout, built without importing open_clip.

Why: a zero-shot command given class embeddings needs the visual tower and nothing else; importing open_clip costs
about 0.7 s and pulls in torchvision's Python package (another 1.8 s, ``torch._dynamo`` included; see
:mod:`rclip_core.tvops`), and open_clip builds the text tower too. :func:`create_visual_clip` reads the variant's
architecture from open_clip's own model config (the JSON file, read without importing the package), builds the tower
on the meta device (no random initialisation) and takes the checkpoint's ``visual.*`` tensors as its parameters.

The modules are open_clip's ``ModifiedResNet`` layout, attribute for attribute (``conv1..3``, ``bn1..3``, ``act1..3``,
``avgpool``, ``layer1..4`` of ``Bottleneck`` blocks with a ``downsample`` of ``"-1"`` AvgPool / ``"0"`` conv / ``"1"``
norm, ``attnpool`` with ``q/k/v/c_proj`` and ``positional_embedding``), so a ``visual.*`` state dict loads strictly and
everything built over ``clip.visual`` (:class:`~rclip_core.clip_backbone.CLIPTrunk`,
:class:`~rclip_core.clip_backbone.RegionHead`, :func:`~rclip_core.clip_backbone.fold_batch_norms`) works unchanged.
Tested equal to open_clip's tower on the same weights. Inference only: nothing here initialises weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from rclip_core.errors import RclipError


class Bottleneck(nn.Module):
    """A ResNet bottleneck whose stride is an average pool after the 3×3 convolution (and before the 1×1 shortcut
    convolution), as CLIP's ResNets do. (B, inplanes, H, W) → (B, 4·planes, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # The keys "-1", "0", "1" are the layout of OpenAI's and open_clip's state dicts.
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)),
                                                         ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                                                         ("1", nn.BatchNorm2d(out))]))

    def forward(self, x: Tensor) -> Tensor:
        y = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        y = self.bn3(self.conv3(self.avgpool(y)))
        y += x if self.downsample is None else self.downsample(x)  # in place: one feature map less to allocate
        return self.act3(y)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool: the mean token (plus positional embeddings) attends over all tokens; (N, C, g, g) →
    (N, D). Computed for the kept token alone (:func:`rclip_core.clip_backbone.attention_pool`, the same function as
    open_clip's forward)."""

    def __init__(self, grid: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        from rclip_core.clip_backbone import attention_pool

        return attention_pool(self, x)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a three-convolution stem with an average pool, four stages of :class:`Bottleneck` blocks
    (``layers`` blocks each, widths ``width``·1,2,4,8), and :class:`AttentionPool2d` on the ``image_size / 32``
    grid. Images (B, 3, image_size, image_size) → (B, output_dim)."""

    def __init__(self, layers: list[int], output_dim: int, heads: int, image_size: int, width: int) -> None:
        super().__init__()
        self.output_dim, self.image_size = output_dim, image_size
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        return self.attnpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class TextTowerIdentity:
    """What an embedding file is checked against (:func:`rclip_core.text_embed.class_embeddings` reads ``out_dim``
    and ``fingerprint()``, as of a :class:`~rclip_core.text_encoder.TextEncoder`), without a text tower: the
    fingerprint stored in the checkpoint, else hashed from its text tensors when first asked (only a file written
    before fingerprints were stored, or not by rclip, needs that).

    Args:
        text_state: the checkpoint's text-tower tensors (memory-mapped; read only if hashed).
        stored: the fingerprint the checkpoint stores, or None.
        out_dim: D, the visual tower's output dimension (the text tower's is the same in every CLIP).
    """

    def __init__(self, text_state: dict[str, Tensor], stored: str | None, out_dim: int) -> None:
        self._text_state, self._stored, self.out_dim = text_state, stored, out_dim

    def fingerprint(self) -> str | None:
        if self._stored is None:
            from rclip_core.text_encoder import text_fingerprint

            self._stored = text_fingerprint(self._text_state)
        return self._stored


class VisualCLIP(nn.Module):
    """A CLIP with its visual tower only (``visual``), for commands that are given class embeddings.

    Attributes: ``visual``; ``text`` (:class:`TextTowerIdentity`, what embedding files are checked against); and, as
    :func:`rclip_core.clip_backbone.create_clip` sets them on a whole CLIP, ``rclip_variant`` and
    ``rclip_random_weights`` (False).
    """

    def __init__(self, visual: ModifiedResNet, text: TextTowerIdentity) -> None:
        super().__init__()
        self.visual = visual
        self.text = text


def model_config(open_clip_name: str, own_config_dir: Path) -> dict:
    """open_clip's JSON config of ``open_clip_name`` (``rclip-tiny`` from rclip's own config folder), read from the
    installed package's files without importing it."""
    own = own_config_dir / f"{open_clip_name}.json"
    if own.is_file():
        return json.loads(own.read_text())
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "model_configs" / f"{open_clip_name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise RclipError(f"no open_clip model config {open_clip_name}.json (is open_clip_torch installed?)")


def build_visual(config: dict) -> ModifiedResNet:
    """A :class:`ModifiedResNet` from an open_clip model config (``embed_dim``, ``vision_cfg``), with open_clip's
    rule for the attention pool's heads (the tower's width × 32 over ``head_width``, 64 by default)."""
    vision = config["vision_cfg"]
    if not isinstance(vision.get("layers"), (list, tuple)):
        raise RclipError("the visual tower is not a ResNet (vision_cfg.layers is not a list of four stages)")
    width = int(vision.get("width", 64))
    heads = width * 32 // int(vision.get("head_width", 64))
    return ModifiedResNet(list(vision["layers"]), int(config["embed_dim"]), heads, int(vision["image_size"]), width)


def create_visual_clip(open_clip_name: str, own_config_dir: Path, state: dict[str, Tensor], source: str | os.PathLike,
                       *, text_fingerprint: str | None = None) -> VisualCLIP:
    """:class:`VisualCLIP` of the architecture ``open_clip_name`` with the ``visual.*`` tensors of ``state`` (a whole
    CLIP's state dict; the text tower's tensors are neither built nor read), built without random initialisation
    and loaded strictly (``assign``: memory-mapped tensors are read where they are used). ``text_fingerprint``: the
    one the checkpoint stores, if any.

    Raises:
        RclipError: the visual keys or shapes do not fit (naming them).
    """
    from rclip_core.checkpoint import check_state_dict
    from rclip_core.clip_backbone import float32_state

    with torch.device("meta"):
        visual = build_visual(model_config(open_clip_name, own_config_dir))
    text = TextTowerIdentity({k: v for k, v in state.items() if not k.startswith("visual.")}, text_fingerprint,
                             int(visual.attnpool.c_proj.out_features))
    model = VisualCLIP(visual, text)
    visual_state = {k: v for k, v in state.items() if k.startswith("visual.")}
    check_state_dict(model, visual_state, str(source))
    model.load_state_dict(float32_state(visual_state), strict=True, assign=True)
    return model.eval()
