"""Vocabularies: thresholding counts, the text + JSON files, and the checks users run before pretraining on one.

File contract: a vocabulary file is UTF-8 text, one concept per line, most frequent first, without counts (the
original release's readers keep the text before the first comma, and ``rclip embed --classes`` reads one name per line).
Counts and provenance go in a JSON beside it: ``concepts.txt`` → ``concepts.json``, whose ``"format"`` is
``rclip-vocab/1``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rclip_core.errors import RclipError
from rclip_core.io import check_writable, write_json, write_text
from rclip_core.vocab.extract import DEFAULT_BATCH_SIZE, ConceptExtractor, count_concepts
from rclip_core.vocab.readers import caption_format, iter_captions, iter_lines

log = logging.getLogger(__name__)

STATS_THRESHOLDS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
VOCAB_FORMAT = "rclip-vocab/1"


@dataclass
class Vocabulary:
    """A concept pool: ``concepts`` most frequent first, their ``counts``, and how it was made."""

    concepts: list[str]
    counts: dict[str, int]
    size_at: dict[int, int] = field(default_factory=dict)  # min-freq -> how many concepts would survive it
    provenance: dict = field(default_factory=dict)


def select_concepts(counts: Counter, *, min_freq: int = 100, max_size: int | None = None,
                    source: str = "the captions") -> list[str]:
    """Concepts seen at least ``min_freq`` times, most frequent first (ties alphabetical), at most ``max_size``.

    Raises :class:`RclipError`, naming ``source`` when no concept was seen at all and stating the highest count seen
    when none survives.
    """
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if not ranked:
        raise RclipError(f"no concept found in {source}")
    kept = [c for c, n in ranked if n >= min_freq][:max_size]
    if not kept:
        top, n = ranked[0]
        raise RclipError(f"no concept reaches --min-freq {min_freq}: the highest count seen is {n} ({top!r}); "
                         "lower --min-freq or add captions")
    return kept


def size_at_thresholds(counts: dict[str, int] | Counter, thresholds: Iterable[int] = STATS_THRESHOLDS) -> dict:
    """How many concepts have a count of at least each threshold."""
    values = list(counts.values())
    return {t: sum(v >= t for v in values) for t in thresholds}


def check_inputs(paths: Sequence[str | Path], fmt: str | None = None) -> list[tuple[Path, str]]:
    """Fail fast, before any parsing work: each file exists, has a known format and a readable first caption."""
    if not paths:
        raise RclipError("no caption file given")
    checked = []
    for p in map(Path, paths):
        f = caption_format(p, fmt)
        next(iter_captions(p, f))
        checked.append((p, f))
    return checked


def build_vocabulary(paths: Sequence[str | Path], extractor: ConceptExtractor, *, fmt: str | None = None,
                     min_freq: int = 100, max_size: int | None = None, workers: int = 1,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     on_progress: Callable[[int], None] | None = None) -> Vocabulary:
    """Parse, count and threshold the captions of ``paths`` (read one after another, streamed).

    Example:
        >>> vocab = build_vocabulary(["captions.jsonl"], load_extractor(), min_freq=100)  # doctest: +SKIP
        >>> write_vocabulary(vocab, "concepts.txt")  # doctest: +SKIP
    """
    inputs = [{"path": str(p), "format": f, "captions": 0} for p, f in check_inputs(paths, fmt)]

    def stream() -> Iterator[str]:
        for entry in inputs:
            for caption, _ in iter_captions(entry["path"], entry["format"]):
                entry["captions"] += 1
                yield caption

    counts, n_captions = count_concepts(stream(), extractor, workers=workers, batch_size=batch_size,
                                        on_progress=on_progress)
    kept = select_concepts(counts, min_freq=min_freq, max_size=max_size,
                           source=f"the {n_captions} captions of {', '.join(e['path'] for e in inputs)}")
    from rclip_core import __version__ as rclip_version

    provenance = {"format": VOCAB_FORMAT, "rclip_version": rclip_version, "inputs": inputs, "captions": n_captions,
                  "distinct_concepts_seen": len(counts), "occurrences": sum(counts.values()),
                  "spacy": extractor.info, "min_freq": min_freq, "max_size": max_size,
                  "phrases": extractor.spec.phrases, "batch_size": batch_size, "workers": workers}
    return Vocabulary(kept, {c: counts[c] for c in kept}, size_at_thresholds(counts), provenance)


def vocab_json_path(out: str | Path) -> Path:
    """Where the counts and provenance of a vocabulary file go: the same name with ``.json``."""
    out = Path(out)
    if out.suffix == ".json":
        raise RclipError(f"{out}: --out is the vocabulary text file (e.g. concepts.txt); its counts go to a .json")
    return out.with_suffix(".json")


def check_vocab_outputs(out: str | Path, *, force: bool) -> tuple[Path, Path]:
    """Refuse existing outputs (unless ``force``) before any work; returns (text path, JSON path)."""
    json_path = vocab_json_path(out)
    return check_writable(out, force=force), check_writable(json_path, force=force)


def write_vocabulary(vocab: Vocabulary, out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``out`` (one concept per line) and its JSON (counts, sizes at thresholds, provenance), atomically."""
    txt, js = check_vocab_outputs(out, force=force)
    write_json(js, {**vocab.provenance, "concepts": len(vocab.concepts), "counts": vocab.counts,
                    "size_at_min_freq": {str(k): v for k, v in vocab.size_at.items()}}, force=True)
    write_text(txt, "".join(c + "\n" for c in vocab.concepts), force=True)
    return txt, js


