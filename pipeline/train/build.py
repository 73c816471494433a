"""The parts of a training run built from its config: loss settings, student and loss, optimizer.

Errors here name the flag to change; the loss library itself raises ``ValueError`` (see ``loss_spec``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.kd_loss import ClassKDLoss, SparseKDLoss
from pipeline.train.losses import LossSettingError, LossSpec

# LossSpec / SparseKDLoss settings → the flag that sets them.
LOSS_FLAGS = {"kind": "--loss", "temperature": "--temperature", "alpha": "--alpha", "beta": "--jsd-beta",
              "chunk_size": "--loss-chunk-size"}


def loss_spec(cfg: TrainConfig, sampled: bool) -> LossSpec:
    """The loss settings of ``cfg`` for a cache (``sampled`` or not), checked; errors name the flag."""
    # with --teacher the targets are the teacher's full distribution, whatever kind the cache is
    spec = LossSpec(kind=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.jsd_beta,
                    sampled=sampled and cfg.teacher is None, tail_bucket=cfg.tail_bucket)
    try:
        spec.validate()
    except LossSettingError as exc:
        raise ConfigError(f"{exc} (flag {LOSS_FLAGS[exc.setting]})") from None
    return spec


def check_optional_dependencies(cfg: TrainConfig) -> None:
    """Extras asked for by flags must be importable before anything is written."""
    needs = [(cfg.wandb, "wandb", "--wandb", "wandb"), (cfg.lora_r > 0, "peft", "--lora-r", "lora"),
             (cfg.optimizer == "adamw_8bit", "bitsandbytes", "--optimizer adamw_8bit", "gpu")]
    for wanted, module, flag, extra in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{flag} needs the {module} package, which is not installed: "
                              f"pip install 'kdpipe[{extra}]' (or drop {flag})")


def apply_lora(model: torch.nn.Module, cfg: TrainConfig, classification: bool) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora_r (flag --lora-r) needs peft: pip install 'kdpipe[lora]'") from None
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                      task_type="SEQ_CLS" if classification else "CAUSAL_LM")
    return get_peft_model(model, lcfg)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer adamw_8bit (flag --optimizer) needs bitsandbytes: "
                              "pip install 'kdpipe[gpu]', or use --optimizer adamw") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)



def build_accelerator(cfg: TrainConfig) -> Any:
    """accelerate's ``Accelerator`` for this process (DDP/FSDP under torchrun or accelerate launch)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # accelerate keeps its settings in a process-wide singleton; a second run_train in the same
    # process (tests, notebooks) may ask for another precision. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without any accelerator, accelerate only sets up torchrun's process group (gloo) in cpu mode.
    cpu = not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=cpu)
    # Same init on every rank (DDP broadcasts anyway); per-rank dropout streams are seeded later.
    set_seed(cfg.seed)
    return accelerator


def build_loader(cfg: TrainConfig, pad_id: int, vocab_size: int | None, rank: int, world_size: int) -> Any:
    """The training stream of this rank, as a :class:`~pipeline.train.stream.StreamLoader`."""
    from pipeline.train.stream import CacheStream, StreamLoader

    # The stream and the evaluation open their own readers: a reader keeps one shard open and
    # switching shards for one consumer would close the file the other is reading.
    stream = CacheStream(cfg.cache, batch_size=cfg.batch_size, pad_id=pad_id, seed=cfg.seed,
                         shuffle_buffer=cfg.shuffle_buffer, rank=rank, world_size=world_size,
                         eval_rows=cfg.eval_rows, vocab_size=vocab_size, storage_options=cfg.storage_options,
                         verify_checksums=cfg.verify_checksums)
    return StreamLoader(stream, num_workers=cfg.num_workers)


StudentParts = tuple[Any, torch.nn.Module, SparseKDLoss | ClassKDLoss]  # tokenizer, student, loss


def build_student(cfg: TrainConfig, manifest: Any, spec: LossSpec) -> StudentParts:
    """(tokenizer, student, loss): the student checked against the cache, with the loss that fits its head."""
    from pipeline.train import student as st

    classification = str(manifest.identity.encoding.kind) == "class_logits"
    enc = manifest.identity.encoding
    tokenizer = st.load_tokenizer(st.resolve_tokenizer_path(cfg.student, cfg.tokenizer, cfg.student_config))
    model = st.load_student(student=cfg.student, student_config=cfg.student_config,
                            student_layers=cfg.student_layers, classification=classification,
                            num_labels=getattr(enc, "num_classes", None) if classification else None,
                            attn_implementation=cfg.attn_implementation, dtype=torch.float32, seed=cfg.seed)
    st.check_against_manifest(model, tokenizer, manifest, cache=cfg.cache, allow_vocab_mismatch=cfg.allow_vocab_mismatch)
    loss: SparseKDLoss | ClassKDLoss = ClassKDLoss(spec)
    if not classification:
        head = st.head_spec(model)
        st.check_head(model, head, int(model.config.vocab_size))
        loss = SparseKDLoss(spec, cfg.loss_chunk_size, head)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg, classification)
    return tokenizer, model, loss


def build_teacher(cfg: TrainConfig, manifest: Any, student_tokenizer: Any, student_vocab: int | None,
                  device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``--teacher`` (online KD): the teacher model, checked against the cache and the student, and its
    identity for the run's summary (see :mod:`pipeline.train.online`)."""
    from pipeline.train.online import load_online_teacher

    return load_online_teacher(cfg, manifest, student_tokenizer, student_vocab, device)
