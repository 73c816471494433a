"""``kdpipe dump-teacher``: run the teacher once over a dataset and write its distributions to a cache.

Flow (each step a ``_setup_*`` function, then one loop):

1. the output folder: create, ``--overwrite``, or resume an earlier run of the same settings;
2. tokenizer and the teacher's config (cheap: k, vocabulary and context are checked before the
   model loads);
3. dataset -> work units (:mod:`pipeline.dump.sources`; nothing is parsed yet) -> a unit plan
   whose ``rows_of(u)`` reads, tokenizes and packs unit ``u`` on demand (``sample_id`` = the row's
   source key, or an LM window's provenance ``doc<D>:tok<T>@doc<D0>:tok<T0>``); the first unit
   with rows is built now, so a wrong field fails in seconds, before the teacher loads;
4. the cache identity; a resume into a cache with other settings is refused naming the setting;
5. the teacher backend; then the work loop.

Work units: the source is cut into units of ``unit_bytes`` bytes (line files) or ``unit_rows``
source rows (:mod:`pipeline.dump.sources`); unit ``j`` belongs to worker ``j % num_workers``
(``--worker-index``/``--num-workers``, by default from torchrun's ``RANK``/``WORLD_SIZE`` or SLURM's
variables, :func:`pipeline.dump.config.resolve_workers`), which reads only its own units' slices of
the source (memory: a few units, whatever the corpus size). A unit is the resume granule (the
writer commits it with a marker in ``end_unit``) and the batching scope (rows are sorted by length
*inside* a unit, so a unit's numbers do not depend on which worker runs it). All workers write into
the one ``--out`` (a folder or an object-store URL); each finalizes the cache when it finds every
unit there, so the last one to finish does, and N workers equal one worker.
Encoding and writing run on the writer's background thread while the next unit's forward pass
runs, so the teacher never waits for compression or the disk; the next unit is read and tokenized
on a thread of its own meanwhile (:func:`_prefetched`: ~0.3 s of CPU per 512 KiB unit, ~10% of a
small GPU teacher's time on that unit, otherwise on the critical path). With ``--engine ray`` the units are
computed by a pool of Ray actors (:mod:`pipeline.dump.ray_engine`) and written here as they finish.

The resolved config goes into the manifest's ``identity.run`` and, re-loadable with ``--config``,
beside a local cache as ``<out>.config.yaml`` (``<out>.config-w<i>.yaml`` per worker; :func:`config_path`);
the cache folder holds only what SPEC §1 lists.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cache_format import CacheIdentity
from pipeline.config import save_resolved_config
from pipeline.dump.config import DumpConfig, resolve_workers
from pipeline.dump.summary import build_summary
from pipeline.dump.tasks import (
    Example,
    RecipeConfig,
    RecipeResult,
    build_examples,
)
from pipeline.dump.units import (
    Sink,
    capture_label,
    check_distinct,
    check_given_backend,
    resolve_capture,
    sink_configs,
)
from pipeline.dump.units import compute_unit as compute_unit  # re-exported (ray_engine's actors call it)
from pipeline.dump.units import format_summary as format_summary  # re-exported for the CLI
from pipeline.dump.units import unit_seed as unit_seed  # re-exported
from pipeline.errors import ConfigError, DatasetError, ModelError
from pipeline.hf_io import first_line, load_config, load_tokenizer


def my_units(n_units: int, num_workers: int, worker_index: int) -> list[int]:
    """Units of worker ``worker_index``: j % num_workers == worker_index."""
    return list(range(worker_index, n_units, num_workers))


# ----------------------------------------------------------------------------- setup steps


@dataclass
class _Output:
    path: Path | str  # a local folder, or the URL of an object-store prefix
    mode: Literal["create", "overwrite", "resume", "shared"]
    previous: CacheIdentity | None  # the stored identity of the cache being resumed
    storage_options: dict[str, Any] | None = None

    @property
    def remote(self) -> bool:
        return isinstance(self.path, str)


def _setup_output(cfg: DumpConfig) -> _Output:
    """Create, overwrite or resume: decided (and refused) before any work; nothing is deleted here.

    Several workers (``--num-workers`` > 1) open the same --out in ``shared`` mode: the first creates
    the cache, the others join it; none deletes anything of another's.
    """
    from cache_format.storage import is_remote

    out = _setup_remote_output(cfg) if is_remote(cfg.out) else _setup_local_output(cfg)
    if (cfg.num_workers or 1) > 1:  # --overwrite is refused with several workers (DumpConfig)
        out.mode = "shared"
    return out


def _setup_local_output(cfg: DumpConfig) -> _Output:
    from cache_format.manifest import INCOMPLETE_MARKER, MANIFEST_NAME
    from pipeline.dump.output import foreign_entries, is_own_temp

    path = Path(cfg.out).expanduser()
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"--out {path} is a symbolic link to a missing target; remove it or give a real folder")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a folder; choose a folder path")
    entries = sorted(path.iterdir()) if path.is_dir() else []
    if not entries:
        return _Output(path, "create", None)
    names = [p.name for p in entries]
    if MANIFEST_NAME not in names and INCOMPLETE_MARKER not in names:
        if all(is_own_temp(p) for p in entries):
            # A dump stopped before its marker was in place: only kdpipe's temp files, no work to keep.
            return _Output(path, "overwrite", None)
        raise ConfigError(f"--out {path} is not empty and holds no kdpipe cache; choose an empty or new folder")
    if cfg.overwrite:
        foreign = foreign_entries(path)
        if foreign:
            raise ConfigError(f"--overwrite refused: --out {path} holds {foreign[0]!r}, which kdpipe did not write; "
                              "nothing was deleted — move it out of the cache folder or choose another --out")
        return _Output(path, "overwrite", None)
    return _Output(path, "resume", _stored_identity(str(path), None))


def _stored_identity(url: str, opts: dict[str, Any] | None) -> CacheIdentity:
    from cache_format import CacheError, read_identity

    try:
        stored = read_identity(url, opts)
    except CacheError as exc:
        raise ConfigError(
            f"--out {url} holds a cache this version cannot read ({first_line(exc)}); pass --overwrite to replace it"
        ) from None
    if stored is None:
        raise ConfigError(f"--out {url}: its cache vanished while being opened (another worker finalizing or "
                          "overwriting it?); rerun")
    return stored


def _setup_remote_output(cfg: DumpConfig) -> _Output:
    """--out s3://bucket/prefix: decided by listing the prefix (empty: create; a kdpipe cache: resume)."""
    from cache_format import CacheError
    from cache_format._cache_dir import is_writer_file
    from cache_format._target import open_target
    from cache_format.manifest import INCOMPLETE_MARKER, MANIFEST_NAME

    opts = cfg.storage_options()
    try:
        entries = open_target(cfg.out, opts).list_files()
    except CacheError as exc:
        raise ConfigError(f"--out {cfg.out}: {first_line(exc)}") from None
    foreign = sorted(n for n, size in entries.items() if size is None or not is_writer_file(n))
    if foreign:
        raise ConfigError(f"--out {cfg.out} holds {foreign[0]!r}, which kdpipe did not write; nothing was deleted — "
                          "choose an empty prefix (or move those objects away)")
    if not entries:
        return _Output(cfg.out, "create", None, opts)
    if cfg.overwrite or (MANIFEST_NAME not in entries and INCOMPLETE_MARKER not in entries):
        return _Output(cfg.out, "overwrite", None, opts)
    return _Output(cfg.out, "resume", _stored_identity(cfg.out, opts), opts)


def _setup_tokenizer(cfg: DumpConfig) -> Any:
    return load_tokenizer(cfg.tokenizer or cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                          what="--tokenizer" if cfg.tokenizer else "--teacher")


@dataclass
class _ModelInfo:
    vocab_size: int
    max_context: int | None
    num_labels: int
    id2label: dict[int, str]
    architecture: str | None


def _setup_model_info(cfg: DumpConfig) -> _ModelInfo:
    from pipeline.dump.teachers import check_teacher_path

    check_teacher_path(cfg.teacher)
    mc = load_config(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, what="--teacher")
    text_cfg = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    vocab = int(getattr(text_cfg, "vocab_size", 0) or 0)
    ctx = getattr(text_cfg, "max_position_embeddings", None)
    id2label = {int(k): str(v) for k, v in (getattr(mc, "id2label", None) or {}).items()}
    return _ModelInfo(vocab, int(ctx) if ctx else None, int(getattr(mc, "num_labels", 0) or 0), id2label,
                      (getattr(mc, "architectures", None) or [None])[0])


def _check_against_model(cfg: DumpConfig, info: _ModelInfo, tok: Any) -> int:
    """Validate k against the vocabulary; return the effective max length (cut to the model's context)."""
    if cfg.task != "classification" and cfg.encoding == "topk" and cfg.top_k > info.vocab_size:
        raise ConfigError(
            f"--top-k {cfg.top_k} is larger than teacher {cfg.teacher}'s vocabulary of {info.vocab_size}; lower --top-k"
        )
    if cfg.task != "classification" and len(tok) > info.vocab_size:
        raise ModelError(
            f"tokenizer has {len(tok)} tokens but teacher {cfg.teacher} has only {info.vocab_size} output ids; "
            "pass the teacher's own tokenizer (--tokenizer)"
        )
    # vLLM generates one token after every prompt, and that token must fit in the context too.
    context = info.max_context - 1 if info.max_context and cfg.backend == "vllm" else info.max_context
    if context and cfg.max_length > context:
        print(
            f"note: --max-length {cfg.max_length} is above the teacher's context of {context}; "
            f"rows are cut to {context} tokens (counted as truncated/split in the summary)",
            file=sys.stderr,
        )
        return context
    return cfg.max_length


