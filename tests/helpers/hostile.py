"""The hostile-cache corpus of issue 10: one generator per case, each writing the case into a fresh folder.

Every generator starts from a valid small cache written with the ``helpers.cache`` builders (2 work
units x 4 rows x 12 tokens, k=8; or ``sampled`` with 16 draws) and then breaks it in one way. Shards
are rewritten with pyarrow (IPC file format, zstd), and the manifest's ``bytes``/``sha256``/totals are
updated wherever the case needs the checksums to *agree* (so only a reader that looks at the content can
tell). Nothing here is a binary blob.

``gen(folder, base)`` writes the cache to ``folder / "cache"`` and returns that path; it may also write
files *beside* the cache (``folder / "outside"``: the targets of symlinks pointing out of the cache root,
e.g. fake credentials). Symlinks inside the corpus are relative, so ``clone_case`` makes self-contained
copies.

``CASES[name].expect[command]`` says what each command must do with the case:

* ``"reject"``: exit status 2 and a last stderr line ``error: ...`` that contains ``Case.mentions`` (the
  file or field at fault; one of several where there are several fair ways to name it);
* ``"accept"``: exit status 0 (the valid control case, and a valid cache for the right commands);
* ``"tolerate"``: exit status 0 or a clean reject as above. Used where a correct implementation may do
  either: ``cache info`` reads only the manifest, so it cannot see a bad shard; ``cache copy`` moves
  bytes whose checksums agree and need not decode rows; the spec says readers MUST ignore unknown
  columns (so a cache whose only oddity is an unknown column is valid if that column is never
  decompressed); manifest strings holding terminal escapes are legal JSON (they must only never reach
  the terminal raw).

Every command, whatever its expectation, must also: end within the timeout, print no traceback and no
terminal control byte (ESC, BEL, CR), stay below the RSS bound, change no file outside its output, and
(``cache copy``) never write the bytes of a symlink's target to the destination.

Commands: ``info`` (``kdpipe cache info``), ``verify``, ``copy`` (``cache copy CACHE DST``), ``train``
(``train-student --max-steps 1``), ``eval`` (``eval --cache``). Bit flips (outcome "same data or a clean
error") are fuzzed by ``tests/cache_format/test_bitflip.py``.

By hand: ``python tests/helpers/hostile.py OUT_DIR`` writes every case into ``OUT_DIR/<case>/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cache_format import CacheIdentity, CacheWriter, SampledEncoding, TopKEncoding
from helpers.cache import VOCAB, identity, sampled_batch, topk_batch

COMMANDS = ("info", "verify", "copy", "train", "eval")
MANIFEST = "manifest.json"
SHARD0 = "shard-u000000000-p0000.arrow"
SHARD1 = "shard-u000000001-p0000.arrow"
UNITS, ROWS_PER_UNIT, LENGTH, K, NUM_DRAWS = 2, 4, 12, 8, 16
# Fake credentials: the target of a shard symlink that points out of the cache root.
SECRET = b"[default]\naws_access_key_id = AKIAHOSTILETESTKEY01\naws_secret_access_key = hostile/secret/0123456789\n"
BOMB_BYTES = 1 << 30  # ~1 GiB of zeros, zstd-compressed to a few tens of KB
BOMB_ROWS = 2_000_000
DEEP = 100_000
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # SPEC §2


@dataclass(frozen=True)
class Base:
    """The tokenizer the corpus caches claim (the harness passes its tiny student's, so training is possible)."""

    vocab: int = VOCAB
    fingerprint: str = "sha256:00"
    tokenizer_name: str = "toy-tok"


def base_identity(base: Base, encoding: Any, **changes: Any) -> CacheIdentity:
    ident = identity(encoding, vocab=base.vocab)
    tok = {**ident.tokenizer, "name": base.tokenizer_name, "fingerprint": base.fingerprint}
    return dataclasses.replace(ident, tokenizer=tok, **changes)


def write_base(cache: Path, base: Base = Base(), *, kind: str = "topk", ident: CacheIdentity | None = None) -> Path:
    """The valid small cache every case starts from: 2 units (one shard each) x 4 rows x 12 tokens."""
    enc = TopKEncoding(k=K) if kind == "topk" else SampledEncoding(num_draws=NUM_DRAWS)
    ident = ident or base_identity(base, enc)
    # The cases edit 1.0 columns (topk_values, topk_id_b*); the 1.1 set columns' own hostile cases are in
    # tests/cache_format/test_idset.py.
    with CacheWriter(cache, ident, id_coding="planes") as w:
        for u in range(UNITS):
            sids = [f"u{u}-r{i}" for i in range(ROWS_PER_UNIT)]
            if kind == "topk":
                w.write(topk_batch(sids, k=K, vocab=base.vocab, length=LENGTH, seed=u))
            else:
                w.write(sampled_batch(sids, num_draws=NUM_DRAWS, vocab=base.vocab, length=LENGTH, seed=u))
            w.end_unit(u)
        w.finalize()
    return cache


# ----------------------------------------------------------------------------------------- helpers


def manifest(cache: Path) -> dict[str, Any]:
    return json.loads((cache / MANIFEST).read_text())


def save_manifest(cache: Path, m: dict[str, Any]) -> None:
    (cache / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")


def _entry(m: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in m["shards"] if s["name"] == name)


def _retotal(m: dict[str, Any]) -> None:
    m["totals"] = {"shards": len(m["shards"]), **{k: sum(s[k] for s in m["shards"])
                                                   for k in ("rows", "tokens", "positions", "bytes")}}


def refresh(cache: Path, name: str, **counts: int) -> None:
    """Make the manifest agree with shard ``name`` as it now is on disk (bytes, sha256, given counts)."""
    data = (cache / name).read_bytes()
    m = manifest(cache)
    e = _entry(m, name)
    e.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), **counts)
    _retotal(m)
    save_manifest(cache, m)


