"""Shared pieces of the benchmark scripts: a small but real teacher trained on wikitext-2.

The teacher is built once and kept under ``benchmarks/.cache`` (git-ignored), so every
benchmark measures the same model. Nothing here is imported by the library.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ../shared/data beside the checkout; KDPIPE_SHARED_DATA points elsewhere (a git worktree, another machine).
SHARED_DATA = Path(os.environ.get("KDPIPE_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CACHE_DIR = Path(__file__).resolve().parent / ".cache"


def wikitext_lines(split: str = "valid") -> list[str]:
    """Non-empty, non-heading lines of wikitext-2 ``valid`` or ``test``."""
    path = SHARED_DATA / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise SystemExit(f"{path} not found: the benchmarks need ../shared/data beside the checkout")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("=")]


def wikitext_teacher(
    *, vocab_size: int = 32000, hidden_size: int = 256, num_layers: int = 4, steps: int = 120
) -> Path:
    """A Llama teacher (4 layers, width 256, BPE vocab up to 32k) trained briefly on wikitext-2 valid.

    Returns the HF folder (model + tokenizer). Built on first use (a few minutes on 2 cores).
    """
    name = f"wikitext-teacher-v{vocab_size}-h{hidden_size}-l{num_layers}-s{steps}"
    out = CACHE_DIR / name
    if (out / "done.json").is_file():
        return out
    import torch

    from pipeline.demo.toy import build_llama, build_tokenizer, token_stream, train_causal_lm

    torch.manual_seed(0)
    lines = wikitext_lines("valid")
    tok = build_tokenizer(lines, vocab_size=vocab_size)
    model = build_llama(len(tok), hidden_size=hidden_size, num_layers=num_layers, tokenizer=tok,
                        max_position_embeddings=1024)
    stream = token_stream(tok, lines)
    t0 = time.perf_counter()
    # Small batches keep the build to a few minutes on 2 cores; the point is realistic,
    # peaked next-token distributions, not a good language model.
    losses = train_causal_lm(model, stream, steps=steps, batch_size=8, seq_len=64, lr=3e-3)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "done.json").write_text(json.dumps({
        "vocab_size": len(tok), "train_tokens": len(stream), "steps": steps,
        "first_loss": losses[0], "final_loss": losses[-1], "train_s": time.perf_counter() - t0,
    }, indent=2))
    return out


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Render ``rows`` as a markdown table (returned and printed)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    print(wikitext_teacher())
