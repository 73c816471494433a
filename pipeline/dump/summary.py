"""The end-of-dump summary: what the cache holds, what this run did and where its time went.

Pure dict/str work on the manifest and the run's counters; imports nothing of the dump's machinery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_summary(manifest: dict[str, Any], loop: dict[str, Any], timing: dict[str, float], writer_stats: dict[str, Any],
                  wall: float, setup_s: float, counts: dict[str, int], out: Path) -> dict[str, Any]:
    """The dump's numbers: the cache's totals from ``manifest``, this run's loop counts and where the time went."""
    totals = manifest.get("totals", {})
    positions = int(totals.get("positions", 0))
    rows = int(totals.get("rows", 0))
    tokens_run = loop["tokens_this_run"]
    teacher_s = timing["teacher_s"]
    outside = max(0.0, wall - teacher_s)
    return {
        "out": str(out),
        "rows": rows,
        "tokens": int(totals.get("tokens", 0)),
        "positions": positions,
        "bytes": int(totals.get("bytes", 0)),
        "bytes_per_token": (int(totals.get("bytes", 0)) / positions) if positions else None,
        "bytes_per_row": (int(totals.get("bytes", 0)) / rows) if rows else None,
        "shards": int(totals.get("shards", 0)),
        **loop,
        "truncated": counts.get("truncated", 0),
        "split_documents": counts.get("split_documents", 0),
        "skipped_rows": counts.get("skipped", 0),
        "setup_s": setup_s,
        "wall_s": wall,
        "tokens_per_s": tokens_run / wall if wall > 0 else None,
        "teacher_s": teacher_s,
        "convert_s": timing["convert_s"],
        "writer_blocked_s": float(writer_stats.get("blocked_s", 0.0)),
        "encode_s": float(writer_stats.get("encode_s", 0.0)),
        "write_s": float(writer_stats.get("write_s", 0.0)),
        "teacher_share": teacher_s / wall if wall > 0 else None,
        "outside_teacher_share": outside / wall if wall > 0 else None,
    }


def format_summary(s: dict[str, Any]) -> str:
    """A few human lines for the end of a dump."""
    def f(v: Any, spec: str = ".3g") -> str:
        return "-" if v is None else format(v, spec)

    state = "" if s.get("finalized", True) else "  (not finalized yet: other workers' units are missing)"
    return "\n".join([
        f"cache: {s['out']}{state}  rows {s['rows']}  tokens {s['tokens']}  target positions {s['positions']}  "
        f"shards {s['shards']}  bytes {s['bytes']} ({f(s['bytes_per_token'], '.1f')} B/position)",
        f"this run: {s['units_done']} units ({s['units_resumed']} already done), {s['tokens_this_run']} tokens in "
        f"{f(s['wall_s'], '.2f')} s = {f(s['tokens_per_s'], '.0f')} tokens/s; setup {f(s['setup_s'], '.1f')} s",
        f"time: teacher {f(s['teacher_s'], '.2f')} s ({f((s['teacher_share'] or 0) * 100, '.1f')}%), conversion "
        f"{f(s['convert_s'], '.3f')} s, waiting on writer {f(s['writer_blocked_s'], '.3f')} s, encode+write "
        f"{f(s['encode_s'] + s['write_s'], '.3f')} s (background, overlapped), final flush "
        f"{f(s['finalize_s'], '.3f')} s; outside teacher "
        f"{f((s['outside_teacher_share'] or 0) * 100, '.1f')}%",
        f"rows truncated {s['truncated']}, documents split across windows {s['split_documents']}, "
        f"rows skipped (nothing to predict) {s['skipped_rows']}",
    ])
