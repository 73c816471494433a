"""Just enough of the Arrow IPC file layout to size a record batch *before* Arrow decodes it.

pyarrow offers no way to see a record batch's buffer sizes without decompressing them, and a
hostile shard can claim any size there (a zstd buffer of a few KB that inflates to GBs, or a
flipped bit that asks for a 2^56-byte allocation). So this module reads the file footer's
block list and a record batch's message metadata (flatbuffers, parsed here with bounds checks)
and the 8-byte uncompressed-length prefix of each compressed buffer
(https://arrow.apache.org/docs/format/Columnar.html#compression). Every malformed input raises
:class:`IpcMetaError`; callers turn it into a ``ShardCorruptError`` naming the shard.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

_MAGIC = b"ARROW1"
_CONTINUATION = 0xFFFFFFFF
# Message.header_type values (Message.fbs).
HEADER_DICTIONARY = 2
HEADER_RECORD_BATCH = 3
_BLOCK = struct.Struct("<qi4xq")  # Block: offset, metaDataLength, (padding), bodyLength
_PAIR = struct.Struct("<qq")  # FieldNode (length, null_count) and Buffer (offset, length)
# A message's flatbuffer is small (a few KB for hundreds of columns); a larger one is hostile.
MAX_MESSAGE_METADATA = 16 * 1024 * 1024


class IpcMetaError(Exception):
    """The file's IPC metadata is malformed (out-of-range offsets, wrong message type, bad sizes)."""


@dataclass(frozen=True)
class Block:
    """Where one message sits in the file (footer ``Block``)."""

    offset: int
    meta_len: int
    body_len: int


@dataclass(frozen=True)
class BatchMeta:
    """A record batch message: its row count, field nodes and body buffers (pre-order over the schema)."""

    length: int
    nodes: list[tuple[int, int]]  # (length, null_count)
    buffers: list[tuple[int, int]]  # (offset in the body, length in the file)
    compressed: bool
    body_offset: int  # absolute file offset of the body
    body_len: int


class _Flatbuffer:
    """Bounds-checked reads of flatbuffer tables, vectors and scalars from a bytes object."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def unpack(self, fmt: str | struct.Struct, pos: int) -> Any:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        if pos < 0 or pos + s.size > len(self.buf):
            raise IpcMetaError(f"flatbuffer read at {pos} is outside its {len(self.buf)} bytes")
        out = s.unpack_from(self.buf, pos)
        return out[0] if len(out) == 1 else out

    def root(self) -> int:
        return self.deref(0)

    def deref(self, pos: int) -> int:
        return pos + int(self.unpack("<I", pos))

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of ``table``, or None when absent (default value)."""
        vtable = table - int(self.unpack("<i", table))
        vt_len = int(self.unpack("<H", vtable))
        if 4 + 2 * index + 2 > vt_len:
            return None
        off = int(self.unpack("<H", vtable + 4 + 2 * index))
        return table + off if off else None

    def scalar(self, table: int, index: int, fmt: str, default: int = 0) -> int:
        pos = self.field(table, index)
        return default if pos is None else int(self.unpack(fmt, pos))

    def table(self, table: int, index: int) -> int | None:
        pos = self.field(table, index)
        return None if pos is None else self.deref(pos)

    def structs(self, table: int, index: int, s: struct.Struct) -> list[Any]:
        """The elements of a vector of fixed-size structs (empty when the field is absent)."""
        pos = self.table(table, index)
        if pos is None:
            return []
        count = int(self.unpack("<I", pos))
        if 4 + count * s.size > len(self.buf) - pos:
            raise IpcMetaError(f"a vector of {count} entries runs past the end of its flatbuffer")
        return [s.unpack_from(self.buf, pos + 4 + i * s.size) for i in range(count)]


def _read_at(fh: Any, pos: int, n: int, size: int) -> bytes:
    if pos < 0 or n < 0 or pos + n > size:
        raise IpcMetaError(f"a read of {n} bytes at offset {pos} runs past the file's end ({size} bytes)")
    fh.seek(pos)
    data = fh.read(n)
    if len(data) != n:
        raise IpcMetaError(f"short read: {len(data)} of {n} bytes at offset {pos}")
    return bytes(data)


