"""Tiny tokenizers and models built locally, for tests, the demo and benchmarks.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained on the
given texts with ``tokenizers`` and the models are randomly initialised Llamas that
can be trained for a few steps on real or generated text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The tokenizer has ``<pad>``, ``<s>`` (bos), ``</s>`` (eos) and ``<unk>`` and adds
    ``<s>`` in front of every encoded text, like Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def build_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    num_labels: int | None = None,
    tokenizer: Any = None,
    out_dir: str | Path | None = None,
) -> Any:
    """A randomly initialised Llama (causal LM, or sequence classifier when ``num_labels``).

    ``num_heads`` defaults to a head size of 32: vLLM's CPU attention rejects head_dim 16.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    num_heads = num_heads or max(1, hidden_size // 32)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else 1,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    if num_labels is not None:
        config.num_labels = num_labels
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    return model


def token_stream(tokenizer: Any, texts: Iterable[str]) -> np.ndarray:
    """All ``texts`` tokenized and joined with EOS into one int64 stream."""
    ids: list[int] = []
    for text in texts:
        if text.strip():
            ids.extend(tokenizer(text)["input_ids"])
            ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int64)


def train_causal_lm(
    model: Any,
    stream: np.ndarray,
    *,
    steps: int = 200,
    batch_size: int = 16,
    seq_len: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` on random windows of ``stream`` with cross-entropy; returns the losses."""
    import torch

    if len(stream) <= seq_len + 1:
        raise ValueError(f"token stream has {len(stream)} tokens; need more than seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    data = torch.as_tensor(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        # HF shifts labels internally, so labels=input gives next-token loss.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return losses


def make_texts(seed: int = 0, n: int = 200, words: Sequence[str] | None = None) -> list[str]:
    """Short pseudo-English sentences for tokenizer training in tests."""
    rng = np.random.default_rng(seed)
    vocab = list(
        words
        or "the a cat dog sat on mat ran fast slow red blue big small tree house and or but "
        "is was will be very not good bad happy sad one two three four five".split()
    )
    return [" ".join(rng.choice(vocab, size=int(rng.integers(4, 16)))) + "." for _ in range(n)]