# Recipe counts a unit contributes to the summary.
_COUNT_KEYS = ("truncated", "split_documents", "skipped")


def _recipe_config(cfg: DumpConfig, max_length: int) -> RecipeConfig:
    return RecipeConfig(
        task=cfg.task, max_length=max_length, text_field=cfg.text_field, label_field=cfg.label_field,
        response_field=cfg.response_field, fallback_field=cfg.fallback_field, template=cfg.template,
        chat_template=cfg.chat_template, pack=cfg.pack, teacher_generates=cfg.teacher_generates, bos=cfg.bos,
        stride=cfg.stride,
    )


@dataclass
class UnitPlan:
    """The dataset as work units: :meth:`rows_of` reads, tokenizes and packs one unit on demand."""

    source: Any  # pipeline.dump.sources.Source
    rcfg: RecipeConfig  # as given: build_examples checks and resolves it
    tok: Any
    label2id: dict[str, int] | None
    fields: list[str] = field(default_factory=list)  # columns of the first unit with rows
    stats: dict[int, dict[str, int]] = field(default_factory=dict)  # recipe counts per unit built, until taken
    kept: dict[int, list[Example]] = field(default_factory=dict)  # the probed unit's rows, handed out once

    @property
    def num_units(self) -> int:
        return int(self.source.num_units)

    def _build(self, u: int) -> list[Example] | None:
        """Unit ``u``'s rows; None when its slice of the source holds no row at all."""
        ds = self.source.read_unit(u)
        if ds.num_rows == 0:
            self.stats[u] = {}
            return None
        # A JSON-lines unit whose records all lack an optional field has no such column: None, as when
        # the whole file was one table.
        for name in self.fields:
            ds.columns.setdefault(name, [None] * ds.num_rows)
        if not self.fields:
            self.fields = list(ds.columns)
        result = build_examples(ds, self.tok, self.rcfg, self.label2id, allow_empty=True)
        self.stats[u] = {k: int(result.stats.get(k, 0)) for k in _COUNT_KEYS}
        return result.examples

    def rows_of(self, u: int) -> list[Example]:
        if u in self.kept:
            return self.kept.pop(u)
        return self._build(u) or []

    def probe(self, mine: list[int]) -> None:
        """Build this worker's first unit with rows now, so a missing field or a bad line fails before the
        teacher loads (its rows are kept for the loop); refuse a dataset that gives no row to distill.

        Only when none of ``mine`` has a row are the other units read, to tell an idle worker from an
        empty dataset."""
        others = sorted(set(range(self.num_units)) - set(mine))
        for u in [*mine, *others]:
            rows = self._build(u)
            if rows:
                if u in mine:
                    self.kept[u] = rows
                return
        raise DatasetError(f"dataset {self.source.source} gave no rows to distill; check --text-field and --limit")

    def take_stats(self, u: int, counts: dict[str, int]) -> None:
        for k, v in self.stats.pop(u, {}).items():
            counts[k] = counts.get(k, 0) + v


