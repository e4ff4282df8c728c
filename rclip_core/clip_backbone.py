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


class CLIPRegionEncoder(nn.Module):
    """Region embeddings from a CLIP ``ModifiedResNet``.

    Args:
        visual: open_clip ``ModifiedResNet`` (``clip.visual``); its modules are used, not copied.
        pooler_resolution: RoIAlign output size P; must be ``2 × visual.attnpool`` grid.

    Example:
        >>> clip = create_clip("tiny")
        >>> enc = CLIPRegionEncoder(clip.visual, pooler_resolution=14)
        >>> res4 = enc.trunk(torch.zeros(1, 3, 224, 224))           # (1, C4, 14, 14)
        >>> enc.region_head(res4, [torch.tensor([[0., 0., 100., 100.]])]).shape
        torch.Size([1, 32])
    """

    def __init__(self, visual: nn.Module, *, pooler_resolution: int) -> None:
        super().__init__()
        self.visual = visual
        grid = int(round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5))
        if pooler_resolution != 2 * grid:
            raise RclipError(f"pooler_resolution {pooler_resolution} does not fit the attention pool's {grid}×{grid} "
                             f"grid (use {2 * grid}): open_clip does not interpolate its positional embedding")
        self.pooler_resolution = pooler_resolution
        self.out_dim = visual.attnpool.c_proj.out_features  # D

    @property
    def res4_channels(self) -> int:
        """Channels of the res4 map (input width of ``layer4``)."""
        return self.visual.layer4[0].conv1.in_channels

    def trunk(self, images: Tensor) -> Tensor:
        """Stem..layer3. ``images`` (B, 3, H, W), normalised → res4 (B, C4, ceil(H/16), ceil(W/16))."""
        v = self.visual
        return v.layer3(v.layer2(v.layer1(v.stem(images))))

    def region_head(self, res4: Tensor, boxes_per_image: list[Tensor]) -> Tensor:
        """RoIAlign P×P on res4 → layer4 → attention pool.

        Args:
            res4: (B, C4, h, w) from :meth:`trunk`.
            boxes_per_image: B tensors (R_i, 4), ``xyxy`` in pixels of the image given to :meth:`trunk`.

        Returns:
            (R, D) region embeddings, R = sum R_i, in image order; (0, D) when there are no boxes.
        """
        num = sum(int(b.shape[0]) for b in boxes_per_image)
        if num == 0:
            return res4.new_zeros((0, self.out_dim))
        boxes = [b.to(dtype=res4.dtype, device=res4.device) for b in boxes_per_image]
        # Same op as detectron2's ROIAlignV2: aligned=True, sampling_ratio=0 (adaptive).
        pooled = roi_align(res4, boxes, output_size=self.pooler_resolution, spatial_scale=1 / 16,
                           sampling_ratio=0, aligned=True)  # (R, C4, P, P)
        return self.visual.attnpool(self.visual.layer4(pooled))  # (R, D)

    def forward(self, images: Tensor, boxes_per_image: list[Tensor]) -> Tensor:
        """Region embeddings (R, D) for boxes on normalised images (B, 3, H, W)."""
        return self.region_head(self.trunk(images), boxes_per_image)

    def encode_image(self, images: Tensor) -> Tensor:
        """Whole-image embeddings (B, D): the full-image box through the region path (the original's "global"
        proposal in pretraining), so image-level training shapes the same features regions use."""
        b, _, h, w = images.shape
        full = images.new_tensor([[0.0, 0.0, float(w), float(h)]])
        return self.forward(images, [full] * b)


def build_region_encoder(clip: nn.Module, variant: str, pooler_resolution: int | None = None) -> CLIPRegionEncoder:
    """A :class:`CLIPRegionEncoder` over ``clip.visual`` with the variant's pooler resolution unless overridden."""
    res = pooler_resolution or get_variant(variant).pooler_resolution
    return CLIPRegionEncoder(clip.visual, pooler_resolution=res)
