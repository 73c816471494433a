"""The one validated configuration of `kdpipe eval` (YAML keys = flag names without dashes)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel

Task = Literal["lm", "classification", "summarization", "reasoning"]
GenerationBackend = Literal["auto", "hf", "vllm"]

class EvalConfig(StrictModel):
    """One ``kdpipe eval`` run (YAML keys = flag names without dashes)."""

    model: str | None = Field(None, description="HF folder or hub name of the model to evaluate")
    task: Task = "lm"
    dataset: str | None = Field(None, description="local file/folder or hub name (see pipeline.dump.datasets)")
    dataset_config: str | None = None
    dataset_format: Literal["auto", "json", "parquet", "csv", "text", "sst2"] = "auto"
    # "validation" is the held-out split of wikitext, SST-2 and summarize_from_feedback;
    # GSM8K has only train/test, so pass --split test there.
    split: str = "validation"
    # None = the whole split; a number keeps the first N rows (quick checks, CI).
    limit: int | None = Field(None, ge=1)
    # None = the recipe's default field for the task (text / sentence / info.post / question ...).
    text_field: str | None = None
    label_field: str | None = None
    response_field: str | None = None
    template: str | None = None
    chat_template: bool = False
    # 512 tokens: the dump's default window, so LM numbers are comparable with the cache's rows.
    max_length: int = Field(512, ge=2)
    # 8 rows per forward pass: fits a 7B model's activations at 512 tokens on one GPU and
    # keeps CPU runs responsive.
    batch_size: int = Field(8, ge=1)
    # 128 new tokens: enough for a TL;DR summary and for most GSM8K answers' final line.
    max_new_tokens: int = Field(128, ge=1)
    # auto: vLLM when it is installed and a GPU is present (large models), else HF generate
    # (vLLM's start-up costs more than a small CPU eval takes).
    generation_backend: GenerationBackend = "auto"
    # auto: the first CUDA device when there is one, else CPU.
    device: str = "auto"
    # float32 by default: exact numbers on CPU; pass bfloat16 for large models on GPU.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    teacher: str | None = Field(None, description="teacher model for agreement metrics")
    cache: str | None = Field(None, description="teacher cache (path or URL) for agreement metrics")
    json_path: str | None = Field(None, description="write the result as JSON here (flag --json)")
    # Entries "NAME=PATH" or "PATH": a model folder/name, or an earlier --json result file.
    compare: list[str] | None = None
    trust_remote_code: bool = False
    # 0: reproducible greedy decoding needs no seed, but vLLM and dropout-free HF models take one.
    seed: int = 0

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {v!r}")
        return v

    @model_validator(mode="after")
    def _needs_model_or_compare(self) -> EvalConfig:
        if not self.compare and not self.model:
            raise ValueError("give the model to evaluate with --model (or several with --compare)")
        if self.compare and self.model:
            raise ValueError("--model and --compare exclude each other; list every model after --compare")
        return self