def _setup_examples(cfg: DumpConfig, tok: Any, info: _ModelInfo, max_length: int) -> tuple[Any, UnitPlan, RecipeConfig]:
    """(source, unit plan, resolved recipe): units are known, only the first unit with rows is read."""
    from pipeline.dump.sources import open_source

    src = open_source(cfg.dataset, config=cfg.dataset_config, split=cfg.split, limit=cfg.limit,
                      fmt=cfg.dataset_format, unit_bytes=cfg.unit_bytes, unit_rows=cfg.unit_rows)
    rcfg = _recipe_config(cfg, max_length)
    label2id = {v: k for k, v in info.id2label.items()} if info.id2label else None
    plan = UnitPlan(src, rcfg, tok, label2id)
    plan.probe(my_units(plan.num_units, cfg.num_workers, cfg.worker_index))
    return src, plan, rcfg.resolved()


def whole_dataset_examples(cfg: DumpConfig, tok: Any, info: _ModelInfo,
                           max_length: int) -> tuple[Any, RecipeResult, RecipeConfig]:
    """The whole dataset loaded and built as ONE stream with row-index sample ids (benchmarks, as eval does);
    the dump itself never does this (see :class:`UnitPlan`)."""
    from pipeline.dump.datasets import load_dataset_rows

    ds = load_dataset_rows(cfg.dataset, config=cfg.dataset_config, split=cfg.split, limit=cfg.limit,
                           fmt=cfg.dataset_format)
    rcfg = _recipe_config(cfg, max_length)
    label2id = {v: k for k, v in info.id2label.items()} if info.id2label else None
    result = build_examples(ds, tok, rcfg, label2id)
    if not result.examples:
        raise DatasetError(f"dataset {ds.source} gave no rows to distill; check --text-field and --limit")
    return ds, result, rcfg.resolved()


def _encoding(cfg: DumpConfig, info: _ModelInfo) -> Any:
    from cache_format import ClassLogitsEncoding, SampledEncoding, TopKEncoding

    if cfg.task == "classification":
        if info.num_labels < 1:
            raise ModelError(f"teacher {cfg.teacher} declares no labels (num_labels); --task classification needs a "
                             "sequence classifier")
        names = [info.id2label.get(i, str(i)) for i in range(info.num_labels)]
        return ClassLogitsEncoding(num_classes=info.num_labels, labels=names)
    # The capture temperature (default 1, the teacher's own distribution); the trainer rescales as it needs.
    if cfg.encoding == "sampled":
        return SampledEncoding(num_draws=cfg.num_draws, temperature=cfg.temperature)
    return TopKEncoding(k=cfg.top_k, temperature=cfg.temperature)


def local_weights_hash(folder: Path) -> str | None:
    """``teacher.revision`` of a local model folder (SPEC §2.2): a content hash of its weight and config files.

    A local path says nothing about which weights it held when the cache was made, so the
    identity records their content: resuming into (or training from) a cache made with other
    weights under the same path is then refused. Returns None for a folder without such files.
    """
    from pipeline.dump.fingerprints import weights_revision

    return weights_revision(folder)


def _teacher_identity(cfg: DumpConfig, info: _ModelInfo) -> dict[str, Any]:
    from pipeline.dump.teachers import package_version
    from pipeline.dump.teachers.vllm import vllm_version

    quant = "4bit" if cfg.load_in_4bit else "8bit" if cfg.load_in_8bit else None
    return {
        "name": cfg.teacher,
        "revision": cfg.revision or (local_weights_hash(Path(cfg.teacher)) if Path(cfg.teacher).is_dir() else None),
        "dtype": cfg.dtype,
        "backend": cfg.backend,
        "backend_version": vllm_version() if cfg.backend == "vllm" else package_version("transformers"),
        "quantization": quant,
        "architecture": info.architecture,
    }


