"""What a cache *is*: teacher, tokenizer, recipe, dataset and encoding.

Two caches with equal identities hold the same kind of data and can be resumed into or
merged; ``run`` (worker index, host, timing, paths) is informational and never compared.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cache_format.errors import EncodingError, ManifestError

# Largest draw count a ``sampled`` cache supports: counts are stored as uint8.
MAX_NUM_DRAWS = 255
# Largest k: the per-position value deltas are uint8 and k above a few hundred is never useful.
MAX_K = 4096


@dataclass(frozen=True)
class TopKEncoding:
    """The k most probable tokens per position with quantized log-probs and the tail mass.

    ``value_step`` is the log-prob quantization step in nats: a uniform error of at most
    step/2 per entry gives a mean KL of about step²/24 (6.5e-4 nats at 1/8, inside the
    1e-3 target), and 1/8 keeps the value deltas in few bits.
    """

    k: int
    value_step: float = 0.125  # why: see the docstring (KL ~ step²/24 < 1e-3 nats)
    temperature: float = 1.0  # why: the log-softmax temperature at capture; 1.0 = the model's own distribution
    kind: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise EncodingError(f"TopKEncoding.k must be an integer in [1, {MAX_K}], got {self.k!r}")
        if not (isinstance(self.value_step, int | float) and 0 < self.value_step <= 1):
            raise EncodingError(f"TopKEncoding.value_step must be in (0, 1] nats, got {self.value_step!r}")
        _check_temperature(self.temperature, "TopKEncoding")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "value_step": float(self.value_step),
                "temperature": float(self.temperature)}


@dataclass(frozen=True)
class SampledEncoding:
    """``num_draws`` tokens drawn with replacement from the full teacher distribution per position."""

    num_draws: int
    temperature: float = 1.0  # why: the sampling temperature at capture; 1.0 = the model's own distribution
    kind: ClassVar[str] = "sampled"

    def __post_init__(self) -> None:
        if not isinstance(self.num_draws, int) or not 1 <= self.num_draws <= MAX_NUM_DRAWS:
            raise EncodingError(
                f"SampledEncoding.num_draws must be an integer in [1, {MAX_NUM_DRAWS}] (counts are uint8), "
                f"got {self.num_draws!r}")
        _check_temperature(self.temperature, "SampledEncoding")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_draws": self.num_draws, "temperature": float(self.temperature)}


@dataclass(frozen=True)
class ClassLogitsEncoding:
    """Full float32 class logits per example (classification teachers)."""

    num_classes: int
    labels: tuple[str, ...] | list[str] | None = None
    temperature: float = 1.0  # why: logits are stored as produced; temperature is for the record only
    kind: ClassVar[str] = "class_logits"

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise EncodingError(f"ClassLogitsEncoding.num_classes must be a positive integer, got {self.num_classes!r}")
        if self.labels is not None:
            labels = tuple(str(x) for x in self.labels)
            if len(labels) != self.num_classes:
                raise EncodingError(
                    f"ClassLogitsEncoding.labels has {len(labels)} names but num_classes={self.num_classes}; "
                    "give one name per class or none")
            object.__setattr__(self, "labels", labels)
        _check_temperature(self.temperature, "ClassLogitsEncoding")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes,
                "labels": list(self.labels) if self.labels is not None else None,
                "temperature": float(self.temperature)}


Encoding = TopKEncoding | SampledEncoding | ClassLogitsEncoding


def _check_temperature(t: Any, where: str) -> None:
    if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise EncodingError(f"{where}.temperature must be a positive finite number, got {t!r}")


def encoding_from_dict(d: Any, where: str = "encoding") -> Encoding:
    """Rebuild an encoding from its manifest dict; unknown extra keys are ignored (forward compatible)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ManifestError(f"{where} must be an object with a 'kind' field, got {d!r}")
    kind = d["kind"]
    try:
        if kind == "topk":
            return TopKEncoding(k=d["k"], value_step=d.get("value_step", 0.125),
                                temperature=d.get("temperature", 1.0))
        if kind == "sampled":
            return SampledEncoding(num_draws=d["num_draws"], temperature=d.get("temperature", 1.0))
        if kind == "class_logits":
            return ClassLogitsEncoding(num_classes=d["num_classes"], labels=d.get("labels"),
                                       temperature=d.get("temperature", 1.0))
    except KeyError as exc:
        raise ManifestError(f"{where} of kind {kind!r} lacks the field {exc.args[0]!r}") from None
    except EncodingError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    raise ManifestError(f"{where}.kind is {kind!r}; this library reads 'topk', 'sampled' and 'class_logits'")


