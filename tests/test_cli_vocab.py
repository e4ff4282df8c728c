"""``rclip vocab build / stats / compare`` through the real Click group, on the caption fixture and generated files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import skip_unless_ci

from rclip_cli.main import cli
from rclip_core.errors import RclipError

FIXTURE = Path(__file__).parent / "fixtures" / "vocab" / "captions.txt"


@pytest.fixture(scope="module", autouse=True)
def _needs_trained_pipeline():
    from rclip_core.vocab import resolve_spec

    try:
        resolve_spec()
    except RclipError as e:
        skip_unless_ci(f"no trained spaCy pipeline: {e}")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _build(runner, *args):
    return runner.invoke(cli, ["vocab", "build", *map(str, args)])


def _generated_captions(path: Path, n: int = 600) -> Path:
    rng = random.Random(0)
    subjects = ["man", "woman", "dog", "cat", "child", "giraffe", "bus", "train"]
    places = ["street", "table", "field", "beach", "kitchen", "park"]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(f"A {rng.choice(subjects)} next to a {rng.choice(subjects)} on the {rng.choice(places)}.\n")
    return path


def test_build_writes_text_and_json(runner, tmp_path):
    out = tmp_path / "concepts.txt"
    res = _build(runner, FIXTURE, "--out", out, "--min-freq", 2)
    assert res.exit_code == 0, res.output
    assert out.read_text() == "knife\nwoman\n"
    meta = json.loads((tmp_path / "concepts.json").read_text())
    assert meta["counts"] == {"knife": 2, "woman": 2} and meta["captions"] == 10 and meta["min_freq"] == 2
    assert meta["inputs"] == [{"path": str(FIXTURE), "format": "text", "captions": 10}]
    assert meta["spacy"]["model"] and meta["spacy"]["spacy_version"] and meta["size_at_min_freq"]["1"] == 23
    assert "wrote" in res.output and "2 concepts" in res.output and "captions/s" in res.output

    res = _build(runner, FIXTURE, "--out", out, "--min-freq", 1)
    assert res.exit_code == 1 and "already exists; pass --force" in res.output and out.read_text() == "knife\nwoman\n"
    res = _build(runner, FIXTURE, "--out", out, "--min-freq", 1, "--max-size", 3, "--force")
    assert res.exit_code == 0, res.output
    assert out.read_text().splitlines() == ["knife", "woman", "bicycle"]  # ties at 1 in alphabetical order


def test_build_errors_name_the_culprit(runner, tmp_path):
    out = tmp_path / "c.txt"
    (tmp_path / "empty.txt").write_text("")
    res = _build(runner, FIXTURE, tmp_path / "empty.txt", "--out", out)
    assert res.exit_code == 1 and "empty.txt: no captions found" in res.output and "Traceback" not in res.output
    res = _build(runner, FIXTURE, "--out", out)
    assert res.exit_code == 1 and "no concept reaches --min-freq 100: the highest count seen is 2" in res.output
    res = _build(runner, FIXTURE, "--out", out, "--spacy-model", "xx_no_such_model")
    assert res.exit_code == 1 and "spaCy model 'xx_no_such_model' cannot be loaded" in res.output
    (tmp_path / "latin1.tsv").write_bytes("a dog\thttp://x/1.jpg\ncaf\xe9\thttp://x/2.jpg\n".encode("latin-1"))
    res = _build(runner, tmp_path / "latin1.tsv", "--out", out, "--min-freq", 1)
    assert res.exit_code == 1 and "latin1.tsv line 2: not UTF-8 text" in res.output
    (tmp_path / "verbs.txt").write_text("quickly running\nslowly\n")
    res = _build(runner, tmp_path / "verbs.txt", "--out", out, "--min-freq", 1)
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 1 and "no concept found in the 2 captions of" in last and "verbs.txt" in last
    assert not out.exists() and not (tmp_path / "c.json").exists()


def test_build_formats_and_workers_give_identical_counts(runner, tmp_path):
    captions = _generated_captions(tmp_path / "gen.txt").read_text().splitlines()
    tsv = tmp_path / "gen.tsv"
    tsv.write_text("caption\turl\n" + "".join(f"{c}\thttp://x/{i}.jpg\n" for i, c in enumerate(captions)))
    jsonl = tmp_path / "gen.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": c}) + "\n" for c in captions))
    coco = tmp_path / "gen.json"
    coco.write_text(json.dumps({"annotations": [{"id": i, "caption": c} for i, c in enumerate(captions)]}))
    counts = {}
    for src, workers in [(tmp_path / "gen.txt", 1), (tsv, 1), (jsonl, 1), (coco, 1), (tmp_path / "gen.txt", 2)]:
        out = tmp_path / f"{src.suffix[1:]}_{workers}.txt"
        res = _build(runner, src, "--out", out, "--min-freq", 5, "--workers", workers, "--batch-size", 64)
        assert res.exit_code == 0, res.output
        counts[(src.suffix, workers)] = json.loads(out.with_suffix(".json").read_text())["counts"]
    reference = counts[(".txt", 1)]
    assert len(reference) >= 10 and all(c == reference for c in counts.values())
    assert list(counts[(".txt", 2)]) == list(reference)  # same order, too


def test_stats_and_compare(runner, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    assert _build(runner, FIXTURE, "--out", a, "--min-freq", 1).exit_code == 0
    b.write_text("person\ndog\nknife\ntraffic light\n")  # a hand-made list, without counts
    res = runner.invoke(cli, ["vocab", "stats", str(a), "--top", "3"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "23 concepts (min-freq 1, from 10 captions" in out and "top 3: knife (2), woman (2), bicycle (1)" in out
    assert "size at min-freq: ≥1: 23  ≥2: 2  ≥5: 0" in out
    assert "COCO-80 coverage:" in out and "LVIS-1203 coverage:" in out and "novel" in out and "missing:" in out

    res = runner.invoke(cli, ["vocab", "stats", str(b), "--json", "--classes", "coco", "--classes", str(a)])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["size"] == 4 and obj["top"][0] == ["person", None] and len(obj["coverage"]) == 2
    coco = obj["coverage"][0]
    assert coco["exact"] == ["person", "traffic light", "dog", "knife"] and coco["head"] == ["hot dog"]

    res = runner.invoke(cli, ["vocab", "compare", str(a), str(b), "--classes", "coco"])
    assert res.exit_code == 0, res.output
    assert "common: 2" in res.stdout and "only in B (2): person, traffic light" in res.stdout
    assert "A COCO-80 coverage: 12/80" in res.stdout and "B COCO-80 coverage: 5/80 (4 exact, 1 by head" in res.stdout

    (tmp_path / "empty.txt").write_text("\n")
    res = runner.invoke(cli, ["vocab", "stats", str(tmp_path / "empty.txt")])
    assert res.exit_code == 1 and "empty.txt: no concepts" in res.output


def test_concepts_file_chains_into_embed_names(runner, tmp_path):
    """`rclip embed --names concepts.txt` reads the build's output as its list of names."""
    from rclip_core.data import class_lists
    out = tmp_path / "concepts.txt"
    assert _build(runner, FIXTURE, "--out", out, "--min-freq", 1).exit_code == 0
    assert class_lists.names_from_text(out) == out.read_text().splitlines()