def _setup_identity(cfg: DumpConfig, tok: Any, info: _ModelInfo, ds: Any, rcfg: RecipeConfig, max_length: int) -> Any:
    from cache_format.identity import tokenizer_fingerprint

    recipe = rcfg.identity(tok)
    recipe["max_length"] = max_length
    # Units fix which rows form a shard (and, for LM, where packing restarts): resuming or merging with
    # other values would mix two layouts, so they are compared like the recipe. The worker count is not
    # part of it: a 4-worker dump and an 8-worker resume of it hold the same rows.
    units = getattr(ds, "units_identity", None)
    recipe["units"] = units() if units is not None else {"rule": "rows", "unit_rows": cfg.unit_rows, "count": 1,
                                                         "row_key": "row index"}
    if cfg.task != "classification":
        recipe["max_new_tokens"] = cfg.max_new_tokens if cfg.teacher_generates else None
        recipe["seed"] = cfg.seed if cfg.encoding == "sampled" else None
    run = json.loads(cfg.model_dump_json())
    # Manifests are shared: storage option values (credentials, perhaps) stay out, their keys stay in.
    run["storage_option"] = [item.partition("=")[0] + "=..." for item in cfg.storage_option]
    return CacheIdentity(
        teacher=_teacher_identity(cfg, info),
        tokenizer={"name": cfg.tokenizer or cfg.teacher, "vocab_size": len(tok), "model_vocab_size": info.vocab_size,
                   "fingerprint": tokenizer_fingerprint(tok)},
        recipe=recipe,
        dataset=ds.identity(),
        encoding=_encoding(cfg, info),
        run=run,
    )


def _check_resume(cfg: DumpConfig, out: _Output, identity: Any) -> None:
    """Refuse to resume into a cache made with other settings, naming the first ones that differ; then
    re-check the finished units' shards and have the writer redo those missing or damaged."""
    from pipeline.dump.output import repair_units

    if out.mode != "resume" or out.previous is None:
        return
    stored = out.previous
    diffs = stored.diff(identity)
    if diffs:
        raise ConfigError(
            f"--out {out.path} holds a cache made with different settings (cache != this run): "
            + "; ".join(diffs[:5]) + " — rerun with the same settings to resume, pass --overwrite to replace it, "
            "or choose another --out"
        )
    if out.remote:
        return  # shard sizes are checked when the writer opens the prefix; hashing would download every shard
    n, w = cfg.num_workers or 1, cfg.worker_index or 0
    for problem in repair_units(Path(out.path), identity, lambda u: u % n == w):
        print(f"note: {problem}; its unit is dumped again", file=sys.stderr)


def _setup_backend(cfg: DumpConfig, tok: Any, max_length: int) -> Any:
    from pipeline.dump.teachers import TeacherSettings, make_backend

    if cfg.engine == "ray":  # one teacher per Ray actor; each actor calls back here with engine="local"
        from pipeline.dump.ray_engine import RayTeacherPool

        return RayTeacherPool(cfg, tok, max_length)
    settings = TeacherSettings(
        model=cfg.teacher, backend=cfg.backend, kind="classifier" if cfg.task == "classification" else "causal_lm",
        dtype=cfg.dtype, device=cfg.device, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation, load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
        batch_size=cfg.batch_size, max_length=max_length, max_logprobs=cfg.max_logprobs or cfg.top_k,
        tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager, seed=cfg.seed, temperature=cfg.temperature,
        vllm_capture=cfg.capture_path() or "logprobs",
        extra={"pad_token_id": tok.pad_token_id, "top_k": cfg.top_k},
    )
    return make_backend(settings)


# ----------------------------------------------------------------------------- the work loop


def _prefetched(todo: list[int], rows_of: Any) -> Iterator[tuple[int, list[Example]]]:
    """(unit, rows) of ``todo`` in order; the next unit is read and tokenized on a thread while the
    teacher runs this one (fast tokenizers release the GIL), so at most two units are in memory."""
    if not todo:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="kdpipe-units") as pool:
        nxt = pool.submit(rows_of, todo[0])
        for i, u in enumerate(todo):
            rows = nxt.result()
            if i + 1 < len(todo):
                nxt = pool.submit(rows_of, todo[i + 1])
            yield u, rows


