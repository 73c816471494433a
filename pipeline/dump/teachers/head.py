"""The teacher's own output head applied to hidden states in bounded memory, shared by both backends.

Both the HF backend (decoder hidden states) and vLLM's hidden-state capture (the pooling
runner's last hidden states) end here, so the same positions go through the same code:

- :func:`length_batches` groups a unit's rows the same way in both backends and
  :func:`run_batches` walks those batches, so the positions reach the head in the same order
  and the same chunks; the seeded draws of the ``sampled`` encoding then consume the generator
  identically and equal log-probs give equal draws;
- :func:`chunked_capture` computes ``head(hidden)`` for at most ``_CHUNK_ELEMENTS`` logits at a
  time in float32 (never ``[tokens, vocab]`` for a whole batch), divides by the capture
  temperature, and takes top-k of the log-softmax and/or draws from the softmax, from one
  matmul per chunk;
- :func:`load_output_head` reads just the head's weights (``lm_head``, or the embedding matrix
  when tied) from a checkpoint's safetensors, for engines that keep the model to themselves;
  :func:`postprocessed` adds the logit scale / soft-capping some models apply in ``forward``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dump.teachers.base import BackendError, Captured, Timing, Want

# 2**24 float32 logits = 64 MiB per chunk: big enough to keep the matmul efficient, small enough
# for any GPU next to a large teacher (a 150k vocabulary gives chunks of ~110 positions).
_CHUNK_ELEMENTS = 1 << 24

Head = Callable[[Any], Any]


def chunk_rows(vocab_size: int) -> int:
    """Positions per head chunk for this vocabulary (the same in both backends, so draws line up)."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def flat_target_index(positions: list[np.ndarray], T: int) -> np.ndarray:
    """Index of each target into the flattened [B * T] hidden states: int64 [n_pos] (row-major)."""
    if not positions:
        return np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(positions), dtype=np.int64), [len(p) for p in positions])
    return rows * T + np.concatenate(positions).astype(np.int64)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first; ties keep row order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def chunked_capture(hidden: Any, head: Head, chunk: int, *, k: int | None = None, num_draws: int | None = None,
                    gen: Any = None, temperature: float = 1.0) -> list[Any]:
    """What a pass asks for at each of ``hidden``'s rows, ``chunk`` rows of logits at a time.

    hidden: [n, H] -> ``[values float32 [n, k] descending, indices int64 [n, k]]`` when ``k``,
    then ``draws int64 [n, num_draws]`` (with replacement, from ``gen`` on the CPU) when
    ``num_draws``. Log-probs and probabilities come from the same float32 logits / temperature.
    """
    import torch

    vals, idxs, draws = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk]).float()
        if temperature != 1.0:
            logits = logits / temperature
        if k is not None:
            v, i = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1, largest=True, sorted=True)
            vals.append(v)
            idxs.append(i)
        if num_draws is not None:
            # multinomial on the generator's device; CPU draws keep results identical across devices.
            probs = torch.softmax(logits, dim=-1).cpu()
            draws.append(torch.multinomial(probs, num_draws, replacement=True, generator=gen))
    out: list[Any] = []
    if k is not None:
        out += [torch.cat(vals), torch.cat(idxs)] if vals else [torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)]
    if num_draws is not None:
        out.append(torch.cat(draws) if draws else torch.zeros(0, num_draws, dtype=torch.long))
    return out


def chunked_topk(hidden: Any, head: Head, k: int, chunk: int) -> tuple[Any, Any]:
    """Top-k of ``log_softmax(head(hidden))`` in float32: (values [n, k] descending, indices int64 [n, k])."""
    vals, idx = chunked_capture(hidden, head, chunk, k=k)
    return vals, idx


def run_batches(
    lengths: list[int],
    positions: list[np.ndarray],
    batch_size: int,
    target_hidden: Callable[[list[int]], tuple[Any, Head]],
    compute: Callable[[Any, Head], list[Any]],
    timing: Timing,
    sync: Callable[[], None] = lambda: None,
) -> list[np.ndarray]:
    """Run ``compute(*target_hidden(batch))`` per length-sorted batch; outputs back in row order, concatenated.

    ``target_hidden(rows)`` gives the hidden states of those rows' target positions ([n_pos, H],
    rows in the given order, positions in row order) and the head to apply to them.
    """
    import torch

    per_row: list[list[np.ndarray]] = [[] for _ in lengths]
    n_out = 0
    for batch in length_batches(lengths, batch_size):
        t0 = time.perf_counter()
        with torch.inference_mode():
            outs = compute(*target_hidden(batch))
        sync()
        t1 = time.perf_counter()
        arrays = [o.cpu().numpy() for o in outs]
        n_out = len(arrays)
        cuts = np.cumsum([len(positions[i]) for i in batch])[:-1]
        for a in arrays:
            for row, part in zip(batch, np.split(a, cuts), strict=True):
                per_row[row].append(part)
        timing.teacher_s += t1 - t0
        timing.convert_s += time.perf_counter() - t1
    t2 = time.perf_counter()
    result = [np.concatenate([per_row[r][j] for r in range(len(lengths))]) for j in range(n_out)]
    timing.convert_s += time.perf_counter() - t2
    return result


