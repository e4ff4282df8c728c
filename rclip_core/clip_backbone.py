"""CLIP ResNet as a region encoder (RegionCLIP §3.1 "visual region representation").

Shapes: B images, R regions (all images together), C channels, D embedding dim, P pooler resolution.

The trunk is open_clip's ``ModifiedResNet`` from the stem through ``layer3`` (res4, stride 16). Regions are pooled from
res4 with torchvision ``roi_align`` (aligned, sampling ratio 0, scale 1/16) to P×P, then go through ``layer4``
(stride 2) and the attention pool. open_clip's attention pool does not interpolate its positional embedding, so P must
be twice the pool's native grid: 14 for RN50 (7×7), 18 for RN50x4 (9×9).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from rclip_core.errors import RclipError

log = logging.getLogger(__name__)

_TINY_CONFIG_DIR = Path(__file__).parent / "data" / "model_configs"


@dataclass(frozen=True)
class Variant:
    """One CLIP ResNet variant: the open_clip model name (QuickGELU, as OpenAI's weights need) and its pool grid."""

    open_clip_name: str
    attnpool_grid: int  # the attention pool's native spatial size (image_size // 32)

    @property
    def pooler_resolution(self) -> int:
        return 2 * self.attnpool_grid


# The one name table of variants. "tiny" is a ~3 M-parameter config for tests and the toy world.
VARIANTS: dict[str, Variant] = {
    "RN50": Variant(open_clip_name="RN50-quickgelu", attnpool_grid=7),
    "RN50x4": Variant(open_clip_name="RN50x4-quickgelu", attnpool_grid=9),
    "tiny": Variant(open_clip_name="rclip-tiny", attnpool_grid=7),
}


def get_variant(name: str) -> Variant:
    """Look up a variant, rejecting unknown names together with the valid list."""
    if name not in VARIANTS:
        raise RclipError(f"unknown CLIP variant '{name}'; available: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def _is_file_spec(weights: str) -> bool:
    return weights.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in weights or os.path.exists(weights)


def create_clip(variant: str, weights: str | None = None, *, log_random_init: bool = True) -> nn.Module:
    """Build an open_clip ``CLIP`` for ``variant`` and load ``weights``.

    Args:
        variant: a key of :data:`VARIANTS`.
        weights: ``None`` (random init, seeded: the same model every time), an open_clip pretrained tag such as
            ``"openai"`` (downloads; online machines only), or a local file: an rclip checkpoint
            (``{"model": state_dict, ...}``, e.g. from ``rclip weights convert``), a bare open_clip/OpenAI state
            dict, or a ``.safetensors`` file.

        log_random_init: say in the log when the model keeps random weights (off for callers that load weights
            into it themselves, such as checkpoint conversion).

    Returns:
        ``open_clip.CLIP`` in eval mode.
    """
    import open_clip

    spec = get_variant(variant)
    if spec.open_clip_name == "rclip-tiny":
        # Registered only when asked for, so importing rclip_core never touches open_clip's config registry.
        open_clip.add_model_config(_TINY_CONFIG_DIR)
    tag = None if weights is None or _is_file_spec(weights) else weights
    try:
        # Random initialisation is seeded, so two commands given no weights build the same model (and the text
        # fingerprint of `rclip embed` matches that of `rclip zeroshot`) without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(spec.open_clip_name, pretrained=tag, pretrained_text=False)
    except RuntimeError as e:
        if tag is not None:
            first = str(e).splitlines()[0]
            raise RclipError(f"could not load open_clip weights '{tag}' for {variant}: {first}") from None
        raise
    if weights is not None and tag is None:
        from rclip_core.checkpoint import load_model_weights

        load_model_weights(model, weights)
    if weights is None and log_random_init:
        log.info("%s: random initialisation (no weights given)", variant)
    return model.eval()


def attnpool_grid(attnpool: nn.Module) -> int:
    """The attention pool's native spatial size (7 for RN50, 9 for RN50x4), read from its positional embedding."""
    return int(round((attnpool.positional_embedding.shape[0] - 1) ** 0.5))


class CLIPTrunk(nn.Module):
    """A CLIP ``ModifiedResNet`` from the stem through ``layer3`` as a detection backbone (the original's C4 design:
    the backbone stops at res4, regions are pooled there).

    Args:
        visual: open_clip ``ModifiedResNet``; its modules are used, not copied.

    Attributes:
        out_channels: C4, the channels of res4 (1024 for RN50, 1280 for RN50x4).
        stride: 16, res4's stride in input pixels.

    Example:
        >>> trunk = CLIPTrunk(create_clip("tiny").visual)
        >>> trunk(torch.zeros(1, 3, 224, 224)).shape, trunk.stride
        (torch.Size([1, 256, 14, 14]), 16)
    """

    stride = 16

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        v = visual
        self.stem = nn.Sequential(v.conv1, v.bn1, v.act1, v.conv2, v.bn2, v.act2, v.conv3, v.bn3, v.act3, v.avgpool)
        self.layer1, self.layer2, self.layer3 = v.layer1, v.layer2, v.layer3
        self.out_channels = int(v.layer4[0].conv1.in_channels)

    def forward(self, images: Tensor) -> Tensor:
        """``images`` (B, 3, H, W), normalised → res4 (B, C4, ceil(H/16), ceil(W/16))."""
        return self.layer3(self.layer2(self.layer1(self.stem(images))))

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients into the stem (``freeze_at`` >= 1) and ``layer1..layer{freeze_at - 1}`` (detectron2's
        FREEZE_AT; the original trains above res2, ``freeze_at`` 2)."""
        stages = [self.stem, self.layer1, self.layer2, self.layer3]
        for stage in stages[: max(0, freeze_at)]:
            stage.requires_grad_(False)


class RegionHead(nn.Module):
    """RoIAlign P×P on res4 → ``layer4`` (res5) → attention pool: one embedding per region (RegionCLIP §3.1).

    Its own module, so a student and a frozen teacher each own one.

    Args:
        layer4: the ResNet's last stage (stride 2).
        attnpool: open_clip ``AttentionPool2d``; its positional embedding fixes the grid P / 2.
        pooler_resolution: P; must be twice the attention pool's grid, because open_clip does not interpolate the
            positional embedding (14 for RN50, 18 for RN50x4).
        spatial_scale: res4 pixels per input pixel (1/16).

    Example:
        >>> clip = create_clip("tiny")
        >>> head = RegionHead(clip.visual.layer4, clip.visual.attnpool, pooler_resolution=14)
        >>> head(torch.zeros(1, 256, 14, 14), [torch.tensor([[0., 0., 100., 100.]])]).shape
        torch.Size([1, 32])
    """

    def __init__(self, layer4: nn.Module, attnpool: nn.Module, *, pooler_resolution: int,
                 spatial_scale: float = 1 / 16) -> None:
        super().__init__()
        grid = attnpool_grid(attnpool)
        if pooler_resolution != 2 * grid:
            raise RclipError(f"pooler_resolution {pooler_resolution} does not fit the attention pool's {grid}×{grid} "
                             f"grid (use {2 * grid}): open_clip does not interpolate its positional embedding")
        self.layer4 = layer4
        self.attnpool = attnpool
        self.pooler_resolution = pooler_resolution
        self.spatial_scale = spatial_scale
        self.out_dim = int(attnpool.c_proj.out_features)  # D

    def pool(self, res4: Tensor, boxes_per_image: list[Tensor]) -> Tensor:
        """RoIAlign of boxes (``xyxy`` input pixels) on res4 (B, C4, h, w) → (R, C4, P, P)."""
        boxes = [b.to(dtype=res4.dtype, device=res4.device) for b in boxes_per_image]
        # detectron2's ROIAlignV2, the original's pooler: aligned=True (half-pixel offset), sampling_ratio=0 (adaptive).
        return roi_align(res4, boxes, output_size=self.pooler_resolution, spatial_scale=self.spatial_scale,
                         sampling_ratio=0, aligned=True)

    def forward(self, res4: Tensor, boxes_per_image: list[Tensor]) -> Tensor:
        """(R, D) region embeddings for B tensors (R_i, 4) of boxes, in image order; (0, D) for no boxes."""
        if sum(int(b.shape[0]) for b in boxes_per_image) == 0:
            return res4.new_zeros((0, self.out_dim))
        return self.attnpool(self.layer4(self.pool(res4, boxes_per_image)))  # (R, D)


class CLIPRegionEncoder(nn.Module):
    """Region embeddings from a CLIP ``ModifiedResNet``: :class:`CLIPTrunk` then :class:`RegionHead`.

    Args:
        visual: open_clip ``ModifiedResNet`` (``clip.visual``); its modules are used, not copied.
        pooler_resolution: RoIAlign output size P; must be ``2 ×`` the attention pool's grid.

    Example:
        >>> enc = CLIPRegionEncoder(create_clip("tiny").visual, pooler_resolution=14)
        >>> enc(torch.zeros(1, 3, 224, 224), [torch.tensor([[0., 0., 100., 100.]])]).shape
        torch.Size([1, 32])
    """

    def __init__(self, visual: nn.Module, *, pooler_resolution: int) -> None:
        super().__init__()
        self.trunk = CLIPTrunk(visual)
        self.head = RegionHead(visual.layer4, visual.attnpool, pooler_resolution=pooler_resolution)
        self.out_dim = self.head.out_dim  # D

    def forward(self, images: Tensor, boxes_per_image: list[Tensor]) -> Tensor:
        """Region embeddings (R, D) for boxes (``xyxy`` pixels of ``images``) on normalised images (B, 3, H, W)."""
        return self.head(self.trunk(images), boxes_per_image)

    def encode_image(self, images: Tensor) -> Tensor:
        """Whole-image embeddings (B, D): the full-image box through the region path (the original's "global"
        proposal in pretraining), so image-level training shapes the same features regions use."""
        from rclip_core.boxes import full_image_boxes

        b, _, h, w = images.shape
        return self.forward(images, list(full_image_boxes(b, h, w, device=images.device)[:, None]))


def build_region_encoder(clip: nn.Module, variant: str, pooler_resolution: int | None = None) -> CLIPRegionEncoder:
    """A :class:`CLIPRegionEncoder` over ``clip.visual`` with the variant's pooler resolution unless overridden."""
    return CLIPRegionEncoder(clip.visual, pooler_resolution=pooler_resolution_for(variant, pooler_resolution))


def pooler_resolution_for(variant: str, override: int | None = None) -> int:
    """The recipe's ``model.pooler_resolution``, or the variant's native one (14 for RN50, 18 for RN50x4)."""
    return override or get_variant(variant).pooler_resolution
