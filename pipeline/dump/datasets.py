"""Dataset loading for the dump: HF hub names, local files, and the plain formats in ``shared/data``.

Every loader returns a :class:`LoadedDataset`: flat columns (nested fields flattened to dotted
names such as ``info.post``), in the file's order, so a recipe can address any field by one name
and the dump's row order is deterministic.

Supported sources (``--dataset``):

- a hub name (``openai/gsm8k``) with ``--dataset-config`` and ``--split``, through ``datasets``;
- a local file: ``.json``/``.jsonl`` (JSON lines or a JSON array), ``.parquet``, ``.csv``, ``.txt``
  (one text per line, field ``text``), or an SST-2 style file (``<label> <sentence>`` per line,
  fields ``label`` and ``sentence``; detected by content or forced with ``--dataset-format sst2``);
- a local folder: the file of that folder whose name matches ``--split`` (``valid.txt``,
  ``test.jsonl``, ``stsa.binary.dev`` ...; ``validation`` also matches ``dev``/``valid``), or a
  folder written by ``datasets.Dataset.save_to_disk``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import DatasetError
from pipeline.hf_io import first_line

DatasetFormat = Literal["auto", "json", "parquet", "csv", "text", "sst2"]

# Split names people use interchangeably for the same held-out set.
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "validation": ("validation", "valid", "val", "dev"),
    "valid": ("valid", "validation", "val", "dev"),
    "dev": ("dev", "validation", "valid", "val"),
    "train": ("train",),
    "test": ("test",),
}
EXT_FORMAT: dict[str, DatasetFormat] = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}
SST2_LINE = re.compile(r"^\s*(-?\d+)\s+(\S.*?)\s*$")
# How each format becomes rows, recorded in the identity so a row number leads back to the source.
ROW_RULES: dict[str, str] = {
    "text": "one row per line of the UTF-8 file (lines end at '\\n', a '\\r' before it dropped), blank lines kept, "
            "field 'text'",
    "sst2": "one row per non-blank line '<label> <sentence>', fields 'label' and 'sentence'",
    "json": "one row per JSON object (JSON lines or a JSON array), nested fields flattened to dotted names",
    "parquet": "one row per Parquet row, nested fields flattened to dotted names",
    "csv": "one row per CSV record (header names the fields)",
    "hf": "one row per datasets.Dataset row in its order, struct fields flattened to dotted names",
}


@dataclass
class LoadedDataset:
    """Columns of a dataset in row order; ``source`` names it in error messages."""

    columns: dict[str, list[Any]]
    num_rows: int
    source: str
    name: str
    config: str | None
    split: str | None
    fingerprint: str
    format: str | None = None  # a ROW_RULES key
    # What names each row in sample ids and provenance: the row index of a whole dataset (the default),
    # or, for one dump unit (pipeline.dump.sources), the source's row key (byte offset or row index).
    row_keys: list[int] | None = None
    row_key_name: str = "row"  # how error messages name a row: "row 3", "line at byte 1024"

    @property
    def keys(self) -> list[int] | range:
        return self.row_keys if self.row_keys is not None else range(self.num_rows)

    def row_label(self, i: int) -> str:
        """Row ``i`` (0-based in these columns) as error messages name it."""
        return f"{self.row_key_name} {self.keys[i]}"

    @property
    def field_names(self) -> list[str]:
        return sorted(self.columns)

    def column(self, field: str, flag: str) -> list[Any]:
        """The values of ``field``; a missing field names the flag and lists the available ones."""
        if field not in self.columns:
            raise DatasetError(
                f"dataset {self.source} has no field '{field}' ({flag}); available fields: "
                f"{', '.join(self.field_names) or '(none)'}; pass one of them with {flag}"
            )
        return self.columns[field]

    def identity(self) -> dict[str, Any]:
        """The ``dataset`` part of the cache identity."""
        return {
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "num_rows": self.num_rows,
            "format": self.format,
            "rows": ROW_RULES.get(self.format or ""),
        }


def _flatten_record(rec: Any, prefix: str = "") -> dict[str, Any]:
    """``{"info": {"post": x}}`` -> ``{"info.post": x}``; lists and scalars stay as values."""
    if not isinstance(rec, dict):
        return {prefix or "value": rec}
    flat: dict[str, Any] = {}
    for key, value in rec.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten_record(value, name))
        else:
            flat[name] = value
    return flat


def records_to_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts (possibly with different keys) -> flat columns; missing values are ``None``."""
    flat = [_flatten_record(r) for r in records]
    names: dict[str, None] = {}
    for rec in flat:
        names.update(dict.fromkeys(rec))
    return {name: [rec.get(name) for rec in flat] for name in names}