def read_footer_blocks(fh: Any, size: int) -> tuple[list[Block], list[Block]]:
    """(dictionary blocks, record batch blocks) from the file footer."""
    tail = _read_at(fh, size - 10, 10, size) if size >= 10 else b""
    if tail[4:] != _MAGIC:
        raise IpcMetaError("the file does not end with the Arrow IPC magic")
    footer_len = struct.unpack("<i", tail[:4])[0]
    if not 0 < footer_len <= size - 18:
        raise IpcMetaError(f"footer length {footer_len} does not fit the file")
    fb = _Flatbuffer(_read_at(fh, size - 10 - footer_len, footer_len, size))
    root = fb.root()
    blocks = [[Block(*b) for b in fb.structs(root, i, _BLOCK)] for i in (2, 3)]  # dictionaries, recordBatches
    for b in blocks[0] + blocks[1]:
        if b.offset < 8 or b.meta_len < 8 or b.body_len < 0 or b.offset + b.meta_len + b.body_len > size:
            raise IpcMetaError(f"footer block {b} lies outside the file")
    return blocks[0], blocks[1]


def read_batch_meta(fh: Any, block: Block, size: int, header: int = HEADER_RECORD_BATCH) -> BatchMeta:
    """The record batch message at ``block`` (for ``HEADER_DICTIONARY``: the batch inside the dictionary)."""
    if block.meta_len > MAX_MESSAGE_METADATA:
        raise IpcMetaError(f"message metadata of {block.meta_len} bytes is over the {MAX_MESSAGE_METADATA} cap")
    raw = _read_at(fh, block.offset, block.meta_len, size)
    start = 8 if struct.unpack_from("<I", raw, 0)[0] == _CONTINUATION else 4
    fb = _Flatbuffer(raw[start:])
    msg = fb.root()
    if fb.scalar(msg, 1, "<B") != header:
        raise IpcMetaError(f"the message at offset {block.offset} is not a "
                           f"{'dictionary' if header == HEADER_DICTIONARY else 'record'} batch")
    batch = fb.table(msg, 2)
    if batch is not None and header == HEADER_DICTIONARY:
        batch = fb.table(batch, 1)
    if batch is None:
        raise IpcMetaError(f"the message at offset {block.offset} has no record batch")
    nodes = [(int(a), int(b)) for a, b in fb.structs(batch, 1, _PAIR)]
    buffers = [(int(a), int(b)) for a, b in fb.structs(batch, 2, _PAIR)]
    for off, length in buffers:
        if off < 0 or length < 0 or off + length > block.body_len:
            raise IpcMetaError(f"a buffer ({off}, {length}) lies outside the {block.body_len}-byte message body")
    if any(n < 0 or nulls < 0 or nulls > n for n, nulls in nodes):
        raise IpcMetaError("a field node has a negative length or more nulls than values")
    return BatchMeta(length=fb.scalar(batch, 0, "<q"), nodes=nodes, buffers=buffers,
                     compressed=fb.field(batch, 3) is not None, body_offset=block.offset + block.meta_len,
                     body_len=block.body_len)


def decompressed_size(fh: Any, meta: BatchMeta, index: int, size: int) -> int:
    """Bytes buffer ``index`` takes once decompressed, read from its 8-byte prefix (no allocation)."""
    off, length = meta.buffers[index]
    if not meta.compressed or length == 0:
        return length
    if length < 8:
        raise IpcMetaError(f"compressed buffer {index} is {length} bytes, shorter than its length prefix")
    prefix = struct.unpack("<q", _read_at(fh, meta.body_offset + off, 8, size))[0]
    if prefix == -1:  # stored uncompressed after the prefix
        return length - 8
    if prefix < 0:
        raise IpcMetaError(f"buffer {index} declares a negative uncompressed length {prefix}")
    return int(prefix)


def layout(t: pa.DataType) -> tuple[int, int] | None:
    """(field nodes, buffers) a column of type ``t`` takes in a record batch message, or None when unknown.

    Needed to step over columns this reader does not know; view types (variadic buffers) are not
    handled, so a caller refuses them where their count matters.
    """
    if pa.types.is_dictionary(t):
        return 1, 2
    if pa.types.is_null(t):
        own = 0
    elif (pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t)
          or pa.types.is_large_binary(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t)):
        own = 3
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        own = 2
    elif pa.types.is_fixed_size_list(t) or pa.types.is_struct(t):
        own = 1
    elif pa.types.is_union(t):
        own = 2 if t.mode == "dense" else 1
    elif pa.types.is_run_end_encoded(t):
        own = 0
    elif pa.types.is_primitive(t) or pa.types.is_decimal(t) or pa.types.is_fixed_size_binary(t):
        return 1, 2
    elif isinstance(t, pa.BaseExtensionType):
        return layout(t.storage_type)
    else:
        return None
    nodes, buffers = 1, own
    for i in range(t.num_fields):
        child = layout(t.field(i).type)
        if child is None:
            return None
        nodes, buffers = nodes + child[0], buffers + child[1]
    return nodes, buffers