def capture_batches(
    lengths: list[int],
    positions: list[np.ndarray],
    want: Want,
    target_hidden: Callable[[list[int]], tuple[Any, Head]],
    *,
    batch_size: int,
    chunk: int,
    temperature: float,
    timing: Timing,
    sync: Callable[[], None] = lambda: None,
) -> Captured:
    """:func:`run_batches` of :func:`chunked_capture`: everything ``want`` asks for, as numpy arrays.

    The draws' generator is seeded once per call from ``want.seed`` (the dump seeds each unit).
    """
    import torch

    if not any(len(p) for p in positions):
        return Captured.empty(want)
    gen = torch.Generator(device="cpu").manual_seed(int(want.seed)) if want.num_draws is not None else None

    def compute(hidden: Any, head: Head) -> list[Any]:
        return chunked_capture(hidden, head, chunk, k=want.top_k, num_draws=want.num_draws, gen=gen,
                               temperature=temperature)

    outs = run_batches(lengths, positions, batch_size, target_hidden, compute, timing, sync)
    got = Captured()
    if want.top_k is not None:
        got.ids, got.logprobs = outs[1].astype(np.int32), outs[0].astype(np.float32, copy=False)
    if want.num_draws is not None:
        got.draws = outs[-1].astype(np.int32)
    return got


def postprocessed(head: Head, cfg: Any) -> Head:
    """``head`` followed by the logit scale / soft-capping ``cfg`` declares (Cohere scaling, Gemma-2 capping)."""
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if softcap is None and scale is None:
        return head
    import torch

    def capped(h: Any) -> Any:
        logits = head(h)
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return capped


# ----------------------------------------------------------------------------- head from a checkpoint


def _head_param_names(cfg: Any, trust_remote_code: bool) -> tuple[list[str], list[str]]:
    """Checkpoint names that may hold the output head's weight / bias (tied names included).

    The model is built on the meta device (no memory, no weights read): transformers ties the
    head to the embedding when the config says so, and every name of the shared parameter is
    a candidate, so a tied checkpoint that stores only the embedding is found too.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError) as exc:
        raise BackendError(f"transformers cannot build {type(cfg).__name__} as a causal LM to find its output head "
                           f"({exc}); use --vllm-capture logprobs (top-k) or --backend hf") from None
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise BackendError(f"{type(model).__name__} has no output embedding layer for --vllm-capture hidden; "
                           "use --vllm-capture logprobs (top-k) or --backend hf")
    named = list(model.named_parameters(remove_duplicate=False))
    weight = [n for n, p in named if p is head.weight]
    bias = [n for n, p in named if getattr(head, "bias", None) is not None and p is head.bias]
    return weight, bias


def _checkpoint_files(model: str, revision: str | None) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a local folder or a hub name (from the local hub cache)."""
    def fetch(name: str) -> Path | None:
        local = Path(model).expanduser()
        if local.is_dir():
            return local / name if (local / name).is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(model, name, revision=revision))
        except EntryNotFoundError:
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: fetch(f) for f in set(weight_map.values())}
        return {name: files[f] for name, f in weight_map.items() if files[f] is not None}  # type: ignore[misc]
    single = fetch("model.safetensors")
    if single is None:
        raise BackendError(f"teacher {model} has no safetensors weights; --vllm-capture hidden reads the output "
                           "head from them: use --vllm-capture logprobs (top-k) or --backend hf")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def _read_tensor(files: dict[str, Path], candidates: list[str], model: str) -> Any:
    from safetensors import safe_open

    for name in candidates:
        if name in files:
            with safe_open(str(files[name]), "pt") as fh:
                return fh.get_tensor(name)
    raise BackendError(f"teacher {model}'s checkpoint holds none of {', '.join(candidates)} (its output head); "
                       "use --vllm-capture logprobs (top-k) or --backend hf")


def load_output_head(model: str, *, revision: str | None, trust_remote_code: bool, device: Any,
                     dtype: Any) -> tuple[Head, int]:
    """The teacher's output head (weights from its checkpoint, in ``dtype`` on ``device``): (head, vocab size).

    Only the head's tensors are read; the logits equal the HF model's ``lm_head`` (+ scale/capping).
    """
    import torch

    from pipeline.hf_io import load_config

    cfg = load_config(model, revision=revision, trust_remote_code=trust_remote_code, what="--teacher")
    weight_names, bias_names = _head_param_names(cfg, trust_remote_code)
    files = _checkpoint_files(model, revision)
    weight = _read_tensor(files, weight_names, model).to(device=device, dtype=dtype)
    bias = _read_tensor(files, bias_names, model).to(device=device, dtype=dtype) if bias_names else None

    def head(h: Any) -> Any:
        return torch.nn.functional.linear(h.to(device=device, dtype=dtype), weight, bias)

    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return postprocessed(head, text_cfg), int(weight.shape[0])
