"""The run's output folder: refusing to clobber it, checkpoints (atomic), resume checks.

Layout of ``--out``: ``checkpoints/step-N/`` (accelerate state + ``trainer_state.json``, written
under ``.tmp-step-N`` and renamed when complete), ``train_config.yaml``, the final student, and
``train_summary.json``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline.config import atomic_write_text, load_yaml
from pipeline.errors import ConfigError, KdpipeError, TrainingError
from pipeline.hf_io import first_line
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


# Written into --out when a run starts: the one sign that kdpipe made the folder, so --overwrite
# may delete it. Runs of earlier versions are recognised by RUN_FILES.
RUN_MARKER = "kdpipe-train-run.json"
RUN_FILES = ("train_config.yaml", "train_summary.json")


def is_training_run(out: Path) -> bool:
    """True when ``out`` holds a kdpipe training run (its marker, or an older run's config/summary/checkpoint)."""
    return any((out / name).is_file() for name in (RUN_MARKER, *RUN_FILES)) or bool(
        _complete_checkpoints(out / "checkpoints"))


def write_run_marker(out: Path) -> None:
    if not (out / RUN_MARKER).is_file():
        atomic_write_text(out / RUN_MARKER, json.dumps({"kdpipe": "train-student run"}) + "\n")


def _local_input(ref: str | None) -> Path | None:
    """The resolved local path of a flag's value, or None for a URL or hub name (nothing local to protect)."""
    if not ref or ("://" in ref and not ref.startswith("file://")):
        return None
    path = Path(ref.removeprefix("file://")).expanduser()
    return path.resolve() if path.exists() else None


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _check_inputs_are_safe(cfg: TrainConfig, out: Path) -> None:
    """--out never inside the cache (it would add files to it); with --overwrite, never the cache, the student
    or the tokenizer being read, nor a folder holding or inside them (compared as resolved real paths)."""
    real = out.resolve()
    inputs = [("cache", "--cache", cfg.cache)]
    if cfg.overwrite:
        inputs += [("student", "--student", cfg.student), ("student config", "--student-config", cfg.student_config),
                   ("tokenizer", "--tokenizer", cfg.tokenizer)]
    for what, flag, ref in inputs:
        path = _local_input(ref)
        if path is not None and (_overlap(real, path) if cfg.overwrite else real.is_relative_to(path)):
            raise ConfigError(f"--out {out} overlaps the {what} being read ({flag} {ref}); --out must be a "
                              f"separate folder, outside the {what} and not holding it — choose another --out")


def check_output_folder(cfg: TrainConfig) -> None:
    """Refuse an unusable ``--out`` before any work: a file, a dangling link, a folder overlapping what the run
    reads, a non-empty folder without ``--resume``/``--overwrite``, or ``--overwrite`` of a folder kdpipe did
    not create (user files are never deleted)."""
    out = Path(cfg.out).expanduser()
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a symbolic link to a missing target; remove it or give a real folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out (flag --out) {out} is a file; give a folder")
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"--out {out} lies under {blocking}, which is a file; give a folder path")
    _check_inputs_are_safe(cfg, out)
    if not (out.exists() and any(out.iterdir())):
        return
    if not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"output folder {out} is not empty; pass --resume to continue its run, "
                          "--overwrite to replace it, or choose another --out")
    if cfg.overwrite:
        _check_deletable(out)


def _check_deletable(out: Path) -> None:
    if out.is_symlink():
        raise ConfigError(f"--overwrite refused: --out {out} is a symbolic link; pass the real folder it points to")
    if not is_training_run(out):
        raise ConfigError(f"--overwrite refused: --out {out} is not a kdpipe training run (no {RUN_MARKER}, "
                          f"{' or '.join(RUN_FILES)} or checkpoints/) and kdpipe never deletes files it did not "
                          "write; choose an empty or new --out, or empty it yourself")


def clear_output(out: Path) -> None:
    """Delete an earlier run in ``out`` for ``--overwrite`` (checked again right before deleting)."""
    if out.exists() and any(out.iterdir()):
        _check_deletable(out)
        shutil.rmtree(out)


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


def _damaged_file_errors() -> tuple[type[BaseException], ...]:
    """What reading a truncated or corrupt checkpoint file raises (torch.load, pickle, safetensors, json).
    A changed setting (a ``KdpipeError`` from the stream's state) is not damage and is raised as is."""
    from safetensors import SafetensorError

    return OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError, SafetensorError


def _failed_anywhere(accelerator: Any, failed: bool) -> bool:
    """Whether any rank failed, so every rank falls back to the same checkpoint."""
    if accelerator.num_processes == 1:
        return failed
    import torch

    flag = torch.tensor([float(failed)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def load_usable_checkpoint(accelerator: Any, ckpt_dir: Path) -> tuple[Path, list[dict[str, float]]]:
    """The newest checkpoint that loads completely, and its eval history: a damaged one (a truncated
    ``optimizer.bin``, ...) is skipped with a warning and the previous one loaded instead."""
    problems: list[str] = []
    for path in reversed(_complete_checkpoints(ckpt_dir)):
        history: list[dict[str, float]] = []
        problem = "it failed on another rank"
        try:
            history = load_checkpoint(accelerator, path)
            problem = ""
        except KdpipeError:
            raise
        except _damaged_file_errors() as exc:
            problem = f"{type(exc).__name__}: {first_line(exc).split('. ')[0][:160]}"  # torch's run on
        if not _failed_anywhere(accelerator, bool(problem)):
            return path, history
        problems.append(f"{path.name}: {problem}")
        if accelerator.is_main_process:
            print(f"warning: checkpoint {path} cannot be loaded ({problem}); trying the previous one",
                  file=sys.stderr)
    raise TrainingError(f"--resume: no usable checkpoint under {ckpt_dir} ({'; '.join(problems) or 'none'}); "
                        "start anew with --overwrite (or restore the checkpoint files)")


def _save_failure(exc: BaseException, ckpt_dir: Path, step: int) -> TrainingError | None:
    """The error for a checkpoint write that failed for lack of space (or another I/O error); None for a bug.
    torch's zip writer reports a full disk as a ``RuntimeError`` that never says so, hence the free space."""
    disk = isinstance(exc, OSError) or "inline_container" in str(exc) or "PytorchStreamWriter" in str(exc)
    if not disk:
        return None
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    full = getattr(exc, "errno", None) == errno.ENOSPC
    what = "disk full" if full else f"write failed ({type(exc).__name__}: {first_line(exc)}; {free}, a full disk?)"
    last = latest_checkpoint(ckpt_dir)
    kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
    return TrainingError(f"{what} while saving checkpoint step-{step} in {ckpt_dir}; the partial checkpoint was "
                         f"removed and {kept}; free space on that disk, then rerun with --resume")


def save_checkpoint(accelerator: Any, ckpt_dir: Path, step: int, history: list[dict[str, float]],
                    keep: int) -> None:
    """Everything :func:`load_checkpoint` restores, as ``step-N`` (atomic rename); keeps the last ``keep``.

    A failed write (full disk) removes the partial ``.tmp-step-N`` and leaves the earlier checkpoints as they were.
    """
    is_main = accelerator.is_main_process
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if is_main:
            atomic_write_text(tmp / "trainer_state.json", json.dumps({"step": step, "history": history}, indent=1))
    except (OSError, RuntimeError) as exc:
        error = _save_failure(exc, ckpt_dir, step)
        if error is None:
            raise
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error from exc
    if is_main:
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
