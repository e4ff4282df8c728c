"""Prompt templates × names → an embedding file (the classifier / concept pool of every later stage).

Embedding file (``torch.save``)::

    {"names": list[str] (K), "embeddings": Tensor[K, D] float32, L2-normalised, "templates": list[str],
     "model": text-tower fingerprint (TextEncoder.fingerprint), "category_ids": list[int] | None}

Loading checks D and the fingerprint against the model in use. The original release stores a bare ``[K, D]``
tensor of *un-normalised* template-averaged features; :func:`export_bare` and :func:`import_bare` convert.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# The class-list helpers live in data/class_lists.py (torch-free); these names stay importable from here too.
from rclip_core.data.class_lists import (  # noqa: F401
    BUILTIN_LISTS,
    ClassList,
    builtin_names,
    categories_from_json,
    clean_name,
    names_from_text,
    resolve_classes,
)
from rclip_core.errors import RclipError

log = logging.getLogger(__name__)

SINGLE_TEMPLATE = "a photo of a {}."

# The original release's 81 prompts: "{}." and CLIP's 80 ImageNet templates (clip_prompt_utils.get_prompt_templates).
ENSEMBLE_TEMPLATES = [
    "{}.", "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
]

TEMPLATE_SETS: dict[str, list[str]] = {"single": [SINGLE_TEMPLATE], "ensemble": ENSEMBLE_TEMPLATES}


@dataclass
class Embeddings:
    """Normalised text embeddings with their names (see the module docstring for the file format)."""

    names: list[str]
    embeddings: Tensor  # (K, D)
    templates: list[str]
    model: str
    category_ids: list[int] | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def to_dict(self) -> dict:
        return {"names": self.names, "embeddings": self.embeddings, "templates": self.templates,
                "model": self.model, "category_ids": self.category_ids}


@torch.no_grad()
def embed_names(
    encoder,
    names: list[str],
    *,
    templates: list[str],
    batch_size: int = 256,
    truncate: bool = True,
    category_ids: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Embeddings:
    """Encode every name with every template and average per name.

    As the original's extraction script does, the per-template features are averaged *before* normalising; the
    average is then L2-normalised.

    Args:
        encoder: a :class:`rclip_core.text_encoder.TextEncoder`.
        names: K names (cleaned with :func:`clean_name` inside the prompt; the file keeps them as given).
        templates: T prompt templates containing ``{}``.
        batch_size: prompts per forward pass.
        progress: called with the number of names finished after each batch.

    Returns:
        :class:`Embeddings` with ``embeddings`` (K, D).
    """
    if not names:
        raise RclipError("no names to embed: the name list is empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise RclipError(f"template {bad[0]!r} has no '{{}}' placeholder")
    t = len(templates)
    prompts = [tpl.format(clean_name(n)) for n in names for tpl in templates]  # K*T, name-major
    sums = torch.zeros(len(names), encoder.out_dim)
    done_prompts = 0
    for start in range(0, len(prompts), batch_size):
        feats = encoder(prompts[start : start + batch_size], truncate=truncate).float().cpu()  # (b, D)
        rows = torch.arange(start, start + feats.shape[0]) // t  # name index of each prompt
        sums.index_add_(0, rows, feats)
        done_prompts = start + feats.shape[0]
        if progress is not None:
            progress(done_prompts // t)
    mean = sums / t
    return Embeddings(names=list(names), embeddings=torch.nn.functional.normalize(mean, dim=-1),
                      templates=list(templates), model=encoder.fingerprint(), category_ids=category_ids)


def save_embeddings(emb: Embeddings, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write an embedding file atomically."""
    from rclip_core.io import torch_save

    return torch_save(emb.to_dict(), path, force=force)


