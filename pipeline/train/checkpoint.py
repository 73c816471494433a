"""The run's output folder: refusing to clobber it, checkpoints (atomic), resume checks.

Layout of ``--out``: ``checkpoints/step-N/`` (accelerate state + ``trainer_state.json``, written
under ``.tmp-step-N`` and renamed when complete), ``train_config.yaml``, the final student, and
``train_summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import atomic_write_text, load_yaml
from pipeline.errors import ConfigError
from pipeline.train.config import RESUME_MAY_CHANGE, TrainConfig


class TrainState:
    """Counters saved with every checkpoint (registered with accelerate as custom state)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def record(self, loss: float, tokens: int) -> None:
        """Count one finished optimizer step."""
        self.step += 1
        self.tokens_seen += tokens
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def check_output_folder(cfg: TrainConfig) -> None:
    """Refuse a non-empty ``--out`` without ``--resume``/``--overwrite`` (before any work)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out (flag --out) {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"output folder {out} is not empty; pass --resume to continue its run, "
                          "--overwrite to replace it, or choose another --out")


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``step-N`` folders with their ``trainer_state.json`` (written last), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = _complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def check_resume_config(cfg: TrainConfig) -> None:
    """Refuse to resume with settings that change what the finished steps did."""
    saved_path = Path(cfg.out) / "train_config.yaml"
    if not saved_path.is_file():
        return
    saved = load_yaml(saved_path)
    now = json.loads(cfg.model_dump_json())
    diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if diff:
        raise ConfigError(f"--resume with settings that differ from {saved_path} ({'; '.join(diff)}); resume "
                          f"with the saved settings (--config {saved_path}) or start anew with --overwrite")


def load_checkpoint(accelerator: Any, path: Path) -> list[dict[str, float]]:
    """Restore model, optimizer, scheduler, RNG, stream position and counters; returns the eval history."""
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text()).get("history", [])


def save_checkpoint(accelerator: Any, ckpt_dir: Path, step: int, history: list[dict[str, float]],
                    keep: int) -> None:
    """Everything :func:`load_checkpoint` restores, as ``step-N`` (atomic rename); keeps the last ``keep``."""
    is_main = accelerator.is_main_process
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if is_main:
        atomic_write_text(tmp / "trainer_state.json", json.dumps({"step": step, "history": history}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_final_student(accelerator: Any, model: Any, tokenizer: Any, out: Path, merge_lora: bool) -> None:
    """The trained student and its tokenizer in ``out`` (main process), loadable without kdpipe or peft."""
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(model).student
    if merge_lora:
        student = student.merge_and_unload()  # a plain model that loads without peft
    state = accelerator.get_state_dict(model)  # gathers FSDP shards: every rank takes part
    if accelerator.is_main_process:
        prefix = "student."
        weights = None if merge_lora else {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        student.save_pretrained(str(out), state_dict=weights)
        tokenizer.save_pretrained(str(out))