# Sections of the identity that are compared; ``run`` is deliberately absent.
COMPARED_SECTIONS = ("teacher", "tokenizer", "recipe", "dataset", "encoding")


@dataclass(frozen=True)
class CacheIdentity:
    """Everything needed to use a cache safely; ``diff()`` tells two identities apart field by field."""

    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    recipe: dict[str, Any]
    dataset: dict[str, Any]
    encoding: Encoding
    run: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("teacher", "tokenizer", "recipe", "dataset", "run"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise EncodingError(f"CacheIdentity.{name} must be a dict, got {type(value).__name__}")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise EncodingError(f"CacheIdentity.{name} must be JSON-serialisable: {exc}") from None
        if not isinstance(self.encoding, TopKEncoding | SampledEncoding | ClassLogitsEncoding):
            raise EncodingError("CacheIdentity.encoding must be TopKEncoding, SampledEncoding or ClassLogitsEncoding, "
                                f"got {type(self.encoding).__name__}")
        if self.encoding.kind != "class_logits":
            vs = self.tokenizer.get("vocab_size")
            if not isinstance(vs, int) or isinstance(vs, bool) or vs < 1:
                raise EncodingError("CacheIdentity.tokenizer['vocab_size'] must be a positive integer for "
                                    f"{self.encoding.kind} caches (ids are checked against it), got {vs!r}")
            mvs = self.tokenizer.get("model_vocab_size")
            if mvs is not None and (not isinstance(mvs, int) or isinstance(mvs, bool) or mvs < 1):
                raise EncodingError(f"CacheIdentity.tokenizer['model_vocab_size'] must be a positive integer or "
                                    f"absent, got {mvs!r}")

    @property
    def id_limit(self) -> int:
        """Exclusive upper bound on token ids: the model's (possibly padded) vocab, else the tokenizer's."""
        mvs = self.tokenizer.get("model_vocab_size")
        vs = self.tokenizer.get("vocab_size", 0)
        return int(max(mvs or 0, vs or 0))

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "tokenizer": self.tokenizer, "recipe": self.recipe,
                "dataset": self.dataset, "encoding": self.encoding.to_dict(), "run": self.run}

    @classmethod
    def from_dict(cls, d: Any, where: str = "identity") -> CacheIdentity:
        if not isinstance(d, dict):
            raise ManifestError(f"{where} must be an object, got {type(d).__name__}")
        missing = [k for k in (*COMPARED_SECTIONS,) if k not in d]
        if missing:
            raise ManifestError(f"{where} lacks the field(s) {', '.join(missing)}")
        try:
            return cls(teacher=d["teacher"], tokenizer=d["tokenizer"], recipe=d["recipe"], dataset=d["dataset"],
                       encoding=encoding_from_dict(d["encoding"], f"{where}.encoding"), run=d.get("run") or {})
        except EncodingError as exc:
            raise ManifestError(f"{where}: {exc}") from None

    def comparable(self) -> dict[str, Any]:
        """The compared part of the identity as plain JSON values (``run`` left out)."""
        full = json.loads(json.dumps(self.to_dict(), sort_keys=True))
        return {k: full[k] for k in COMPARED_SECTIONS}

    def diff(self, other: CacheIdentity) -> list[str]:
        """Human-readable differences, e.g. ``teacher.revision: 'abc' != 'def'``; empty when compatible."""
        return _diff(self.comparable(), other.comparable(), "")

    def fingerprint(self) -> str:
        """sha256 of the compared identity: equal fingerprints mean resumable/mergeable caches."""
        blob = json.dumps(self.comparable(), sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


_MISSING = object()


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out += _diff(a.get(key, _MISSING), b.get(key, _MISSING), sub)
        return out
    if a is _MISSING:
        return [f"{path}: absent != {b!r}"]
    if b is _MISSING:
        return [f"{path}: {a!r} != absent"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the sorted vocabulary, the special tokens and the vocab size of any HF tokenizer.

    Duck-typed (``get_vocab()``, ``all_special_tokens``, ``len()``) so transformers is never imported.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise TypeError(f"tokenizer_fingerprint needs a tokenizer with get_vocab(), got {type(tokenizer).__name__}")
    vocab = get_vocab()
    items = sorted((str(tok), int(idx)) for tok, idx in vocab.items())
    specials = sorted(str(s) for s in (getattr(tokenizer, "all_special_tokens", None) or []))
    try:
        size = len(tokenizer)
    except TypeError:
        size = len(vocab)
    blob = json.dumps({"vocab": items, "special_tokens": specials, "vocab_size": size},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()