def read_table(path: Path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as fh:
        return pa.ipc.open_file(fh).read_all()


def write_table(path: Path, table: pa.Table) -> None:
    """One record batch, zstd, with ``kdpipe.batch_rows`` set to match."""
    meta = dict(table.schema.metadata or {})
    meta[b"kdpipe.batch_rows"] = json.dumps([table.num_rows]).encode()
    table = table.replace_schema_metadata(meta)
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)
    opts = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=opts) as w:
        w.write_batch(batch)


def rewrite_shard(cache: Path, name: str, change: Callable[[pa.Table], pa.Table], **counts: int) -> None:
    """Apply ``change`` to shard ``name``'s table, write it back, and make the manifest agree with it."""
    write_table(cache / name, change(read_table(cache / name)))
    refresh(cache, name, **counts)


def set_column(table: pa.Table, name: str, values: list[Any], typ: pa.DataType) -> pa.Table:
    """Replace column ``name`` by ``values`` (Python lists), typed ``typ`` (the field keeps its nullability)."""
    i = table.schema.get_field_index(name)
    fld = table.schema.field(i)
    return table.set_column(i, pa.field(name, typ, nullable=fld.nullable), pa.array(values, typ))


def edit_list(table: pa.Table, name: str, row: int, edit: Callable[[list[Any]], list[Any]]) -> pa.Table:
    """Apply ``edit`` to one row's list in list column ``name`` (type unchanged)."""
    col = table.column(name)
    rows = col.to_pylist()
    rows[row] = edit(list(rows[row]))
    return set_column(table, name, rows, col.type)


def clone_case(src: Path, dst: Path) -> None:
    """Copy a case folder: files copied, symlinks re-created as links (never followed), FIFOs re-made."""
    dst.mkdir(parents=True, exist_ok=False)
    for entry in os.scandir(src):
        s, d = Path(entry.path), dst / entry.name
        st = os.lstat(s)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISDIR(st.st_mode):
            clone_case(s, d)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(d)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(s, d, follow_symlinks=False)
        else:
            raise ValueError(f"clone_case: {s} is neither a file, folder, symlink nor FIFO")


