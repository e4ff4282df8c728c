"""Caption files, read lazily: COCO captions JSON, CC3M-style TSV, JSONL, plain text (``.gz`` read through).

Every reader is a generator of ``(caption, line)``, so a 3.3 M-caption CC3M file is never held in memory; a COCO JSON
is walked value by value (:class:`_JsonStream`) rather than loaded. Every error names the file and the line.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from rclip_core.errors import RclipError

# File suffix (after an optional .gz) -> caption format.
CAPTION_FORMATS: dict[str, str] = {".json": "coco", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv",
                                   ".txt": "text"}
FORMAT_NAMES: tuple[str, ...] = ("coco", "tsv", "jsonl", "text")


def caption_format(path: str | Path, fmt: str | None = None) -> str:
    """The format of ``path``: ``fmt`` when given, else from its suffix (``.gz`` looked through)."""
    if fmt and fmt != "auto":
        if fmt not in FORMAT_NAMES:
            raise RclipError(f"unknown caption format {fmt!r}; available: {', '.join(FORMAT_NAMES)}")
        return fmt
    p = Path(path)
    suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    if suffix.lower() not in CAPTION_FORMATS:
        raise RclipError(f"{p}: cannot tell the caption format from the suffix {suffix or '(none)'!r}; "
                         f"name it {', '.join(CAPTION_FORMATS)} or pass --format ({', '.join(FORMAT_NAMES)})")
    return CAPTION_FORMATS[suffix.lower()]


def _open_binary(path: Path) -> IO[bytes]:
    if not path.is_file():
        raise RclipError(f"caption file not found: {path}")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline), decoded one line at a time so a bad byte is located exactly."""
    with _open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RclipError(f"{path} line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "re-encode the file as UTF-8") from None
            yield n, (line.removeprefix("\ufeff") if n == 1 else line).rstrip("\r\n")


def _iter_text(path: Path) -> Iterator[tuple[str, int]]:
    for n, line in iter_lines(path):
        if line.strip():
            yield line.strip(), n


def _iter_jsonl(path: Path) -> Iterator[tuple[str, int]]:
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RclipError(f"{path} line {n}: malformed JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("caption"), str):
            raise RclipError(f"{path} line {n}: expected an object with a \"caption\" string")
        yield obj["caption"].strip(), n


def _looks_like_location(cell: str) -> bool:
    cell = cell.strip()
    return "://" in cell or (" " not in cell and ("/" in cell or cell.lower().endswith((".jpg", ".jpeg", ".png"))))


def _iter_tsv(path: Path) -> Iterator[tuple[str, int]]:
    """Caption column: the one named caption/text in a header row, else the first that is not a URL or path."""
    column = width = None
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        cells = line.split("\t")
        if column is None:
            width = len(cells)
            names = [c.strip().lower() for c in cells]
            header = next((names.index(h) for h in ("caption", "captions", "text") if h in names), None)
            column = header if header is not None else next(
                (i for i, c in enumerate(cells) if not _looks_like_location(c)), None)
            if column is None:
                raise RclipError(f"{path} line {n}: no caption column (every column looks like a URL or path)")
            if header is not None:
                continue
        if len(cells) != width:
            raise RclipError(f"{path} line {n}: expected {width} tab-separated columns like line 1, found {len(cells)}")
        yield cells[column].strip(), n


class _JsonStream:
    """One JSON document read incrementally from a binary file, value by value, with line numbers for errors.

    Used for COCO captions JSON so that no list (``images``, ``annotations``) is ever held whole.
    """

    _WS = re.compile(r"[ \t\r\n]*")
    CHUNK = 1 << 20  # bytes read at a time; a value longer than this is read in doubling steps

    def __init__(self, f: IO[bytes], path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.eof = "", 0, False
        self.lines, self.counted = 1, 0  # line number at buf[counted]: newlines are counted once, moving forward
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.json = json.JSONDecoder()

    def _fill(self, size: int = 0) -> bool:
        if self.eof:
            return False
        raw = self.f.read(size or self.CHUNK)
        try:
            text = self.utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            line = self.line(len(self.buf)) + raw.count(b"\n", 0, e.start)
            raise RclipError(f"{self.path} line {line}: not UTF-8 text; re-encode the file as UTF-8") from None
        self.eof = not raw
        self.line(self.pos)  # drop what was consumed, keeping its line count
        first = not self.buf and self.lines == 1
        self.buf = self.buf[self.pos:] + (text.removeprefix("\ufeff") if first else text)
        self.pos = self.counted = 0
        return True

    def line(self, pos: int | None = None) -> int:
        """The line number at ``pos`` (default: the current position) of the buffer."""
        pos = self.pos if pos is None else pos
        if pos < self.counted:
            return self.lines - self.buf.count("\n", pos, self.counted)
        self.lines += self.buf.count("\n", self.counted, pos)
        self.counted = pos
        return self.lines

    def error(self, msg: str, pos: int | None = None) -> RclipError:
        return RclipError(f"{self.path} line {self.line(pos)}: malformed JSON: {msg}")

    def peek(self) -> str:
        """The next non-blank character, or "" at the end of the file."""
        while True:
            self.pos = self._WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.error(f"expected {' or '.join(repr(x) for x in chars)}, found {c or 'end of file'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        size = self.CHUNK
        while True:
            try:
                obj, end = self.json.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a value ending at the buffer's end may be cut short (12|34)
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.error(e.msg, e.pos) from None
            self._fill(size)
            size *= 2  # a value larger than the buffer is re-parsed O(log n) times, not O(n)

    def array(self) -> Iterator[tuple[Any, int]]:
        """(element, line) for each element of the array that starts here."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            self.peek()  # skip blanks first, so the line is the element's own
            line = self.line()
            yield self.value(), line
            if self.expect(",]") == "]":
                return


def _iter_coco(path: Path) -> Iterator[tuple[str, int]]:
    with _open_binary(path) as f:
        js = _JsonStream(f, path)
        if js.peek() != "{":
            raise js.error("expected COCO captions JSON: an object with an \"annotations\" list")
        js.expect("{")
        found = False
        closed = js.peek() == "}"
        js.pos += closed
        while not closed:
            key = js.value()
            if not isinstance(key, str):
                raise js.error("expected a key")
            js.expect(":")
            if js.peek() != "[":
                js.value()
            else:
                for ann, line in js.array():  # other lists (images) are walked element by element and dropped
                    if key != "annotations":
                        continue
                    if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                        raise RclipError(f"{path} line {line}: annotation without a \"caption\" string")
                    yield ann["caption"].strip(), line
                found = found or key == "annotations"
            closed = js.expect(",}") == "}"
        if js.peek():
            raise js.error("extra data after the JSON object")
        if not found:
            raise RclipError(f"{path}: no \"annotations\" list; expected COCO captions JSON")


_READERS: dict[str, Callable[[Path], Iterator[tuple[str, int]]]] = {
    "coco": _iter_coco, "tsv": _iter_tsv, "jsonl": _iter_jsonl, "text": _iter_text}


def iter_captions(path: str | Path, fmt: str | None = None) -> Iterator[tuple[str, int]]:
    """Yield ``(caption, line)`` from one caption file, lazily; empty captions are skipped.

    Formats: ``coco`` (COCO captions JSON, ``annotations[].caption``), ``tsv`` (CC3M style, caption and image
    path/URL, header optional), ``jsonl`` (one ``{"caption": ...}`` per line), ``text`` (one caption per line).
    ``.gz`` files are read through. A file with no caption at all raises :class:`RclipError`.

    Example:
        >>> for caption, line in iter_captions("captions_train2017.json"): ...  # doctest: +SKIP
    """
    path = Path(path)
    n = 0
    for caption, line in _READERS[caption_format(path, fmt)](path):
        if caption:
            n += 1
            yield caption, line
    if n == 0:
        raise RclipError(f"{path}: no captions found (empty file?)")


def estimate_captions(path: str | Path, fmt: str | None = None) -> int:
    """A fast upper estimate of the number of captions (lines, or ``"caption"`` keys in JSON), for progress bars."""
    needle = b'"caption"' if caption_format(path, fmt) == "coco" else b"\n"
    total, tail = 0, b""
    with _open_binary(Path(path)) as f:
        while chunk := f.read(1 << 22):
            total += (tail + chunk).count(needle)
            tail = chunk[-(len(needle) - 1):] if len(needle) > 1 else b""
    return total


