"""Student initialisation and the checks of a student against a cache manifest.

Three ways to get a student:

* a pretrained model (local folder or hub name): ``--student PATH``;
* a fresh, randomly initialised model from a config: ``--student-config config.json``
  (with ``--tokenizer``);
* a smaller copy of a model with ``--student PATH --student-layers N``: the same
  architecture with N decoder layers, embeddings, final norm and head copied, and the
  decoder layers taken every ``L/N``-th (DistilBERT/TinyBERT style; evenly spaced when
  ``N`` does not divide ``L``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from pipeline import hf_io
from pipeline.errors import ConfigError, ModelError
from pipeline.hf_io import ModelKind, first_line, load_config, load_model, model_class
from pipeline.train.losses import HeadSpec, head_logits


def select_layers(num_teacher: int, num_student: int) -> list[int]:
    """Indices of the teacher layers copied into the student: every n-th, or evenly spaced."""
    if not 1 <= num_student <= num_teacher:
        raise ConfigError(
            f"student_layers (flag --student-layers) must be in [1, {num_teacher}] (the model has "
            f"{num_teacher} layers), got {num_student}"
        )
    if num_teacher % num_student == 0:
        stride = num_teacher // num_student
        return [i * stride for i in range(num_student)]
    step = (num_teacher - 1) / max(1, num_student - 1)
    return [round(i * step) for i in range(num_student)]


def _layer_list_prefix(model: torch.nn.Module, num_layers: int) -> str:
    """The state-dict prefix of the decoder-layer ``ModuleList`` (e.g. ``model.layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name:
            return name
    raise ModelError(
        f"cannot find the list of {num_layers} decoder layers in {type(model).__name__}; "
        "--student-layers supports models whose layers sit in one ModuleList (Llama, Qwen, Mistral, GPT-2, BERT...)"
    )


def shrink_model(model: torch.nn.Module, num_layers: int, model_cls: Any) -> torch.nn.Module:
    """A copy of ``model`` with ``num_layers`` of its decoder layers (see :func:`select_layers`)."""
    config = copy.deepcopy(model.config)
    total = int(config.num_hidden_layers)
    keep = select_layers(total, num_layers)
    prefix = _layer_list_prefix(model, total)
    config.num_hidden_layers = num_layers
    # Per-layer lists in the config (e.g. layer_types for sliding/full attention) follow the copied layers.
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, [value[i] for i in keep])
    student = model_cls.from_config(config)
    src = model.state_dict()
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_state = {}
    for key in student.state_dict():
        m = pattern.match(key)
        new_state[key] = src[f"{prefix}.{keep[int(m.group(1))]}.{m.group(2)}"] if m else src[key]
    student.load_state_dict(new_state)
    return student


def load_student(
    *,
    student: str | None,
    student_config: str | None,
    student_layers: int | None,
    classification: bool,
    num_labels: int | None,
    attn_implementation: str | None,
    dtype: torch.dtype,
    seed: int,
) -> torch.nn.Module:
    """Build the student as described in the module docstring."""
    if (student is None) == (student_config is None):
        raise ConfigError("give exactly one of student (flag --student, a model path or name) and "
                          "student_config (flag --student-config, a config.json for a fresh model)")
    torch.manual_seed(seed)  # fresh heads and fresh models start from the run's seed
    kind: ModelKind = "classifier" if classification else "causal_lm"
    if student_config is not None:
        if student_layers is not None:
            raise ConfigError("student_layers (flag --student-layers) shrinks a pretrained --student; "
                              "with --student-config set num_hidden_layers in the config instead")
        return _fresh_student(student_config, kind, num_labels, attn_implementation, dtype)
    assert student is not None  # exactly one of the two, checked above
    _check_architecture(load_config(student, what="--student"), student, classification)
    model = load_model(student, kind=kind, dtype=dtype, attn_implementation=attn_implementation, what="--student")
    if student_layers is not None:
        model = shrink_model(model, student_layers, model_class(kind))
    return model


def _fresh_student(
    student_config: str, kind: ModelKind, num_labels: int | None, attn_implementation: str | None, dtype: torch.dtype
) -> torch.nn.Module:
    """A randomly initialised model from ``--student-config`` (a config.json or a folder holding one)."""
    cfg = load_config(student_config, what="--student-config")
    if kind == "classifier" and num_labels is not None:
        cfg.num_labels = num_labels
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    try:
        return model_class(kind).from_config(cfg, dtype=dtype)
    except (ValueError, ImportError) as exc:
        raise ModelError(f"cannot build a model from student_config {student_config} (--student-config): "
                         f"{first_line(exc)}; fix the config.json or --attn-implementation") from None


def _check_architecture(config: Any, student: str, classification: bool) -> None:
    """Refuse a checkpoint whose saved head does not fit the cache's task (before loading weights)."""
    archs = list(getattr(config, "architectures", None) or [])
    is_classifier = any("ForSequenceClassification" in a for a in archs)
    if archs and classification and not is_classifier:
        raise ModelError(f"the cache holds class logits but the student {student} is a {archs[0]} without a "
                         "sequence-classification head; use a classifier student")
    if archs and not classification and is_classifier:
        raise ModelError(f"the cache holds token distributions but the student {student} is a sequence "
                         f"classifier ({archs[0]}); use a causal LM student")


