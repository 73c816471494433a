"""Rows of line-based files (text, SST-2, JSON lines) from the lines of one byte-range unit (:mod:`pipeline.dump.sources`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Literal

from pipeline.dump.datasets import SST2_LINE, records_to_columns
from pipeline.errors import DatasetError

LineFormat = Literal["text", "sst2", "json"]
# Bytes read per step while looking for the next line start: a long line is skipped without holding it.
_SKIP_BLOCK = 1 << 13


def skip_to_line_start(fh: IO[bytes], lo: int) -> int:
    """Seek ``fh`` to the first line start at or after byte ``lo``; return that offset (EOF when none)."""
    if lo == 0:
        fh.seek(0)
        return 0
    pos = lo - 1  # if byte lo-1 is the newline, the line starting at lo is the first one
    fh.seek(pos)
    while True:
        block = fh.read(_SKIP_BLOCK)
        if not block:
            return pos
        cut = block.find(b"\n")
        if cut >= 0:
            pos += cut + 1
            fh.seek(pos)
            return pos
        pos += len(block)


def _decode(line: bytes, pos: int, path: Path) -> str:
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: the line at byte {pos} is not valid UTF-8 ({exc.reason}); re-encode the file "
                           "as UTF-8 (e.g. iconv -t utf-8) or drop that line") from None


def line_rows(kind: LineFormat, lines: Iterable[tuple[int, bytes]], path: Path) -> tuple[dict[str, list[Any]], list[int]]:
    """(columns, row keys) of ``(offset, line)`` pairs; the key of a row is its line's offset."""
    keys: list[int] = []
    if kind == "text":  # every line is a row, blank ones too (the LM recipe drops them)
        texts = []
        for pos, line in lines:
            keys.append(pos)
            texts.append(_decode(line, pos, path))
        return {"text": texts}, keys
    if kind == "sst2":
        labels: list[int] = []
        sentences: list[str] = []
        for pos, line in lines:
            text = _decode(line, pos, path)
            if not text.strip():
                continue
            m = SST2_LINE.match(text)
            if m is None:
                raise DatasetError(f"{path}: the line at byte {pos} is not '<label> <sentence>' (SST-2 format); fix "
                                   "the line or pass --dataset-format for another format")
            keys.append(pos)
            labels.append(int(m.group(1)))
            sentences.append(m.group(2))
        return {"label": labels, "sentence": sentences}, keys
    records = []
    for pos, line in lines:
        text = _decode(line, pos, path)
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: the line at byte {pos} is not valid JSON ({exc.msg}, column {exc.colno}); "
                               "fix that line (one JSON object per line)") from None
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}: the line at byte {pos} holds a {type(rec).__name__}, not a JSON object; "
                               "each line must be one object (one row)")
        keys.append(pos)
        records.append(rec)
    return records_to_columns(records), keys
