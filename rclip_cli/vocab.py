"""``rclip vocab``: build a concept pool from captions, and check one (stats, compare) before pretraining on it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from rclip_cli.common import console, force_option, make_progress, progress_callback
from rclip_core import vocab as V

_SHOWN_MISSING = 12  # missing class names listed per coverage line; the rest are counted


@click.group()
def vocab() -> None:
    """Concept vocabularies: `build` from captions, `stats` and `compare` to check them."""


@vocab.command()
@click.argument("captions", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Vocabulary text file (one concept per line); counts and provenance go to the .json beside it.")
@click.option("--format", "fmt", type=click.Choice(["auto", *V.FORMAT_NAMES]), default="auto", show_default=True,
              help="Caption format; auto: .json COCO captions, .tsv CC3M-style, .jsonl {\"caption\": ...}, .txt lines.")
@click.option("--min-freq", type=click.IntRange(min=1), default=100, show_default=True,
              help="Keep concepts seen at least this many times (the paper's value: 100).")
@click.option("--max-size", type=click.IntRange(min=1), default=None,
              help="Keep at most this many, most frequent first.")
@click.option("--phrases", is_flag=True, help="Also count multi-word noun phrases ('traffic light'); runs the parser.")
@click.option("--spacy-model", default=None,
              help=f"spaCy pipeline (package or folder). Default: the first installed of "
                   f"{', '.join(V.DEFAULT_SPACY_MODELS)}.")
@click.option("--lemmatizer", type=click.Choice(V.LEMMATIZERS), default="trained", show_default=True,
              help="lookup: blank English pipeline + spacy-lookups-data, for when no trained pipeline is installed. "
                   "It has no tagger, so any word that can be a noun counts ('watch', 'running'), and no --phrases.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes, each with its own pipeline; the counts are the same for any number.")
@click.option("--batch-size", type=click.IntRange(min=1), default=V.DEFAULT_BATCH_SIZE, show_default=True,
              help="Captions per nlp.pipe batch.")
@force_option
def build(captions, out, fmt, min_freq, max_size, phrases, spacy_model, lemmatizer, workers, batch_size, force):
    """Parse nouns out of CAPTIONS files, count them, keep the frequent ones.

    Captions are streamed, so CC3M's 3.3 M captions fit in constant memory. Example:

        rclip vocab build captions_train2017.json --out concepts.txt --workers 2
    """
    V.check_vocab_outputs(out, force=force)
    extractor = V.load_extractor(spacy_model, lemmatizer=lemmatizer, phrases=phrases)
    total = sum(V.estimate_captions(p, fmt) for p in captions)
    with make_progress() as progress:
        task = progress.add_task("parsing captions", total=total or None, rate="")
        vocab_ = V.build_vocabulary(captions, extractor, fmt=fmt, min_freq=min_freq, max_size=max_size,
                                    workers=workers, batch_size=batch_size,
                                    on_progress=progress_callback(progress, task, "captions"))
        n = vocab_.provenance["captions"]
        progress.update(task, total=n, completed=n)  # the estimate counted lines; settle on the captions read
    txt, js = V.write_vocabulary(vocab_, out, force=force)
    info = vocab_.provenance["spacy"]
    console.print(f"wrote {txt}: {len(vocab_.concepts)} concepts seen ≥ {min_freq} times, of "
                  f"{vocab_.provenance['distinct_concepts_seen']} distinct, in {n} captions "
                  f"({info['model']} {info['model_version']}); counts and provenance in {js}",
                  soft_wrap=True, markup=False, highlight=False)


@vocab.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="How many top concepts to list.")
@click.option("--classes", multiple=True, default=V.REFERENCE_CLASSES, show_default=True,
              help="Class lists to check coverage of, as --classes elsewhere: a built-in list (coco80, lvis1203, "
                   "coco17, ...), a names or vocabulary file, or \"cat,dog\". Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def stats(file, top, classes, as_json):
    """Size, top concepts, size at several --min-freq values, and coverage of COCO-80 / LVIS-1203 class names.

    Example:

        rclip vocab stats concepts.txt --top 10
    """
    v = V.read_vocabulary(file)
    covs = [V.reference_coverage(v.concepts, c) for c in classes]
    if as_json:
        click.echo(json.dumps({"file": str(file), "size": len(v.concepts), "top": _top(v, top),
                               "size_at_min_freq": v.size_at, "provenance": v.provenance,
                               "coverage": [asdict(c) for c in covs]}, indent=2))
        return
    click.echo(f"{file}: {len(v.concepts)} concepts{_source(v)}")
    if top:
        click.echo(f"top {min(top, len(v.concepts))}: " + ", ".join(
            c if n is None else f"{c} ({n})" for c, n in _top(v, top)))
    if v.size_at:
        click.echo("size at min-freq: " + "  ".join(f"≥{t}: {n}" for t, n in sorted(v.size_at.items())))
    for cov in covs:
        click.echo(_coverage_line(cov))


@vocab.command()
@click.argument("a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top", type=click.IntRange(min=0), default=15, show_default=True,
              help="How many concepts found only in one of them to list (in that file's order).")
@click.option("--classes", multiple=True, default=V.REFERENCE_CLASSES, show_default=True,
              help="Class lists to compare coverage of, as --classes elsewhere: a built-in list (coco80, lvis1203, "
                   "...), a names or vocabulary file, or \"cat,dog\". Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def compare(a, b, top, classes, as_json):
    """Overlap of two vocabularies and their coverage of COCO-80 / LVIS-1203 side by side.

    Example:

        rclip vocab compare coco_concepts.txt cc3m_concepts.txt
    """
    va, vb = V.read_vocabulary(a), V.read_vocabulary(b)
    cmp = V.compare_vocabularies(va, vb)
    covs = [(V.reference_coverage(va.concepts, c), V.reference_coverage(vb.concepts, c)) for c in classes]
    if as_json:
        click.echo(json.dumps({"a": str(a), "b": str(b), **cmp,
                               "coverage": [{"a": asdict(x), "b": asdict(y)} for x, y in covs]}, indent=2))
        return
    click.echo(f"A {a}: {cmp['size_a']} concepts{_source(va)}")
    click.echo(f"B {b}: {cmp['size_b']} concepts{_source(vb)}")
    click.echo(f"common: {cmp['common']}  (Jaccard {cmp['jaccard']:.3f})")
    for side in ("a", "b"):
        only = cmp[f"only_{side}"]
        listed = f": {', '.join(only[:top])}{' …' if len(only) > top else ''}" if only and top else ""
        click.echo(f"only in {side.upper()} ({len(only)}){listed}")
    for x, y in covs:
        click.echo(_coverage_line(x, prefix="A "))
        click.echo(_coverage_line(y, prefix="B "))


def _top(v: V.Vocabulary, k: int) -> list[tuple[str, int | None]]:
    return [(c, v.counts.get(c)) for c in v.concepts[:k]]


def _source(v: V.Vocabulary) -> str:
    p = v.provenance
    if not p:
        return " (no counts: no matching .json beside it)"
    spacy = p.get("spacy", {})
    return (f" (min-freq {p.get('min_freq')}, from {p.get('captions')} captions, "
            f"{spacy.get('model')} {spacy.get('model_version')}, lemmatizer {spacy.get('lemmatizer')})")


def _coverage_line(cov: V.Coverage, prefix: str = "") -> str:
    covered = len(cov.exact) + len(cov.head)
    line = (f"{prefix}{cov.label} coverage: {covered}/{cov.total} ({len(cov.exact)} exact, {len(cov.head)} by head "
            "noun only)")
    if cov.groups:
        line += "  [" + ", ".join(f"{g} {a}/{n}" for g, (a, n) in cov.groups.items()) + "]"
    if cov.missing:
        more = len(cov.missing) - _SHOWN_MISSING
        line += f"; missing: {', '.join(cov.missing[:_SHOWN_MISSING])}{f' (+{more} more)' if more > 0 else ''}"
    return line
