"""The one validated configuration of `kdpipe dump-teacher` (YAML keys = flag names without dashes)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel


class DumpConfig(StrictModel):
    """Everything ``kdpipe dump-teacher`` needs; saved as ``config.yaml`` in the cache folder."""

    # What to run
    teacher: str  # HF folder or hub name
    tokenizer: str | None = None  # why None: the teacher's own tokenizer, which is what it was trained with
    revision: str | None = None  # why None: the default branch / the folder as it is
    backend: Literal["hf", "vllm"] = "hf"  # why hf: runs everywhere (CPU too) without extra packages
    task: Literal["lm", "classification", "summarization", "reasoning"] = "lm"  # why lm: the plain KD case
    out: str

    # Data
    dataset: str
    dataset_config: str | None = None  # why None: most datasets have a single config
    split: str = "train"  # why train: distillation data is the training split
    dataset_format: Literal["auto", "json", "parquet", "csv", "text", "sst2"] = "auto"  # why auto: by suffix/content
    limit: int | None = Field(default=None, ge=1)  # why None: the whole split
    text_field: str | None = None  # why None: the task's default (recipes.DEFAULT_TEXT_FIELD)
    label_field: str | None = None  # why None: "label" for classification
    response_field: str | None = None  # why None: summary.text / answer
    fallback_field: str | None = None  # why None: info.article for summarization (news rows have no post)
    template: str | None = None  # why None: the task's prompt template (recipes.DEFAULT_TEMPLATE)
    chat_template: bool = False  # why off: base models have no chat template
    pack: bool = True  # why packed: LM windows are full, no compute is spent on padding
    max_length: int = Field(default=512, ge=2)  # why 512: fits small teachers' context; cut to the model's if larger

    # Teacher output
    encoding: Literal["topk", "sampled"] = "topk"  # why topk: exact top-k + tail, the smallest KL error per byte
    top_k: int = Field(default=64, ge=1)  # why 64: the design's operating point (<=100 B/token)
    num_draws: int = Field(default=32, ge=1, le=255)  # why 32: few unique ids per position keeps sampled caches small
    teacher_generates: bool = False  # why off: reference answers are the default (sequence-level KD is opt-in)
    max_new_tokens: int = Field(default=256, ge=1)  # why 256: a GSM8K solution fits comfortably

    # Engine
    batch_size: int = Field(default=8, ge=1)  # why 8: CPU-friendly; raise on GPUs
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # why float32: exact log-probs (use bf16 on GPU)
    device: str = "auto"  # why auto: CUDA when visible, else CPU
    attn_implementation: str | None = None  # why None: transformers' default (sdpa)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    trust_remote_code: bool = False  # why off: never run a model repo's code unless asked
    max_logprobs: int | None = Field(default=None, ge=1)  # why None: vLLM gets exactly --top-k
    tensor_parallel_size: int = Field(default=1, ge=1)  # why 1: one GPU unless asked
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # why 0.9: vLLM's own default
    enforce_eager: bool | None = None  # why None: eager on CPU (compile costs ~40 s), graphs on GPU
    seed: int = 0  # why 0: any fixed value; sampled draws are seeded from (seed, unit)

    # Work split and output
    num_workers: int = Field(default=1, ge=1)
    worker_index: int = Field(default=0, ge=0)
    unit_rows: int = Field(default=256, ge=1)  # why 256: ~1 min of CPU work, so a crash loses little
    overwrite: bool = False  # why off: never delete a cache unless asked
    max_shard_rows: int | None = Field(default=None, ge=1)  # why None: the writer's default
    max_shard_bytes: int | None = Field(default=None, ge=1)  # why None: the writer's default
    progress: bool = True  # why on: a dump takes long; the bar shows tokens/s and ETA on stderr

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> DumpConfig:
        if self.worker_index >= self.num_workers:
            raise ValueError(
                f"--worker-index {self.worker_index} must be below --num-workers {self.num_workers} (0-based)"
            )
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
        if self.backend == "vllm" and self.encoding == "sampled":
            raise ValueError("--encoding sampled needs the full distribution, which vLLM only returns as Python "
                             "objects per vocabulary entry; use --backend hf for sampled caches")
        if self.backend == "vllm" and self.task == "classification":
            raise ValueError("--task classification needs a sequence-classifier head; use --backend hf")
        if self.task == "classification" and self.encoding == "sampled":
            raise ValueError("--encoding sampled does not apply to --task classification (it stores class logits)")
        if self.max_logprobs is not None and self.encoding == "topk" and self.task != "classification" \
                and self.top_k > self.max_logprobs:
            raise ValueError(f"--top-k {self.top_k} is larger than --max-logprobs {self.max_logprobs}; "
                             "raise --max-logprobs or lower --top-k")
        return self


# ----------------------------------------------------------------------------- pure helpers
