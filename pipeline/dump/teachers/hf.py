"""HF transformers teacher: batched padded forward, float32 log-softmax and top-k over chunks.

The decoder runs once per batch (right padding + attention mask, rows sorted by length so
batches pad little); only the hidden states of *target* positions go through the LM head, in
chunks of at most 2**24 logits, so a ``[batch, seq, vocab]`` float32 tensor is never
held. The ``sampled`` encoding draws with ``torch.multinomial`` from the same float32 softmax
(the full distribution), with a generator seeded by the dump per work unit, so a resumed or
split dump draws the same tokens. Batching, chunking and the head's arithmetic live in
:mod:`.head`, shared with vLLM's hidden-state capture so both backends give the same numbers
(and the same draws).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.dump.teachers import base
from pipeline.dump.teachers.base import BackendError, Captured, TeacherBackend, TeacherSettings, Want
from pipeline.dump.teachers.head import capture_batches, chunk_rows, flat_target_index, postprocessed
from pipeline.dump.teachers.head import chunked_topk as chunked_topk  # re-exported (tests, callers)
from pipeline.dump.teachers.head import length_batches as length_batches  # re-exported
from pipeline.errors import ModelError
from pipeline.hf_io import greedy_generate, load_model, pad, torch_dtype


class HFTeacher(TeacherBackend):
    name = "hf"

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__()
        import torch

        self.settings = settings
        self.device = self._setup_device(settings)
        self.pad_id = int(settings.extra.get("pad_token_id") or 0)
        self.model = self._setup_model(settings)
        cfg = self.model.config
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or 0)
        self.max_context = getattr(cfg, "max_position_embeddings", None)
        self.num_labels = int(getattr(cfg, "num_labels", 0) or 0)
        self._head = self._setup_head()
        self._chunk = chunk_rows(self.vocab_size)
        self._sync: Callable[[], None] = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    # -- setup -----------------------------------------------------------------------------

    @staticmethod
    def _setup_device(settings: TeacherSettings) -> Any:
        import torch

        from pipeline.config import resolve_device

        want = resolve_device(settings.device, BackendError)
        if (settings.load_in_4bit or settings.load_in_8bit) and not want.startswith("cuda"):
            flag = "--load-in-4bit" if settings.load_in_4bit else "--load-in-8bit"
            raise BackendError(f"{flag} needs a CUDA GPU (bitsandbytes quantization); none is used here, drop {flag}")
        return torch.device(want)

    def _quantization(self, settings: TeacherSettings) -> Any:
        if not (settings.load_in_4bit or settings.load_in_8bit):
            return None
        if settings.load_in_4bit and settings.load_in_8bit:
            raise BackendError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
        if base.package_version("bitsandbytes") is None:
            raise BackendError(
                "4/8-bit loading needs bitsandbytes: pip install 'kdpipe[gpu]' (or pip install bitsandbytes)"
            )
        from transformers import BitsAndBytesConfig

        if settings.load_in_4bit:
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype(settings.dtype))
        return BitsAndBytesConfig(load_in_8bit=True)

    def _setup_model(self, settings: TeacherSettings) -> Any:
        model = load_model(
            settings.model, kind=settings.kind, dtype=settings.dtype, device=self.device, revision=settings.revision,
            trust_remote_code=settings.trust_remote_code, attn_implementation=settings.attn_implementation,
            quantization_config=self._quantization(settings), what="--teacher",
        )
        model.eval()
        if settings.kind == "classifier" and model.config.pad_token_id is None:
            if settings.extra.get("pad_token_id") is None and settings.batch_size > 1:
                raise ModelError(
                    f"classifier teacher {settings.model} has no pad token (neither its config nor its tokenizer "
                    "sets one) so batched rows cannot be told apart from padding; set pad_token_id in its "
                    "config.json, give the tokenizer a pad token, or pass --batch-size 1"
                )
            model.config.pad_token_id = settings.extra.get("pad_token_id")
        return model

    def _setup_head(self) -> Callable[[Any], Any] | None:
        """The LM head applied to hidden states, or ``None`` to fall back to the model's own logits."""
        if self.settings.kind != "causal_lm":
            return None
        try:
            self._decoder = self.model.get_decoder()
            head = self.model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if head is None or self._decoder is None:
            return None
        return postprocessed(head, self.model.config)

    # -- forward ---------------------------------------------------------------------------

    def _target_hidden(self, seqs: list[np.ndarray], positions: list[np.ndarray]) -> tuple[Any, Callable[[Any], Any]]:
        """Hidden states (or logits) of the batch's target positions: ([n_pos, H], head)."""
        import torch

        ids_t, mask_t = pad(seqs, self.pad_id, device=self.device)
        flat = torch.from_numpy(flat_target_index(positions, ids_t.shape[1])).to(self.device)
        with torch.inference_mode():
            if self._head is not None:
                hidden = self._decoder(input_ids=ids_t, attention_mask=mask_t, use_cache=False).last_hidden_state
                return hidden.reshape(-1, hidden.shape[-1])[flat], self._head
            logits = self.model(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits
            return logits.reshape(-1, logits.shape[-1])[flat], (lambda x: x)

    def capture(self, seqs: list[np.ndarray], positions: list[np.ndarray], want: Want) -> Captured:
        self.check_want(want)
        return capture_batches(
            [len(s) for s in seqs], positions, want,
            lambda rows: self._target_hidden([seqs[i] for i in rows], [positions[i] for i in rows]),
            batch_size=self.settings.batch_size, chunk=self._chunk, temperature=self.settings.temperature,
            timing=self.timing, sync=self._sync,
        )

    def class_logits(self, seqs: list[np.ndarray]) -> np.ndarray:
        import torch

        if self.settings.kind != "classifier":
            raise BackendError("class logits need the teacher loaded as a classifier (--task classification)")
        out = np.zeros((len(seqs), self.num_labels), dtype=np.float32)
        for batch in length_batches([len(s) for s in seqs], self.settings.batch_size):
            t0 = time.perf_counter()
            ids, mask = pad([seqs[i] for i in batch], int(self.model.config.pad_token_id or 0), device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            self._sync()
            t1 = time.perf_counter()
            out[batch] = logits.cpu().numpy()
            self.timing.teacher_s += t1 - t0
            self.timing.convert_s += time.perf_counter() - t1
        return out

    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None) -> list[np.ndarray]:
        results: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
        for batch in length_batches([len(p) for p in prompts], self.settings.batch_size):
            t0 = time.perf_counter()
            answers = greedy_generate(self.model, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                                      pad_id=self.pad_id, eos_id=eos_id, device=self.device)
            for i, answer in zip(batch, answers, strict=True):
                results[i] = answer
            # generate() ends with a copy to the CPU, so the whole batch counts as the teacher's time.
            self.timing.teacher_s += time.perf_counter() - t0
        return results
