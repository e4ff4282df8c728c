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

from rclip_core.errors import RclipError
from rclip_core.tvops import roi_align

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


# The one name table of variants. "tiny" is a ~3 M-parameter config for tests and the toy world, at the toy world's
# 128 px: its attention pool has a 4×4 grid, so regions are pooled 8×8 (cheap enough to pretrain on 2 CPU cores).
VARIANTS: dict[str, Variant] = {
    "RN50": Variant(open_clip_name="RN50-quickgelu", attnpool_grid=7),
    "RN50x4": Variant(open_clip_name="RN50x4-quickgelu", attnpool_grid=9),
    "tiny": Variant(open_clip_name="rclip-tiny", attnpool_grid=4),
}


def get_variant(name: str) -> Variant:
    """Look up a variant, rejecting unknown names together with the valid list."""
    if name not in VARIANTS:
        raise RclipError(f"unknown CLIP variant '{name}'; available: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def _is_file_spec(weights: str) -> bool:
    return weights.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in weights or os.path.exists(weights)


def stored_variant(obj: object) -> str | None:
    """The variant an rclip checkpoint records in its recipe (``recipe.model.variant``), else None."""
    if isinstance(obj, dict) and isinstance(obj.get("recipe"), dict):
        model = obj["recipe"].get("model")
        if isinstance(model, dict) and isinstance(model.get("variant"), str):
            return model["variant"]
    return None


def _check_tag_reachable(open_clip_name: str, tag: str) -> None:
    """Fail within seconds, in one line, when open_clip would have to download ``tag`` and cannot: the weights are
    neither in huggingface_hub's cache nor reachable (an offline machine otherwise waits for retries to time out)."""
    import socket

    import open_clip

    cfg = open_clip.get_pretrained_cfg(open_clip_name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(open_clip_name)) or "none"
        raise RclipError(f"open_clip has no weights '{tag}' for {open_clip_name}; known tags: {known}")
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            return
        offline = constants.HF_HUB_OFFLINE
        if not offline:
            try:
                socket.create_connection(("huggingface.co", 443), timeout=3).close()
                return
            except OSError:
                offline = True
        raise RclipError(f"open_clip weights '{tag}' ({repo}) are not in huggingface_hub's cache "
                         f"({constants.HF_HUB_CACHE}) and cannot be downloaded here (no network"
                         f"{' / HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else ''}); download them on a "
                         "machine with network into that cache, or give a local file: --weights FILE")


def float32_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with floating tensors of another precision cast to float32 (OpenAI's released files are fp16):
    loading with ``assign`` keeps the file's dtypes, which a float32 model must not inherit."""
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}


def _load_without_init(open_clip, spec: Variant, variant: str, state: dict, source: str) -> nn.Module:
    """Build the model on the meta device (no random initialisation: ten times faster for RN50) and take the
    loaded tensors as its parameters (``assign``, so a memory-mapped file is read only where it is used)."""
    from rclip_core.checkpoint import check_state_dict

    with torch.device("meta"):
        model = open_clip.create_model(spec.open_clip_name, pretrained=None, pretrained_text=False, device="meta")
    check_state_dict(model, state, source)
    model.load_state_dict(float32_state(state), strict=True, assign=True)
    # The one non-persistent buffer, the text tower's causal mask, is not in any file: build it for real.
    length = int(model.positional_embedding.shape[0])
    model.attn_mask = torch.full((length, length), float("-inf")).triu_(1)
    model.rclip_variant, model.rclip_random_weights = variant, False
    return model.eval()


def create_clip(variant: str | None, weights: str | None = None, *, log_random_init: bool = True,
                visual_only: bool = False) -> nn.Module:
    """Build an open_clip ``CLIP`` and load ``weights``; the variant is ``variant`` or the one the file records.

    Args:
        variant: a key of :data:`VARIANTS`, or None: the variant a local rclip checkpoint records in its recipe, else
            the one its attention pool's shape identifies, else RN50. A given variant that contradicts the file's
            recorded one is an error naming both.
        weights: ``None`` (random init, seeded: the same model every time; a WARNING says the outputs mean
            nothing), an open_clip pretrained tag such as ``"openai"`` (downloads on online machines; fails in a
            few seconds otherwise), or a local file: an rclip checkpoint (``{"model": state_dict, ...}``, e.g. from
            ``rclip weights convert`` or ``rclip pretrain``), a bare open_clip/OpenAI state dict, or ``.safetensors``.
        log_random_init: warn when the model keeps random weights (off for callers that load weights into it
            themselves, such as checkpoint conversion).
        visual_only: with a local weights file, build the visual tower alone, without importing open_clip (a
            :class:`rclip_core.clip_visual.VisualCLIP`: ``visual`` and the text tower's fingerprint and dimension, for
            commands given class embeddings); ignored for a tag or random weights.

    Returns:
        ``open_clip.CLIP`` (or ``VisualCLIP``) in eval mode, with ``rclip_variant`` (the variant used) and
        ``rclip_random_weights``.
    """
    tag = None if weights is None or _is_file_spec(weights) else weights
    state, stored_fingerprint = None, None
    if weights is not None and tag is None:
        from rclip_core.checkpoint import read_torch_file, state_dict_of

        path = Path(weights)
        if path.suffix == ".safetensors":
            from rclip_core.checkpoint import read_state_dict

            state, recorded = read_state_dict(path), None
        else:
            obj = read_torch_file(path, what="weights file")
            recorded, state = stored_variant(obj), state_dict_of(obj, path)
            stored_fingerprint = obj.get("text_fingerprint") if isinstance(obj, dict) else None
        if variant is not None and recorded is not None and recorded != variant:
            raise RclipError(f"{weights} is a {recorded} checkpoint, but the variant asked for is {variant}; leave "
                             "--variant out (the checkpoint selects its own) or give weights of that variant")
        if variant is None:
            from rclip_core.convert import infer_variant

            variant = recorded or infer_variant(state) or "RN50"
    variant = variant or "RN50"
    spec = get_variant(variant)
    if state is not None and visual_only:
        from rclip_core.clip_visual import create_visual_clip

        model = create_visual_clip(spec.open_clip_name, _TINY_CONFIG_DIR, state, str(weights),
                                   text_fingerprint=stored_fingerprint)
        model.rclip_variant, model.rclip_random_weights = variant, False
        return model
    import open_clip

    if spec.open_clip_name == "rclip-tiny":
        # Registered only when asked for, so importing rclip_core never touches open_clip's config registry.
        open_clip.add_model_config(_TINY_CONFIG_DIR)
    if tag is not None:
        _check_tag_reachable(spec.open_clip_name, tag)
    if state is not None:
        model = _load_without_init(open_clip, spec, variant, state, str(weights))
        if stored_fingerprint is not None:
            model.rclip_text_fingerprint = stored_fingerprint
        return model
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
    if weights is None and log_random_init:
        log.warning("%s: running on RANDOM weights (no --weights given): labels and scores mean nothing", variant)
    model.rclip_variant = variant
    model.rclip_random_weights = weights is None
    return model.eval()


def fold_batch_norms(visual: nn.Module) -> int:
    """Fold every batch norm of a ``ModifiedResNet`` (in eval mode: a fixed affine map, the original's FrozenBN)
    into the convolution before it, in place: the same function with one pass less over every feature map. Changes
    outputs only by float rounding (tested within 1e-5). Call before building modules that hold the convolutions
    (``CLIPTrunk`` collects the stem's). Returns how many norms were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(visual, "conv1", "bn1"), (visual, "conv2", "bn2"), (visual, "conv3", "bn3")]
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        for block in layer:
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2"), (block, "conv3", "bn3")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))  # named "-1" (AvgPool), "0" (Conv), "1" (BN)
    folded = 0
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d):
                setattr(owner, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(owner, bn_name, nn.Identity())
                folded += 1
    return folded


def prepare_for_inference(clip: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """Make a CLIP's visual tower fast for inference, in place: batch norms folded into convolutions, weights in
    channels-last memory order (what oneDNN / cuDNN convolutions prefer). Returns ``clip``; it can no longer be
    trained or saved as the original layout (the norms are gone), so only inference commands call this."""
    clip.eval()
    if fold_bn:
        fold_batch_norms(clip.visual)
        clip.rclip_folded = True
    if channels_last:
        clip.visual.to(memory_format=torch.channels_last)
    return clip


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
        self.frozen_stages = 0

    def forward(self, images: Tensor) -> Tensor:
        """``images`` (B, 3, H, W), normalised → res4 (B, C4, ceil(H/16), ceil(W/16))."""
        return self.layer3(self.layer2(self.layer1(self.stem(images))))

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients into the stem (``freeze_at`` >= 1) and ``layer1..layer{freeze_at - 1}`` (detectron2's
        FREEZE_AT; the original trains above res2, ``freeze_at`` 2)."""
        stages = [self.stem, self.layer1, self.layer2, self.layer3]
        self.frozen_stages = max(0, freeze_at)
        for stage in stages[: self.frozen_stages]:
            stage.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIPTrunk:
        """As ``nn.Module.train``, but frozen stages keep their batch norms in eval mode: a frozen stage is
        detectron2's FrozenBN (running statistics), never normalised by the batch at hand."""
        super().train(mode)
        for stage in [self.stem, self.layer1, self.layer2, self.layer3][: self.frozen_stages]:
            stage.eval()
        return self


def attention_pool(attnpool: nn.Module, x: Tensor) -> Tensor:
    """open_clip's ``AttentionPool2d`` on (N, C, h, w) → (N, D), computing only the output it keeps, by linearity.

    open_clip lets all T = h·w + 1 tokens attend and returns the first (the mean token's), so the queries and outputs
    of the other h·w tokens are thrown away; and with one query per head, keys and values need not be projected
    at all: ``q·(W_k x + b_k) = (W_kᵀ q)·x + const`` (the constant cancels in the softmax) and
    ``Σ a (W_v x + b_v) = W_v (Σ a x) + b_v`` (the weights sum to 1). That is about 4 C² multiply-adds per region
    instead of about (2 T + 1.5) C² — the pool, which runs once per region, becomes negligible beside res5. Same
    function, so the same result to float rounding (tested against open_clip's forward), gradients included.

    Shapes: N regions, C channels (= embed dim), H heads of d = C / H, T tokens, D output dim.
    """
    n, c = x.shape[:2]
    heads = attnpool.num_heads
    d = c // heads
    tokens = x.flatten(2).transpose(1, 2)  # (N, T-1, C)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (N, T, C)
    tokens = tokens + attnpool.positional_embedding.to(tokens.dtype)[None]
    q = attnpool.q_proj(tokens[:, 0]).view(n, heads, d) * d**-0.5  # (N, H, d) the mean token's query
    qk = torch.einsum("nhd,hdc->nhc", q, attnpool.k_proj.weight.view(heads, d, c))  # (N, H, C) W_kᵀ q
    attn = torch.einsum("nhc,ntc->nht", qk, tokens).softmax(dim=-1)  # (N, H, T)
    mixed = torch.einsum("nht,ntc->nhc", attn, tokens)  # (N, H, C) Σ a x
    v = torch.einsum("nhc,hdc->nhd", mixed, attnpool.v_proj.weight.view(heads, d, c))  # (N, H, d)
    v = v + attnpool.v_proj.bias.view(heads, d)
    return attnpool.c_proj(v.reshape(n, c))  # (N, D)


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
        >>> head = RegionHead(clip.visual.layer4, clip.visual.attnpool, pooler_resolution=8)  # tiny: 4×4 grid
        >>> head(torch.zeros(1, 256, 8, 8), [torch.tensor([[0., 0., 100., 100.]])]).shape
        torch.Size([1, 32])
    """

    def __init__(self, layer4: nn.Module, attnpool: nn.Module, *, pooler_resolution: int,
                 spatial_scale: float = 1 / 16, chunk: int | None = None) -> None:
        super().__init__()
        grid = attnpool_grid(attnpool)
        if pooler_resolution != 2 * grid:
            raise RclipError(f"pooler_resolution {pooler_resolution} does not fit the attention pool's {grid}×{grid} "
                             f"grid (use {2 * grid}): open_clip does not interpolate its positional embedding")
        self.layer4 = layer4
        self.attnpool = attnpool
        self.pooler_resolution = pooler_resolution
        self.spatial_scale = spatial_scale
        # Regions per pass through pooler, res5 and attention pool: bounds peak memory with 1000 proposals (an RN50
        # RoI at 14×14×1024 is 0.8 MB before res5 widens it); None = all at once.
        self.chunk = chunk
        # True: open_clip's own attention-pool forward (every token queries), the plain reference of the benchmarks
        # and tests; False: :func:`attention_pool`, the same function computed for the kept token alone.
        self.full_attention = False
        self.out_dim = int(attnpool.c_proj.out_features)  # D

    def pool(self, res4: Tensor, boxes_per_image: list[Tensor] | Tensor) -> Tensor:
        """RoIAlign of boxes (``xyxy`` input pixels; per image, or (R, 5) rows led by the image index) on res4
        (B, C4, h, w) → (R, C4, P, P)."""
        if isinstance(boxes_per_image, Tensor):
            boxes = boxes_per_image.to(dtype=res4.dtype, device=res4.device)
        else:
            boxes = [b.to(dtype=res4.dtype, device=res4.device) for b in boxes_per_image]
        # detectron2's ROIAlignV2, the original's pooler: aligned=True (half-pixel offset), sampling_ratio=0 (adaptive).
        return roi_align(res4, boxes, output_size=self.pooler_resolution, spatial_scale=self.spatial_scale,
                         sampling_ratio=0, aligned=True)

    def forward(self, res4: Tensor, boxes_per_image: list[Tensor]) -> Tensor:
        """(R, D) region embeddings for B tensors (R_i, 4) of boxes, in image order; (0, D) for no boxes."""
        total = sum(int(b.shape[0]) for b in boxes_per_image)
        if total == 0:
            return res4.new_zeros((0, self.out_dim))
        if self.chunk is None or total <= self.chunk:
            return self._embed(self.pool(res4, boxes_per_image))  # (R, D)
        # (R, 5) rows of (image index, x1, y1, x2, y2), the form roi_align also takes, cut into chunks.
        rois = torch.cat([torch.cat([torch.full((b.shape[0], 1), float(i), dtype=res4.dtype, device=res4.device),
                                     b.to(dtype=res4.dtype, device=res4.device)], dim=1)
                          for i, b in enumerate(boxes_per_image)])
        out = []
        for part in rois.split(self.chunk):
            out.append(self._embed(self.pool(res4, part)))
        return torch.cat(out)  # (R, D)

    def _embed(self, pooled: Tensor) -> Tensor:
        """(R, C4, P, P) pooled regions → res5 → attention pool → (R, D)."""
        res5 = self.layer4(pooled)  # (R, C5, P/2, P/2)
        return self.attnpool(res5) if self.full_attention else attention_pool(self.attnpool, res5)


class CLIPRegionEncoder(nn.Module):
    """Region embeddings from a CLIP ``ModifiedResNet``: :class:`CLIPTrunk` then :class:`RegionHead`.

    Args:
        visual: open_clip ``ModifiedResNet`` (``clip.visual``); its modules are used, not copied.
        pooler_resolution: RoIAlign output size P; must be ``2 ×`` the attention pool's grid.

    Example:
        >>> enc = CLIPRegionEncoder(create_clip("tiny").visual, pooler_resolution=8)
        >>> enc(torch.zeros(1, 3, 128, 128), [torch.tensor([[0., 0., 100., 100.]])]).shape
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
