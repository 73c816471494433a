"""Streaming dataset sources for the dump: deterministic work units, each read from its own slice of the source.

A :class:`Source` knows the dataset's identity and cuts it into ``num_units`` units without
parsing it; :meth:`Source.read_unit` reads one unit's rows (a small :class:`LoadedDataset` with
``row_keys``) and nothing else, so the dump's memory is a few units whatever the corpus size, a
worker reads only its own units, and a resumed dump never re-reads finished ones.

Unit rules (recorded in the identity's ``recipe.units``):

- **bytes** (``.txt``, JSON lines, SST-2 lines): unit ``u`` owns every line that *starts* in bytes
  ``[u*B, (u+1)*B)`` of the file (``B`` = ``--unit-bytes``; a line starts at offset 0 or after a
  ``\\n``). Reading it seeks to ``u*B - 1``, skips to the next line start and reads lines until
  one starts at or past ``(u+1)*B``. A line longer than ``B`` leaves the units it covers after its
  own empty. Lines end at ``\\n`` only (a ``\\r`` before it is dropped; no other Unicode line
  breaks split a row). The row key is the byte offset of the row's first byte in the file.
- **rows** (Parquet, CSV, ``datasets`` folders and hub datasets, JSON arrays): unit ``u`` holds
  source rows ``[u*R, (u+1)*R)`` (``R`` = ``--unit-rows``); the row key is the row index. Parquet
  reads only the row groups of those rows, batch by batch. CSV cannot be cut by bytes (a quoted
  field may hold newlines), so one streaming pass at open records the byte offset where each
  unit's first record starts. ``datasets`` memory-maps Arrow, so a unit is the slice
  ``ds[start:end]``; hub datasets are loaded non-streaming (Arrow on disk) because
  ``streaming=True`` cannot address a unit without reading every unit before it. A JSON array
  file cannot be split without parsing it: it is loaded whole (documented limitation; use JSON
  lines for big files).

``--limit N`` keeps the first N rows: line files end at the byte where row N ends (found by one
pass over those rows only), row sources cap the row count.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.dump.datasets import (
    ROW_RULES,
    DatasetFormat,
    LoadedDataset,
    dataset_location,
    detect_format,
    hub_dataset,
    read_json,
    records_to_columns,
    saved_dataset,
    split_file,
)
from pipeline.dump.fingerprints import dataset_fingerprint
from pipeline.dump.sources_lines import LineFormat, line_rows, skip_to_line_start
from pipeline.errors import DatasetError
from pipeline.hf_io import first_line

BYTE_KEY = "byte offset of the row's first byte in the file"
ROW_KEY = "row index"


def open_binary(path: Path) -> IO[bytes]:
    """Every byte a source reads goes through here (tests wrap it to count bytes read)."""
    return path.open("rb")


@dataclass
class Source:
    """A dataset cut into units; subclasses read one unit at a time."""

    name: str
    config: str | None
    split: str | None
    source: str  # the file or hub name, for error messages
    format: str  # a ROW_RULES key
    fingerprint: str
    num_rows: int | None  # None where counting would need a full parse (SST-2 and JSON lines without --limit)
    rule: str  # "bytes" or "rows"
    unit_size: int
    num_units: int = 0

    def identity(self) -> dict[str, Any]:
        """The ``dataset`` part of the cache identity (as :meth:`LoadedDataset.identity`)."""
        return {"name": self.name, "config": self.config, "split": self.split, "fingerprint": self.fingerprint,
                "num_rows": self.num_rows, "format": self.format, "rows": ROW_RULES.get(self.format)}

    def units_identity(self) -> dict[str, Any]:
        """``recipe.units``: how rows are cut into units (the same for any number of workers)."""
        size_key = "unit_bytes" if self.rule == "bytes" else "unit_rows"
        return {"rule": self.rule, size_key: self.unit_size, "count": self.num_units,
                "row_key": BYTE_KEY if self.rule == "bytes" else ROW_KEY}

    def read_unit(self, u: int) -> LoadedDataset:
        raise NotImplementedError

    def _loaded(self, columns: dict[str, list[Any]], keys: list[int]) -> LoadedDataset:
        return LoadedDataset(columns=columns, num_rows=len(keys), source=self.source, name=self.name,
                             config=self.config, split=self.split, fingerprint=self.fingerprint, format=self.format,
                             row_keys=keys, row_key_name="line at byte" if self.rule == "bytes" else "row")


@dataclass
class LineSource(Source):
    """Text, SST-2 and JSON-lines files: byte-range units over ``[0, end)``."""

    path: Path = Path()
    kind: LineFormat = "text"
    end: int = 0  # bytes in use: the file size, or where row --limit ends

    def __post_init__(self) -> None:
        self.num_units = -(-self.end // self.unit_size)

    def read_unit(self, u: int) -> LoadedDataset:
        lo, hi = u * self.unit_size, min((u + 1) * self.unit_size, self.end)
        with open_binary(self.path) as fh:
            pos = skip_to_line_start(fh, lo)
            columns, keys = line_rows(self.kind, _lines_from(fh, pos, hi), self.path)
        return self._loaded(columns, keys)


def _lines_from(fh: IO[bytes], pos: int, hi: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of every line starting in ``[pos, hi)``; ``fh`` is at ``pos``, a line start."""
    while pos < hi:
        line = fh.readline()
        if not line:
            return
        yield pos, line
        pos += len(line)


