"""``train-student --teacher``: online KD, the teacher's full distribution computed in this process.

The cache still supplies the rows — input ids, target positions, labels, and their order — so an
online run sees the same batches as an offline run from the same cache (same steps, data order and
init); only the targets differ: the teacher's whole next-token distribution (``k = V``, tail 0)
instead of the cached top-k or draws, fed to the same loss code. A ``class_logits`` cache gets the
teacher's class logits instead.

Before anything is written, the teacher is checked against the cache (whose token ids it reads)
and the student (whose head must cover every teacher id): same tokenizer fingerprint, or with
``--allow-vocab-mismatch`` vocabularies that fit; and its chunked head must reproduce its own
forward. Every error names ``--teacher``. :func:`teacher_identity` is what the run records.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline import hf_io
from pipeline.errors import ConfigError, ModelError
from pipeline.train.distill import OnlineTeacher
from pipeline.train.losses import HeadSpec


def teacher_device(want: str, train_device: torch.device) -> torch.device:
    """``--teacher-device``: ``auto`` is the training device; a CUDA device must be visible."""
    if want == "auto":
        return torch.device(train_device)
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"teacher_device (flag --teacher-device) {want} was asked for but no CUDA device is "
                          "visible; use --teacher-device cpu or auto")
    return torch.device(want)


def check_teacher_tokenizer(teacher_tok: Any, student_tok: Any, manifest: Any, *, teacher: str, cache: str,
                            allow_vocab_mismatch: bool) -> None:
    """The teacher reads the cache's token ids and is compared with the student: same tokenizer fingerprint
    as both (unless ``--allow-vocab-mismatch``), and enough embedding rows for the cache's ids."""
    from cache_format import tokenizer_fingerprint

    tok_info = manifest.identity.tokenizer or {}
    mine = tokenizer_fingerprint(teacher_tok)
    others = (("the cache's", cache, tok_info.get("fingerprint")),
              ("the student's", "--student/--tokenizer", tokenizer_fingerprint(student_tok)))
    for whose, where, fingerprint in others:
        if fingerprint and fingerprint != mine and not allow_vocab_mismatch:
            raise ModelError(
                f"the teacher's tokenizer (--teacher {teacher}: vocab {len(teacher_tok)}, fingerprint {mine[:19]}...) "
                f"differs from {whose} ({where}: fingerprint {fingerprint[:19]}...); online KD needs one tokenizer "
                "for cache, teacher and student — use a teacher with the cache's tokenizer, or pass "
                "--allow-vocab-mismatch if the vocabularies are known to share ids"
            )
    want = int(tok_info.get("vocab_size") or 0)
    if len(teacher_tok) < want:
        raise ModelError(f"the teacher's tokenizer (--teacher {teacher}) has {len(teacher_tok)} tokens, fewer than "
                         f"the {want} of the cache's ({cache}), whose ids it must read; use a teacher whose "
                         "vocabulary covers the cache's")


def check_teacher_vocab(model: Any, student_vocab: int, *, teacher: str) -> int:
    """The teacher's output rows ``V_t``: at most the student's, since the loss reads the student at every teacher id."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if vocab > student_vocab:
        raise ModelError(f"the teacher's vocabulary (--teacher {teacher}: {vocab} output rows) is larger than the "
                         f"student's ({student_vocab}); use a teacher and a student with the same tokenizer")
    return vocab


def check_teacher_head(teacher: OnlineTeacher, vocab: int, *, name: str) -> None:
    """The chunked head must give the teacher's own forward (kdpipe reproduces a linear head with optional
    logit scale and soft cap); checked on a few tokens, in the teacher's own dtype."""
    model = teacher.model
    device = next(model.parameters()).device
    ids = torch.arange(1, 7, device=device).remainder(vocab).unsqueeze(0)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones_like(ids).bool(),
             "labels": torch.full_like(ids, -100)}
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    mine = teacher(batch)[0:ids.shape[1]].logprobs.to(ref.device)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(ref, mine, atol=tol, rtol=tol):
        raise ModelError(
            f"the teacher (--teacher {name}, {type(model).__name__}) transforms its logits in a way kdpipe does not "
            f"reproduce (max log-prob difference {float((ref - mine).abs().max()):.3g}); online KD supports a linear "
            "head with optional logit_scale and final_logit_softcapping — use a supported architecture"
        )


def load_online_teacher(cfg: Any, manifest: Any, student_tok: Any, student_vocab: int | None,
                        train_device: torch.device) -> tuple[OnlineTeacher, dict[str, Any]]:
    """``cfg.teacher`` loaded and checked (see the module doc): (the teacher, its identity for the summary)."""
    from pipeline.train.student import head_spec

    name, enc = cfg.teacher, manifest.identity.encoding
    classification = str(enc.kind) == "class_logits"
    device = teacher_device(cfg.teacher_device, train_device)
    tokenizer = hf_io.load_tokenizer(name, what="--teacher")
    check_teacher_tokenizer(tokenizer, student_tok, manifest, teacher=name, cache=cfg.cache,
                            allow_vocab_mismatch=cfg.allow_vocab_mismatch)
    model = hf_io.load_model(name, kind="classifier" if classification else "causal_lm", dtype=cfg.teacher_dtype,
                             device=device, what="--teacher")
    if classification:
        if int(getattr(model.config, "num_labels", 0)) != int(enc.num_classes):
            raise ModelError(f"the teacher (--teacher {name}) has num_labels={model.config.num_labels} but the cache "
                             f"{cfg.cache} has {enc.num_classes} classes; use a classifier with {enc.num_classes}")
        return OnlineTeacher(model, device=device), teacher_identity(cfg, model, tokenizer, device)
    spec: HeadSpec = head_spec(model)
    teacher = OnlineTeacher(model, device=device, head_spec=spec)
    check_teacher_head(teacher, check_teacher_vocab(model, int(student_vocab or 0), teacher=name), name=name)
    return teacher, teacher_identity(cfg, model, tokenizer, device)


def teacher_identity(cfg: Any, model: Any, tokenizer: Any, device: torch.device) -> dict[str, Any]:
    """What ``train_summary.json`` records about the online teacher (beside the resolved config)."""
    from cache_format import tokenizer_fingerprint

    out = model.get_output_embeddings()
    return {
        "name": cfg.teacher, "dtype": cfg.teacher_dtype, "device": str(device),
        "architecture": (list(getattr(model.config, "architectures", None) or []) or [type(model).__name__])[0],
        "commit": getattr(model.config, "_commit_hash", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": int(out.weight.shape[0]) if out is not None else None,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }
