"""``kdpipe train-student``: train a student from a cache with a sparse KD loss.

Built on ``accelerate``: ``torchrun --nproc-per-node N -m pipeline.cli train-student ...``
or ``accelerate launch -m pipeline.cli train-student ...`` runs DDP, and an accelerate
config with FSDP runs FSDP. The loss is computed inside a small wrapper module
(:class:`DistillModule`), so whatever accelerate wraps around it sees a plain forward.

Steps read top to bottom in :meth:`Trainer.run`. The loss of an optimizer step is
``sum over its target positions / number of those positions``, counted over every
micro-batch of the gradient accumulation and every rank (``clamp_min(1)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import atomic_write_text, load_yaml, save_resolved_config
from pipeline.errors import ConfigError, KdpipeError
from pipeline.train.config import RESUME_MAY_CHANGE, TrainConfig
from pipeline.train.losses import HeadSpec, KDTargets, LossSpec, chunked_kd_loss, class_kl, hard_ce

# Mean teacher tail mass above which pure KD from a top-k cache gets a warning: at 0.54 (top-8)
# it lost to cross-entropy in docs/RESULTS.md, at 0.29 (top-64) it still won clearly.
LARGE_TAIL_WARNING = 0.35

__all__ = ["DistillModule", "TrainConfig", "Trainer", "TrainingError", "run_train"]


class TrainingError(KdpipeError):
    """Training stopped (non-finite loss, nothing to resume, ...)."""


class DistillModule(torch.nn.Module):
    """The student plus its loss: ``forward(batch)`` returns sums (loss, kd part, top-1 agreement).

    For causal LMs only the target positions of the last hidden state go through the output
    head, in chunks (:func:`pipeline.train.losses.chunked_kd_loss`).
    """

    def __init__(self, student: torch.nn.Module, spec: LossSpec, head: HeadSpec, chunk_size: int,
                 classification: bool) -> None:
        super().__init__()
        self.student = student
        self.spec = spec
        self.head = head
        self.chunk_size = chunk_size
        self.classification = classification
        hf = student.get_base_model() if hasattr(student, "get_base_model") else student
        # Lists keep these out of the module tree: they are `student` or inside it, and a second
        # registration would duplicate their weights in every checkpoint.
        self._hf = [hf]
        self._decoder = [getattr(hf, hf.base_model_prefix)] if not classification else [None]

    @property
    def decoder(self) -> torch.nn.Module | None:
        """The student's decoder stack (last hidden state), without the output head."""
        return self._decoder[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.classification:
            logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kd = class_kl(batch["class_logits"], logits, self.spec.temperature)
            loss = kd
            if self.spec.alpha > 0:
                lq = torch.log_softmax(logits.float(), -1)
                ce = hard_ce(lq.gather(1, batch["class_labels"].clamp_min(0).unsqueeze(-1)).squeeze(-1),
                             batch["class_labels"])
                loss = (1 - self.spec.alpha) * kd + self.spec.alpha * ce
            teacher_top = batch["class_logits"].argmax(-1)
            return {"loss_sum": loss.sum(), "kd_sum": kd.detach().sum(),
                    "top1_agree": (logits.argmax(-1) == teacher_top).sum().float()}
        hidden = self.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state  # [B, T, H]
        mask = batch["target_mask"]
        targets = KDTargets(ids=batch["ids"][mask], logprobs=batch["logprobs"][mask], tail=batch["tail"][mask],
                            valid=batch["valid"][mask], labels=batch["labels"][mask])
        out_emb = self._hf[0].get_output_embeddings()
        # top-1 agreement costs a pass over the logits: only asked for in evaluation
        stats: dict[str, torch.Tensor] = {} if self.training else {"top1_agree": hidden.new_zeros(())}
        loss = chunked_kd_loss(hidden[mask], out_emb.weight, getattr(out_emb, "bias", None), targets, self.spec,
                               self.head, self.chunk_size, stats)
        return {"loss_sum": loss, "kd_sum": stats["kd_sum"], "top1_agree": stats.get("top1_agree", loss.new_zeros(()))}


class _Counters:
    """Trainer counters saved with every checkpoint (accelerate custom state)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """One training run; :meth:`run` lists the steps in order."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.counters = _Counters()
        self.history: list[dict[str, float]] = []

    def run(self) -> dict[str, Any]:
        self._setup_output()
        self._setup_accelerator()
        self._setup_cache()
        self._setup_student()
        self._setup_data()
        self._setup_distributed_model()
        self._setup_optimizer()
        self._setup_resume_or_fresh_output()
        self._setup_logging()
        try:
            wall = self._train_loop()
        finally:
            self._close_logging()
        return self._save_final(wall)

    # -- setup ---------------------------------------------------------------------------------

    def _setup_output(self) -> None:
        """Refuse to touch a non-empty --out without --resume/--overwrite (before any work)."""
        cfg = self.cfg
        exists = self.out.exists() and any(self.out.iterdir())
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"out (flag --out) {self.out} is a file; give a folder")
        if exists and not (cfg.resume or cfg.overwrite):
            raise ConfigError(f"output folder {self.out} is not empty; pass --resume to continue its run, "
                              "--overwrite to replace it, or choose another --out")
        self._check_optional_dependencies()
        if cfg.resume:
            self.resume_from = self._latest_checkpoint()
            if self.resume_from is None:
                raise TrainingError(f"--resume: no complete checkpoint under {self.ckpt_dir}; "
                                    "start without --resume (add --overwrite if the folder is not empty)")
            self._check_resume_config()

    def _check_optional_dependencies(self) -> None:
        """Extras asked for by flags must be importable before anything is written."""
        import importlib.util

        needs = [(self.cfg.wandb, "wandb", "--wandb", "wandb"), (self.cfg.lora_r > 0, "peft", "--lora-r", "lora"),
                 (self.cfg.optimizer == "adamw_8bit", "bitsandbytes", "--optimizer adamw_8bit", "gpu")]
        for wanted, module, flag, extra in needs:
            if wanted and importlib.util.find_spec(module) is None:
                raise ConfigError(f"{flag} needs the {module} package, which is not installed: "
                                  f"pip install 'kdpipe[{extra}]' (or drop {flag})")

    def _latest_checkpoint(self) -> Path | None:
        if not self.ckpt_dir.is_dir():
            return None
        done = [p for p in self.ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def _check_resume_config(self) -> None:
        saved_path = self.out / "train_config.yaml"
        if not saved_path.is_file():
            return
        saved = load_yaml(saved_path)
        now = json.loads(self.cfg.model_dump_json())
        diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
        if diff:
            raise ConfigError(f"--resume with settings that differ from {saved_path} ({'; '.join(diff)}); resume "
                              "with the saved settings (--config " + str(saved_path) + ") or start anew with --overwrite")

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        # accelerate keeps its settings in a process-wide singleton; a second run_train in the same
        # process (tests, notebooks) may ask for another precision. The process group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)

        # Without any accelerator, accelerate only sets up torchrun's process group (gloo) in cpu mode.
        cpu = not torch.accelerator.is_available()
        self.accelerator = Accelerator(mixed_precision="bf16" if self.cfg.precision == "bf16" else "no", cpu=cpu)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        # Same init on every rank (DDP broadcasts anyway); per-rank dropout differs via device_specific later.
        set_seed(self.cfg.seed)

    def _setup_cache(self) -> None:
        from cache_format import open_cache

        self.reader = open_cache(self.cfg.cache, storage_options=self.cfg.storage_options)
        self.manifest = self.reader.manifest
        self.kind = str(self.manifest.identity.encoding.kind)
        if self.manifest.num_rows == 0:
            raise TrainingError(f"cache {self.cfg.cache} is empty (0 rows); dump data into it first")
        self.spec = LossSpec(kind=self.cfg.loss, temperature=self.cfg.temperature, alpha=self.cfg.alpha,
                             beta=self.cfg.jsd_beta, sampled=self.kind == "sampled",
                             tail_bucket=self.cfg.tail_bucket)
        self.spec.validate()

    def _setup_student(self) -> None:
        from pipeline.train import student as st

        cfg = self.cfg
        classification = self.kind == "class_logits"
        enc = self.manifest.identity.encoding
        self.tokenizer = st.load_tokenizer(st.resolve_tokenizer_path(cfg.student, cfg.tokenizer, cfg.student_config))
        model = st.load_student(student=cfg.student, student_config=cfg.student_config,
                                student_layers=cfg.student_layers, classification=classification,
                                num_labels=getattr(enc, "num_classes", None) if classification else None,
                                attn_implementation=cfg.attn_implementation, dtype=torch.float32, seed=cfg.seed)
        st.check_against_manifest(model, self.tokenizer, self.manifest, cache=cfg.cache,
                                  allow_vocab_mismatch=cfg.allow_vocab_mismatch)
        head = HeadSpec()
        if not classification:
            head = st.head_spec(model)
            st.check_head(model, head, int(model.config.vocab_size))
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_r > 0:
            model = self._apply_lora(model, classification)
        self.student = model
        self.vocab_size = None if classification else int(model.get_output_embeddings().weight.shape[0])
        self.module = DistillModule(model, self.spec, head, cfg.loss_chunk_size, classification)
        if cfg.compile and self.module.decoder is not None:
            self.module.decoder.forward = torch.compile(self.module.decoder.forward)

    def _apply_lora(self, model: torch.nn.Module, classification: bool) -> torch.nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("lora_r (flag --lora-r) needs peft: pip install 'kdpipe[lora]'") from None
        lcfg = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha,
                          target_modules=self.cfg.lora_target_modules,
                          task_type="SEQ_CLS" if classification else "CAUSAL_LM")
        return get_peft_model(model, lcfg)

    def _setup_data(self) -> None:
        from pipeline.train.stream import CacheStream, StreamLoader

        cfg = self.cfg
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        # The stream and the evaluation open their own readers: a reader keeps one shard open and
        # switching shards for one consumer would close the file the other is reading.
        stream = CacheStream(cfg.cache, batch_size=cfg.batch_size,
                             pad_id=self.pad_id, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                             rank=self.accelerator.process_index, world_size=self.world, eval_rows=cfg.eval_rows,
                             vocab_size=self.vocab_size, storage_options=cfg.storage_options)
        self.loader = StreamLoader(stream, num_workers=cfg.num_workers)
        rows_per_step = cfg.batch_size * cfg.grad_accum * self.world
        self.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * stream.train_rows / rows_per_step))

    def _setup_distributed_model(self) -> None:
        """DDP/FSDP wrapping by accelerate; done before the optimizer exists, as FSDP requires."""
        self.model = self.accelerator.prepare(self.module)

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.optimizer == "adamw_8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError("optimizer adamw_8bit (flag --optimizer) needs bitsandbytes: "
                                  "pip install 'kdpipe[gpu]', or use --optimizer adamw") from None
            self.optimizer = bnb.optim.AdamW8bit(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        # Not passed through accelerator.prepare: its scheduler wrapper steps once per process,
        # which would make N ranks decay the LR N times faster than one.
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.scheduler = get_scheduler(self.cfg.lr_scheduler, self.optimizer,
                                       num_warmup_steps=self.cfg.warmup_steps, num_training_steps=self.max_steps)
        for obj in (self.scheduler, self.loader, self.counters):
            self.accelerator.register_for_checkpointing(obj)

    def _setup_resume_or_fresh_output(self) -> None:
        """Every check has passed: now load the checkpoint, or (main process) clear --out."""
        if self.cfg.resume:
            self.accelerator.load_state(str(self.resume_from))
            self.history = json.loads((self.resume_from / "trainer_state.json").read_text()).get("history", [])
        elif self.is_main:
            if self.cfg.overwrite and self.out.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_resolved_config(self.cfg, self.out, name="train_config.yaml")

    def _setup_logging(self) -> None:
        self.tb = None
        self.wandb_run = None
        if not self.is_main:
            return
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if self.cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb (flag --wandb) needs the wandb package: pip install 'kdpipe[wandb]'") from None
            self.wandb_run = wandb.init(project=self.cfg.wandb_project, mode=self.cfg.wandb_mode,
                                        dir=str(self.out), config=json.loads(self.cfg.model_dump_json()))

    def _close_logging(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def _log(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    # -- training ------------------------------------------------------------------------------

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (global mean loss, tokens)."""
        acc, dev = self.accelerator, self.accelerator.device
        micro = [_batch_to(next(self.loader), dev) for _ in range(self.cfg.grad_accum)]
        if self.counters.step == 0:
            self._warn_if_tail_is_large(micro[0])
        local = torch.stack([sum(b["num_targets"] for b in micro).to(dev).float(),
                             sum(b["attention_mask"].sum() for b in micro).to(dev).float()])
        count, tokens = acc.reduce(local, reduction="sum").tolist()
        denom = max(count, 1.0)
        loss_sum = torch.zeros((), device=dev)
        for i, batch in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
            with sync:
                out = self.model(batch)
                # DDP/FSDP average gradients over ranks: scale by world size to get sum / global count.
                acc.backward(out["loss_sum"] * (self.world / denom))
            loss_sum += out["loss_sum"].detach()
        loss = float(acc.reduce(loss_sum, reduction="sum")) / denom
        if not math.isfinite(loss):
            last = self._latest_checkpoint()
            raise TrainingError(f"loss became {loss} at step {self.counters.step + 1}; stopped before updating "
                                f"the weights. Last good checkpoint: {last or 'none (none saved yet)'}; try a lower "
                                "--lr, --max-grad-norm, or --precision fp32, then --resume")
        if self.cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, int(tokens)

    def _warn_if_tail_is_large(self, batch: dict[str, Any]) -> None:
        """Say so (once) when pure KD is asked of a top-k cache that leaves much mass outside its ids.

        The tail bucket carries the tail's amount, not its shape: with a large tail, pure KD
        measurably lost to cross-entropy in docs/RESULTS.md (top-8, mean tail 0.54).
        """
        if self.kind != "topk" or self.cfg.alpha > 0 or not self.accelerator.is_main_process:
            return
        mask = batch["target_mask"].bool()
        if not bool(mask.any()):
            return
        mean_tail = float(batch["tail"][mask].float().mean())
        if mean_tail > LARGE_TAIL_WARNING:
            print(f"warning: the cache's teacher keeps {mean_tail:.0%} of its probability outside the stored top-k "
                  f"(first batch); with --alpha 0 the student learns little about that mass. Consider --alpha 0.3-0.5, "
                  "a larger k, or a `sampled` cache (docs/RESULTS.md)", file=sys.stderr)

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
                                       storage_options=self.cfg.storage_options):
            out = self.model(_batch_to(batch, self.accelerator.device))
            kd += float(out["kd_sum"])
            agree += float(out["top1_agree"])
            count += float(batch["num_targets"])
        self.model.train()
        n = max(count, 1.0)
        return {"eval/kd_loss": kd / n, "eval/top1_agreement": agree / n, "eval/positions": count}

    def _save_checkpoint(self) -> None:
        """Model, optimizer, scheduler, RNG states, stream position, counters: step-N (atomic rename)."""
        acc, step = self.accelerator, self.counters.step
        final = self.ckpt_dir / f"step-{step}"
        tmp = self.ckpt_dir / f".tmp-step-{step}"
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.is_main:
            atomic_write_text(tmp / "trainer_state.json", json.dumps(
                {"step": step, "history": self.history}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            done = sorted((p for p in self.ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file()),
                          key=lambda p: int(p.name.split("-")[1]))
            for old in done[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _train_loop(self) -> float:
        from tqdm.auto import tqdm

        c = self.counters
        self.model.train()
        # Per-rank RNG streams (dropout) differ but are reproducible; restored from checkpoints on resume.
        if not self.cfg.resume:
            torch.manual_seed(self.cfg.seed + self.accelerator.process_index)
            random.seed(self.cfg.seed + self.accelerator.process_index)
            np.random.seed(self.cfg.seed + self.accelerator.process_index)
        bar = tqdm(total=self.max_steps, initial=c.step, disable=not (self.is_main and self.cfg.progress),
                   desc="train", dynamic_ncols=True)
        t0 = time.perf_counter()
        tokens_run = 0
        while c.step < self.max_steps:
            loss, tokens = self._train_step()
            c.step += 1
            c.tokens_seen += tokens
            tokens_run += tokens
            c.first_loss = loss if c.first_loss is None else c.first_loss
            c.last_loss = loss
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_run / max(elapsed, 1e-9):.0f}")
            if c.step % self.cfg.log_every == 0 or c.step == self.max_steps:
                self._log({"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                           "train/tokens_per_s": tokens_run / max(elapsed, 1e-9)}, c.step)
            if c.step % self.cfg.eval_every == 0 or c.step == self.max_steps:
                metrics = self.evaluate()
                if metrics:
                    self._log(metrics, c.step)
                    self.history.append({"step": c.step, "train_loss": loss, **metrics})
                    bar.write(f"step {c.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if c.step % self.cfg.save_every == 0 or c.step == self.max_steps:
                self._save_checkpoint()
        bar.close()
        self._run_tokens = tokens_run
        return time.perf_counter() - t0

    def _save_final(self, wall: float) -> dict[str, Any]:
        acc = self.accelerator
        acc.wait_for_everyone()
        student = acc.unwrap_model(self.model).student
        if self.cfg.lora_r > 0:
            student = student.merge_and_unload()  # a plain model that loads without peft
        state = acc.get_state_dict(self.model)  # gathers FSDP shards
        summary: dict[str, Any] = {}
        if self.is_main:
            prefix = "student."
            sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if self.cfg.lora_r == 0 else None
            student.save_pretrained(str(self.out), state_dict=sd)
            self.tokenizer.save_pretrained(str(self.out))
            c = self.counters
            summary = {
                "steps": c.step, "first_loss": c.first_loss, "final_loss": c.last_loss,
                "tokens_seen": c.tokens_seen, "wall_s": wall,
                "tokens_per_s": self._run_tokens / wall if wall > 0 else 0.0,
                "world_size": self.world, "cache_kind": self.kind, "cache_rows": self.manifest.num_rows,
                "eval": self.history[-1] if self.history else None, "history": self.history,
                "resolved_config": json.loads(self.cfg.model_dump_json()),
            }
            atomic_write_text(self.out / "train_summary.json", json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return summary


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student from a cache; returns the ``train_summary.json`` content (empty on non-main ranks)."""
    return Trainer(cfg).run()