@dataclass
class RowSource(Source):
    """Sources cut into row units: unit ``u`` is source rows ``[u*R, (u+1)*R)`` of ``num_rows``."""

    def __post_init__(self) -> None:
        self.num_units = -(-(self.num_rows or 0) // self.unit_size)

    def row_range(self, u: int) -> tuple[int, int]:
        """[start, end) source rows of unit ``u``."""
        return u * self.unit_size, min((u + 1) * self.unit_size, self.num_rows or 0)


@dataclass
class ParquetSource(RowSource):
    path: Path = Path()

    def read_unit(self, u: int) -> LoadedDataset:
        import pyarrow.parquet as pq

        start, end = self.row_range(u)
        records: list[dict[str, Any]] = []
        pf = pq.ParquetFile(self.path)
        first = 0  # the first row of row group g
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first < end and first + n > start:  # only the row groups holding this unit's rows
                at = first
                for batch in pf.iter_batches(batch_size=min(self.unit_size, 1 << 16), row_groups=[g]):
                    lo, hi = max(start - at, 0), min(end - at, batch.num_rows)
                    if hi > lo:
                        records.extend(batch.slice(lo, hi - lo).to_pylist())
                    at += batch.num_rows
                    if at >= end:
                        break
            first += n
        return self._loaded(records_to_columns(records), list(range(start, end)))


@dataclass
class CsvSource(RowSource):
    """CSV: row units found by one streaming pass that records where each unit's first record starts."""

    path: Path = Path()
    header: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # byte offset of each unit's first record

    def read_unit(self, u: int) -> LoadedDataset:
        start, end = self.row_range(u)
        with open_binary(self.path) as fh:
            fh.seek(self.offsets[u])
            reader = csv.DictReader(_TextLines(fh, self.offsets[u], self.path), fieldnames=self.header)
            records = [rec for _, rec in zip(range(end - start), reader, strict=False)]
        return self._loaded(records_to_columns(records), list(range(start, start + len(records))))


class _TextLines:
    """The decoded lines of a binary file for ``csv``, tracking the byte offset consumed so far.

    ``csv.reader`` pulls one line at a time and never reads ahead, so after a record ``pos`` is
    where the next record starts."""

    def __init__(self, fh: IO[bytes], pos: int, path: Path) -> None:
        self.fh, self.pos, self.path = fh, pos, path

    def __iter__(self) -> _TextLines:
        return self

    def __next__(self) -> str:
        line = self.fh.readline()
        if not line:
            raise StopIteration
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.path}: the line at byte {self.pos} is not valid UTF-8 ({exc.reason}); "
                               "re-encode the file as UTF-8 (e.g. iconv -t utf-8)") from None
        self.pos += len(line)
        return text


def _csv_units(path: Path, unit_rows: int, limit: int | None) -> tuple[list[str], list[int], int]:
    """(header, each unit's starting byte offset, rows) in one pass; blank lines are no records (as DictReader)."""
    offsets: list[int] = []
    rows = 0
    with open_binary(path) as fh:
        lines = _TextLines(fh, 0, path)
        reader = csv.reader(lines)
        header = next(reader, [])
        while limit is None or rows < limit:
            at = lines.pos
            rec = next(reader, None)
            if rec is None:
                break
            if not rec:
                continue
            if rows % unit_rows == 0:
                offsets.append(at)
            rows += 1
    return header, offsets, rows


@dataclass
class ArrowSource(RowSource):
    """A ``datasets.Dataset`` (memory-mapped Arrow): unit ``u`` is the slice ``ds[u*R:(u+1)*R]``."""

    ds: Any = None

    def read_unit(self, u: int) -> LoadedDataset:
        start, end = self.row_range(u)
        return self._loaded(dict(self.ds[start:end]), list(range(start, end)))


@dataclass
class MemorySource(RowSource):
    """Rows already in memory (a JSON array file, which cannot be read in parts): row units over them."""

    columns: dict[str, list[Any]] = field(default_factory=dict)

    def read_unit(self, u: int) -> LoadedDataset:
        start, end = self.row_range(u)
        return self._loaded({k: v[start:end] for k, v in self.columns.items()}, list(range(start, end)))


