"""`kdpipe train-student`: one flag per :class:`pipeline.train.TrainConfig` field.

Flags are generated from the config model, so the CLI, ``--config train.yaml`` keys and the
saved ``train_config.yaml`` never drift apart. Every flag defaults to None (= not given), so
YAML values survive unless a flag overrides them.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

import typer

HELP: dict[str, str] = {
    "cache": "Cache folder or URL (s3://, gs://, hf://) written by `kdpipe dump-teacher`.",
    "out": "Output folder: the trained student, checkpoints/, tensorboard/, train_summary.json.",
    "student": "Student: a model folder or hub name (with --student-layers: the model to shrink).",
    "student_config": "A config.json for a freshly initialised student (needs --tokenizer).",
    "student_layers": "Copy --student with this many layers, every n-th layer copied (DistilBERT style).",
    "tokenizer": "Tokenizer folder or hub name (default: the student's).",
    "allow_vocab_mismatch": "Accept a tokenizer whose fingerprint differs from the cache's if ids fit.",
    "attn_implementation": "Attention kernel: sdpa, eager, flash_attention_2.",
    "loss": "Divergence: fkl (forward KL), rkl (reverse KL), jsd, tvd.",
    "temperature": "Distillation temperature T (bucket tempering, loss scaled by T^2).",
    "alpha": "Weight of hard-label cross-entropy; loss = (1-alpha) KD + alpha CE.",
    "tail_bucket": "Use the cached tail mass as a (k+1)-th bucket; --no-tail-bucket renormalises the top-k instead.",
    "jsd_beta": "JSD mixture weight beta.",
    "loss_chunk_size": "Target positions per chunk of the student log-softmax.",
    "max_steps": "Optimizer steps (or use --epochs).",
    "epochs": "Passes over the training rows (or use --max-steps).",
    "batch_size": "Rows per micro-batch per process.",
    "grad_accum": "Micro-batches per optimizer step.",
    "lr": "Peak learning rate.",
    "optimizer": "adamw or adamw_8bit (bitsandbytes).",
    "lr_scheduler": "constant, linear, cosine, constant_with_warmup.",
    "warmup_steps": "Linear warmup steps.",
    "max_grad_norm": "Gradient clipping norm.",
    "precision": "fp32 or bf16.",
    "compile": "torch.compile the student's decoder.",
    "gradient_checkpointing": "Recompute activations in backward to save memory.",
    "lora_r": "LoRA rank (0 = full fine-tuning; needs `pip install 'kdpipe[lora]'`).",
    "lora_target_modules": "Module names LoRA adapts (repeat the flag).",
    "seed": "Seed for init, data order, dropout.",
    "shuffle_buffer": "Rows in the shuffle buffer.",
    "num_workers": "DataLoader worker processes decoding the cache.",
    "eval_rows": "Held-out rows (start of the last shard) for evaluation; 0 = none.",
    "eval_every": "Steps between evaluations.",
    "save_every": "Steps between checkpoints.",
    "wandb": "Also log to Weights & Biases (offline unless --wandb-mode online).",
    "resume": "Continue from the latest checkpoint in --out.",
    "overwrite": "Replace --out's contents (after all checks pass).",
}

# Fields that have no sensible flag form; set them in --config YAML.
_YAML_ONLY = {"storage_options"}


def _flag_type(annotation: Any) -> Any:
    """The Python type typer should parse for a config field (pydantic validates the rest)."""
    text = str(annotation)
    if "Literal" in text:
        return str
    if "bool" in text:
        return bool
    if "list[str]" in text:
        return list[str]
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def _build_command() -> Any:
    from pipeline.train.config import TrainConfig

    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
                                default=typer.Option(None, "--config", help="YAML file with the same keys as the flags."))]
    for name, field in TrainConfig.model_fields.items():
        if name in _YAML_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        typ = _flag_type(field.annotation)
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if typ is bool else [flag]
        option = typer.Option(None, *decls, help=HELP.get(name, f"See TrainConfig.{name}."))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Optional[typ], default=option))  # noqa: UP045

    def train_student(**kwargs: Any) -> None:
        """Train a student from a cache with a sparse KD loss (DDP/FSDP via torchrun or accelerate launch)."""
        from pipeline.config import resolve_config
        from pipeline.train.config import TrainConfig
        from pipeline.train.trainer import run_train

        config = kwargs.pop("config")
        cfg = resolve_config(TrainConfig, config, kwargs)
        summary = run_train(cfg)
        if summary:
            keys = ("steps", "first_loss", "final_loss", "tokens_seen", "wall_s", "tokens_per_s")
            typer.echo(json.dumps({k: summary.get(k) for k in keys}))
            typer.echo(f"student saved to {cfg.out}")

    train_student.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return train_student


def register(app: typer.Typer) -> None:
    """Add `train-student` to the `kdpipe` app."""
    app.command("train-student")(_build_command())
