"""What a cache *is*: teacher, tokenizer, recipe, dataset and encoding.

Two caches with equal identities hold the same kind of data and can be resumed into or
merged; ``run`` (worker index, host, timing, paths) is informational and never compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from cache_format.encodings import ENCODINGS, Encoding, encoding_format
from cache_format.errors import EncodingError, ManifestError


def encoding_from_dict(d: Any, where: str = "encoding") -> Encoding:
    """Rebuild an encoding from its manifest dict; unknown extra keys are ignored (forward compatible)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ManifestError(f"{where} must be an object with a 'kind' field, got {d!r}")
    try:
        params = encoding_format(d["kind"]).params
    except EncodingError:
        raise ManifestError(f"{where}.kind is {d['kind']!r}; this library reads "
                            + ", ".join(repr(k) for k in ENCODINGS)) from None
    # A field without a default is required, and so are those of READ_REQUIRED (SPEC §2: a reader never
    # guesses a quantization step or a temperature); the others fall back to their defaults when absent.
    try:
        kwargs = {f.name: d[f.name] if f.default is dataclasses.MISSING or f.name in READ_REQUIRED
                  else d.get(f.name, f.default) for f in dataclasses.fields(params)}
        return params(**kwargs)  # type: ignore[no-any-return]
    except KeyError as exc:
        raise ManifestError(f"{where} of kind {d['kind']!r} lacks the field {exc.args[0]!r}") from None
    except EncodingError as exc:
        raise ManifestError(f"{where}: {exc}") from None


# Encoding parameters a manifest MUST state although the dataclasses give them defaults (SPEC §2).
READ_REQUIRED = frozenset({"value_step", "temperature"})
# Sections of the identity that are compared; ``run`` is deliberately absent.
COMPARED_SECTIONS = ("teacher", "tokenizer", "recipe", "dataset", "encoding")
# Format versions whose identity fingerprint is Python's json.dumps text (SPEC appendix A); later ones use JCS.
LEGACY_FINGERPRINT_VERSIONS = frozenset({"1.0"})


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
            try:  # UTF-8 encodable too: a lone surrogate would fail the fingerprint's JCS text later
                json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise EncodingError(f"CacheIdentity.{name} must be JSON-serialisable: {exc}") from None
        kinds = tuple(f.params for f in ENCODINGS.values())
        if not isinstance(self.encoding, kinds):
            raise EncodingError("CacheIdentity.encoding must be one of " + ", ".join(k.__name__ for k in kinds)
                                + f", got {type(self.encoding).__name__}")
        if ENCODINGS[self.encoding.kind].per_position:
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

    def fingerprint(self, format_version: str | None = None) -> str:
        """``identity_fingerprint`` by the rule of ``format_version`` (default: the version this library writes).

        SPEC §2.2: ``sha256:`` + hex of the RFC 8785 (JCS) text of the compared identity; format
        1.0 hashed Python's ``json.dumps(..., sort_keys=True, separators=(",", ":"))`` instead.
        """
        if format_version is None:
            from cache_format.shard import FORMAT_VERSION  # here: shard imports this module

            format_version = FORMAT_VERSION
        if format_version in LEGACY_FINGERPRINT_VERSIONS:
            blob = json.dumps(self.comparable(), sort_keys=True, separators=(",", ":")).encode()
        else:
            blob = canonical_json(self.comparable()).encode("utf-8")
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


def canonical_json(value: Any) -> str:
    """RFC 8785 (JCS) text of a JSON value: members sorted by UTF-16 code units, no whitespace,
    ECMAScript number formatting, only ``"``, ``\\`` and control characters escaped.

    Python ints count as JSON numbers (IEEE doubles, as JCS says): exact below 2**53.
    """
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, int | float):
        return _jcs_number(value)
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate is not Unicode text: JCS refuses it, and so does this
        return json.dumps(value, ensure_ascii=False)  # the same escapes as JCS: \b \t \n \f \r \" \\ and \u00xx
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("canonical_json: object keys must be strings")
        keys = sorted(value, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(canonical_json(k) + ":" + canonical_json(value[k]) for k in keys) + "}"
    raise TypeError(f"canonical_json: {type(value).__name__} is not a JSON value")


def _jcs_number(x: int | float) -> str:
    """ECMAScript Number::toString of ``x`` (shortest round-trip digits), as RFC 8785 §3.2.2.3 requires."""
    if isinstance(x, int) and abs(x) < 2**53:
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        raise ValueError("canonical_json: NaN and Infinity are not JSON")
    if x == 0:
        return "0"  # also -0
    mantissa, _, exp = repr(abs(x)).partition("e")  # repr: the shortest digits that read back as x
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    n = len(whole) + int(exp or 0) - (len(whole + frac) - len(digits))  # value = 0.<digits> * 10**n
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        text = (digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e)))
    return "-" + text if x < 0 else text


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SPEC §2.2: sha256 over the vocabulary, the special tokens and the vocab size of any HF tokenizer.

    The hashed text is ``{"vocab":[[token,id],...],"special_tokens":[...],"vocab_size":N}``:
    members in that order (fixed since format 1.0, so every cache's fingerprint still compares),
    pairs sorted by token then id and special tokens sorted, both by code point, no whitespace,
    strings escaped as in JCS, UTF-8. Duck-typed (``get_vocab()``, ``all_special_tokens``,
    ``len()``) so transformers is never imported.
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