def snapshot(root: Path, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Relative path -> (type, sha256 | link target) of everything under ``root``, without following
    symlinks or opening anything but regular files (FIFOs and devices are recorded by type only).
    Top-level names in ``skip`` are left out."""
    out: dict[str, Any] = {}

    def walk(d: Path, rel: str) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            r = f"{rel}{entry.name}"
            if not rel and entry.name in skip:
                continue
            st = os.lstat(entry.path)
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("link", os.readlink(entry.path))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = ("dir", None)
                walk(Path(entry.path), r + "/")
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(entry.path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                out[r] = ("file", h.hexdigest())
            else:
                out[r] = ("fifo" if stat.S_ISFIFO(st.st_mode) else "special", None)

    walk(root, "")
    return out


def diff_snapshots(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``["deleted X", ..., "changed Y", ..., "added Z", ...]`` (losses first, each group sorted)."""
    return ([f"deleted {k}" for k in sorted(before.keys() - after.keys())]
            + [f"changed {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
            + [f"added {k}" for k in sorted(after.keys() - before.keys())])


def _start(folder: Path, base: Base, kind: str = "topk", ident: CacheIdentity | None = None) -> Path:
    return write_base(folder / "cache", base, kind=kind, ident=ident)


# ---------------------------------------------------------------------------- valid and control cases


def valid(folder: Path, base: Base) -> Path:
    """The unaltered base cache: every command must succeed (the harness's control)."""
    return _start(folder, base)


def other_tokenizer(folder: Path, base: Base) -> Path:
    """A valid cache made with another tokenizer (same vocab size, other fingerprint): train and eval refuse it."""
    other = Base(vocab=base.vocab, fingerprint="sha256:" + "ab" * 32, tokenizer_name="other-tok")
    return _start(folder, other)


# ---------------------------------------------------------------------------------------- security


def shard_symlink_outside_root(folder: Path, base: Base) -> Path:
    """Shard 0 is a symlink to a file outside the cache root holding (fake) credentials; manifest unchanged."""
    cache = _start(folder, base)
    (folder / "outside").mkdir()
    (folder / "outside" / "credentials").write_bytes(SECRET)
    (cache / SHARD0).unlink()
    os.symlink("../outside/credentials", cache / SHARD0)
    return cache


def shard_symlink_to_valid_shard_outside_root(folder: Path, base: Base) -> Path:
    """Shard 0 moved out of the cache root and replaced by a symlink to it: the bytes still match the manifest,
    but SPEC §1 lets readers open only files inside the root."""
    cache = _start(folder, base)
    (folder / "outside").mkdir()
    (cache / SHARD0).rename(folder / "outside" / SHARD0)
    os.symlink("../outside/" + SHARD0, cache / SHARD0)
    return cache


def manifest_symlink_outside_root(folder: Path, base: Base) -> Path:
    """manifest.json is a symlink to a (valid) manifest outside the cache root."""
    cache = _start(folder, base)
    (folder / "outside").mkdir()
    (cache / MANIFEST).rename(folder / "outside" / MANIFEST)
    os.symlink("../outside/" + MANIFEST, cache / MANIFEST)
    return cache


def _dev_zero(folder: Path, base: Base, nbytes: int) -> Path:
    cache = _start(folder, base)
    (cache / SHARD0).unlink()
    os.symlink("/dev/zero", cache / SHARD0)
    m = manifest(cache)
    e = _entry(m, SHARD0)
    e["bytes"] = nbytes
    if nbytes == 0:
        e["sha256"] = hashlib.sha256(b"").hexdigest()
    _retotal(m)
    save_manifest(cache, m)
    return cache


def shard_symlink_dev_zero_bytes_0(folder: Path, base: Base) -> Path:
    """Shard 0 -> /dev/zero, manifest says 0 bytes (and the empty file's sha256): stat() agrees, reads never end."""
    return _dev_zero(folder, base, 0)


def shard_symlink_dev_zero_large_bytes(folder: Path, base: Base) -> Path:
    """Shard 0 -> /dev/zero, manifest says 10 GiB: a copy that trusts read() until EOF never stops."""
    return _dev_zero(folder, base, 10 * 2**30)


def shard_fifo(folder: Path, base: Base) -> Path:
    """Shard 0 is a named pipe (nobody writes to it): open() blocks forever."""
    cache = _start(folder, base)
    (cache / SHARD0).unlink()
    os.mkfifo(cache / SHARD0)
    return cache


def manifest_fifo(folder: Path, base: Base) -> Path:
    """manifest.json is a named pipe: open() blocks forever."""
    cache = _start(folder, base)
    (cache / MANIFEST).unlink()
    os.mkfifo(cache / MANIFEST)
    return cache


ESCAPES = {"title": "\x1b]0;pwned\x07", "clear": "\x1b[2J", "cr": "\rok"}


def manifest_terminal_escapes(folder: Path, base: Base) -> Path:
    """Manifest strings (teacher name/revision, dataset, split, producer) hold OSC title, clear-screen and CR.

    Written through the writer, so the identity fingerprint is consistent; the cache is otherwise valid.
    """
    ident = base_identity(base, TopKEncoding(k=K))
    ident = dataclasses.replace(
        ident,
        teacher={**ident.teacher, "name": "teacher" + ESCAPES["title"], "revision": ESCAPES["clear"] + "r1"},
        dataset={**ident.dataset, "name": "data" + ESCAPES["cr"], "split": "train" + ESCAPES["clear"]},
        recipe={**ident.recipe, "task": "lm"},
    )
    cache = _start(folder, base, ident=ident)
    m = manifest(cache)
    m["producer"] = "kdpipe" + ESCAPES["title"] + ESCAPES["cr"]
    save_manifest(cache, m)
    return cache


def shard_name_trailing_newline(folder: Path, base: Base) -> Path:
    """Shard 0 is named ``shard-u000000000-p0000.arrow\\n`` (file and manifest agree; ``$`` matches before \\n)."""
    cache = _start(folder, base)
    (cache / SHARD0).rename(cache / (SHARD0 + "\n"))
    m = manifest(cache)
    _entry(m, SHARD0)["name"] = SHARD0 + "\n"
    save_manifest(cache, m)
    return cache


# ------------------------------------------------------------------------------------------- bombs


def _zero_lists(rows: int, per_row: int) -> pa.ListArray:
    values = pa.array(np.zeros(rows * per_row, np.uint8))
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * per_row)
    return pa.ListArray.from_arrays(offsets, values)


def unknown_column_zstd_bomb(folder: Path, base: Base) -> Path:
    """Shard 0 gains a column ``x_bomb`` (list<uint8>) of 1 GiB of zeros that zstd packs into a small shard.

    Checksums agree. The spec says readers MUST ignore unknown columns: a reader that decompresses it
    anyway needs 1 GiB.
    """
    cache = _start(folder, base)

    def add(t: pa.Table) -> pa.Table:
        return t.append_column(pa.field("x_bomb", pa.list_(pa.uint8()), nullable=False),
                               _zero_lists(t.num_rows, BOMB_BYTES // t.num_rows))

    rewrite_shard(cache, SHARD0, add)
    return cache


def spec_column_zstd_bomb(folder: Path, base: Base) -> Path:
    """Shard 0's ``topk_values`` row 0 holds 1 GiB of zeros (instead of n*k values); checksums agree."""
    cache = _start(folder, base)

    def bomb(t: pa.Table) -> pa.Table:
        col = t.column("topk_values").combine_chunks()
        lengths = np.diff(col.offsets.to_numpy())
        lengths[0] = BOMB_BYTES
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = np.zeros(int(offsets[-1]), np.uint8)
        old = col.values.to_numpy()
        values[BOMB_BYTES:] = old[int(col.offsets[1].as_py()):]
        arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        i = t.schema.get_field_index("topk_values")
        return t.set_column(i, t.schema.field(i), arr)

    rewrite_shard(cache, SHARD0, bomb)
    return cache


def two_million_empty_rows(folder: Path, base: Base) -> Path:
    """Shard 0 is one record batch of 2,000,000 empty rows (empty sample ids and lists): ~6 KB on disk.

    The writer caps record batches at 1,024 rows; manifest (rows=2,000,000) and ``kdpipe.batch_rows``
    agree with the file.
    """
    cache = _start(folder, base)
    schema = read_table(cache / SHARD0).schema
    n = BOMB_ROWS
    zeros = pa.py_buffer(np.zeros(n + 1, np.int32).tobytes())
    cols: list[pa.Array] = []
    for fld in schema:
        if fld.name == "sample_id":
            cols.append(pa.StringArray.from_buffers(n, zeros, pa.py_buffer(b"")))
        elif fld.name == "label":
            cols.append(pa.nulls(n, pa.int32()))
        else:
            cols.append(pa.ListArray.from_arrays(pa.Array.from_buffers(pa.int32(), n + 1, [None, zeros]),
                                                 pa.array([], fld.type.value_type)))
    write_table(cache / SHARD0, pa.Table.from_arrays(cols, schema=schema))
    refresh(cache, SHARD0, rows=n, tokens=0, positions=0)
    return cache


def buffer_length_bitflip(folder: Path, base: Base) -> Path:
    """One flipped bit (bit 56) in the uncompressed-length prefix of shard 0's first compressed buffer.

    The buffer then claims 2^56 + n bytes (a malloc of ~72 PB). The manifest's checksum is updated, so
    only decoding can tell.
    """
    cache = _start(folder, base)
    data = bytearray((cache / SHARD0).read_bytes())
    magic = data.find(b"\x28\xb5\x2f\xfd")  # zstd frame magic; the 8 bytes before it are the int64 length
    assert magic >= 8, "no zstd-compressed buffer found in the base shard"
    data[magic - 1] ^= 0x01
    (cache / SHARD0).write_bytes(bytes(data))
    refresh(cache, SHARD0)
    return cache


def manifest_nested_100k(folder: Path, base: Base) -> Path:
    """manifest.json is an array nested 100,000 levels deep (200 KB): a recursive parser overflows."""
    cache = _start(folder, base)
    (cache / MANIFEST).write_bytes(b"[" * DEEP + b"]" * DEEP)
    return cache


def manifest_oversized(folder: Path, base: Base) -> Path:
    """A valid manifest padded with whitespace to 64 MiB + 1 byte (over the spec's cap)."""
    cache = _start(folder, base)
    text = (cache / MANIFEST).read_bytes()
    (cache / MANIFEST).write_bytes(text + b" " * (MAX_MANIFEST_BYTES + 1 - len(text)))
    return cache


# --------------------------------------------------------- invalid data (checksums agree; verify rejects)


def positive_logprobs(folder: Path, base: Base) -> Path:
    """Row 0, position 0: rank 0 gets q=0 and norm_code -32767, so it decodes to log-prob +1.0."""
    cache = _start(folder, base)

    def change(t: pa.Table) -> pa.Table:
        def values(v: list[int]) -> list[int]:
            q = np.cumsum(np.array(v, np.uint8), dtype=np.uint8)
            q[0] = 0
            return [int(x) for x in np.diff(q, prepend=np.uint8(0)).astype(np.uint8)]

        t = edit_list(t, "topk_values", 0, values)
        return edit_list(t, "norm_code", 0, lambda v: [-32767, *v[1:]])

    rewrite_shard(cache, SHARD0, change)
    return cache


def tail_one_on_top_of_topk(folder: Path, base: Base) -> Path:
    """Row 0: tail_code 0 (tail = 1.0) at every position, on top of the top-k mass."""
    cache = _start(folder, base)
    rewrite_shard(cache, SHARD0, lambda t: edit_list(t, "tail_code", 0, lambda v: [0] * len(v)))
    return cache


def position_minus_one(folder: Path, base: Base) -> Path:
    """Row 0's first target position is -1 (still strictly increasing; wraps to the last token if indexed)."""
    cache = _start(folder, base)
    rewrite_shard(cache, SHARD0, lambda t: edit_list(t, "positions", 0, lambda v: [-1, *v[1:]]))
    return cache


def positions_reversed(folder: Path, base: Base) -> Path:
    """Row 0's positions in decreasing order."""
    cache = _start(folder, base)
    rewrite_shard(cache, SHARD0, lambda t: edit_list(t, "positions", 0, lambda v: v[::-1]))
    return cache


def position_beyond_row(folder: Path, base: Base) -> Path:
    """Row 0's last target position is 40, beyond its 12 tokens."""
    cache = _start(folder, base)
    rewrite_shard(cache, SHARD0, lambda t: edit_list(t, "positions", 0, lambda v: [*v[:-1], 40]))
    return cache


def topk_id_beyond_vocab(folder: Path, base: Base) -> Path:
    """Row 0, position 0, rank 0: token id 65535 (>= vocab)."""
    cache = _start(folder, base)

    def change(t: pa.Table) -> pa.Table:
        t = edit_list(t, "topk_id_b0", 0, lambda v: [255, *v[1:]])
        return edit_list(t, "topk_id_b1", 0, lambda v: [255, *v[1:]])

    rewrite_shard(cache, SHARD0, change)
    return cache


def input_id_beyond_vocab(folder: Path, base: Base) -> Path:
    """Row 0's first input token is vocab + 7."""
    cache = _start(folder, base)
    rewrite_shard(cache, SHARD0, lambda t: edit_list(t, "input_ids", 0, lambda v: [base.vocab + 7, *v[1:]]))
    return cache


def nan_tail(folder: Path, base: Base) -> Path:
    """``tail_code`` is list<float32> (not uint16) and row 0's first entry is NaN: the tail decodes to NaN."""
    cache = _start(folder, base)

    def change(t: pa.Table) -> pa.Table:
        rows = [[float(x) for x in r] for r in t.column("tail_code").to_pylist()]
        rows[0][0] = float("nan")
        return set_column(t, "tail_code", rows, pa.list_(pa.float32()))

    rewrite_shard(cache, SHARD0, change)
    return cache


def input_ids_int64(folder: Path, base: Base) -> Path:
    """``input_ids`` is list<int64> (not int32); row 0's first token is 2^32 + 5, which wraps to 5 as int32."""
    cache = _start(folder, base)

    def change(t: pa.Table) -> pa.Table:
        rows = t.column("input_ids").to_pylist()
        rows[0][0] = 2**32 + 5
        return set_column(t, "input_ids", rows, pa.list_(pa.int64()))

    rewrite_shard(cache, SHARD0, change)
    return cache


def sample_id_binary(folder: Path, base: Base) -> Path:
    """``sample_id`` is binary (not string); same bytes."""
    cache = _start(folder, base)
    rewrite_shard(cache, SHARD0, lambda t: set_column(
        t, "sample_id", [s.encode() for s in t.column("sample_id").to_pylist()], pa.binary()))
    return cache


def topk_values_string(folder: Path, base: Base) -> Path:
    """``topk_values`` is a string column (not list<uint8>)."""
    cache = _start(folder, base)
    rewrite_shard(cache, SHARD0, lambda t: set_column(
        t, "topk_values", [bytes(v).hex() for v in t.column("topk_values").to_pylist()], pa.string()))
    return cache


def value_step_changed(folder: Path, base: Base) -> Path:
    """``value_step`` 0.125 -> 0.0625 in every shard's ``kdpipe.encoding`` and in the manifest (identity,
    shard_encoding, fingerprint): everything agrees, but every log-prob decodes to half its value."""
    cache = _start(folder, base)
    for name in (SHARD0, SHARD1):
        def change(t: pa.Table) -> pa.Table:
            meta = dict(t.schema.metadata)
            enc = json.loads(meta[b"kdpipe.encoding"])
            enc["value_step"] = 0.0625
            meta[b"kdpipe.encoding"] = json.dumps(enc, sort_keys=True).encode()
            return t.replace_schema_metadata(meta)

        rewrite_shard(cache, name, change)
    m = manifest(cache)
    m["identity"]["encoding"]["value_step"] = 0.0625
    m["shard_encoding"]["value_step"] = 0.0625
    m["identity_fingerprint"] = CacheIdentity.from_dict(m["identity"]).fingerprint()
    save_manifest(cache, m)
    return cache


def shard_listed_twice(folder: Path, base: Base) -> Path:
    """The manifest lists shard 0 twice (same file; totals add up)."""
    cache = _start(folder, base)
    m = manifest(cache)
    m["shards"].insert(1, dict(m["shards"][0]))
    _retotal(m)
    save_manifest(cache, m)
    return cache


def shard_duplicated_under_new_name(folder: Path, base: Base) -> Path:
    """Shard 0 copied as unit 2's shard (consistent entry): its rows (same sample ids) would be trained twice."""
    cache = _start(folder, base)
    name2 = "shard-u000000002-p0000.arrow"
    shutil.copyfile(cache / SHARD0, cache / name2)
    m = manifest(cache)
    m["shards"].append({**_entry(m, SHARD0), "name": name2, "unit": 2})
    m["units"] = [*m["units"], 2]
    _retotal(m)
    save_manifest(cache, m)
    return cache


def sampled_counts_not_summing_to_n(folder: Path, base: Base) -> Path:
    """A ``sampled`` cache (16 draws) whose row 0, position 0 counts sum to 17."""
    cache = _start(folder, base, kind="sampled")
    rewrite_shard(cache, SHARD0, lambda t: edit_list(t, "sampled_counts", 0, lambda v: [v[0] + 1, *v[1:]]))
    return cache


def sample_id_not_utf8(folder: Path, base: Base) -> Path:
    """Row 0's sample id is the bytes ``u0-r0\\xff\\xfe`` in a string column (not UTF-8)."""
    cache = _start(folder, base)

    def change(t: pa.Table) -> pa.Table:
        raw = [s.encode() for s in t.column("sample_id").to_pylist()]
        raw[0] += b"\xff\xfe"
        i = t.schema.get_field_index("sample_id")
        return t.set_column(i, t.schema.field(i), pa.array(raw, pa.binary()).view(pa.string()))

    rewrite_shard(cache, SHARD0, change)
    return cache


def truncated_shard(folder: Path, base: Base) -> Path:
    """Shard 0 cut to half its bytes; manifest unchanged."""
    cache = _start(folder, base)
    data = (cache / SHARD0).read_bytes()
    (cache / SHARD0).write_bytes(data[: len(data) // 2])
    return cache


def same_size_damaged_shard(folder: Path, base: Base) -> Path:
    """Shard 0's stored sample id ``u0-r3`` becomes ``u0-r7`` in place: same size, still decodes to valid
    rows, different data; only the sha256 (manifest unchanged) tells."""
    cache = _start(folder, base)
    data = (cache / SHARD0).read_bytes()
    assert data.count(b"u0-r3") == 1, "the base shard no longer stores sample ids uncompressed"
    (cache / SHARD0).write_bytes(data.replace(b"u0-r3", b"u0-r7"))
    return cache


# -------------------------------------------------------------------------------------------- cases

Gen = Callable[[Path, Base], Path]


def _levels(level: str) -> dict[str, str]:
    """Expectation per command from where the fault lies (see the module docstring)."""
    if level == "manifest":  # the manifest itself is bad: nobody may use the cache
        return dict.fromkeys(COMMANDS, "reject")
    if level == "file":  # a shard file is not what the manifest says (type, size, bytes)
        return {"info": "tolerate", "verify": "reject", "copy": "reject", "train": "reject", "eval": "reject"}
    if level == "data":  # the files match the manifest; their content breaks the spec
        return {"info": "tolerate", "verify": "reject", "copy": "tolerate", "train": "reject", "eval": "reject"}
    if level == "valid":
        return dict.fromkeys(COMMANDS, "accept")
    if level == "any":
        return dict.fromkeys(COMMANDS, "tolerate")
    raise ValueError(level)


@dataclass(frozen=True)
class Case:
    gen: Gen
    level: str  # manifest | file | data | valid | any (see _levels)
    mentions: str | tuple[str, ...] = SHARD0  # what a reject's error line must name (any one of these)
    secret: bytes | None = None  # bytes that must never reach a copy's destination
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def expect(self) -> dict[str, str]:
        return {**_levels(self.level), **self.overrides}

    @property
    def doc(self) -> str:
        return (self.gen.__doc__ or "").strip().splitlines()[0]


CASES: dict[str, Case] = {
    "valid": Case(valid, "valid"),
    "other_tokenizer": Case(other_tokenizer, "valid", mentions="tokenizer",
                            overrides={"train": "reject", "eval": "reject"}),
    # security
    "shard_symlink_outside_root": Case(shard_symlink_outside_root, "file", secret=SECRET),
    "shard_symlink_to_valid_shard_outside_root": Case(shard_symlink_to_valid_shard_outside_root, "file"),
    "manifest_symlink_outside_root": Case(manifest_symlink_outside_root, "manifest", mentions=MANIFEST),
    "shard_symlink_dev_zero_bytes_0": Case(shard_symlink_dev_zero_bytes_0, "file"),
    "shard_symlink_dev_zero_large_bytes": Case(shard_symlink_dev_zero_large_bytes, "file"),
    "shard_fifo": Case(shard_fifo, "file"),
    "manifest_fifo": Case(manifest_fifo, "manifest", mentions=MANIFEST),
    "manifest_terminal_escapes": Case(manifest_terminal_escapes, "any"),
    "shard_name_trailing_newline": Case(shard_name_trailing_newline, "manifest"),
    # bombs
    "unknown_column_zstd_bomb": Case(unknown_column_zstd_bomb, "any"),
    "spec_column_zstd_bomb": Case(spec_column_zstd_bomb, "data"),
    "two_million_empty_rows": Case(two_million_empty_rows, "data"),
    "buffer_length_bitflip": Case(buffer_length_bitflip, "data"),
    "manifest_nested_100k": Case(manifest_nested_100k, "manifest", mentions=MANIFEST),
    "manifest_oversized": Case(manifest_oversized, "manifest", mentions=MANIFEST),
    # invalid data: verify rejects it, so nothing may train on it
    "positive_logprobs": Case(positive_logprobs, "data"),
    "tail_one_on_top_of_topk": Case(tail_one_on_top_of_topk, "data"),
    "position_minus_one": Case(position_minus_one, "data"),
    "positions_reversed": Case(positions_reversed, "data"),
    "position_beyond_row": Case(position_beyond_row, "data"),
    "topk_id_beyond_vocab": Case(topk_id_beyond_vocab, "data"),
    "input_id_beyond_vocab": Case(input_id_beyond_vocab, "data"),
    "nan_tail": Case(nan_tail, "data"),
    "input_ids_int64": Case(input_ids_int64, "data"),
    "sample_id_binary": Case(sample_id_binary, "data"),
    "topk_values_string": Case(topk_values_string, "data"),
    "value_step_changed": Case(value_step_changed, "data", mentions=(SHARD0, SHARD1)),
    "shard_listed_twice": Case(shard_listed_twice, "manifest"),
    "shard_duplicated_under_new_name": Case(shard_duplicated_under_new_name, "data",
                                            mentions=("u0-r0", "shard-u000000002-p0000.arrow")),
    "sampled_counts_not_summing_to_n": Case(sampled_counts_not_summing_to_n, "data"),
    "sample_id_not_utf8": Case(sample_id_not_utf8, "data"),
    "truncated_shard": Case(truncated_shard, "file"),
    "same_size_damaged_shard": Case(same_size_damaged_shard, "file"),
}


if __name__ == "__main__":  # write every case for manual inspection
    out = Path(sys.argv[1])
    for case_name, case in CASES.items():
        target = out / case_name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        print(case.gen(target, Base()))
