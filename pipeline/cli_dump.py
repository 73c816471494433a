"""`kdpipe dump-teacher`: flags and ``--config dump.yaml`` -> :class:`pipeline.dump.DumpConfig` -> ``run_dump``.

Every option defaults to ``None`` (= not given), so a YAML file's value is kept unless the flag
is passed; the real defaults live in ``DumpConfig`` (one place, each with its reason).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

Opt = typer.Option


def dump_teacher(
    teacher: Annotated[str | None, Opt("--teacher", help="Teacher: HF model folder or hub name.")] = None,
    backend: Annotated[str | None, Opt("--backend", help="hf | vllm")] = None,
    task: Annotated[str | None, Opt("--task", help="lm | classification | summarization | reasoning")] = None,
    dataset: Annotated[str | None, Opt("--dataset", help="Local file/folder or hub dataset name.")] = None,
    out: Annotated[str | None, Opt("--out", help="Cache folder to write (or resume).")] = None,
    config: Annotated[Path | None, Opt("--config", help="YAML with the same keys; flags override it.")] = None,
    tokenizer: Annotated[str | None, Opt("--tokenizer", help="Tokenizer (default: the teacher's).")] = None,
    revision: Annotated[str | None, Opt("--revision", help="Teacher revision (hub branch/tag/commit).")] = None,
    dataset_config: Annotated[str | None, Opt("--dataset-config", help="Hub dataset config.")] = None,
    split: Annotated[str | None, Opt("--split", help="Dataset split (default train).")] = None,
    dataset_format: Annotated[str | None, Opt("--dataset-format",
                                              help="auto | json | parquet | csv | text | sst2")] = None,
    limit: Annotated[int | None, Opt("--limit", help="Use only the first N rows.")] = None,
    text_field: Annotated[str | None, Opt("--text-field", help="Text / document / question field.")] = None,
    label_field: Annotated[str | None, Opt("--label-field", help="Gold label field (classification).")] = None,
    response_field: Annotated[str | None, Opt("--response-field", help="Summary / answer field.")] = None,
    fallback_field: Annotated[str | None, Opt("--fallback-field",
                                              help="Used when --text-field is empty (info.article).")] = None,
    template: Annotated[str | None, Opt("--template", help="Prompt template with {text}.")] = None,
    chat_template: Annotated[bool | None, Opt("--chat-template/--no-chat-template",
                                              help="Wrap prompts in the tokenizer's chat template.")] = None,
    pack: Annotated[bool | None, Opt("--pack/--no-pack", help="LM: pack documents into full windows.")] = None,
    max_length: Annotated[int | None, Opt("--max-length", help="Tokens per row (default 512).")] = None,
    encoding: Annotated[str | None, Opt("--encoding", help="topk | sampled")] = None,
    top_k: Annotated[int | None, Opt("--top-k", help="k of the top-k encoding (default 64).")] = None,
    num_draws: Annotated[int | None, Opt("--num-draws", help="Draws per position (sampled).")] = None,
    teacher_generates: Annotated[bool | None, Opt("--teacher-generates/--reference-answers",
                                                  help="Reasoning/summarization: the teacher writes the answers.")] = None,
    max_new_tokens: Annotated[int | None, Opt("--max-new-tokens", help="Answer length with --teacher-generates.")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="Rows per forward pass (hf).")] = None,
    dtype: Annotated[str | None, Opt("--dtype", help="float32 | bfloat16 | float16")] = None,
    device: Annotated[str | None, Opt("--device", help="auto | cpu | cuda | cuda:N (hf)")] = None,
    attn_implementation: Annotated[str | None, Opt("--attn-implementation",
                                                   help="sdpa | eager | flash_attention_2 (hf)")] = None,
    load_in_4bit: Annotated[bool | None, Opt("--load-in-4bit", help="bitsandbytes 4-bit (hf, CUDA).")] = None,
    load_in_8bit: Annotated[bool | None, Opt("--load-in-8bit", help="bitsandbytes 8-bit (hf, CUDA).")] = None,
    trust_remote_code: Annotated[bool | None, Opt("--trust-remote-code", help="Run the model repo's code.")] = None,
    max_logprobs: Annotated[int | None, Opt("--max-logprobs", help="vLLM max_logprobs (default: --top-k).")] = None,
    tensor_parallel_size: Annotated[int | None, Opt("--tensor-parallel-size", help="vLLM GPUs per teacher.")] = None,
    gpu_memory_utilization: Annotated[float | None, Opt("--gpu-memory-utilization", help="vLLM.")] = None,
    enforce_eager: Annotated[bool | None, Opt("--enforce-eager/--no-enforce-eager",
                                              help="vLLM eager mode (default: on CPU only).")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Seed of the sampled encoding.")] = None,
    num_workers: Annotated[int | None, Opt("--num-workers", help="Workers splitting the dataset.")] = None,
    worker_index: Annotated[int | None, Opt("--worker-index", help="This worker, 0-based.")] = None,
    unit_rows: Annotated[int | None, Opt("--unit-rows", help="Rows per work unit (resume granule).")] = None,
    overwrite: Annotated[bool | None, Opt("--overwrite", help="Replace a cache already in --out.")] = None,
    max_shard_rows: Annotated[int | None, Opt("--max-shard-rows", help="Rows per shard at most.")] = None,
    max_shard_bytes: Annotated[int | None, Opt("--max-shard-bytes", help="Raw bytes buffered per shard.")] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress", help="Progress bar on stderr.")] = None,
    json_out: Annotated[Path | None, Opt("--json", help="Also write the summary to this JSON file.")] = None,
) -> None:
    """Stage 1: run the teacher over a dataset and write its distributions into a cache."""
    from pipeline.config import resolve_config
    from pipeline.dump.run import DumpConfig, format_summary, run_dump

    overrides: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("config", "json_out")}
    overrides = {k: v for k, v in overrides.items() if k in DumpConfig.model_fields}
    cfg = resolve_config(DumpConfig, config, overrides)
    summary = run_dump(cfg)
    typer.echo(format_summary(summary))
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=2) + "\n")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `kdpipe` app."""
    app.command("dump-teacher")(dump_teacher)
