"""``kdpipe train-student``: train a student from a cache with a sparse KD loss.

Built on ``accelerate``: ``torchrun --nproc-per-node N -m pipeline.cli train-student ...``
or ``accelerate launch -m pipeline.cli train-student ...`` runs DDP, and an accelerate
config with FSDP runs FSDP. The loss is computed inside a small wrapper module
(:class:`~pipeline.train.distill.DistillModule`), so whatever accelerate wraps around it sees a
plain forward.

**Reading order.** :meth:`Trainer.setup` lists the setup steps in order (``_setup_*``);
:meth:`Trainer.train` is the loop; :meth:`Trainer.train_step` is one optimizer step. The loss
of an optimizer step is ``sum over its target positions / number of those positions``, counted
over every micro-batch of the gradient accumulation and every rank (``clamp_min(1)``).

**Extension points** (constructor arguments; no subclassing needed):

* ``teacher``: where the targets come from, in training and in the held-out evaluation, a
  :data:`~pipeline.train.distill.Teacher`. The default is the cache's own targets;
  :class:`~pipeline.train.distill.OnlineTeacher` runs a teacher model in this process (online KD)
  on the same batches, with the same loss — what ``--teacher`` sets up (:mod:`pipeline.train.online`).
* ``on_step``: called after every optimizer step with its :class:`StepMetrics` (timing, logging).

``run_train(cfg)`` is ``Trainer(cfg).run()``, and ``run()`` is ``setup()`` then ``train()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.config import atomic_write_text, save_resolved_config
from pipeline.errors import ConfigError, TrainingError
from pipeline.train.build import (
    build_accelerator,
    build_loader,
    build_optimizer,
    build_student,
    build_teacher,
    check_optional_dependencies,
    loss_spec,
)
from pipeline.train.checkpoint import (
    TrainState,
    check_output_folder,
    check_resume_config,
    clear_output,
    latest_checkpoint,
    load_usable_checkpoint,
    save_checkpoint,
    save_final_student,
    write_run_marker,
)
from pipeline.train.config import TrainConfig
from pipeline.train.distill import (
    Batch,
    DistillModule,
    OnlineTeacher,
    Targets,
    Teacher,
    cached_targets,
    warn_if_tail_is_large,
)
from pipeline.train.kd_loss import ClassKDLoss
from pipeline.train.losses import KDTargets, LossSpec
from pipeline.train.tracking import Trackers

if TYPE_CHECKING:
    from accelerate import Accelerator

    from cache_format.manifest import Manifest
    from pipeline.train.stream import StreamLoader

__all__ = ["DistillModule", "OnlineTeacher", "StepMetrics", "TrainConfig", "Trainer", "TrainingError", "run_train"]


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, over every micro-batch and every rank."""

    step: int  # optimizer steps done, this one included
    loss: float  # mean loss per target position
    kd_loss: float  # its distillation part
    ce_loss: float  # hard-label cross-entropy per target position (also when alpha = 0)
    lr: float  # learning rate the step used
    targets: int  # target positions
    tokens: int  # input tokens (attention mask)
    seconds: float  # wall time of train_step: forward, backward, update (data loading excluded)


