"""``kdpipe eval``: the seed project's metrics for one model, or a side-by-side table of several.

Per task (rows come from the same recipes the dump uses, so "the held-out set" means the
same thing everywhere):

- ``lm``: perplexity, next-token accuracy@1 and @5 over the dump's LM windows of ``max_length``
  (BOS per window as the tokenizer does, overlapping by the default stride; each token scored
  once, on the window's target positions);
- ``classification``: accuracy against the dataset's labels;
- ``summarization``: BLEU and ROUGE-1/2/L (evaluate's definitions, see ``pipeline.eval.metrics``)
  of greedy generations against the reference summaries;
- ``reasoning``: exact match of the final number (GSM8K ``#### n``) of greedy generations.

Every result has the parameter count; with ``--teacher`` (a model) or ``--cache`` (a teacher
cache) it also has top-1 agreement and mean KL(teacher || student). ``--compare A B C``
evaluates (or loads earlier ``--json`` results of) several models and prints one table.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import resolve_device
from pipeline.errors import ConfigError, DatasetError, ModelError
from pipeline.eval import metrics
from pipeline.eval.compare import format_value, run_compare, write_outputs
from pipeline.eval.config import EvalConfig
from pipeline.hf_io import (
    greedy_generate,
    load_config,
    load_model,
    load_tokenizer,
    model_class,
    pad,
    torch_dtype,
)

# --------------------------------------------------------------------------- entry point


def run_eval(cfg: EvalConfig, engine: Any = None) -> dict[str, Any]:
    """Evaluate ``cfg.model`` (or every ``cfg.compare`` entry) and return the result dict.

    ``engine``: an already loaded vLLM backend (``pipeline.dump.teachers.make_backend``) of
    ``cfg.model`` for generation, reused instead of starting a new one.
    """
    if cfg.compare:
        return run_compare(cfg)
    result = evaluate_model(cfg, engine)
    write_outputs(cfg, result, markdown=None)
    return result


def evaluate_model(cfg: EvalConfig, engine: Any = None) -> dict[str, Any]:
    """Metrics of one model: ``{"model", "task", "params", "metrics", "agreement", ...}``."""
    assert cfg.model is not None  # guaranteed by EvalConfig's validator
    t0 = time.perf_counter()
    runtime = _setup_runtime(cfg)
    if not cfg.dataset and not cfg.cache:
        raise ConfigError("pass --dataset to score the model (or --cache to measure agreement with a teacher cache)")
    model, tokenizer, params = _setup_model(cfg, runtime)
    if cfg.cache:
        _check_cache_tokenizer(cfg, tokenizer)
    result: dict[str, Any] = {
        "model": cfg.model,
        "task": cfg.task,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "params": params,
    }
    if cfg.dataset:
        result.update(_task_metrics(cfg, model, tokenizer, runtime, engine))
    if (cfg.teacher or cfg.cache) and model is None:
        # Agreement needs the HF forward pass; loaded only now that the vLLM engine is gone.
        model, tokenizer = _load_model(cfg.model, cfg.task, runtime, cfg.trust_remote_code)
    result["agreement"] = _agreement(cfg, model, tokenizer, runtime)
    result["eval_s"] = round(time.perf_counter() - t0, 2)
    return result


# --------------------------------------------------------------------------- setup


@dataclass
class Runtime:
    """Where and how models run."""

    device: str
    dtype: Any


def _setup_runtime(cfg: EvalConfig) -> Runtime:
    import torch

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    return Runtime(device=device, dtype=torch_dtype(cfg.dtype))


def _setup_model(cfg: EvalConfig, runtime: Runtime) -> tuple[Any, Any, int]:
    """(HF model or None, tokenizer, parameter count).

    When vLLM generates, it holds the weights itself: an HF copy beside it would double the GPU
    memory, so the parameters are counted on an empty (meta-device) model instead.
    """
    assert cfg.model is not None
    if cfg.task in ("summarization", "reasoning") and _generation_backend(cfg, runtime) == "vllm":
        tokenizer = _load_tokenizer(cfg.model, cfg.trust_remote_code, "--model")
        return None, tokenizer, _count_params_without_weights(cfg.model, cfg.trust_remote_code)
    model, tokenizer = _load_model(cfg.model, cfg.task, runtime, cfg.trust_remote_code)
    return model, tokenizer, metrics.count_parameters(model)


def _count_params_without_weights(name: str, trust_remote_code: bool) -> int:
    from accelerate import init_empty_weights

    config = load_config(name, trust_remote_code=trust_remote_code, what="--model")
    with init_empty_weights():
        empty = model_class("causal_lm").from_config(config, trust_remote_code=trust_remote_code)
    return metrics.count_parameters(empty)


def _load_tokenizer(name: str, trust_remote_code: bool, what: str) -> Any:
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code, what=what)
    if tokenizer.pad_token_id is None:
        # Batching needs a pad id; EOS is never scored where it pads (the attention mask hides it).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(
    name: str, task: str, runtime: Runtime, trust_remote_code: bool, what: str = "--model"
) -> tuple[Any, Any]:
    """The model (classifier head for classification, causal LM otherwise) and its tokenizer."""
    tokenizer = _load_tokenizer(name, trust_remote_code, what)
    model = load_model(name, kind="classifier" if task == "classification" else "causal_lm", dtype=runtime.dtype,
                       device=runtime.device, trust_remote_code=trust_remote_code, what=what)
    return model.eval(), tokenizer


def _load_rows(cfg: EvalConfig) -> Any:
    from pipeline.dump.datasets import load_dataset_rows

    assert cfg.dataset is not None
    return load_dataset_rows(
        cfg.dataset, config=cfg.dataset_config, split=cfg.split, limit=cfg.limit, fmt=cfg.dataset_format
    )


def _recipe(cfg: EvalConfig, *, max_length: int, teacher_generates: bool = False) -> Any:
    from pipeline.dump.tasks import RecipeConfig

    return RecipeConfig(
        task=cfg.task,
        max_length=max_length,
        text_field=cfg.text_field,
        label_field=cfg.label_field,
        response_field=cfg.response_field,
        template=cfg.template,
        chat_template=cfg.chat_template,
        teacher_generates=teacher_generates,
        # The dump's rules and defaults (BOS per window, overlapping windows), so a model's LM numbers are
        # measured on the windows a cache of the same data targets; set when the eval config carries them.
        bos=cfg.bos,
        stride=cfg.stride if cfg.task == "lm" else None,
    )


# --------------------------------------------------------------------------- task metrics


def _task_metrics(
    cfg: EvalConfig, model: Any, tokenizer: Any, runtime: Runtime, engine: Any = None
) -> dict[str, Any]:
    ds = _load_rows(cfg)
    if cfg.task == "lm":
        return _eval_lm(cfg, ds, model, tokenizer, runtime)
    if cfg.task == "classification":
        return _eval_classification(cfg, ds, model, tokenizer, runtime)
    return _eval_generation(cfg, ds, model, tokenizer, runtime, engine)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _padded_batches(examples: Sequence[Any], cfg: EvalConfig, tokenizer: Any, runtime: Runtime) -> Iterator[Any]:
    """``(batch, input_ids, attention_mask)`` per ``--batch-size`` examples, right-padded on the device."""
    for batch in _batches(examples, cfg.batch_size):
        ids, mask = pad([e.input_ids for e in batch], tokenizer.pad_token_id, device=runtime.device)
        yield batch, ids, mask


def _eval_lm(cfg: EvalConfig, ds: Any, model: Any, tokenizer: Any, runtime: Runtime) -> dict[str, Any]:
    import torch

    from pipeline.dump.tasks import build_examples

    examples = build_examples(ds, tokenizer, _recipe(cfg, max_length=cfg.max_length)).examples
    stats = metrics.LMStats()
    with torch.inference_mode():
        for batch, ids, mask in _padded_batches(examples, cfg, tokenizer, runtime):
            logits = model(input_ids=ids, attention_mask=mask).logits
            # logits[:, t] predicts ids[:, t + 1]; only the rows' target positions are scored, so a token
            # that is context in one overlapping window and target in the next counts once.
            targets = torch.zeros_like(mask[:, 1:], dtype=torch.bool)
            for i, e in enumerate(batch):
                targets[i, torch.as_tensor(e.positions, dtype=torch.long, device=targets.device)] = True
            stats.add(metrics.lm_token_stats(logits[:, :-1], ids[:, 1:], targets))
    return {"num_examples": len(examples), "metrics": stats.summary()}


def _eval_classification(cfg: EvalConfig, ds: Any, model: Any, tokenizer: Any, runtime: Runtime) -> dict[str, Any]:
    import torch

    from pipeline.dump.tasks import build_examples

    label2id = {str(k): int(v) for k, v in (getattr(model.config, "label2id", None) or {}).items()}
    examples = build_examples(ds, tokenizer, _recipe(cfg, max_length=cfg.max_length), label2id).examples
    labelled = [e for e in examples if e.label is not None]
    if not labelled:
        raise DatasetError(
            f"dataset {ds.source} has no labels in field '{cfg.label_field or 'label'}'; "
            "pass the label column with --label-field"
        )
    preds: list[int] = []
    with torch.inference_mode():
        for _, ids, mask in _padded_batches(labelled, cfg, tokenizer, runtime):
            preds.extend(model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist())
    acc = metrics.accuracy(preds, [e.label for e in labelled])
    return {"num_examples": len(labelled), "metrics": {"accuracy": acc}}


def _eval_generation(
    cfg: EvalConfig, ds: Any, model: Any, tokenizer: Any, runtime: Runtime, engine: Any = None
) -> dict[str, Any]:
    """Greedy generations from the task's prompts, scored against the dataset's responses."""
    from pipeline.dump.tasks import build_examples

    prompt_room = cfg.max_length - cfg.max_new_tokens
    if prompt_room < 2:
        raise ConfigError(
            f"--max-length ({cfg.max_length}) leaves no room for a prompt after --max-new-tokens "
            f"({cfg.max_new_tokens}); raise --max-length or lower --max-new-tokens"
        )
    recipe = _recipe(cfg, max_length=prompt_room + 1, teacher_generates=True).resolved()
    examples = build_examples(ds, tokenizer, recipe).examples
    references = ds.column(recipe.response_field, "--response-field")
    prompts = [e.input_ids.tolist() for e in examples]
    refs = [str(references[e.sample_id] or "") for e in examples]
    backend = _generation_backend(cfg, runtime)
    if backend == "vllm":
        outputs = _generate_vllm(cfg, tokenizer, prompts, engine)
    else:
        outputs = _generate_hf(cfg, model, tokenizer, runtime, prompts)
    texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
    if cfg.task == "summarization":
        scores = {**{"bleu": metrics.bleu(texts, refs)["bleu"]}, **metrics.rouge(texts, refs)}
    else:
        scores = {"exact_match": metrics.gsm8k_exact_match(texts, refs)}
    samples = [{"prediction": p, "reference": r} for p, r in zip(texts[:3], refs[:3], strict=False)]
    return {"num_examples": len(examples), "metrics": scores, "generation_backend": backend, "samples": samples}


def _generation_backend(cfg: EvalConfig, runtime: Runtime) -> str:
    has_vllm = importlib.util.find_spec("vllm") is not None
    if cfg.generation_backend == "vllm" and not has_vllm:
        raise ConfigError("--generation-backend vllm needs the vllm package; install kdpipe[vllm] or use hf")
    if cfg.generation_backend == "auto":
        return "vllm" if has_vllm and runtime.device.startswith("cuda") else "hf"
    return cfg.generation_backend


def _generate_hf(
    cfg: EvalConfig, model: Any, tokenizer: Any, runtime: Runtime, prompts: list[list[int]]
) -> list[list[int]]:
    outputs: list[Any] = []
    for batch in _batches(prompts, cfg.batch_size):
        outputs += greedy_generate(model, batch, max_new_tokens=cfg.max_new_tokens, pad_id=tokenizer.pad_token_id,
                                   eos_id=tokenizer.eos_token_id, device=runtime.device)
    return _without_eos(outputs, tokenizer.eos_token_id)


def _without_eos(outputs: Sequence[Any], eos: int | None) -> list[list[int]]:
    """Generated ids as lists without the EOS that ended them (metrics score the text alone)."""
    return [[t for t in out.tolist() if t != eos] for out in outputs]


def _generate_vllm(cfg: EvalConfig, tokenizer: Any, prompts: list[list[int]], engine: Any = None) -> list[list[int]]:
    """Greedy answers from the dump's vLLM teacher backend (one place configures vLLM).

    ``engine``: an already loaded ``pipeline.dump.teachers`` vLLM backend of the same model to reuse
    (vLLM start-up costs 10-40 s); otherwise one is loaded here and freed afterwards.
    """
    import numpy as np

    from pipeline.dump.teachers import TeacherSettings, make_backend

    own = engine is None
    if own:
        engine = make_backend(TeacherSettings(
            model=cfg.model or "", backend="vllm", dtype=cfg.dtype, max_length=cfg.max_length, seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
        ))
    try:
        eos = tokenizer.eos_token_id
        outs = engine.generate([np.asarray(p, dtype=np.int32) for p in prompts], cfg.max_new_tokens, eos)
    finally:
        if own:
            engine.close()
    return _without_eos(outs, eos)


# --------------------------------------------------------------------------- agreement


def _agreement(cfg: EvalConfig, model: Any, tokenizer: Any, runtime: Runtime) -> dict[str, Any] | None:
    if cfg.cache:
        out = _agreement_with_cache(cfg, model, runtime)
        return {**out, "against": f"cache:{cfg.cache}"}
    if cfg.teacher:
        if not cfg.dataset:
            raise ConfigError("--teacher needs --dataset (the rows both models are compared on)")
        out = _agreement_with_teacher(cfg, model, tokenizer, runtime)
        return {**out, "against": f"teacher:{cfg.teacher}"}
    return None


def _agreement_with_teacher(cfg: EvalConfig, model: Any, tokenizer: Any, runtime: Runtime) -> dict[str, Any]:
    """Compare full distributions on the task's target positions (class logits for classification)."""
    import torch

    from pipeline.dump.tasks import build_examples

    teacher, _ = _load_model(cfg.teacher or "", cfg.task, runtime, cfg.trust_remote_code, what="--teacher")
    ds = _load_rows(cfg)
    examples = build_examples(ds, tokenizer, _recipe(cfg, max_length=cfg.max_length)).examples
    stats = metrics.AgreementStats()
    with torch.inference_mode():
        for batch, ids, mask in _padded_batches(examples, cfg, tokenizer, runtime):
            s_logits = model(input_ids=ids, attention_mask=mask).logits
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            if cfg.task == "classification":
                stats.add(metrics.agreement_dense(s_logits, t_logits))
                continue
            vocab = min(s_logits.shape[-1], t_logits.shape[-1])  # padded embedding rows hold no token
            for i, e in enumerate(batch):
                pos = torch.as_tensor(e.positions, dtype=torch.long, device=s_logits.device)
                stats.add(metrics.agreement_dense(s_logits[i, pos, :vocab], t_logits[i, pos, :vocab]))
    return stats.summary()