def _unit_batches(cfg: DumpConfig, backend: Any, todo: list[int], rows_of: Any, tok: Any, max_length: int,
                  counts: dict[str, int]) -> Iterator[tuple[int, Any, int]]:
    """(unit, batches, tokens) of every unit in ``todo``: in order here, as they finish with ``--engine ray``."""
    if cfg.engine == "ray":
        yield from backend.unit_batches(todo, rows_of, counts)
        return
    # The teacher writing its own answers tokenizes them on this thread: no second thread on the tokenizer.
    pairs = ((u, rows_of(u)) for u in todo) if cfg.teacher_generates else _prefetched(todo, rows_of)
    for u, rows in pairs:
        yield u, *compute_unit(backend, rows, cfg, tok, max_length, counts, u)


def _progress(cfg: DumpConfig, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    # Units, not tokens: the token count of a unit is known only once it is read.
    return tqdm(total=total, initial=initial, unit="unit", desc="dump-teacher",
                file=sys.stderr, disable=not cfg.progress, smoothing=0.1)


def _run_units(cfg: DumpConfig, backend: Any, sinks: list[Sink], plan: UnitPlan, tok: Any,
               max_length: int, counts: dict[str, int]) -> dict[str, Any]:
    mine = my_units(plan.num_units, cfg.num_workers, cfg.worker_index)
    # A unit runs when any cache lacks it (a crash may fall between two caches' end_unit), and
    # its batches go only to the caches that lack it.
    todo = [u for u in mine if any(u not in s.done for s in sinks)]
    plan.kept = {u: r for u, r in plan.kept.items() if u in todo}  # the probed unit, if this run needs it
    bar = _progress(cfg, len(mine), len(mine) - len(todo))
    tokens = 0
    handoff_s = 0.0  # caller-side time in writer.write/end_unit: batch checks + queueing (incl. blocked)
    try:
        for u, batches, n_tokens in _unit_batches(cfg, backend, todo, plan.rows_of, tok, max_length, counts):
            plan.take_stats(u, counts)
            t0 = time.perf_counter()
            for sk, batch in zip(sinks, batches or [None] * len(sinks), strict=True):
                if u in sk.done:  # this cache has the unit already (its twin did not)
                    continue
                if batch is not None:
                    sk.writer.write(batch)
                sk.writer.end_unit(u)
            handoff_s += time.perf_counter() - t0
            tokens += n_tokens
            bar.update(1)
    finally:
        bar.close()
    return {"units_total": plan.num_units, "units_mine": len(mine), "units_resumed": len(mine) - len(todo),
            "units_done": len(todo), "tokens_this_run": tokens, "handoff_s": handoff_s}


def config_path(out: str | Path, worker_index: int | None = None) -> Path:
    """``<out>.config.yaml`` (one worker) or ``<out>.config-w<i>.yaml`` (worker i of several): the resolved config.

    Beside the cache folder, not inside it: SPEC §1 lists every file a cache folder holds. The
    manifest's ``identity.run`` records the same values; this file is the one ``kdpipe dump-teacher
    --config`` reruns from (it pins the worker index, so each worker has its own). A remote --out
    has no "beside": its config is not saved (the manifest's ``identity.run`` keeps it; rerun the
    same command line to resume).
    """
    folder = Path(out).expanduser().resolve()
    suffix = ".config.yaml" if worker_index is None else f".config-w{worker_index}.yaml"
    return folder.with_name(folder.name + suffix)


def _save_config(cfg: DumpConfig, out: _Output) -> None:
    if out.remote:
        return
    # Saved without --overwrite: rerunning from this file must resume, never wipe the cache.
    path = config_path(out.path, cfg.worker_index if (cfg.num_workers or 1) > 1 else None)
    save_resolved_config(cfg.model_copy(update={"overwrite": False}), path.parent, name=path.name)


def _setup_outputs(configs: list[tuple[DumpConfig, str]]) -> list[_Output]:
    outs = []
    for c, flag in configs:
        try:
            outs.append(_setup_output(c))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("--out ", f"{flag} ", 1)) from None
    check_distinct([Path(str(o.path)) for o in outs])
    return outs