def load_tokenizer(path: str) -> Any:
    return hf_io.load_tokenizer(path, what="--tokenizer")


def head_spec(model: torch.nn.Module) -> HeadSpec:
    """The output scaling a causal LM applies after its head (Cohere logit_scale, Gemma-2 softcap)."""
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return HeadSpec(logit_scale=float(scale) if scale else 1.0, softcap=float(cap) if cap else None)


def check_head(model: torch.nn.Module, head: HeadSpec, vocab_size: int) -> None:
    """Refuse a model whose logits are not ``scale(hidden @ W.T + b)``: compare with its own forward."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(hf, hf.base_model_prefix, None)
    out_emb = hf.get_output_embeddings()
    if base is None or out_emb is None or not hasattr(out_emb, "weight"):
        raise ModelError(f"{type(hf).__name__} has no output head kdpipe can read (get_output_embeddings); "
                         "use a causal LM with a linear output head")
    ids = torch.arange(1, 7).remainder(vocab_size).unsqueeze(0).to(out_emb.weight.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        hidden = base(input_ids=ids).last_hidden_state
        mine = head_logits(hidden[0], out_emb.weight, getattr(out_emb, "bias", None), head)
    model.train(was_training)
    if not torch.allclose(ref[0], mine, atol=1e-3, rtol=1e-3):
        raise ModelError(
            f"{type(hf).__name__} transforms its logits in a way kdpipe does not reproduce (max difference "
            f"{float((ref[0] - mine).abs().max()):.3g}); the chunked loss supports a linear head with optional "
            "logit_scale and final_logit_softcapping — use a supported architecture"
        )


def check_against_manifest(
    model: torch.nn.Module, tokenizer: Any, manifest: Any, *, cache: str, allow_vocab_mismatch: bool
) -> None:
    """Stop with a message saying what differs between the student and the cache."""
    from cache_format import tokenizer_fingerprint

    ident = manifest.identity
    kind = ident.encoding.kind
    tok_info = ident.tokenizer or {}
    task = (ident.recipe or {}).get("task", "?")
    is_classifier = "ForSequenceClassification" in type(model).__name__ or getattr(
        getattr(model, "config", None), "problem_type", None) == "single_label_classification"
    if kind == "class_logits":
        want = int(ident.encoding.num_classes)
        got = getattr(model.config, "num_labels", None)
        if not is_classifier:
            raise ModelError(f"cache {cache} holds class logits (task {task!r}) but the student "
                             f"{type(model).__name__} has no sequence-classification head; use a classifier student")
        if got != want:
            raise ModelError(f"cache {cache} has {want} classes but the student's head has num_labels={got}; "
                             f"use a student with {want} labels")
    elif is_classifier:
        raise ModelError(f"cache {cache} holds {kind} token distributions (task {task!r}) but the student "
                         f"{type(model).__name__} is a sequence classifier; use a causal LM student")
    expected_fp = tok_info.get("fingerprint")
    actual_fp = tokenizer_fingerprint(tokenizer)
    if expected_fp and expected_fp != actual_fp and not allow_vocab_mismatch:
        raise ModelError(
            f"the student's tokenizer differs from the cache's ({cache}: tokenizer {tok_info.get('name')!r}, "
            f"vocab {tok_info.get('vocab_size')}, fingerprint {expected_fp[:19]}...; student: vocab {len(tokenizer)}, "
            f"fingerprint {actual_fp[:19]}...); use the teacher's tokenizer (--tokenizer) or pass "
            "--allow-vocab-mismatch if the vocabularies are known to share ids"
        )
    if kind == "class_logits":
        return
    limit = int(ident.id_limit)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = hf.get_output_embeddings()
    student_vocab = int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)
    if student_vocab < limit:
        raise ModelError(
            f"the student's vocabulary ({student_vocab} output rows) is smaller than the cache's id range "
            f"({cache}: ids up to {limit - 1}); use a student whose vocabulary covers the teacher's"
        )
    if allow_vocab_mismatch and len(tokenizer) < int(tok_info.get("vocab_size") or 0):
        raise ModelError(
            f"--allow-vocab-mismatch needs the student's tokenizer to cover the cache's vocabulary: "
            f"{len(tokenizer)} tokens < {tok_info.get('vocab_size')} in {cache}"
        )


def resolve_tokenizer_path(student: str | None, tokenizer: str | None, student_config: str | None) -> str:
    if tokenizer:
        return tokenizer
    if student:
        return student
    cfg_dir = Path(student_config).parent if student_config and Path(student_config).is_file() else student_config
    if cfg_dir and Path(cfg_dir, "tokenizer_config.json").is_file():
        return str(cfg_dir)
    raise ConfigError("a fresh student (--student-config) needs tokenizer (flag --tokenizer): the teacher's "
                      "tokenizer folder or hub name")
