"""HF transformers I/O shared by every stage: loading tokenizers, configs and models, padding, greedy decoding.

A failed load becomes one line that names the flag (or file) it came from and says how to fix it,
so the dump, the HF teacher, the student and eval word it the same way. transformers and torch
are imported inside the functions: importing this module stays cheap for the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.errors import ModelError

if TYPE_CHECKING:
    import torch

ModelKind = Literal["causal_lm", "classifier"]
_KIND_NAMES: dict[str, str] = {"causal_lm": "a causal LM", "classifier": "a sequence classifier"}
# What transformers raises for a missing/corrupt folder, an unknown hub name, a bad setting or a
# missing optional package (flash-attn, sentencepiece); anything else is a bug worth a traceback.
_LOAD_ERRORS = (OSError, ValueError, ImportError)
_HF_HINT = "pass an HF model folder or hub name to"


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message; its class name when the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` passes through."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   error: type[Exception] = ModelError, what: str = "--tokenizer") -> Any:
    """``AutoTokenizer.from_pretrained(name)``; a failure raises ``error`` naming ``what`` (the flag)."""
    from transformers import AutoTokenizer

    return _load_or_raise(
        lambda: AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code),
        error, f"cannot load a tokenizer from {name} ({what})", f"pass a tokenizer folder or hub name to {what}",
    )


def load_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                error: type[Exception] = ModelError, what: str = "--model") -> Any:
    """``AutoConfig.from_pretrained(name)`` (a folder, its ``config.json``, or a hub name), errors as above."""
    from transformers import AutoConfig

    return _load_or_raise(
        lambda: AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code),
        error, f"cannot read the model config of {name} ({what})", f"{_HF_HINT} {what}",
    )


def _load_or_raise(load: Callable[[], Any], error: type[Exception], failed: str, fix: str) -> Any:
    """``load()``; a load error becomes ``error("<failed>: <its first line>; <fix>")``."""
    try:
        return load()
    except _LOAD_ERRORS as exc:
        raise error(f"{failed}: {first_line(exc)}; {fix}") from None


def model_class(kind: ModelKind) -> Any:
    """The transformers auto class that loads ``kind``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM


def load_model(
    name: str,
    *,
    kind: ModelKind = "causal_lm",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    error: type[Exception] = ModelError,
    what: str = "--model",
) -> Any:
    """Load ``name`` as ``kind`` and move it to ``device`` (when given).

    With ``quantization_config`` (bitsandbytes) the weights are placed by ``device_map`` on
    ``device``'s GPU while loading, since a quantized model cannot be moved afterwards.
    """
    import torch

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": torch.device(device or "cuda").index or 0}
    try:
        model = model_class(kind).from_pretrained(name, **kwargs)
    except _LOAD_ERRORS as exc:
        # OSError is a missing file or hub name; the others are often the attention backend.
        hint = " (check --attn-implementation)" if attn_implementation and not isinstance(exc, OSError) else ""
        raise error(
            f"cannot load {name} ({what}) as {_KIND_NAMES[kind]}{hint}: {first_line(exc)}; {_HF_HINT} {what}"
        ) from None
    if device is not None and quantization_config is None:
        model.to(device)
    return model


def pad(
    rows: Sequence[Sequence[int] | np.ndarray],
    pad_id: int,
    *,
    left: bool = False,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token rows into ``[B, T_max]`` int64 ``(input_ids, attention_mask)`` on ``device``.

    Right padding by default; ``left=True`` aligns every row's end (where generation starts).
    """
    import torch

    if not rows:
        raise ValueError("pad needs at least one row")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = row
        mask[i, cols] = 1
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if device is not None:
        ids_t, mask_t = ids_t.to(device), mask_t.to(device)
    return ids_t, mask_t


def cut_at_eos(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
    """``tokens`` up to and including the first EOS (the rest is padding): int32 [n]."""
    if eos_id is None:
        return tokens
    hits = np.flatnonzero(tokens == eos_id)
    return tokens[: hits[0] + 1] if len(hits) else tokens


def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int] | np.ndarray],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    device: str | torch.device | None = None,
) -> list[np.ndarray]:
    """Greedy continuations of one batch of prompts with ``model.generate``.

    Returns each prompt's new tokens, int32, up to and including the first EOS (when the model
    stopped). Batching is the caller's: it decides the batch size and what it times.
    """
    import torch

    ids, mask = pad(prompts, pad_id, left=True, device=device if device is not None else model.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_id, eos_token_id=eos_id,
        )
    new = out[:, ids.shape[1] :].cpu().numpy().astype(np.int32)
    return [cut_at_eos(row, eos_id) for row in new]