class Trainer:
    """One training run: :meth:`setup`, then :meth:`train` (see the module doc)."""

    def __init__(self, cfg: TrainConfig, *, teacher: Teacher | None = None,
                 on_step: Callable[[StepMetrics], None] | None = None) -> None:
        self.cfg = cfg
        self.teacher = teacher  # None: the cache's own targets (or --teacher's, set up in setup())
        self.teacher_info: dict[str, Any] | None = None  # --teacher's identity, recorded in the summary
        self.on_step = on_step
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = TrainState()
        self.history: list[dict[str, float]] = []  # one entry per evaluation
        # Set by setup(), in its order; None (or a neutral value) until then.
        self.resume_from: Path | None = None
        self.accelerator: Accelerator | None = None
        self.is_main = True
        self.world = 1
        self.manifest: Manifest | None = None
        self.kind = ""  # the cache's encoding: topk, sampled or class_logits
        self.spec: LossSpec | None = None
        self.tokenizer: Any = None
        self.student: torch.nn.Module | None = None  # the HF (or peft) model that is saved
        self.vocab_size: int | None = None  # the student's output rows; None for a classifier
        self.module: DistillModule | None = None
        self.pad_id = 0
        self.loader: StreamLoader | None = None
        self.max_steps = 0
        self.model: torch.nn.Module | None = None  # `module` as wrapped by accelerate (DDP/FSDP)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.trackers: Trackers | None = None

    def run(self) -> dict[str, Any]:
        """Set up and train; returns the ``train_summary.json`` content (empty on non-main ranks)."""
        self.setup()
        return self.train()

    # -- setup: every check before anything is written to --out --------------------------------

    def setup(self) -> None:
        """Every check and every object of the run, in order; --out is only written once all checks passed."""
        self._setup_output()
        self._setup_accelerator()
        self._setup_cache()
        self._setup_student()
        self._setup_teacher()
        self._setup_data()
        self._setup_distributed_model()
        self._setup_optimizer()
        self._setup_resume_or_fresh_output()
        self.trackers = Trackers(self.cfg, self.out, self.is_main)
        self._setup_rank_seeds()

    def _setup_output(self) -> None:
        check_output_folder(self.cfg)
        check_optional_dependencies(self.cfg)
        if self.cfg.resume:
            self.resume_from = latest_checkpoint(self.ckpt_dir)
            if self.resume_from is None:
                raise TrainingError(f"--resume: no complete checkpoint under {self.ckpt_dir}; "
                                    "start without --resume (add --overwrite if the folder is not empty)")
            check_resume_config(self.cfg)

    def _setup_accelerator(self) -> None:
        self.accelerator = build_accelerator(self.cfg)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes

    def _setup_cache(self) -> None:
        from cache_format import open_cache

        self.manifest = open_cache(self.cfg.cache, storage_options=self.cfg.storage_options,
                                   verify_checksums=self.cfg.verify_checksums).manifest
        self.kind = str(self.manifest.identity.encoding.kind)
        if self.manifest.num_rows == 0:
            raise TrainingError(f"cache {self.cfg.cache} is empty (0 rows); dump data into it first")
        self.spec = loss_spec(self.cfg, sampled=self.kind == "sampled")

    def _setup_student(self) -> None:
        self.tokenizer, self.student, loss = build_student(self.cfg, self.manifest, self.spec)
        if not isinstance(loss, ClassKDLoss):
            self.vocab_size = int(self.student.get_output_embeddings().weight.shape[0])
        self.module = DistillModule(self.student, loss)
        if self.cfg.compile and self.module.decoder is not None:
            self.module.decoder.forward = torch.compile(self.module.decoder.forward)

    def _setup_teacher(self) -> None:
        """--teacher (online KD): its full distribution replaces the cache's targets; checked before --out is written."""
        if self.cfg.teacher is None:
            return
        if self.teacher is not None:
            raise ConfigError("teacher (flag --teacher) and Trainer(teacher=...) both give the targets; pass one")
        self.teacher, self.teacher_info = build_teacher(self.cfg, self.manifest, self.tokenizer, self.vocab_size,
                                                        self.accelerator.device)

    def _setup_data(self) -> None:
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.loader = build_loader(self.cfg, self.pad_id, self.vocab_size, self.accelerator.process_index, self.world)
        rows_per_step = self.cfg.batch_size * self.cfg.grad_accum * self.world
        train_rows = self.loader.stream.train_rows
        self.max_steps = self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * train_rows / rows_per_step))

    def _setup_distributed_model(self) -> None:
        """DDP/FSDP wrapping by accelerate; done before the optimizer exists, as FSDP requires."""
        self.model = self.accelerator.prepare(self.module)

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.accelerator.prepare(build_optimizer(self.cfg, params))
        # Not passed through accelerator.prepare: its scheduler wrapper steps once per process,
        # which would make N ranks decay the LR N times faster than one.
        self.scheduler = get_scheduler(self.cfg.lr_scheduler, self.optimizer,
                                       num_warmup_steps=self.cfg.warmup_steps, num_training_steps=self.max_steps)
        for obj in (self.scheduler, self.loader, self.state):
            self.accelerator.register_for_checkpointing(obj)

    def _setup_resume_or_fresh_output(self) -> None:
        """Every check has passed: now load the newest usable checkpoint, or (main process) clear --out
        (only an earlier kdpipe run: :func:`~pipeline.train.checkpoint.clear_output`) and mark it as a run."""
        if self.resume_from is not None:
            self.resume_from, self.history = load_usable_checkpoint(self.accelerator, self.ckpt_dir)
        elif self.is_main:
            if self.cfg.overwrite:
                clear_output(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            write_run_marker(self.out)
            save_resolved_config(self.cfg, self.out, name="train_config.yaml")

    def _setup_rank_seeds(self) -> None:
        """Per-rank RNG streams (dropout) differ but are reproducible; a resumed run restored its own."""
        if self.resume_from is None:
            seed = self.cfg.seed + self.accelerator.process_index
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)

    # -- training --------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Optimizer steps until ``max_steps``, logging, evaluating and saving on their schedules."""
        from tqdm.auto import tqdm

        if self.model is None:
            raise RuntimeError("Trainer.setup() must run before Trainer.train()")
        cfg, state = self.cfg, self.state
        bar = tqdm(total=self.max_steps, initial=state.step, disable=not (self.is_main and cfg.progress),
                   desc="train", dynamic_ncols=True)
        t0, run_tokens = time.perf_counter(), 0
        self.model.train()
        try:
            while state.step < self.max_steps:
                step = self.train_step([next(self.loader) for _ in range(cfg.grad_accum)])
                run_tokens += step.tokens
                tokens_per_s = run_tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                if self._due(cfg.log_every):
                    self.trackers.log({"train/loss": step.loss, "train/kd_loss": step.kd_loss,
                                       "train/ce_loss": step.ce_loss, "train/lr": step.lr,
                                       "train/tokens_per_s": tokens_per_s}, state.step)
                if self._due(cfg.eval_every):
                    self._evaluate_and_record(step.loss, bar)
                if self._due(cfg.save_every):
                    save_checkpoint(self.accelerator, self.ckpt_dir, state.step, self.history, cfg.keep_checkpoints)
                if self.on_step is not None:
                    self.on_step(step)
        finally:
            bar.close()
            self.trackers.close()
        return self._save_final(time.perf_counter() - t0, run_tokens)

    def train_step(self, micro_batches: Sequence[Batch]) -> StepMetrics:
        """One optimizer step over this rank's ``micro_batches`` (collated batches, ``grad_accum`` of them).

        The loss is the sum over every target position of every micro-batch on every rank, divided
        once by their global count; a non-finite loss stops the run before the weights change.
        """
        t0 = time.perf_counter()
        acc, dev = self.accelerator, self.accelerator.device
        micro = [{k: v.to(dev, non_blocking=True) for k, v in b.items()} for b in micro_batches]
        pure_kd_from_topk_cache = self.kind == "topk" and self.cfg.alpha == 0 and self.teacher is None
        if self.state.step == 0 and pure_kd_from_topk_cache and self.is_main:
            warn_if_tail_is_large(micro[0])
        local = torch.stack([sum(b["num_targets"] for b in micro).float(),
                             sum(b["attention_mask"].sum() for b in micro).float()])
        count, tokens = acc.reduce(local, reduction="sum").tolist()
        sums = torch.zeros(3, device=dev)  # loss, kd, ce of this rank's micro-batches, / global count
        for i, batch in enumerate(micro):
            with contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model):
                out = self.model(batch, self._targets(batch), normalizer=count)
                # DDP/FSDP average gradients over ranks: times the world size they are sum / global count.
                acc.backward(out.loss * self.world)
            sums += torch.stack([out.loss.detach(), out.kd_loss, out.ce_loss])
        loss, kd, ce = acc.reduce(sums, reduction="sum").tolist()
        self._stop_if_not_finite(loss, micro)
        lr = float(self.scheduler.get_last_lr()[0])
        if self.cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.record(loss, int(tokens))
        return StepMetrics(step=self.state.step, loss=loss, kd_loss=kd, ce_loss=ce, lr=lr, targets=int(count),
                           tokens=int(tokens), seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """KD loss and teacher–student top-1 agreement on the held-out slice (same on every rank)."""
        from pipeline.train.stream import iter_eval_batches

        if self.cfg.eval_rows == 0:
            return {}
        self.model.eval()
        kd = agree = count = 0.0
        for batch in iter_eval_batches(self.cfg.cache, eval_rows=self.cfg.eval_rows, batch_size=self.cfg.batch_size,
                                       pad_id=self.pad_id, vocab_size=self.vocab_size,
                                       storage_options=self.cfg.storage_options,
                                       verify_checksums=self.cfg.verify_checksums):
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            out = self.model(batch, self._targets(batch), normalizer=1.0)  # plain sums
            kd += float(out.kd_loss)
            agree += float(out.top1_agreement)
            count += out.n_targets
        self.model.train()
        n = max(count, 1.0)
        return {"eval/kd_loss": kd / n, "eval/top1_agreement": agree / n, "eval/positions": count}

    def _targets(self, batch: Batch) -> Targets:
        with torch.no_grad():  # targets carry no gradient, whatever the teacher does
            return cached_targets(batch) if self.teacher is None else self.teacher(batch)

    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.max_steps

    def _stop_if_not_finite(self, loss: float, micro: Sequence[Batch]) -> None:
        """A non-finite loss stops the run: blamed on the cache (or teacher) when the targets are non-finite,
        else on the optimisation (the learning-rate advice)."""
        if math.isfinite(loss):
            return
        last = latest_checkpoint(self.ckpt_dir)
        stopped = (f"at step {self.state.step + 1}; stopped before updating the weights. Last good checkpoint: "
                   f"{last or 'none (none saved yet)'}")
        for batch in micro:
            if self.teacher is not None and not _finite_targets(self._targets(batch)):
                raise TrainingError(f"the teacher's targets are NaN/inf {stopped}; check the teacher model")
            bad = _non_finite_cache_row(batch) if self.teacher is None else None
            if bad is not None:
                from cache_format.errors import InvariantError

                shard = self.manifest.shards[bad[0]].name
                raise InvariantError(
                    f"cache {self.cfg.cache}: shard {shard} row {bad[1]} holds NaN/inf teacher targets, found {stopped}"
                    f"; the cache is damaged, not the training — run `kdpipe cache verify {self.cfg.cache}` and "
                    "re-copy or re-dump it")
        raise TrainingError(f"loss became {loss} {stopped}; try a lower --lr, --max-grad-norm, or --precision fp32, "
                            "then --resume")

    def _evaluate_and_record(self, train_loss: float, bar: Any) -> None:
        metrics = self.evaluate()
        if metrics:
            self.trackers.log(metrics, self.state.step)
            self.history.append({"step": self.state.step, "train_loss": train_loss, **metrics})
            bar.write(f"step {self.state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _save_final(self, wall: float, run_tokens: int) -> dict[str, Any]:
        """The student (LoRA merged) and tokenizer in --out, and ``train_summary.json``."""
        save_final_student(self.accelerator, self.model, self.tokenizer, self.out, merge_lora=self.cfg.lora_r > 0)
        summary: dict[str, Any] = {}
        if self.is_main:
            c = self.state
            summary = {
                "steps": c.step, "first_loss": c.first_loss, "final_loss": c.last_loss,
                "tokens_seen": c.tokens_seen, "wall_s": wall, "tokens_per_s": run_tokens / wall if wall > 0 else 0.0,
                "world_size": self.world, "cache_kind": self.kind, "cache_rows": self.manifest.num_rows,
                "teacher": self.teacher_info,  # --teacher's identity; None: the cache's targets
                "eval": self.history[-1] if self.history else None, "history": self.history,
                "resolved_config": json.loads(self.cfg.model_dump_json()),
            }
            atomic_write_text(self.out / "train_summary.json", json.dumps(summary, indent=2))
        self.accelerator.wait_for_everyone()
        return summary


def _finite_targets(targets: Targets) -> bool:
    if isinstance(targets, KDTargets):
        return bool(torch.isfinite(targets.logprobs[targets.valid]).all() and torch.isfinite(targets.tail).all())
    return bool(torch.isfinite(targets.logits).all())


def _non_finite_cache_row(batch: Batch) -> tuple[int, int] | None:
    """(shard index, row index) of the first row whose cached targets hold NaN/inf; None when all are finite."""
    if "class_logits" in batch:
        bad = ~torch.isfinite(batch["class_logits"]).all(dim=1)
    else:
        logprobs = torch.where(batch["valid"], batch["logprobs"], 0.0)  # -inf marks padding entries
        tail = torch.where(batch["target_mask"], batch["tail"], 0.0)
        bad = ~(torch.isfinite(logprobs).flatten(1).all(dim=1) & torch.isfinite(tail).all(dim=1))
    rows = bad.nonzero()
    return None if len(rows) == 0 else tuple(batch["row_ref"][int(rows[0, 0])].tolist())


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student from a cache; returns the ``train_summary.json`` content (empty on non-main ranks)."""
    return Trainer(cfg).run()
