"""The configuration of ``kdpipe train-student`` (no torch import, so the CLI starts fast).

Every default carries a comment saying why; :mod:`pipeline.train.trainer` re-exports :class:`TrainConfig`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel


class TrainConfig(StrictModel):
    """Every setting of ``kdpipe train-student`` (flags override ``--config train.yaml``)."""

    cache: str  # path or URL of the cache (see cache_format)
    out: str  # output folder: final student, checkpoints/, tensorboard/, train_summary.json
    student: str | None = None  # pretrained model path or hub name (or the model to shrink)
    student_config: str | None = None  # config.json for a freshly initialised student
    student_layers: int | None = Field(default=None, ge=1)  # None = keep every layer of --student
    tokenizer: str | None = None  # None = the student's own tokenizer
    allow_vocab_mismatch: bool = False  # False: the tokenizer must match the cache's fingerprint exactly
    attn_implementation: str | None = None  # None = the transformers default (sdpa where available)

    loss: Literal["fkl", "rkl", "jsd", "tvd"] = "fkl"  # forward KL: classic KD, valid for every cache kind
    temperature: float = Field(default=1.0, gt=0)  # 1 = distill the cached distribution as is
    alpha: float = Field(default=0.0, ge=0, le=1)  # hard-label CE weight; 0 = pure KD (the cache is the signal)
    tail_bucket: bool = True  # the stored tail mass is a (k+1)-th bucket; False = renormalised top-k
    jsd_beta: float = Field(default=0.5, gt=0, lt=1)  # 0.5 = the symmetric Jensen-Shannon divergence
    loss_chunk_size: int = Field(default=1024, ge=1)  # positions per chunk: ~3 x chunk x V float32 at peak

    max_steps: int | None = Field(default=None, ge=1)  # optimizer steps; exactly one of max_steps / epochs
    epochs: float | None = Field(default=None, gt=0)  # passes over the training rows
    batch_size: int = Field(default=8, ge=1)  # rows per micro-batch per rank; small enough for one GPU at 2k tokens
    grad_accum: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(default=3e-4, gt=0)  # a common AdamW LR for small LMs
    weight_decay: float = Field(default=0.0, ge=0)  # none by default: short distillation runs rarely need it
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw_8bit needs bitsandbytes (extra `gpu`)
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "cosine"  # the usual for KD
    warmup_steps: int = Field(default=0, ge=0)  # 0: the cache's soft targets make early steps stable
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # clipping at 1.0 as in most LM recipes; None = off
    precision: Literal["fp32", "bf16"] = "fp32"  # fp32 is exact on CPU; bf16 autocast on GPUs
    compile: bool = False  # torch.compile of the student's decoder (slow to start, faster steps on GPU)
    gradient_checkpointing: bool = False  # trades compute for activation memory
    lora_r: int = Field(default=0, ge=0)  # 0 = full fine-tuning; > 0 = LoRA rank via peft (extra `lora`)
    lora_alpha: int = Field(default=16, ge=1)  # peft's usual scaling
    lora_target_modules: list[str] | None = None  # None = peft's default for the architecture

    seed: int = 0  # model init, data order and dropout
    shuffle_buffer: int = Field(default=256, ge=1)  # rows held for shuffling: bounded memory, decent mixing
    num_workers: int = Field(default=0, ge=0)  # 0 = decode in the training process (no worker startup)
    storage_options: dict[str, Any] | None = None  # fsspec options for remote caches

    eval_rows: int = Field(default=32, ge=0)  # held-out rows (start of the last shard); 0 = no eval
    eval_every: int = Field(default=200, ge=1)  # steps between evaluations
    save_every: int = Field(default=200, ge=1)  # steps between checkpoints
    keep_checkpoints: int = Field(default=2, ge=1)  # older ones are deleted; 2 survives a crash during saving
    log_every: int = Field(default=10, ge=1)  # steps between TensorBoard points
    tensorboard: bool = True  # cheap and local
    wandb: bool = False  # needs the `wandb` extra; offline unless wandb_mode says otherwise
    wandb_project: str = "kdpipe"  # W&B project name
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # never online unless asked
    progress: bool = True  # tqdm bar on the main process

    resume: bool = False  # continue from the latest checkpoint in --out
    overwrite: bool = False  # delete --out's contents (only after every check passed)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps (flag --max-steps) and epochs (flag --epochs)")
        if self.resume and self.overwrite:
            raise ValueError("resume (flag --resume) and overwrite (flag --overwrite) exclude each other")
        if (self.student is None) == (self.student_config is None):
            raise ValueError("give exactly one of student (flag --student) and student_config (flag --student-config)")
        return self


# Settings that may differ when resuming (they do not change what the first steps did).
RESUME_MAY_CHANGE = {"resume", "overwrite", "max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints",
                      "log_every", "tensorboard", "wandb", "wandb_mode", "wandb_project", "progress"}