def _finish(sk: Sink) -> tuple[dict[str, Any], bool]:
    """Commit this worker's units, then finalize the cache if every unit is there ("the last worker finalizes").

    Returns (the manifest, or the totals so far when other workers' units are missing; finalized?).
    """
    from cache_format.errors import MissingUnitsError
    from cache_format.finalize import finalize_cache

    sk.writer.commit()
    try:
        return finalize_cache(str(sk.out.path), sk.out.storage_options), True
    except MissingUnitsError as exc:
        print("note: this worker's units are done, but other workers' are not yet, so the cache is not finalized: "
              "the last worker to finish finalizes it (or, if a worker failed: rerun it, then `kdpipe cache "
              f"finalize`). {exc}", file=sys.stderr)
        return {"totals": exc.totals}, False


def run_dump(cfg: DumpConfig, backend: Any = None) -> dict[str, Any]:
    """Run the dump described by ``cfg``; returns the summary (also printed by the CLI).

    ``backend``: an already loaded teacher (``pipeline.dump.teachers.make_backend``) to reuse across
    dumps, e.g. one vLLM engine for several caches; it must match ``cfg`` and is not closed here.
    With ``--out-sampled`` one teacher pass per unit feeds two writers; the summary is the
    ``--out`` cache's, with the other cache's under ``also_written``.
    """
    from cache_format import CacheWriter

    t_start = time.perf_counter()
    cfg = resolve_workers(resolve_capture(cfg))
    configs = sink_configs(cfg)
    outs = _setup_outputs(configs)
    info = _setup_model_info(cfg)
    tok = _setup_tokenizer(cfg)
    max_length = _check_against_model(cfg, info, tok)
    ds, plan, rcfg = _setup_examples(cfg, tok, info, max_length)
    sinks = [Sink(c, out, _setup_identity(c, tok, info, ds, rcfg, max_length), flag)
             for (c, flag), out in zip(configs, outs, strict=True)]
    for sk in sinks:
        _check_resume(sk.cfg, sk.out, sk.identity)
    own_backend = backend is None
    if own_backend:
        backend = _setup_backend(cfg, tok, max_length)
    elif cfg.engine == "ray":
        raise ConfigError("--engine ray loads one teacher in each Ray actor; pass no backend to run_dump")
    else:
        check_given_backend(cfg, backend)
    backend.timing = type(backend.timing)()  # this dump's time only
    counts = dict.fromkeys(_COUNT_KEYS, 0)  # this run's units only; each adds its recipe counts when done
    writer_kwargs = {k: v for k, v in (("max_shard_rows", cfg.max_shard_rows),
                                        ("max_shard_bytes", cfg.max_shard_bytes)) if v is not None}
    setup_s = time.perf_counter() - t_start
    try:
        t0 = time.perf_counter()
        with ExitStack() as stack:
            for sk in sinks:
                sk.writer = stack.enter_context(CacheWriter(str(sk.out.path), sk.identity, mode=sk.out.mode,
                                                            storage_options=sk.out.storage_options,
                                                            **writer_kwargs))
                sk.done = frozenset(sk.writer.completed_units)
                _save_config(sk.cfg, sk.out)
            loop = _run_units(cfg, backend, sinks, plan, tok, max_length, counts)
            t_fin = time.perf_counter()
            # The commit waits for the last unit's encode+write: the only part not overlapped.
            finished = [_finish(sk) for sk in sinks]
            loop["finalize_s"] = time.perf_counter() - t_fin
            stats = [dict(sk.writer.stats) for sk in sinks]
        wall = time.perf_counter() - t0
    finally:
        if own_backend:
            backend.close()
    timing = backend.timing.as_dict()
    summaries = [{**build_summary(m, loop, timing, st, wall, setup_s, counts, sk.out.path), "finalized": done}
                 for (m, done), st, sk in zip(finished, stats, sinks, strict=True)]
    return {**summaries[0], "capture": capture_label(cfg), "also_written": summaries[1:]}