def _file_fingerprint(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    h.update(extra.encode())
    return "sha256:" + h.hexdigest()[:32]


def _sniff_sst2(path: Path) -> bool:
    """True when the first non-empty lines all look like ``<int label> <sentence>``."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        lines = [ln for ln in (fh.readline() for _ in range(20)) if ln.strip()]
    return bool(lines) and all(SST2_LINE.match(ln) for ln in lines)


def detect_format(path: Path, fmt: DatasetFormat) -> DatasetFormat:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in EXT_FORMAT:
        found = EXT_FORMAT[path.suffix.lower()]
        if found == "text" and _sniff_sst2(path):
            return "sst2"
        return found
    if path.name.startswith("stsa.") or _sniff_sst2(path):
        return "sst2"
    raise DatasetError(
        f"cannot tell the format of dataset file {path}; name it .json/.jsonl/.parquet/.csv/.txt "
        "or pass --dataset-format json|parquet|csv|text|sst2"
    )


def _lines(path: Path) -> list[str]:
    """Lines as the dump's byte units cut them (pipeline.dump.sources): at '\\n' only, a '\\r' before it dropped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline (or is empty): no row after it
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _read_text(path: Path) -> dict[str, list[Any]]:
    # One text per line, as in wikitext's .txt files; empty lines are kept (recipes skip them)
    # so row numbers match line numbers.
    return {"text": _lines(path)}


def _read_sst2(path: Path) -> dict[str, list[Any]]:
    labels: list[int] = []
    sentences: list[str] = []
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        m = SST2_LINE.match(line)
        if m is None:
            raise DatasetError(
                f"{path}:{lineno} is not '<label> <sentence>' (SST-2 format); fix the line or pass "
                "--dataset-format for another format"
            )
        labels.append(int(m.group(1)))
        sentences.append(m.group(2))
    return {"label": labels, "sentence": sentences}


def read_json(path: Path) -> dict[str, list[Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as exc:
        raise DatasetError(f"dataset file {path} is not valid JSON / JSON lines: {exc}") from None
    if not all(isinstance(r, dict) for r in records):
        raise DatasetError(f"dataset file {path} must hold JSON objects (one row each), not bare values")
    return records_to_columns(records)


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DatasetError(f"dataset file {path} is not a readable Parquet file: {first_line(exc)}") from None
    return records_to_columns(table.to_pylist())


def _read_csv(path: Path) -> dict[str, list[Any]]:
    import csv

    with path.open(newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))
    return records_to_columns(records)


_READERS = {"json": read_json, "parquet": _read_parquet, "csv": _read_csv, "text": _read_text, "sst2": _read_sst2}


def split_file(folder: Path, split: str) -> Path:
    """The file in ``folder`` whose stem or last suffix names ``split`` (e.g. ``stsa.binary.dev``)."""
    wanted = _SPLIT_ALIASES.get(split, (split,))
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for name in wanted:
        for p in files:
            parts = {p.stem, p.name.rsplit(".", 1)[-1], p.name.split(".", 1)[0]}
            if name in parts and p.suffix.lower() not in {".md", ".py"} and p.name != "LICENSE":
                return p
    raise DatasetError(
        f"dataset folder {folder} has no file for split '{split}' (--split); files there: "
        f"{', '.join(p.name for p in files) or '(none)'}"
    )


def _limit_columns(columns: dict[str, list[Any]], limit: int | None) -> dict[str, list[Any]]:
    if limit is None:
        return columns
    return {k: v[:limit] for k, v in columns.items()}


def _num_rows(columns: dict[str, list[Any]]) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def _load_local(path: Path, split: str, fmt: DatasetFormat, limit: int | None) -> LoadedDataset:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return _load_saved_dataset(path, limit)
        file = split_file(path, split)
    else:
        file = path
    kind = detect_format(file, fmt)
    columns = _limit_columns(_READERS[kind](file), limit)
    return LoadedDataset(
        columns=columns,
        num_rows=_num_rows(columns),
        source=str(file),
        name=str(path),
        config=None,
        split=split if path.is_dir() else None,
        fingerprint=_file_fingerprint([file], f"format={kind};limit={limit}"),
        format=kind,
    )


def saved_dataset(path: Path) -> Any:
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder (memory-mapped Arrow, nothing read yet)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DatasetError(f"dataset folder {path} holds several splits; point --dataset at one split's folder")
    return ds


def _load_saved_dataset(path: Path, limit: int | None) -> LoadedDataset:
    return _from_hf(saved_dataset(path), str(path), str(path), None, None, limit)


def _from_hf(ds: Any, source: str, name: str, config: str | None, split: str | None, limit: int | None) -> LoadedDataset:
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.flatten()  # struct columns -> dotted names, e.g. info.post
    columns = ds.to_dict()
    return LoadedDataset(
        columns=columns,
        num_rows=len(ds),
        source=source,
        name=name,
        config=config,
        split=split,
        fingerprint=f"hf:{getattr(ds, '_fingerprint', 'unknown')};limit={limit}",
        format="hf",
    )


def _load_hub(name: str, config: str | None, split: str, limit: int | None) -> LoadedDataset:
    ds, source = hub_dataset(name, config, split)
    return _from_hf(ds, source, name, config, split, limit)


def hub_dataset(name: str, config: str | None, split: str) -> tuple[Any, str]:
    """(``datasets.Dataset``, its name for messages) of a hub dataset, loaded non-streaming (Arrow on disk)."""
    import datasets

    source = f"'{name}'" + (f" (config {config})" if config else "") + f" split {split}"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except FileNotFoundError as exc:
        raise DatasetError(
            f"dataset {name} is neither a local path nor loadable from the hub ({first_line(exc)}); pass an existing "
            "file or folder to --dataset, or a hub name reachable from here"
        ) from None
    except ValueError as exc:
        raise DatasetError(f"dataset {source} cannot be loaded: {first_line(exc)}; check --dataset-config and --split") from None
    except Exception as exc:  # network, auth, builder errors: all mean the same to the user
        raise DatasetError(
            f"dataset {source} cannot be loaded ({type(exc).__name__}: {first_line(exc)}); check the name, "
            "--dataset-config and --split, or pass a local file"
        ) from None
    return ds, source


def dataset_location(name: str, limit: int | None) -> tuple[Path, bool]:
    """(path, whether ``--dataset`` names a local file or folder rather than a hub dataset); refuses a bad --limit
    and a local-looking path that does not exist."""
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or path.suffix.lower() in EXT_FORMAT
    if looks_local and not path.exists():
        raise DatasetError(f"dataset path {path} does not exist; pass an existing file or folder to --dataset")
    if looks_local and not (path.is_file() or path.is_dir()):
        # A FIFO, socket or device: opening it could block forever or read without end.
        raise DatasetError(f"dataset path {path} is not a regular file or folder; pass a file or folder to --dataset")
    return path, looks_local


def load_dataset_rows(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    limit: int | None = None,
    fmt: DatasetFormat = "auto",
) -> LoadedDataset:
    """Load a dataset (local path or hub name), keep the first ``limit`` rows; refuse an empty one."""
    path, looks_local = dataset_location(name, limit)
    loaded = _load_local(path, split, fmt, limit) if looks_local else _load_hub(name, config, split, limit)
    if loaded.num_rows == 0:
        raise DatasetError(
            f"dataset {loaded.source} has no rows; check --dataset, --split and --limit"
        )
    return loaded
