"""The concept pool: noun concepts parsed from image captions, counted, and kept when frequent.

RegionCLIP (Zhong et al., CVPR 2022, §3.2 and §4.1) builds its region-concept pool by parsing nouns out of image
captions and keeping those seen at least 100 times (4,764 concepts from COCO Captions, 6,790 from CC3M). The original
parsing script was never released, so these rules are our own, documented choice:

- a concept is a noun or proper noun (``NOUN``/``PROPN`` from a trained spaCy pipeline), lemmatized and lowercased;
  stop words, pronouns, numbers, non-alphabetic and one-letter tokens are dropped; irregular plurals that the tagger
  calls singular or proper ("geese") are looked up in the pipeline's own noun exception table;
- a partitive head before "of" ("a *pair* of scissors", "a *group* of people") is not a concept, the noun after it is;
- nouns that exist only in the plural ("scissors", "jeans") keep their plural, as in the COCO/LVIS class names;
- with ``phrases``, the run of alphabetic, non-stop words of each noun chunk that ends at its root ("traffic light",
  "red car") is counted too, when it has two to four words;
- counts are occurrences, not captions: "a dog next to a dog" counts "dog" twice;
- the ``lookup`` lemmatizer (no trained pipeline) lemmatizes every word as a noun with spacy-lookups-data's tables and
  keeps it when the lemma is a known (WordNet) noun: without a tagger, words that can be nouns count as nouns
  ("holding", "watch"), nouns missing from WordNet are lost, and there are no phrases.

Modules: :mod:`.readers` (caption files, streamed), :mod:`.extract` (spaCy, counting in worker processes),
:mod:`.pool` (thresholds, vocabulary files, coverage and comparison). Nothing here imports torch.

Example:
    >>> from rclip_core import vocab
    >>> ex = vocab.load_extractor()  # doctest: +SKIP
    >>> v = vocab.build_vocabulary(["captions_train2017.json"], ex, min_freq=100)  # doctest: +SKIP
    >>> vocab.write_vocabulary(v, "concepts.txt")  # doctest: +SKIP
"""

from rclip_core.vocab.extract import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SPACY_MODELS,
    LEMMATIZERS,
    PARTITIVE_NOUNS,
    PLURALIA_TANTUM,
    ConceptExtractor,
    PipelineSpec,
    count_concepts,
    load_extractor,
    resolve_spec,
)
from rclip_core.vocab.pool import (
    REFERENCE_CLASSES,
    STATS_THRESHOLDS,
    VOCAB_FORMAT,
    Coverage,
    Vocabulary,
    build_vocabulary,
    check_inputs,
    check_vocab_outputs,
    compare_vocabularies,
    coverage,
    normalize_class_name,
    read_vocabulary,
    reference_coverage,
    select_concepts,
    size_at_thresholds,
    vocab_json_path,
    write_vocabulary,
)
from rclip_core.vocab.readers import CAPTION_FORMATS, FORMAT_NAMES, caption_format, estimate_captions, iter_captions

__all__ = [
    "CAPTION_FORMATS", "DEFAULT_BATCH_SIZE", "DEFAULT_SPACY_MODELS", "FORMAT_NAMES", "LEMMATIZERS", "PARTITIVE_NOUNS",
    "PLURALIA_TANTUM", "REFERENCE_CLASSES", "STATS_THRESHOLDS", "VOCAB_FORMAT", "ConceptExtractor", "Coverage",
    "PipelineSpec", "Vocabulary", "build_vocabulary", "caption_format", "check_inputs", "check_vocab_outputs",
    "compare_vocabularies", "count_concepts", "coverage", "estimate_captions", "iter_captions", "load_extractor",
    "normalize_class_name", "read_vocabulary", "reference_coverage", "resolve_spec", "select_concepts",
    "size_at_thresholds", "vocab_json_path", "write_vocabulary",
]
