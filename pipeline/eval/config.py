"""The one validated configuration of `kdpipe eval` (YAML keys = flag names without dashes)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel, cli_flags
from pipeline.dump.datasets import DatasetFormat
from pipeline.dump.lm import BosPolicy
from pipeline.dump.tasks import Task

GenerationBackend = Literal["auto", "hf", "vllm"]


class EvalConfig(StrictModel):
    """One ``kdpipe eval`` run (YAML keys = flag names without dashes)."""

    model: str | None = Field(None, description="Model to evaluate: HF folder or hub name.")
    task: Task = Field("lm", description="Task whose metrics to compute.")
    dataset: str | None = Field(None, description="Local file/folder or hub dataset name.")
    dataset_config: str | None = Field(None, description="Hub dataset config.")
    dataset_format: DatasetFormat = Field("auto", description="Dataset file format; auto tells it by suffix or "
                                                              "content.")
    split: str = Field("validation", description="Dataset split; validation is the held-out split of wikitext, "
                                                 "SST-2 and summarize_from_feedback (GSM8K: pass --split test).")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows (quick checks, CI); default: the "
                                                      "whole split.")
    text_field: str | None = Field(None, description="Text / document / question field; default: the task's "
                                                     "(text, sentence, info.post, question).")
    label_field: str | None = Field(None, description="Gold label field (classification); default: label.")
    response_field: str | None = Field(None, description="Reference summary / answer field; default: the "
                                                         "task's.")
    template: str | None = Field(None, description="Prompt template with {text}; default: the task's template.")
    chat_template: bool = Field(False, description="Wrap prompts in the tokenizer's chat template; off because "
                                                   "base models have none.")
    bos: BosPolicy = Field("auto", description="BOS at the start of every LM window and prompt row, as in "
                                               "dump-teacher --bos; auto follows the tokenizer, so eval sees what "
                                               "the cache's teacher saw.")
    stride: int | None = Field(None, ge=1, description="LM: new tokens (scored targets) per window, as in "
                                                       "dump-teacher --stride; default 3/4 of --max-length, the "
                                                       "dump's default, so perplexities are comparable with the "
                                                       "cache's rows.")
    max_length: int = Field(512, ge=2, description="Tokens per row; 512 is the dump's default window, so LM "
                                                   "numbers are comparable with the cache's rows.")
    batch_size: int = Field(8, ge=1, description="Rows per forward / generate call; 8 fits a 7B model's "
                                                 "activations at 512 tokens on one GPU and keeps CPU runs "
                                                 "responsive.")
    max_new_tokens: int = Field(128, ge=1, description="Generated tokens per answer; 128 is enough for a TL;DR "
                                                       "summary and most GSM8K answers' final line.")
    generation_backend: GenerationBackend = Field(
        "auto", description="auto: vLLM when installed and a GPU is present (large models), else HF generate "
                            "(vLLM's start-up costs more than a small CPU eval takes).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N; auto = the first CUDA device when there "
                                            "is one, else CPU.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Model dtype; float32 gives exact numbers on CPU (bfloat16 for large models on GPU).")
    teacher: str | None = Field(None, description="Teacher model: adds top-1 agreement and KL.")
    cache: str | None = Field(None, description="Teacher cache (path or URL): agreement on the cache's rows.")
    verify_checksums: bool = Field(True, description="With --cache: check each shard's sha256 against the "
                                                     "manifest as it is read (a shared cache is untrusted input); "
                                                     "--no-verify-checksums only for a trusted local cache.")
    allow_vocab_mismatch: bool = Field(False, description="With --cache: accept a model whose tokenizer "
                                                          "fingerprint differs from the cache's (as train-student "
                                                          "does); off: it must match exactly.")
    json_path: str | None = Field(None, json_schema_extra=cli_flags("--json"),
                                  description="Write the result (and config) as JSON here.")
    compare: list[str] | None = Field(None, description="NAME=PATH or PATH (a model, or an earlier --json result); "
                                                        "repeat, or list after one flag.")
    trust_remote_code: bool = Field(False, json_schema_extra=cli_flags("--trust-remote-code"),
                                    description="Run the model repo's code; off: never unless asked.")
    seed: int = Field(0, description="Seed for generation backends; greedy decoding needs none, but vLLM and "
                                     "HF take one.")

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
