"""Content fingerprints of what a dump reads: a local teacher's weights and a local dataset (SPEC §2.2).

Both are a *tree digest*: ``sha256:`` + the sha256 of the lines ``<sha256 hex of the file>  <name>\\n``,
one per file, sorted by the UTF-8 bytes of the name (for ordinary names, what
``LC_ALL=C sha256sum NAMES | sha256sum`` prints). Each file is hashed on its own, so a caller can
hash files in parallel, and the cost is one read of every byte (sha256 runs at 0.5-2 GB/s per core).
Only hashlib: no model or dataset library is imported.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

# The files of a local model folder that decide what the model computes (SPEC §2.2): weights and
# model configs, not tokenizer files (the tokenizer fingerprint covers those) and not a Trainer's
# optimizer/scheduler state, which can be twice the size of the weights and changes nothing.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
WEIGHT_CONFIGS = frozenset({"config.json", "generation_config.json", "adapter_config.json"})
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})
_CHUNK = 1 << 22


def file_sha256(path: Path, on_chunk: Callable[[bytes], None] | None = None) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks; ``on_chunk`` sees every chunk too (one read for both)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
    return digest.hexdigest()


def tree_digest(root: Path, names: Iterable[str], on_chunk: Callable[[bytes], None] | None = None) -> str:
    """``sha256:<hex>`` over ``<file sha256>  <name>\\n`` lines, names (POSIX paths under ``root``) in UTF-8 byte order."""
    listing = hashlib.sha256()
    for name in sorted(set(names), key=lambda n: n.encode("utf-8")):
        listing.update(f"{file_sha256(root / name, on_chunk)}  {name}\n".encode())
    return "sha256:" + listing.hexdigest()


def is_weight_file(name: str) -> bool:
    """True for the file names :func:`weights_revision` hashes."""
    return name not in NOT_WEIGHTS and (name in WEIGHT_CONFIGS or name.endswith(WEIGHT_SUFFIXES))


def weights_revision(folder: Path) -> str | None:
    """``teacher.revision`` of a local model folder: the tree digest of its weight and config files.

    Only files directly in the folder (what ``from_pretrained`` loads; symlinks followed, as in a
    hub cache snapshot). None when the folder has no such file.
    """
    names = [e.name for e in os.scandir(folder) if is_weight_file(e.name) and os.path.isfile(e.path)]
    return tree_digest(folder, names) if names else None


def dataset_fingerprint(root: Path, files: Iterable[Path], on_chunk: Callable[[bytes], None] | None = None) -> str:
    """``dataset.fingerprint`` of local files: the tree digest of ``files``, named by their paths under ``root``.

    ``root`` is the folder given as the dataset (a single file: its own folder), so the names do
    not depend on where the data sits on disk. Covers the bytes only: how rows are cut from them
    is ``dataset.format``/``rows`` and how many were used is ``num_rows``. ``on_chunk``: as in
    :func:`file_sha256` (a caller that also needs to scan the bytes reads them once).
    """
    root = Path(root)
    return tree_digest(root, [Path(f).relative_to(root).as_posix() for f in files], on_chunk)