# ----------------------------------------------------------------------------- opening


def _is_json_array(path: Path) -> bool:
    with open_binary(path) as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _limit_end(path: Path, kind: LineFormat, limit: int) -> tuple[int, int]:
    """(byte where row ``limit`` ends, rows found): one pass over the first ``limit`` rows only."""
    rows = pos = 0
    with open_binary(path) as fh:
        for line in fh:
            pos += len(line)
            rows += kind == "text" or bool(line.decode("utf-8", "replace").strip())  # as the units decide
            if rows >= limit:
                break
    return pos, rows


class _LineCount:
    """Lines of a file (rows of a text file), counted from the chunks the fingerprint reads anyway."""

    def __init__(self) -> None:
        self.newlines, self.last = 0, b"\n"

    def __call__(self, chunk: bytes) -> None:
        self.newlines += chunk.count(b"\n")
        self.last = chunk[-1:]

    @property
    def lines(self) -> int:
        return self.newlines + (self.last != b"\n")  # a last line without its newline counts too


def _open_file(root: Path, file: Path, name: str, split: str | None, kind: DatasetFormat, limit: int | None,
               unit_bytes: int, unit_rows: int) -> Source:
    # SPEC §2.2: the tree digest of the file, named under the dataset root (one streaming read of its
    # bytes, nothing parsed; a text file's lines are counted in that same read); how rows are cut and how
    # many were used are identity members of their own.
    counted = _LineCount() if kind == "text" and limit is None else None
    fp = dataset_fingerprint(root, [file], counted)
    common = {"name": name, "config": None, "split": split, "source": str(file), "fingerprint": fp}
    if kind in ("text", "sst2") or (kind == "json" and not _is_json_array(file)):
        size = file.stat().st_size
        end, rows = _limit_end(file, kind, limit) if limit is not None else (size, None)  # type: ignore[arg-type]
        if counted is not None:
            rows = counted.lines
        return LineSource(**common, format=kind, num_rows=rows, rule="bytes", unit_size=unit_bytes, path=file,
                          kind=kind, end=end)  # type: ignore[arg-type]
    if kind == "json":
        columns = read_json(file)
        n = len(next(iter(columns.values()))) if columns else 0
        n = min(n, limit) if limit is not None else n
        return MemorySource(**common, format=kind, num_rows=n, rule="rows", unit_size=unit_rows,
                            columns={k: v[:n] for k, v in columns.items()})
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            total = pq.ParquetFile(file).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DatasetError(f"dataset file {file} is not a readable Parquet file: {first_line(exc)}") from None
        n = min(total, limit) if limit is not None else total
        return ParquetSource(**common, format=kind, num_rows=n, rule="rows", unit_size=unit_rows, path=file)
    header, offsets, n = _csv_units(file, unit_rows, limit)
    return CsvSource(**common, format="csv", num_rows=n, rule="rows", unit_size=unit_rows, path=file,
                     header=header, offsets=offsets)


def _arrow_source(ds: Any, source: str, name: str, config: str | None, split: str | None, limit: int | None,
                  unit_rows: int) -> Source:
    n = min(len(ds), limit) if limit is not None else len(ds)
    flat = ds.flatten()  # struct columns -> dotted names (info.post); still memory-mapped
    return ArrowSource(name=name, config=config, split=split, source=source,
                       fingerprint=f"hf:{getattr(ds, '_fingerprint', 'unknown')};limit={limit}", format="hf",
                       num_rows=n, rule="rows", unit_size=unit_rows, ds=flat)


def open_source(name: str, *, config: str | None = None, split: str = "train", limit: int | None = None,
                fmt: DatasetFormat = "auto", unit_bytes: int = 512 * 1024, unit_rows: int = 256) -> Source:
    """The dataset ``name`` (local path or hub name) cut into units; refuses one without rows."""
    path, looks_local = dataset_location(name, limit)
    if not looks_local:
        ds, source = hub_dataset(name, config, split)
        src = _arrow_source(ds, source, name, config, split, limit, unit_rows)
    elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        src = _arrow_source(saved_dataset(path), str(path), str(path), None, None, limit, unit_rows)
    else:
        file = split_file(path, split) if path.is_dir() else path
        src = _open_file(path if path.is_dir() else path.parent, file, str(path), split if path.is_dir() else None,
                         detect_format(file, fmt), limit, unit_bytes, unit_rows)
    if src.num_units == 0 or src.num_rows == 0:
        raise DatasetError(f"dataset {src.source} has no rows; check --dataset, --split and --limit")
    return src


__all__ = ["Source", "open_binary", "open_source"]