def read_vocabulary(path: str | Path) -> Vocabulary:
    """Read a vocabulary: our ``.txt`` (with counts from the ``.json`` beside it when it matches), our ``.json``,
    or any list of names one per line (text after a first comma ignored, as the original release's readers do)."""
    path = Path(path)
    if path.suffix == ".json":
        from rclip_core.io import read_json

        meta = read_json(path, what="vocabulary file")
        if not isinstance(meta, dict) or meta.get("format") != VOCAB_FORMAT:
            raise RclipError(f"{path}: not an rclip vocabulary JSON (no \"format\": \"{VOCAB_FORMAT}\")")
        return _vocab_from_meta(meta, list(meta["counts"]))
    if not path.is_file():
        raise RclipError(f"vocabulary file not found: {path}")
    concepts = [name for _, line in iter_lines(path) if (name := line.split(",")[0].strip())]
    if not concepts:
        raise RclipError(f"{path}: no concepts (empty file)")
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and meta.get("format") == VOCAB_FORMAT and list(meta.get("counts", {})) == concepts:
            return _vocab_from_meta(meta, concepts)
        log.warning("%s does not match %s; its counts are ignored", side, path)
    return Vocabulary(concepts, {})


def _vocab_from_meta(meta: dict, concepts: list[str]) -> Vocabulary:
    size_at = {int(k): v for k, v in meta.get("size_at_min_freq", {}).items()}
    provenance = {k: v for k, v in meta.items() if k not in ("counts", "size_at_min_freq", "concepts")}
    return Vocabulary(concepts, dict(meta["counts"]), size_at, provenance)


# ---------------------------------------------------------------------------------------------------------------
# Checking a vocabulary: coverage of class names, comparison


def normalize_class_name(name: str) -> str:
    """Lowercase, ``_``/``-`` as spaces, parenthesized qualifiers dropped: ``bow_(weapon)`` → ``bow``.

    Unlike the prompt clean-up (which keeps the qualifier's words), a qualifier is a disambiguation, not part of the
    noun a caption would use.
    """
    name = re.sub(r"\([^)]*\)", " ", name.replace("_", " ").replace("-", " ").lower())
    return " ".join(name.split())


def _number_variants(word: str) -> set[str]:
    # Singular and plural spellings, so that "skis" finds "ski" and "jean" finds "jeans" without a lemmatizer.
    forms = {word, word + "s", word + "es"}
    if word.endswith("s"):
        forms.add(word[:-1])
    if word.endswith("es"):
        forms.add(word[:-2])
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    return forms


