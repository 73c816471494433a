"""Golden caches of format 1.0, written from literal codes with plain pyarrow (no kdpipe writer).

These are the exact caches kdpipe's 1.0 writer produced for the builders of ``test_golden.py``
(same columns, codes, schema metadata, zstd level 3, one record batch; with pyarrow 26 the same
file bytes). Writers moved on (format 1.1: another normaliser choice, JCS identity fingerprints),
so the 1.0 bytes live here, as data, and every later reader must still open, decode and verify
them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

SHARD = "shard-u000000000-p0000.arrow"
_IDENTITY_BASE: dict[str, Any] = {
    "teacher": {"name": "toy-teacher", "revision": "r1", "dtype": "float32", "backend": "hf", "backend_version": "0"},
    "tokenizer": {"name": "toy-tok", "vocab_size": 300, "model_vocab_size": 300, "fingerprint": "sha256:00"},
    "recipe": {"task": "lm", "template": None, "max_length": 64, "fields": {"text": "text"}},
    "dataset": {"name": "toy", "config": None, "split": "train", "fingerprint": "abc", "num_rows": 10},
}
_U8, _U16 = pa.list_(pa.uint8()), pa.list_(pa.uint16())
_EMPTY_TOPK = {"topk_values": [], "topk_id_b0": [], "topk_id_b1": [], "tail_code": [], "norm_code": []}

# kind -> (encoding, identity_fingerprint by the 1.0 rule, encoding columns, rows)
GOLDEN_10: dict[str, tuple[dict[str, Any], str, list[tuple[str, pa.DataType]], list[dict[str, Any]]]] = {
    "topk": (
        {"kind": "topk", "k": 4, "value_step": 0.125, "temperature": 1.0},
        "sha256:f9f3e5ca742fc5dd906c5ab34203a8c34169b513ed2637d789caa679a5ad98b1",
        [("topk_values", _U8), ("topk_id_b0", _U8), ("topk_id_b1", _U8), ("tail_code", _U16),
         ("norm_code", pa.list_(pa.int16()))],
        [{"sample_id": "empty", "input_ids": [], "positions": [], "label": None, **_EMPTY_TOPK},
         {"sample_id": "one-token", "input_ids": [3], "positions": [], "label": None, **_EMPTY_TOPK},
         {"sample_id": "doc-7#0", "input_ids": [1, 5, 9, 2, 8, 4], "positions": [0, 1, 2, 3, 4], "label": 1,
          "topk_values": [6, 7, 5, 6, 233, 23, 13, 18, 211, 0, 3, 5, 249, 0, 0, 0, 245, 37, 55, 163],
          "topk_id_b0": [5, 17, 43, 0, 1, 2, 3, 4, 250, 251, 7, 8, 10, 11, 12, 13, 42, 43, 44, 45],
          "topk_id_b1": [0, 0, 1, 0] + [0] * 16,
          "tail_code": [3832, 6607, 4664, 21495, 8071], "norm_code": [-847, -591, -818, 371, 963]}],
    ),
    "sampled": (
        {"kind": "sampled", "num_draws": 4, "temperature": 1.0},
        "sha256:99a730cf2cab3e3462488f88dbd8be331ba862581c4a9ea164e1ecb64c3b498b",
        [("sampled_num_unique", _U8), ("sampled_counts", _U8), ("sampled_id_b0", _U8), ("sampled_id_b1", _U8)],
        [{"sample_id": "a", "input_ids": [4, 4, 4], "positions": [0, 1], "label": None, "sampled_num_unique": [3, 2],
          "sampled_counts": [2, 1, 1, 3, 1], "sampled_id_b0": [1, 2, 9, 43, 0], "sampled_id_b1": [0, 0, 0, 1, 0]},
         {"sample_id": "b", "input_ids": [7, 8], "positions": [0], "label": None, "sampled_num_unique": [1],
          "sampled_counts": [4], "sampled_id_b0": [5], "sampled_id_b1": [0]}],
    ),
    "class_logits": (
        {"kind": "class_logits", "num_classes": 2, "labels": ["neg", "pos"], "temperature": 1.0},
        "sha256:0bf8813f0a1161f5f8e8ff557614cb81938943867e7045c13ecd0a2fb893dd8e",
        [("class_logits", pa.list_(pa.float32()))],
        [{"sample_id": "s1", "input_ids": [], "positions": [], "label": 1, "class_logits": [1.5, -0.25]},
         {"sample_id": "s2", "input_ids": [], "positions": [], "label": None, "class_logits": [-3.0, 2.0]}],
    ),
}


def _shard_bytes(enc: dict[str, Any], columns: list[tuple[str, pa.DataType]], rows: list[dict[str, Any]]) -> bytes:
    fields = [pa.field("sample_id", pa.string(), nullable=False),
              pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
              pa.field("positions", pa.list_(pa.int32()), nullable=False), pa.field("label", pa.int32()),
              *(pa.field(name, t, nullable=False) for name, t in columns)]
    meta = {b"kdpipe.format": b"kdpipe-logit-cache", b"kdpipe.format_version": b"1.0",
            b"kdpipe.encoding": json.dumps(enc, sort_keys=True).encode(), b"kdpipe.batch_rows": f"[{len(rows)}]".encode()}
    schema = pa.schema(fields, metadata=meta)
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=3), use_threads=False)
    with pa.ipc.new_file(sink, schema, options=opts) as w:
        for batch in table.to_batches():
            w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def write_golden_10(root: Path, kind: str) -> Path:
    """Write the 1.0 golden cache of ``kind`` (``topk``, ``sampled``, ``class_logits``) at ``root``."""
    enc, fingerprint, columns, rows = GOLDEN_10[kind]
    shard_enc = {**enc, "id_bytes": 2} if kind != "class_logits" else dict(enc)
    data = _shard_bytes(shard_enc, columns, rows)
    root.mkdir(parents=True)
    (root / SHARD).write_bytes(data)
    tokens, positions = sum(len(r["input_ids"]) for r in rows), sum(len(r["positions"]) for r in rows)
    shard = {"name": SHARD, "unit": 0, "part": 0, "rows": len(rows), "tokens": tokens, "positions": positions,
             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": "kdpipe-logit-cache", "format_version": "1.0", "created_at": "2026-01-01T00:00:00Z",
                "producer": "kdpipe cache_format 0.1.0", "identity": {**_IDENTITY_BASE, "encoding": enc, "run": {}},
                "identity_fingerprint": fingerprint, "shard_encoding": shard_enc, "shards": [shard], "units": [0],
                "totals": {"shards": 1, "rows": len(rows), "tokens": tokens, "positions": positions,
                           "bytes": len(data)}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return root
