"""Task recipes: dataset rows -> token ids plus the positions whose teacher distribution is stored.

Position convention (docs/ARCHITECTURE.md): position ``t`` holds the distribution of the token
*after* ``input_ids[: t + 1]``, so the position that predicts token ``j`` is ``j - 1``.

- ``lm``: documents (non-blank texts) are tokenized without special tokens, each followed by
  EOS, and **packed** into one stream cut into windows of ``max_length`` tokens, each opened by
  BOS when one is in use (``bos``), consecutive windows overlapping so that only the ``stride``
  new tokens of a window are targets (see :mod:`pipeline.dump.lm`; a document spanning a window
  boundary is counted as ``split_documents``). ``pack=False`` keeps documents apart instead: each
  document becomes one or more windows of its own. ``sample_id`` is the row's provenance,
  ``doc<D>:tok<T>@doc<D0>:tok<T0>``.
- ``classification``: the text tokenized with the tokenizer's own special tokens, truncated to
  ``max_length``; no positions (the cache stores class logits), the gold label kept when the
  dataset has one.
- ``summarization`` / ``reasoning``: ``template`` with ``{text}`` replaced by the document /
  question forms the prompt (through the tokenizer's chat template with ``chat_template``), the
  response (reference summary / answer, or the teacher's own answer with ``--teacher-generates``)
  follows, ended with EOS so the student learns to stop. The prompt carries the tokenizer's own
  special tokens (``add_special_tokens=True``; with ``chat_template`` the template's own markers,
  tokenized with ``add_special_tokens=False``); the response none. Targets are the positions predicting
  response tokens: ``len(prompt) - 1 .. T - 2``. Too-long rows lose prompt tokens from the left
  (after BOS; the end of the prompt carries the instruction cue), then response tokens from the
  right, and are counted as ``truncated``.

BOS outside ``lm`` (``bos``): ``auto`` keeps the tokenizer's or template's own leading BOS,
``always`` adds one where they gave none, ``never`` removes it; a row never starts with two.
Rows of these tasks keep their dataset row key as ``sample_id``: the row index, or in a dump the source's
row key of its unit (the byte offset of the row's line in a text/JSON-lines/SST-2 file; see
:mod:`pipeline.dump.sources`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.dump.datasets import LoadedDataset
from pipeline.dump.lm import (
    BosPolicy,
    default_stride,
    lm_recipe_facts,
    lm_rows,
    normalize_bos,
    resolve_bos,
)
from pipeline.errors import ConfigError, DatasetError

Task = Literal["lm", "classification", "summarization", "reasoning"]
TASKS: tuple[str, ...] = ("lm", "classification", "summarization", "reasoning")

# Field defaults per task, chosen to fit the usual public datasets without flags:
# wikitext ("text"), SST-2 ("sentence", "label"), openai/summarize_from_feedback config "axis"
# ("info.post", falling back to "info.article" for news rows, "summary.text"), GSM8K
# ("question", "answer").
DEFAULT_TEXT_FIELD: dict[str, str] = {
    "lm": "text",
    "classification": "sentence",
    "summarization": "info.post",
    "reasoning": "question",
}
DEFAULT_RESPONSE_FIELD: dict[str, str] = {"summarization": "summary.text", "reasoning": "answer"}
DEFAULT_FALLBACK_FIELD: dict[str, str] = {"summarization": "info.article"}
# Prompts in the style the datasets were published with: the TL;DR cue of the summarize-from-
# feedback work, and a plain Q/A frame for GSM8K. The response follows after one space.
DEFAULT_TEMPLATE: dict[str, str] = {
    "summarization": "{text}\n\nTL;DR:",
    "reasoning": "Question: {text}\nAnswer:",
}


@dataclass(frozen=True)
class RecipeConfig:
    """The recipe part of the dump config (``None`` fields take the task's default)."""

    task: Task
    max_length: int
    text_field: str | None = None
    label_field: str | None = None
    response_field: str | None = None
    fallback_field: str | None = None
    template: str | None = None
    chat_template: bool = False
    pack: bool = True
    teacher_generates: bool = False
    bos: BosPolicy = "auto"
    stride: int | None = None  # lm only; None: default_stride(max_length)

    def resolved(self) -> RecipeConfig:
        """A copy with every task default filled in (this is what the cache identity records)."""
        t = self.task
        return RecipeConfig(
            task=t,
            max_length=self.max_length,
            text_field=self.text_field or DEFAULT_TEXT_FIELD[t],
            label_field=self.label_field or ("label" if t == "classification" else None),
            response_field=self.response_field or DEFAULT_RESPONSE_FIELD.get(t),
            fallback_field=self.fallback_field or DEFAULT_FALLBACK_FIELD.get(t),
            template=self.template or DEFAULT_TEMPLATE.get(t),
            chat_template=self.chat_template,
            pack=self.pack,
            teacher_generates=self.teacher_generates,
            bos=self.bos,
            stride=(default_stride(self.max_length) if self.stride is None else self.stride) if t == "lm" else None,
        )

    def identity(self, tokenizer: Any) -> dict[str, Any]:
        """The ``recipe`` part of the cache identity: every fact needed to rebuild a row from the dataset."""
        r = self.resolved()
        bos_id = resolve_bos(tokenizer, r.bos)
        return {
            "task": r.task,
            "template": r.template,
            "max_length": r.max_length,
            "chat_template": r.chat_template,
            "pack": r.pack if r.task == "lm" else None,
            "teacher_generates": r.teacher_generates,
            "fields": {
                "text": r.text_field,
                "label": r.label_field,
                "response": r.response_field,
                "fallback": r.fallback_field,
            },
            "bos": r.bos,
            "bos_id": bos_id,
            # How the texts were tokenized: lm documents bare (BOS/EOS added by the recipe), prompts and
            # classification texts with the tokenizer's own special tokens (chat templates write theirs).
            "add_special_tokens": r.task != "lm" and not r.chat_template,
            "lm": lm_recipe_facts(tokenizer, bos_id=bos_id, stride=r.stride, pack=r.pack) if r.task == "lm" else None,
            "response": {  # the text after the prompt: separator + response.strip(), bare, then EOS
                "separator": response_separator(r.chat_template), "add_special_tokens": False,
                "eos_after": tokenizer.eos_token_id is not None,
            } if r.task in ("summarization", "reasoning") else None,
        }


@dataclass
class Example:
    """One cache row before the teacher runs.

    ``sample_id``: the row's key (``LoadedDataset.keys``: its index, or in a dump its source key, a byte
    offset or row index), or (``lm``) the window's provenance string;
    ``input_ids``: int32 [T]; ``positions``: int32 [n_pos], strictly increasing, < T;
    ``prompt_len``: tokens before the response (summarization/reasoning), used to rebuild the
    row when the teacher generates its own response.
    """

    sample_id: int | str
    input_ids: np.ndarray
    positions: np.ndarray
    label: int | None = None
    prompt_len: int | None = None


@dataclass
class RecipeResult:
    examples: list[Example]
    stats: dict[str, int] = field(default_factory=dict)


def response_separator(chat_template: bool) -> str:
    """What goes between prompt and response: a space after a plain template's cue ("TL;DR:", "Answer:"),
    nothing after a chat template's generation prompt (it ends with the turn marker)."""
    return "" if chat_template else " "


def _check_template(template: str) -> None:
    if "{text}" not in template:
        raise ConfigError(f"--template must contain '{{text}}' where the document goes; got {template!r}")


def _token_lists(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _with_bos(tokenizer: Any, rows: list[list[int]], policy: str) -> list[list[int]]:
    """Rows tokenized with the tokenizer's own special tokens, their leading BOS set by ``--bos``."""
    resolve_bos(tokenizer, policy)  # --bos always without a BOS token fails here, naming the flag
    return [normalize_bos(list(r), tokenizer.bos_token_id, policy) for r in rows]


def _as_text(values: list[Any], field_name: str, flag: str, ds: LoadedDataset) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append("")
        elif isinstance(v, str):
            out.append(v)
        else:
            raise DatasetError(
                f"dataset {ds.source} {ds.row_label(i)} field '{field_name}' ({flag}) is {type(v).__name__}, not text; "
                f"pick a text field with {flag}"
            )
    return out


def build_lm(ds: LoadedDataset, tokenizer: Any, cfg: RecipeConfig, allow_empty: bool = False) -> RecipeResult:
    """Overlapping windows of ``max_length`` tokens over the documents (:mod:`pipeline.dump.lm`)."""
    field_name = cfg.text_field or "text"
    texts = _as_text(ds.column(field_name, "--text-field"), field_name, "--text-field", ds)
    rows = [i for i, t in enumerate(texts) if t.strip()]
    if not rows and allow_empty:
        return RecipeResult([], {"documents": 0, "split_documents": 0, "truncated": 0})
    if not rows:
        raise DatasetError(f"dataset {ds.source} field '{field_name}' (--text-field) holds only empty texts")
    eos = tokenizer.eos_token_id
    token_docs = [np.asarray([*ids, eos] if eos is not None else ids, dtype=np.int32)
                  for ids in _token_lists(tokenizer, [texts[i] for i in rows], special=False)]
    keys = ds.keys
    windows, split_docs = lm_rows(token_docs, [keys[i] for i in rows], max_length=cfg.max_length, stride=cfg.stride,
                                  bos_id=resolve_bos(tokenizer, cfg.bos), pack=cfg.pack)
    examples = [Example(sample_id=w.sample_id, input_ids=w.input_ids, positions=w.positions) for w in windows]
    return RecipeResult(examples, {"documents": len(rows), "split_documents": split_docs, "truncated": 0})


def _label_ids(values: list[Any], label2id: dict[str, int] | None, ds: LoadedDataset, field_name: str) -> list[int | None]:
    out: list[int | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif isinstance(v, bool | int | np.integer) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
            out.append(int(v))
        elif isinstance(v, str) and label2id and v in label2id:
            out.append(int(label2id[v]))
        else:
            known = ", ".join(sorted(label2id)) if label2id else "integers"
            raise DatasetError(
                f"dataset {ds.source} {ds.row_label(i)} label '{v}' (field '{field_name}', --label-field) is not one of "
                f"the teacher's labels ({known})"
            )
    return out


def build_classification(
    ds: LoadedDataset, tokenizer: Any, cfg: RecipeConfig, label2id: dict[str, int] | None = None
) -> RecipeResult:
    """Text rows truncated to ``max_length``; no positions; gold label when the dataset has one."""
    field_name = cfg.text_field or "sentence"
    texts = _as_text(ds.column(field_name, "--text-field"), field_name, "--text-field", ds)
    labels: list[int | None] = [None] * len(texts)
    if cfg.label_field and cfg.label_field in ds.columns:
        labels = _label_ids(ds.columns[cfg.label_field], label2id, ds, cfg.label_field)
    elif cfg.label_field and cfg.label_field != "label":
        ds.column(cfg.label_field, "--label-field")  # raises the listing error: it was asked for explicitly
    ids = _with_bos(tokenizer, _token_lists(tokenizer, texts, special=True), cfg.bos)
    truncated = sum(len(x) > cfg.max_length for x in ids)
    examples = [
        Example(sample_id=key, input_ids=np.asarray(x[: cfg.max_length], dtype=np.int32),
                positions=np.zeros(0, dtype=np.int32), label=labels[i])
        for i, (key, x) in enumerate(zip(ds.keys, ids, strict=True))
    ]
    empty = [i for i, e in enumerate(examples) if len(e.input_ids) == 0]
    if empty:
        raise DatasetError(f"dataset {ds.source} {ds.row_label(empty[0])} tokenizes to nothing; drop empty rows")
    return RecipeResult(examples, {"truncated": truncated})


def render_prompts(tokenizer: Any, texts: list[str], cfg: RecipeConfig) -> list[list[int]]:
    """Token ids of each prompt (template, optionally wrapped in the chat template)."""
    template = cfg.template or "{text}"
    _check_template(template)
    prompts = [template.replace("{text}", t) for t in texts]
    if not cfg.chat_template:
        return _with_bos(tokenizer, _token_lists(tokenizer, prompts, special=True), cfg.bos)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"--chat-template was given but tokenizer {getattr(tokenizer, 'name_or_path', '')} has no chat "
            "template; drop --chat-template or use a tokenizer that defines one"
        )
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # The chat template already writes BOS (if its model uses one) and the turn markers.
    return _with_bos(tokenizer, _token_lists(tokenizer, rendered, special=False), cfg.bos)


def fit_prompt_response(
    prompt: list[int], response: list[int], max_length: int, bos_id: int | None
) -> tuple[list[int], list[int], bool]:
    """Cut ``prompt + response`` to ``max_length``: prompt tokens go first (from the left, after BOS),
    the response is cut from the right only when it alone does not fit. Returns (prompt, response, cut)."""
    total = len(prompt) + len(response)
    if total <= max_length:
        return prompt, response, False
    keep_head = 1 if prompt and bos_id is not None and prompt[0] == bos_id else 0
    min_prompt = keep_head + 1  # at least one real prompt token predicts the first response token
    room_for_prompt = max(min_prompt, max_length - len(response))
    if len(prompt) > room_for_prompt:
        tail = room_for_prompt - keep_head
        prompt = prompt[:keep_head] + prompt[len(prompt) - tail :]
    response = response[: max(0, max_length - len(prompt))]
    return prompt, response, True


def make_prompt_response_example(
    sample_id: int, prompt: list[int], response: list[int], max_length: int, bos_id: int | None
) -> tuple[Example | None, bool]:
    """Row ``prompt + response``; targets predict response tokens. ``None`` when nothing is left to predict."""
    prompt, response, cut = fit_prompt_response(prompt, response, max_length, bos_id)
    if not prompt or not response:
        return None, cut
    ids = np.asarray(prompt + response, dtype=np.int32)
    positions = np.arange(len(prompt) - 1, len(ids) - 1, dtype=np.int32)
    return Example(sample_id=sample_id, input_ids=ids, positions=positions, prompt_len=len(prompt)), cut


def build_prompt_response(ds: LoadedDataset, tokenizer: Any, cfg: RecipeConfig, allow_empty: bool = False) -> RecipeResult:
    """Summarization and reasoning rows; with ``teacher_generates`` the response is left empty here."""
    text_field = cfg.text_field or ""
    texts = _as_text(ds.column(text_field, "--text-field"), text_field, "--text-field", ds)
    if cfg.fallback_field and cfg.fallback_field in ds.columns:
        fallback = _as_text(ds.columns[cfg.fallback_field], cfg.fallback_field, "--fallback-field", ds)
        texts = [t if t.strip() else f for t, f in zip(texts, fallback, strict=True)]
    prompts = render_prompts(tokenizer, texts, cfg)
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    if cfg.teacher_generates:
        # The teacher writes the responses later; keep the prompts (cut to leave room for an answer).
        examples = []
        truncated = 0
        for key, p in zip(ds.keys, prompts, strict=True):
            # Leave at least one token of room for the answer; the dump cuts answers to fit.
            p2, _, cut = fit_prompt_response(p, [], cfg.max_length - 1, bos)
            truncated += cut
            examples.append(Example(sample_id=key, input_ids=np.asarray(p2, dtype=np.int32),
                                    positions=np.zeros(0, dtype=np.int32), prompt_len=len(p2)))
        return RecipeResult(examples, {"truncated": truncated, "skipped": 0})
    resp_field = cfg.response_field or ""
    responses = _as_text(ds.column(resp_field, "--response-field"), resp_field, "--response-field", ds)
    sep = response_separator(cfg.chat_template)
    resp_ids = _token_lists(tokenizer, [sep + r.strip() for r in responses], special=False)
    examples: list[Example] = []
    truncated = skipped = 0
    for i, (p, r) in enumerate(zip(prompts, resp_ids, strict=True)):
        if not responses[i].strip():
            skipped += 1
            continue
        ex, cut = make_prompt_response_example(ds.keys[i], p, [*r, eos] if eos is not None else r, cfg.max_length, bos)
        truncated += cut
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    if not examples and not allow_empty:
        raise DatasetError(
            f"dataset {ds.source}: no row has both a prompt ('{text_field}', --text-field) and a response "
            f"('{resp_field}', --response-field)"
        )
    return RecipeResult(examples, {"truncated": truncated, "skipped": skipped})


def build_examples(
    ds: LoadedDataset, tokenizer: Any, cfg: RecipeConfig, label2id: dict[str, int] | None = None,
    allow_empty: bool = False,
) -> RecipeResult:
    """Dispatch on ``cfg.task``; rows come out in dataset order, ``sample_id`` = their row key (``ds.keys``: the
    row index, or one dump unit's source row keys; lm: provenance).

    ``allow_empty``: one dump unit may hold no usable row (blank lines only); the dump checks the whole
    dataset instead."""
    if cfg.stride is not None and cfg.task != "lm":
        raise ConfigError(f"--stride applies to --task lm (overlapping LM windows), not {cfg.task}; drop --stride")
    cfg = cfg.resolved()
    if cfg.max_length < 2:
        raise ConfigError(f"--max-length must be at least 2 tokens, got {cfg.max_length}")
    if cfg.teacher_generates and cfg.task not in ("reasoning", "summarization"):
        raise ConfigError(f"--teacher-generates applies to --task reasoning or summarization, not {cfg.task}")
    if cfg.task == "lm":
        return build_lm(ds, tokenizer, cfg, allow_empty)
    if cfg.task == "classification":
        return build_classification(ds, tokenizer, cfg, label2id)
    if cfg.task in ("summarization", "reasoning"):
        return build_prompt_response(ds, tokenizer, cfg, allow_empty)
    raise ConfigError(f"unknown --task {cfg.task!r}; choose one of {', '.join(TASKS)}")
