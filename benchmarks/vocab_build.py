"""``rclip vocab build`` vs a bare ``nlp.pipe`` loop with the same spaCy components, on synthetic captions.

Both sides start from the same caption file and end with noun counts, model loading included: ours is the whole
command run in-process (format check, caption estimate, streaming reader, chunked ``nlp.pipe``, concept rules,
progress bar, atomic outputs); the bare loop reads the lines and runs ``nlp.pipe`` counting ``NOUN`` lemmas. They
alternate, several repeats, best time each. A second line shows ``--workers 2`` against the same bare loop.

    python benchmarks/vocab_build.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

SUBJECTS = ["man", "woman", "child", "dog", "cat", "giraffe", "elephant", "bus", "train", "pizza", "surfer", "bird",
            "horse", "skateboarder", "couple", "group of people", "plate of food", "pair of scissors", "clock tower"]
ADJECTIVES = ["", "", "young", "large", "small", "red", "white", "old", "wooden", "black and white"]
VERBS = ["sitting on", "standing next to", "holding", "riding", "eating", "looking at", "walking down",
         "parked in front of", "flying over", "laying on"]
OBJECTS = ["a table", "the street", "a bench", "some bananas", "two frisbees", "the beach", "a kitchen counter",
           "a busy road", "the grass", "3 umbrellas", "a wave", "the snow", "a pile of books", "the mice"]


def make_captions(path: Path, n: int, seed: int = 0) -> None:
    """COCO-like captions (8 to 16 words) from fixed word lists."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            adj = rng.choice(ADJECTIVES)
            caption = f"A {adj + ' ' if adj else ''}{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            if rng.random() < 0.5:
                caption += f" near {rng.choice(OBJECTS)}"
            f.write(caption[0].upper() + caption[1:] + ".\n")


def run_ours(captions: Path, out: Path, workers: int) -> float:
    from rclip_cli.main import cli

    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar and summary go to stderr
        cli.main(["vocab", "build", str(captions), "--out", str(out), "--min-freq", "1", "--force",
                  "--workers", str(workers)], standalone_mode=False)
    return time.perf_counter() - start


def run_bare(captions: Path, model: str, components: list[str], batch_size: int) -> float:
    import spacy

    start = time.perf_counter()
    nlp = spacy.load(model)
    nlp.select_pipes(enable=components)
    counts: Counter = Counter()
    with open(captions, encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        for doc in nlp.pipe(lines, batch_size=batch_size):
            counts.update(t.lemma_.lower() for t in doc if t.pos_ == "NOUN")
    assert counts
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4k captions, 2 repeats (default: 20k, 3 repeats)")
    args = parser.parse_args()
    n, repeats = (4_000, 2) if args.quick else (20_000, 3)

    import spacy

    from rclip_core import vocab as V

    extractor = V.load_extractor()
    model, components = extractor.spec.model, extractor.info["components"]
    with tempfile.TemporaryDirectory() as tmp:
        captions, out = Path(tmp) / "captions.txt", Path(tmp) / "concepts.txt"
        make_captions(captions, n)
        times: dict[str, list[float]] = {"ours": [], "bare": [], "ours_w2": []}
        for r in range(repeats):
            order = ["ours", "bare", "ours_w2"] if r % 2 == 0 else ["bare", "ours", "ours_w2"]
            for name in order:
                if name == "bare":
                    t = run_bare(captions, model, components, V.DEFAULT_BATCH_SIZE)
                else:
                    t = run_ours(captions, out, workers=2 if name == "ours_w2" else 1)
                times[name].append(t)
                print(f"repeat {r + 1}/{repeats}  {name:8s} {n / t:8.0f} captions/s  ({t:.2f} s)", flush=True)
        kept = len(out.read_text().splitlines())
    best = {k: n / min(v) for k, v in times.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tail = f"({cores} cores, spacy {spacy.__version__}, {model}, {n} captions, {kept} concepts)"
    print(f"BENCH vocab_build  ours={best['ours']:.0f} captions/s  bare={best['bare']:.0f} captions/s  "
          f"ratio={best['ours'] / best['bare']:.2f}  {tail}")
    print(f"BENCH vocab_build_workers2  ours={best['ours_w2']:.0f} captions/s  bare={best['bare']:.0f} captions/s  "
          f"ratio={best['ours_w2'] / best['bare']:.2f}  {tail}")


if __name__ == "__main__":
    main()
