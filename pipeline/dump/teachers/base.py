"""Teacher backends behind one interface: the dump never knows which engine runs the teacher.

A backend takes token-id sequences and the target positions of each (position convention of
docs/ARCHITECTURE.md: position ``t`` predicts token ``t + 1``) and returns numpy arrays with the
rows' positions concatenated in the order the rows were given:

- :meth:`TeacherBackend.capture`: whatever a :class:`Want` asks for, from **one** teacher pass:
  top-k (``ids`` int32 [n_pos, k] and ``logprobs`` float32 [n_pos, k], exact log-softmax values,
  float32 over the full vocabulary, descending per position) and/or draws (int32
  [n_pos, num_draws], tokens drawn with replacement from the full distribution); all at the
  settings' capture ``temperature`` (1 = the model's own distribution);
- :meth:`TeacherBackend.topk` / :meth:`TeacherBackend.sample`: one of them alone;
- :meth:`TeacherBackend.class_logits`: float32 [n_rows, num_classes];
- :meth:`TeacherBackend.generate`: greedy continuations (list of int32 arrays).

``timing`` accumulates ``teacher_s`` (the model's own work: forward pass, the head, softmax
and top-k) and ``convert_s`` (turning engine output into those arrays), so the dump can report
how much time is spent outside the teacher.
"""

from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import ConfigError, ModelError

Backend = Literal["hf", "vllm"]
BACKENDS: tuple[str, ...] = ("hf", "vllm")


class BackendError(ModelError):
    """A teacher backend cannot be used as configured (missing package, bad device, unsupported mode)."""


@dataclass
class TeacherSettings:
    """Everything a backend needs to load the teacher (a slice of the dump config)."""

    model: str
    backend: Backend = "hf"
    kind: Literal["causal_lm", "classifier"] = "causal_lm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    batch_size: int = 8
    max_length: int = 512
    # vLLM only
    max_logprobs: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool | None = None
    seed: int = 0
    # Capture temperature: log-probs and draws come from softmax(logits / temperature).
    temperature: float = 1.0
    # vLLM only: "logprobs" = prompt log-probs (top-k only, can generate), "hidden" = the pooling
    # runner's last hidden states + the teacher's own head applied by kdpipe (every encoding).
    vllm_capture: Literal["logprobs", "hidden"] = "logprobs"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Want:
    """What one teacher pass produces at each target position: top-k and/or ``num_draws`` seeded draws."""

    top_k: int | None = None
    num_draws: int | None = None
    seed: int = 0


@dataclass
class Captured:
    """One pass's outputs (``None`` where not asked for), rows' positions concatenated in row order."""

    ids: np.ndarray | None = None  # int32 [n_pos, k]
    logprobs: np.ndarray | None = None  # float32 [n_pos, k], descending
    draws: np.ndarray | None = None  # int32 [n_pos, num_draws]

    @classmethod
    def empty(cls, want: Want) -> Captured:
        k, d = want.top_k, want.num_draws
        return cls(ids=None if k is None else np.zeros((0, k), np.int32),
                   logprobs=None if k is None else np.zeros((0, k), np.float32),
                   draws=None if d is None else np.zeros((0, d), np.int32))


@dataclass
class Timing:
    teacher_s: float = 0.0
    convert_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"teacher_s": self.teacher_s, "convert_s": self.convert_s}


class TeacherBackend(ABC):
    """One loaded teacher. Methods take sequences as int32 arrays and return numpy arrays."""

    name: str
    vocab_size: int
    max_context: int | None

    def __init__(self) -> None:
        self.timing = Timing()

    @abstractmethod
    def capture(self, seqs: list[np.ndarray], positions: list[np.ndarray], want: Want) -> Captured:
        """Everything ``want`` asks for at each target position, from one pass over ``seqs``."""

    def topk(self, seqs: list[np.ndarray], positions: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each target position: (ids int32 [n_pos, k], logprobs float32 [n_pos, k])."""
        got = self.capture(seqs, positions, Want(top_k=k))
        assert got.ids is not None and got.logprobs is not None  # why: capture fills what was asked for
        return got.ids, got.logprobs

    def sample(
        self, seqs: list[np.ndarray], positions: list[np.ndarray], num_draws: int, seed: int
    ) -> np.ndarray:
        """``num_draws`` tokens per target position from the full distribution: int32 [n_pos, num_draws]."""
        got = self.capture(seqs, positions, Want(num_draws=num_draws, seed=seed))
        assert got.draws is not None  # why: capture fills what was asked for
        return got.draws

    def check_want(self, want: Want) -> None:
        """Refuse a k the vocabulary cannot give (one clear error before any work)."""
        if want.top_k is not None and want.top_k > self.vocab_size:
            raise BackendError(f"--top-k {want.top_k} exceeds the teacher's vocabulary of {self.vocab_size}; "
                               "lower --top-k")

    def class_logits(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Class logits of each sequence: float32 [n_rows, num_classes]."""
        raise BackendError(f"the {self.name} backend cannot run --task classification; use --backend hf")

    @abstractmethod
    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None) -> list[np.ndarray]:
        """Greedy continuation of each prompt (int32, ending with EOS when the model stopped)."""

    def close(self) -> None:
        """Free the engine (called once at the end of a dump); nothing to do by default."""
        return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_teacher_path(model: str) -> None:
    """A local-looking teacher path must exist (a hub name is checked when loading)."""
    p = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or p.exists() or model.count("/") > 1
    if looks_local and not p.exists():
        raise ModelError(f"teacher path {p} does not exist; pass a model folder or hub name to --teacher")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(f"teacher folder {p} has no config.json; pass a HF model folder to --teacher")


def row_offsets(positions: list[np.ndarray]) -> np.ndarray:
    """Start of each row's block in the concatenated position arrays: int64 [n_rows + 1]."""
    counts = np.fromiter((len(p) for p in positions), dtype=np.int64, count=len(positions))
    return np.concatenate([[0], np.cumsum(counts)])


def make_backend(settings: TeacherSettings) -> TeacherBackend:
    """Load the teacher with the named backend (heavy imports happen here, not at module import)."""
    check_teacher_path(settings.model)
    if settings.backend == "hf":
        from pipeline.dump.teachers.hf import HFTeacher

        return HFTeacher(settings)
    if settings.backend == "vllm":
        from pipeline.dump.teachers.vllm import VLLMTeacher

        return VLLMTeacher(settings)
    raise ConfigError(f"unknown --backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")