def _agreement_with_cache(cfg: EvalConfig, model: Any, runtime: Runtime) -> dict[str, Any]:
    """Compare with the cached teacher distributions, on the cache's own rows (``--limit`` rows)."""
    import numpy as np
    import torch

    from cache_format import open_cache

    reader = open_cache(cfg.cache, verify_checksums=cfg.verify_checksums)
    vocab = _model_vocab(model)
    stats = metrics.AgreementStats()
    with torch.inference_mode():
        for n, row in enumerate(reader.iter_rows()):
            if cfg.limit is not None and n >= cfg.limit:
                break
            ids = torch.tensor(np.asarray(row.input_ids), dtype=torch.long, device=runtime.device)[None]
            logits = model(input_ids=ids).logits[0]
            if row.class_logits is not None:
                stats.add(metrics.agreement_dense(logits[None].float(), torch.tensor(np.asarray(row.class_logits))[None]))
                continue
            if vocab is not None and len(row.ids) and int(np.max(row.ids)) >= vocab:
                raise ModelError(
                    f"cache {cfg.cache} row {row.sample_id} holds token id {int(np.max(row.ids))} but model "
                    f"{cfg.model} has {vocab} embeddings; evaluate a student with the teacher's tokenizer"
                )
            pos = torch.tensor(np.asarray(row.positions), dtype=torch.long, device=logits.device)
            tail = None if row.tail is None else torch.tensor(np.asarray(row.tail))
            stats.add(metrics.agreement_sparse(
                logits[pos].cpu(), torch.tensor(np.asarray(row.ids)), torch.tensor(np.asarray(row.logprobs)), tail,
            ))
    if stats.positions == 0:
        raise DatasetError(f"cache {cfg.cache} has no rows to compare with; check --cache and --limit")
    return stats.summary()


