"""The configuration of ``kdpipe train-student`` (no torch import, so the CLI starts fast).

Each field's description says what it sets and why its default is what it is (``--help`` shows it);
:mod:`pipeline.train.trainer` re-exports :class:`TrainConfig`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import YAML_ONLY, StrictModel, flag_name


class TrainConfig(StrictModel):
    """Every setting of ``kdpipe train-student`` (flags override ``--config train.yaml``)."""

    cache: str = Field(description="Cache folder or URL (s3://, gs://, hf://) written by `kdpipe dump-teacher`.")
    out: str = Field(description="Output folder: the trained student, checkpoints/, tensorboard/, "
                                 "train_summary.json.")
    student: str | None = Field(None, description="Student: a model folder or hub name (with --student-layers: "
                                                  "the model to shrink).")
    student_config: str | None = Field(None, description="A config.json for a freshly initialised student "
                                                         "(needs --tokenizer).")
    student_layers: int | None = Field(None, ge=1, description="Copy --student with this many layers, every n-th "
                                                               "layer copied (DistilBERT style); default: all.")
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub name; default: the student's own.")
    verify_checksums: bool = Field(True, description="Check each shard's sha256 against the manifest as it is "
                                                     "read (a shared cache is untrusted input); "
                                                     "--no-verify-checksums only for a trusted local cache you "
                                                     "wrote or verified yourself.")
    allow_vocab_mismatch: bool = Field(False, description="Accept a tokenizer whose fingerprint differs from the "
                                                          "cache's if ids fit; off: it must match exactly.")
    attn_implementation: str | None = Field(None, description="Attention kernel: sdpa, eager, flash_attention_2; "
                                                              "default: transformers' (sdpa where available).")

    # Online KD: the teacher runs in this process; the cache then only supplies the rows.
    teacher: str | None = Field(None, description="Online KD: a teacher model folder or hub name run in this process; "
                                                  "its full distribution replaces the cache's targets (the cache "
                                                  "still gives the rows and their order). Needs the cache's tokenizer; "
                                                  "the loss then holds ~6 x chunk x V float32.")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the --teacher model; float32 gives exact log-probs, as `dump-teacher` "
                               "does by default (bfloat16 on GPUs).")
    teacher_device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                                description="Device of the --teacher model: auto (the training device), cpu, cuda, "
                                            "cuda:N or mps.")

    loss: Literal["fkl", "rkl", "jsd", "tvd"] = Field(
        "fkl", description="Divergence: forward KL (classic KD, valid for every cache kind), reverse KL, JSD, TVD.")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature T (bucket tempering, loss scaled "
                                                      "by T^2); 1 distills the cached distribution as is.")
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of hard-label cross-entropy; loss = (1-alpha) KD + "
                                                      "alpha CE; 0 = pure KD (the cache is the signal).")
    tail_bucket: bool = Field(True, description="Use the cached tail mass as a (k+1)-th bucket; --no-tail-bucket "
                                                "renormalises the top-k instead.")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight beta; 0.5 is the symmetric "
                                                         "Jensen-Shannon divergence.")
    loss_chunk_size: int = Field(1024, ge=1, description="Target positions per chunk of the student "
                                                         "log-softmax; peak memory is ~3 x chunk x V float32.")

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps (or use --epochs; exactly one).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training rows (or use --max-steps).")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch per process; small enough for one GPU at "
                                                 "2k tokens.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate; a common AdamW LR for small LMs.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; none, short distillation runs rarely "
                                                       "need it.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="adamw_8bit needs bitsandbytes "
                                                                           "(extra `gpu`).")
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule; cosine is the usual for KD.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps; 0, because the cache's soft targets make "
                                                   "early steps stable.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; 1.0 as in most LM recipes "
                                                               "(null in YAML = off).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32 is exact on CPU; bf16 autocast on GPUs.")
    compile: bool = Field(False, description="torch.compile the student's decoder (slow to start, faster steps "
                                             "on GPU).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory "
                                                            "(trades compute for memory).")
    lora_r: int = Field(0, ge=0, description="LoRA rank via peft (0 = full fine-tuning; needs the "
                                             "`lora` extra of kdpipe).")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha; 16 is peft's usual.")
    lora_target_modules: list[str] | None = Field(None, description="Module names LoRA adapts (repeat the flag); "
                                                                    "default: peft's for the architecture.")

    seed: int = Field(0, description="Seed for init, data order, dropout.")
    shuffle_buffer: int = Field(256, ge=1, description="Rows in the shuffle buffer: bounded memory, decent "
                                                       "mixing.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes decoding the cache; 0 = decode in "
                                                  "the training process (no worker startup).")
    storage_options: dict[str, Any] | None = Field(None, json_schema_extra=YAML_ONLY,
                                                   description="fsspec options for remote caches (YAML only).")

    eval_rows: int = Field(32, ge=0, description="Held-out rows (start of the last shard) for evaluation; "
                                                 "0 = none.")
    eval_every: int = Field(200, ge=1, description="Steps between evaluations.")
    save_every: int = Field(200, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted); 2 survives a "
                                                       "crash during saving.")
    log_every: int = Field(10, ge=1, description="Steps between TensorBoard points.")
    tensorboard: bool = Field(True, description="Log to TensorBoard in --out (cheap and local).")
    wandb: bool = Field(False, description="Also log to Weights & Biases (needs the `wandb` extra; offline unless "
                                           "--wandb-mode online).")
    wandb_project: str = Field("kdpipe", description="W&B project name.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline", description="W&B mode; never online "
                                                                                        "unless asked.")
    progress: bool = Field(True, description="tqdm progress bar on the main process.")

    resume: bool = Field(False, description="Continue from the latest checkpoint in --out.")
    overwrite: bool = Field(False, description="Replace --out's contents (only after every check passed).")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        check_finite(self)
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps (flag --max-steps) and epochs (flag --epochs)")
        if self.resume and self.overwrite:
            raise ValueError("resume (flag --resume) and overwrite (flag --overwrite) exclude each other")
        if (self.student is None) == (self.student_config is None):
            raise ValueError("give exactly one of student (flag --student) and student_config (flag --student-config)")
        return self


def check_finite(cfg: StrictModel) -> None:
    """Refuse inf/NaN in any float setting (``gt=0`` lets inf through): a run with ``--temperature inf``
    would train on nothing and leave checkpoints no --resume can use."""
    for name, value in cfg:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} (flag {flag_name(type(cfg), name)}) must be a finite number, got {value}")


# Settings that may differ when resuming (they do not change what the first steps did).
RESUME_MAY_CHANGE = {"resume", "overwrite", "verify_checksums", "max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints",
                      "log_every", "tensorboard", "wandb", "wandb_mode", "wandb_project", "progress"}
