"""One unit's teacher work, the caches one dump writes from that one pass, and which teacher path fills them.

:func:`compute_unit` turns a unit's rows into one writer batch per cache (the local loop and every
``--engine ray`` actor run it, so both write the same rows).

``--out`` holds the cache of ``--encoding``; ``--out-sampled`` (beside a top-k ``--out``) adds a
sampled cache filled from the *same* forward pass per unit. Each folder is a normal cache whose
identity and saved config are exactly those of a dump of that encoding alone (:func:`sink_configs`),
so either can be resumed, verified, merged or trained from on its own, and the pair equals two
separate dumps (same seed per unit, same draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dump.config import DumpConfig
from pipeline.dump.tasks import Example, make_prompt_response_example
from pipeline.errors import ConfigError


def unit_seed(seed: int, unit: int) -> int:
    """A per-unit seed for the sampled encoding, the same whichever worker or run does the unit."""
    return int(np.random.SeedSequence([seed, unit]).generate_state(1)[0])


@dataclass
class Sink:
    """One cache this dump writes: its config (``--out`` / ``--out-sampled``), folder, identity and writer."""

    cfg: DumpConfig
    out: Any  # run._Output: the folder and how it is opened
    identity: Any
    flag: str
    writer: Any = None
    done: frozenset[int] = field(default_factory=frozenset)  # units complete before this run


def sink_configs(cfg: DumpConfig) -> list[tuple[DumpConfig, str]]:
    """Each cache's own config and flag: --out, then the --out-sampled cache as if dumped alone with its encoding."""
    configs = [(cfg, "--out")]
    if cfg.out_sampled is not None:
        configs.append((cfg.model_copy(update={"encoding": "sampled", "out": cfg.out_sampled, "out_sampled": None}),
                        "--out-sampled"))
    return configs


def check_distinct(paths: list[Path]) -> None:
    if len({p.expanduser().resolve() for p in paths}) < len(paths):
        raise ConfigError("--out and --out-sampled name the same folder; each cache needs its own")


def resolve_capture(cfg: DumpConfig) -> DumpConfig:
    """``--vllm-capture auto`` made concrete, so the identity's run record and the saved config name the path used."""
    path = cfg.capture_path()
    return cfg if path is None else cfg.model_copy(update={"vllm_capture": path})


def capture_label(cfg: DumpConfig) -> str:
    """How the teacher's distribution was obtained, for summaries: hf, vllm:logprobs or vllm:hidden."""
    path = cfg.capture_path()
    return cfg.backend if path is None else f"{cfg.backend}:{path}"


def check_given_backend(cfg: DumpConfig, backend: Any) -> None:
    """A teacher passed to ``run_dump`` must be the configured engine, loaded for the configured capture."""
    if backend.name != cfg.backend:
        raise ConfigError(f"the given teacher backend is {backend.name} but --backend is {cfg.backend}")
    path = cfg.capture_path()
    if path is not None and getattr(backend, "capture_path", path) != path:
        raise ConfigError(f"the given vLLM teacher captures with {backend.capture_path} but this dump needs "
                          f"--vllm-capture {path}; load the teacher with that capture")


def teacher_batches(backend: Any, rows: list[Example], cfg: DumpConfig, unit: int, encodings: list[str]) -> list[Any]:
    """Run the teacher once over one unit's rows; one writer batch per asked encoding (rows in unit order)."""
    from cache_format import ClassLogitsBatch, SampledBatch, TopKBatch
    from pipeline.dump.teachers.base import Want

    sids = [str(ex.sample_id) for ex in rows]
    seqs = [ex.input_ids for ex in rows]
    if cfg.task == "classification":
        logits = backend.class_logits(seqs)
        return [ClassLogitsBatch(sample_ids=sids, logits=logits, labels=[ex.label for ex in rows], input_ids=seqs)]
    positions = [ex.positions for ex in rows]
    want = Want(top_k=cfg.top_k if "topk" in encodings else None,
                num_draws=cfg.num_draws if "sampled" in encodings else None, seed=unit_seed(cfg.seed, unit))
    got = backend.capture(seqs, positions, want)
    return [SampledBatch(sample_ids=sids, input_ids=seqs, positions=positions, draws=got.draws)
            if enc == "sampled" else
            TopKBatch(sample_ids=sids, input_ids=seqs, positions=positions, ids=got.ids, logprobs=got.logprobs)
            for enc in encodings]


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-dump lines: the ``--out`` cache's (:mod:`.summary`), the teacher path, caches from the same pass."""
    from pipeline.dump.summary import format_summary as cache_lines

    lines = [cache_lines(s)]
    if s.get("capture"):
        lines.append(f"teacher pass: {s['capture']}")
    for other in s.get("also_written", []):
        bpp = other["bytes_per_token"]
        lines.append(f"also written from the same pass: {other['out']}  rows {other['rows']}  bytes {other['bytes']}"
                     f" ({'-' if bpp is None else format(bpp, '.1f')} B/position)")
    return "\n".join(lines)


def generate_responses(backend: Any, rows: list[Example], cfg: DumpConfig, tok: Any, max_length: int,
                        counts: dict[str, int]) -> list[Example]:
    """Sequence-level KD: the teacher answers each prompt greedily; rows become prompt + its answer."""
    prompts = [ex.input_ids for ex in rows]
    answers = backend.generate(prompts, min(cfg.max_new_tokens, max_length - 1), tok.eos_token_id)
    out: list[Example] = []
    for ex, ans in zip(rows, answers, strict=True):
        # The answer was written for this exact prompt, so an overlong row loses answer tokens, never prompt ones.
        room = max_length - len(ex.input_ids)
        counts["truncated"] += int(len(ans) > room)
        new, _ = make_prompt_response_example(ex.sample_id, ex.input_ids.tolist(), ans[:room].tolist(), max_length,
                                              tok.bos_token_id)
        if new is None:
            counts["skipped"] += 1
        else:
            out.append(new)
    return out


def compute_unit(backend: Any, rows: list[Example], cfg: DumpConfig, tok: Any, max_length: int,
                 counts: dict[str, int], unit: int) -> tuple[list[Any] | None, int]:
    """One unit's writer batches, one per cache of :func:`sink_configs` (None when no row is left), and its
    token count; run by the local loop and by each ``--engine ray`` actor, so both write the same rows."""
    if cfg.teacher_generates:
        rows = generate_responses(backend, rows, cfg, tok, max_length, counts)
    encodings = [c.encoding for c, _ in sink_configs(cfg)]
    batches = teacher_batches(backend, rows, cfg, unit, encodings) if rows else None
    return batches, int(sum(len(ex.input_ids) for ex in rows))