def _check_cache_tokenizer(cfg: EvalConfig, tokenizer: Any) -> None:
    """Refuse (before any work) a model whose tokenizer is not the cache's: its token ids would be compared
    with another vocabulary's. The same rule and flag as ``train-student``."""
    from cache_format import open_cache, tokenizer_fingerprint

    info = open_cache(cfg.cache).manifest.identity.tokenizer or {}
    expected, actual = info.get("fingerprint"), tokenizer_fingerprint(tokenizer)
    if expected and expected != actual and not cfg.allow_vocab_mismatch:
        raise ModelError(
            f"the tokenizer of --model {cfg.model} differs from the cache's ({cfg.cache}: tokenizer "
            f"{info.get('name')!r}, vocab {info.get('vocab_size')}, fingerprint {expected[:19]}...; model: vocab "
            f"{len(tokenizer)}, fingerprint {actual[:19]}...); evaluate a model with the teacher's tokenizer, or "
            "pass --allow-vocab-mismatch if the vocabularies are known to share ids")


def _model_vocab(model: Any) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.weight.shape[0]) if emb is not None else None


def print_result(result: dict[str, Any], file: Any = None) -> None:
    """One line per metric, for the CLI (``file`` None: the current ``sys.stdout``)."""
    file = file or sys.stdout
    if "markdown" in result:
        return  # run_compare already printed its table
    print(f"model {result['model']} ({metrics.format_params(int(result['params']))} params), task {result['task']}",
          file=file)
    for key, value in (result.get("metrics") or {}).items():
        print(f"  {key}: {format_value(value)}", file=file)
    for key, value in (result.get("agreement") or {}).items():
        print(f"  {key}: {format_value(value)}", file=file)