def load_embeddings(path: str | os.PathLike, *, dim: int | None = None, fingerprint: str | None = None) -> Embeddings:
    """Read an embedding file; check its dimension and text-tower fingerprint when given.

    A fingerprint mismatch means the embeddings came from another text tower: the scores would be meaningless,
    so it is an error (re-embed, or import the file with :func:`import_bare` to state you accept it).
    """
    from rclip_core.checkpoint import read_torch_file

    p = Path(path)
    obj = read_torch_file(p, what="embedding file")
    if isinstance(obj, Tensor):
        raise RclipError(f"{p}: a bare [K, D] tensor (original RegionCLIP format); convert it first with "
                         "`rclip embed --import-bare FILE --classes NAMES.txt`")
    if not isinstance(obj, dict) or not {"names", "embeddings"} <= set(obj):
        raise RclipError(f"{p}: not an rclip embedding file (expected keys names, embeddings, templates, model)")
    emb = Embeddings(names=list(obj["names"]), embeddings=obj["embeddings"].float(),
                     templates=list(obj.get("templates") or []), model=str(obj.get("model", "")),
                     category_ids=obj.get("category_ids"))
    if emb.embeddings.ndim != 2 or emb.embeddings.shape[0] != len(emb.names):
        raise RclipError(f"{p}: embeddings of shape {tuple(emb.embeddings.shape)} do not match {len(emb.names)} names")
    if dim is not None and emb.dim != dim:
        raise RclipError(f"{p}: embedding dimension {emb.dim} does not match the model's {dim}")
    if fingerprint is not None and emb.model and emb.model != "imported" and emb.model != fingerprint:
        raise RclipError(f"{p}: made with text tower {emb.model}, but the model in use has {fingerprint}; "
                         "re-run `rclip embed` with this model's weights")
    return emb


def export_bare(emb: Embeddings, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the original release's format: a bare float tensor [K, D] (ours is normalised; the original's is not,
    which does not matter because it normalises at use)."""
    from rclip_core.io import torch_save

    return torch_save(emb.embeddings.clone(), path, force=force)


def import_bare(path: str | os.PathLike, names: list[str]) -> Embeddings:
    """Read an original-release ``[K, D]`` tensor (e.g. ``coco_65_cls_emb.pth``) and attach ``names`` (K)."""
    from rclip_core.checkpoint import read_torch_file

    p = Path(path)
    t = read_torch_file(p, what="embedding file")
    if isinstance(t, Tensor) and t.ndim == 1:  # the original squeezes a single concept to 1-D
        t = t[None]
    if not isinstance(t, Tensor) or t.ndim != 2:
        raise RclipError(f"{p}: expected a bare [K, D] tensor")
    if t.shape[0] != len(names):
        raise RclipError(f"{p}: {t.shape[0]} rows but {len(names)} names were given")
    return Embeddings(names=list(names), embeddings=torch.nn.functional.normalize(t.float(), dim=-1),
                      templates=[], model="imported")


# ---- where names come from -------------------------------------------------------------------------------------


def class_embeddings(encoder, classes: ClassList | None, embeddings: str | os.PathLike | None, *, templates: str,
                     batch_size: int, truncate: bool, progress: Callable[[int], None] | None = None) -> Embeddings:
    """The classifier of a zero-shot command: ``classes`` embedded now with ``encoder`` (a
    :class:`~rclip_core.text_encoder.TextEncoder`) and the ``templates`` set, or a cached ``embeddings`` file
    checked against the encoder's dimension and fingerprint (``classes`` None; see
    :func:`rclip_core.data.class_lists.class_source`)."""
    if classes is None:
        return load_embeddings(embeddings, dim=encoder.out_dim, fingerprint=encoder.fingerprint())
    return embed_names(encoder, classes.names, templates=TEMPLATE_SETS[templates], batch_size=batch_size,
                       truncate=truncate, category_ids=classes.category_ids, progress=progress)


def class_list_of(classes: ClassList | None, embeddings: str | os.PathLike | None) -> ClassList:
    """The classes a command will name regions with, known before any model is built (so annotation files can be
    checked first): ``classes`` itself, or the names and category ids stored in an ``embeddings`` file (checked
    against the model later, by :func:`class_embeddings`)."""
    if classes is not None:
        return classes
    stored = load_embeddings(embeddings)
    return ClassList(stored.names, stored.category_ids, f"embeddings {embeddings}")