@dataclass
class Coverage:
    """How a vocabulary covers a list of class names.

    ``exact``: the whole name is a concept (up to singular/plural); ``head``: only its last word is (e.g. "light"
    for "traffic light"), enough for a single-noun pool; ``missing``: neither. ``groups`` maps a group (LVIS
    frequency, COCO base/novel) to (covered exactly or by head, total).
    """

    label: str
    exact: list[str]
    head: list[str]
    missing: list[str]
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.exact) + len(self.head) + len(self.missing)


def coverage(concepts: Iterable[str], names: Sequence[str], *, groups: Sequence[str] | None = None,
             label: str = "classes") -> Coverage:
    """Which of ``names`` a vocabulary covers (see :class:`Coverage`); ``groups`` gives each name's group.

    Example:
        >>> coverage(["dog", "light"], ["dogs", "traffic light", "zebra"]).missing
        ['zebra']
    """
    vocab = {normalize_class_name(c) for c in concepts}
    cov = Coverage(label, [], [], [])
    tally: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        words = normalize_class_name(name).split()
        if not words:
            continue
        stem = " ".join(words[:-1] + [""])
        if any(stem + w in vocab for w in _number_variants(words[-1])):
            kind = cov.exact
        elif len(words) > 1 and _number_variants(words[-1]) & vocab:
            kind = cov.head
        else:
            kind = cov.missing
        kind.append(name)
        if groups is not None:
            t = tally.setdefault(groups[i], [0, 0])
            t[0] += kind is not cov.missing
            t[1] += 1
    cov.groups = {g: (a, b) for g, (a, b) in sorted(tally.items())}
    return cov


REFERENCE_CLASSES: tuple[str, ...] = ("coco80", "lvis1203")


def reference_coverage(concepts: Sequence[str], which: str) -> Coverage:
    """Coverage of a class list given as everywhere else in rclip (``--classes``): ``coco80`` (grouped base / novel
    / other by the open-vocabulary split; ``coco`` is its old name), ``lvis1203`` (grouped by frequency r/c/f;
    ``lvis``), another built-in list, a comma list, or a file: a vocabulary (``rclip vocab build`` output or one name
    per line) or a COCO/LVIS annotation file's categories."""
    from rclip_core.data import categories
    from rclip_core.data.class_lists import resolve_classes

    if which in ("coco", "coco80"):
        split = {c["name"]: c["split"] for c in categories.coco_ovd_categories()}
        names = [c["name"] for c in categories.coco_categories()]
        return coverage(concepts, names, groups=[split.get(n, "other") for n in names], label="COCO-80")
    if which in ("lvis", "lvis1203"):
        cats = categories.lvis_categories()
        return coverage(concepts, [c["name"] for c in cats], groups=[c["frequency"] for c in cats], label="LVIS-1203")
    path = Path(which)
    if path.is_file() and (path.suffix != ".json" or _is_vocabulary_json(path)):
        return coverage(concepts, read_vocabulary(path).concepts, label=path.name)
    spec = resolve_classes(which)
    return coverage(concepts, spec.names, label=path.name if path.is_file() else which)


def _is_vocabulary_json(path: Path) -> bool:
    from rclip_core.io import read_json

    meta = read_json(path)
    return isinstance(meta, dict) and meta.get("format") == VOCAB_FORMAT


def compare_vocabularies(a: Vocabulary, b: Vocabulary) -> dict:
    """Sizes, overlap (common, only in A, only in B, Jaccard), each list in A's or B's rank order."""
    sa, sb = set(a.concepts), set(b.concepts)
    common = sa & sb
    return {"size_a": len(sa), "size_b": len(sb), "common": len(common),
            "jaccard": len(common) / max(len(sa | sb), 1),
            "only_a": [c for c in a.concepts if c not in sb], "only_b": [c for c in b.concepts if c not in sa]}

