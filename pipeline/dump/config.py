"""The one validated configuration of `kdpipe dump-teacher` (YAML keys = flag names without dashes)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel, cli_flags
from pipeline.dump.datasets import DatasetFormat
from pipeline.dump.lm import BosPolicy
from pipeline.dump.tasks import Task


class DumpConfig(StrictModel):
    """Everything ``kdpipe dump-teacher`` needs; recorded in the manifest's ``identity.run`` and saved beside the cache as ``<out>.config.yaml``."""

    # What to run
    teacher: str = Field(description="Teacher: HF model folder or hub name.")
    tokenizer: str | None = Field(None, description="Tokenizer; default: the teacher's own, the one it was "
                                                    "trained with.")
    revision: str | None = Field(None, description="Teacher revision (hub branch/tag/commit); default: the "
                                                   "default branch, or the folder as it is.")
    backend: Literal["hf", "vllm"] = Field("hf", description="Teacher engine; hf runs everywhere (CPU too) "
                                                              "without extra packages.")
    task: Task = Field("lm", description="Task recipe; lm is the plain KD case.")
    out: str = Field(description="Cache folder or URL (s3://bucket/prefix, gs://..., any fsspec URL) to write "
                                 "(or resume); several workers may write one --out.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint of --out (MinIO, moto, Ceph); "
                                                       "default: AWS's.")
    storage_option: list[str] = Field(default_factory=list, description="fsspec option of --out as KEY=VALUE "
                                      "(repeatable; VALUE parsed as JSON when it can be, dotted keys nest: "
                                      "config_kwargs.read_timeout=60); default: none.")
    out_sampled: str | None = Field(None, description="Also write a sampled cache (--num-draws, --seed) into this "
                                                      "folder from the same teacher pass as the top-k cache in --out; "
                                                      "default: none. Each folder is a normal cache, equal to what a "
                                                      "dump of that encoding alone writes.")

    # Data
    dataset: str = Field(description="Local file/folder or hub dataset name.")
    dataset_config: str | None = Field(None, description="Hub dataset config; most datasets have a single one.")
    split: str = Field("train", description="Dataset split; train, because distillation data is the training "
                                            "split.")
    dataset_format: DatasetFormat = Field("auto", description="Dataset file format; auto tells it by suffix or "
                                                              "content.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows; default: the whole split.")
    text_field: str | None = Field(None, description="Text / document / question field; default: the task's "
                                                     "(text, sentence, info.post, question).")
    label_field: str | None = Field(None, description="Gold label field (classification); default: label.")
    response_field: str | None = Field(None, description="Summary / answer field; default: summary.text "
                                                         "(summarization), answer (reasoning).")
    fallback_field: str | None = Field(None, description="Used when --text-field is empty; default: info.article "
                                                         "for summarization (news rows have no post).")
    template: str | None = Field(None, description="Prompt template with {text}; default: the task's template.")
    chat_template: bool = Field(False, description="Wrap prompts in the tokenizer's chat template; off because "
                                                   "base models have none.")
    pack: bool = Field(True, description="LM: pack documents, separated by EOS, into full windows (no compute spent "
                                         "on padding; attention crosses document boundaries inside a window); "
                                         "--no-pack: one document per row.")
    bos: BosPolicy = Field("auto", description="BOS at the start of every LM window (a context slot, never a "
                                               "target) and of prompt/classification rows: auto follows the "
                                               "tokenizer (add_bos_token, or tokenizer('x') starts with BOS), "
                                               "because a teacher trained with BOS predicts worse without it; "
                                               "always (error if the tokenizer has none); never.")
    stride: int | None = Field(None, ge=1, description="LM: new tokens (targets) per window, 1..max-length - 1; "
                                                       "the rest of the row is the tokens just before them, so "
                                                       "every target after the first window sees at least "
                                                       "max-length - stride tokens of context (BOS included). "
                                                       "Default: 3/4 of --max-length (1.33x the teacher's forward work "
                                                       "per target, ~+0.2% bytes per position): on SmolLM2-135M, "
                                                       "wikitext-2, 256-token windows, it cut the mean teacher NLL "
                                                       "by 9.6% (7/8: 6.3% at 1.12x; 1/2: 11% at 1.93x), and "
                                                       "that of window-start tokens from 7.4 to 3.7 nats "
                                                       "(benchmarks/context.py).")
    max_length: int = Field(512, ge=2, description="Tokens per row; 512 fits small teachers' context (cut to the "
                                                   "model's if larger).")

    # Teacher output
    encoding: Literal["topk", "sampled"] = Field("topk", description="Cache encoding; topk (exact top-k + tail) "
                                                                     "has the smallest KL error per byte.")
    top_k: int = Field(64, ge=1, description="k of the top-k encoding; 64 is the design's operating point "
                                             "(<=100 B/token).")
    num_draws: int = Field(32, ge=1, le=255, description="Draws per position (sampled); 32 keeps few unique ids "
                                                         "per position, so sampled caches stay small.")
    temperature: float = Field(1.0, description="Capture temperature: log-probs and draws come from "
                                                "softmax(logits / T), recorded in the cache's encoding; 1 = the "
                                                "teacher's own distribution (students rescale as they need).")
    teacher_generates: bool = Field(False, json_schema_extra=cli_flags("--teacher-generates/--reference-answers"),
                                    description="Reasoning/summarization: the teacher writes the answers "
                                                "(sequence-level KD, opt-in); default: reference answers.")
    max_new_tokens: int = Field(256, ge=1, description="Answer length with --teacher-generates; 256 fits a GSM8K "
                                                       "solution comfortably.")

    # Engine
    batch_size: int = Field(8, ge=1, description="Rows per forward pass (hf); 8 is CPU-friendly, raise it on "
                                                 "GPUs.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Teacher dtype; float32 gives exact log-probs (use bfloat16 on GPU).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps (hf); auto = CUDA when visible, "
                                            "else CPU.")
    attn_implementation: str | None = Field(None, description="sdpa | eager | flash_attention_2 (hf); default: "
                                                              "transformers' (sdpa).")
    load_in_4bit: bool = Field(False, json_schema_extra=cli_flags("--load-in-4bit"),
                               description="bitsandbytes 4-bit (hf, CUDA).")
    load_in_8bit: bool = Field(False, json_schema_extra=cli_flags("--load-in-8bit"),
                               description="bitsandbytes 8-bit (hf, CUDA).")
    trust_remote_code: bool = Field(False, json_schema_extra=cli_flags("--trust-remote-code"),
                                    description="Run the model repo's code; off: never unless asked.")
    max_logprobs: int | None = Field(None, ge=1, description="vLLM max_logprobs; default: exactly --top-k.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM GPUs per teacher; one unless asked.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM GPU memory share; 0.9 is vLLM's "
                                                                       "own default.")
    enforce_eager: bool | None = Field(None, description="vLLM eager mode; default: eager on CPU (graph "
                                                         "compilation costs ~40 s there), graphs on GPU.")
    vllm_capture: Literal["auto", "logprobs", "hidden"] = Field(
        "auto", description="How vLLM hands out the teacher's distribution: logprobs = prompt log-probs (top-k "
                            "only, temperature 1, can --teacher-generates); hidden = last hidden states + the "
                            "teacher's own head applied by kdpipe (every encoding, --out-sampled, any "
                            "--temperature; classifiers always use it); auto = logprobs where it can, else hidden.")
    seed: int = Field(0, description="Seed of the sampled encoding; draws are seeded from (seed, unit), any "
                                     "fixed value works.")

    # Work split and output
    num_workers: int | None = Field(None, ge=1, description="Workers splitting the dataset; default: "
                                    "$WORLD_SIZE (torchrun), else $SLURM_ARRAY_TASK_COUNT, else $SLURM_NTASKS, "
                                    "else 1.")
    worker_index: int | None = Field(None, ge=0, description="This worker, 0-based; default: $RANK (torchrun), "
                                     "else $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else $SLURM_PROCID, "
                                     "else 0.")
    unit_rows: int = Field(256, ge=1, description="Source rows per work unit (resume granule) of row sources: "
                                                  "Parquet, CSV, datasets folders, hub datasets; 256 is ~1 min of "
                                                  "CPU work, so a crash loses little.")
    # 512 KiB of English text is ~130k tokens: a few seconds of a GPU teacher, so memory stays a few
    # units and a crash redoes little, yet long enough that packing's restart at a unit boundary
    # (one short window, a few hundred targets with less context) costs under 1%.
    unit_bytes: int = Field(512 * 1024, ge=1, description="Bytes per work unit of line files (.txt, JSON lines, "
                                                          "SST-2): a unit holds the lines starting in its byte "
                                                          "range; 512 KiB is ~130k tokens, a few seconds of a GPU "
                                                          "teacher.")
    overwrite: bool = Field(False, json_schema_extra=cli_flags("--overwrite"),
                            description="Replace a cache already in --out; off: never delete a cache unless asked.")
    max_shard_rows: int | None = Field(None, ge=1, description="Rows per shard at most; default: the writer's.")
    max_shard_bytes: int | None = Field(None, ge=1, description="Raw bytes buffered per shard; default: the "
                                                                "writer's.")
    progress: bool = Field(True, description="Progress bar (tokens/s, ETA) on stderr; on, because a dump "
                                             "takes long.")

    # Ray engine (pip install 'kdpipe[ray]')
    engine: Literal["local", "ray"] = Field(
        "local", description="Where the teacher runs: local = in this process; ray = a pool of Ray actors, one "
                             "teacher each, fed units by this process, which writes the one cache.")
    ray_address: str | None = Field(None, description="Ray cluster to join (--engine ray): auto, host:port or "
                                                      "ray://host:10001; default: $RAY_ADDRESS, else a new local "
                                                      "Ray on this machine.")
    ray_actors: int | None = Field(None, ge=1, description="Teacher actors (--engine ray); default: as many as the "
                                                           "cluster's GPUs (or, without GPUs, CPUs) hold.")
    ray_gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor; default: "
                                                                     "--tensor-parallel-size (vllm) or 1 when the "
                                                                     "cluster has GPUs and --device is not cpu, "
                                                                     "else 0.")
    ray_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor (its torch threads); 1 suits GPU "
                                                             "actors, raise it on CPU-only clusters.")
    ray_unit_retries: int = Field(3, ge=0, description="Reruns of a unit on a fresh actor after its actor died "
                                                       "(crash, OOM kill, lost node); then the dump stops naming "
                                                       "the unit.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"must be a positive finite number (1 = the teacher's own distribution), got {v!r}")
        return v

    def capture_path(self) -> Literal["logprobs", "hidden"] | None:
        """The vLLM capture this dump uses (``auto`` resolved); None for --backend hf."""
        if self.backend != "vllm":
            return None
        if self.vllm_capture != "auto":
            return self.vllm_capture
        # Prompt log-probs give top-k at temperature 1 only, and vLLM classifiers are pooling models.
        one_topk = self.encoding == "topk" and self.out_sampled is None and self.temperature == 1.0
        return "logprobs" if one_topk and self.task != "classification" else "hidden"

    def _check_capture(self) -> None:
        if self.backend != "vllm":
            if self.vllm_capture != "auto":
                raise ValueError(f"--vllm-capture {self.vllm_capture} is for --backend vllm; drop it")
            return
        if self.vllm_capture == "logprobs":
            what = ("--task classification" if self.task == "classification" else "--encoding sampled"
                    if self.encoding == "sampled" else "--out-sampled" if self.out_sampled is not None
                    else "--temperature other than 1" if self.temperature != 1.0 else None)
            if what is not None:
                raise ValueError(f"{what} needs the full distribution, which --vllm-capture logprobs (top-k "
                                 "prompt log-probs at temperature 1) cannot give; use --vllm-capture hidden or auto")
        if self.teacher_generates and self.capture_path() == "hidden":
            raise ValueError("--teacher-generates with --backend vllm needs --vllm-capture logprobs (one top-k cache "
                             "at temperature 1): the pooling runner behind hidden-state capture cannot generate; "
                             "use --backend hf for this combination")

    def _check_outputs(self) -> None:
        if self.out_sampled is None:
            return
        if self.task == "classification" or self.encoding != "topk":
            raise ValueError("--out-sampled adds a sampled cache beside a top-k one: it needs --encoding topk and "
                             "a task other than classification")
        if self.out_sampled.rstrip("/") == self.out.rstrip("/"):
            raise ValueError("--out-sampled must be another folder than --out (each holds one cache)")

    @model_validator(mode="after")
    def _check_combinations(self) -> DumpConfig:
        # inf passes a gt=0 bound (a temperature option, say) and would reach the teacher as a number.
        bad = next((name for name, value in self if isinstance(value, float) and not math.isfinite(value)), None)
        if bad is not None:
            raise ValueError(f"--{bad.replace('_', '-')} must be a finite number, got {getattr(self, bad)}")
        if self.worker_index is not None and self.num_workers is not None and self.worker_index >= self.num_workers:
            raise ValueError(
                f"--worker-index {self.worker_index} must be below --num-workers {self.num_workers} (0-based)"
            )
        if self.overwrite and (self.num_workers or 1) > 1:
            raise ValueError("--overwrite with several workers would let one worker delete the others' work; "
                             "delete the old cache first (or choose a new --out), then start the workers "
                             "without --overwrite")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
        if self.task == "classification" and self.temperature != 1.0:
            raise ValueError("--temperature applies to token distributions; class logits are stored as produced "
                             "(drop --temperature, or rescale when training)")
        self._check_outputs()
        self._check_capture()
        if self.task == "classification" and self.encoding == "sampled":
            raise ValueError("--encoding sampled does not apply to --task classification (it stores class logits)")
        if self.max_logprobs is not None and self.encoding == "topk" and self.task != "classification" \
                and self.top_k > self.max_logprobs:
            raise ValueError(f"--top-k {self.top_k} is larger than --max-logprobs {self.max_logprobs}; "
                             "raise --max-logprobs or lower --top-k")
        return self

    @model_validator(mode="after")
    def _check_ray(self) -> DumpConfig:
        if self.engine != "ray":
            given = [f for f in ("ray_address", "ray_actors", "ray_gpus_per_actor") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} applies to --engine ray only; add --engine ray")
        elif re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"--device {self.device} cannot be used with --engine ray: Ray gives each actor its "
                             "own GPUs; use --device auto or cuda")
        return self



    def storage_options(self) -> dict[str, Any] | None:
        """fsspec options of --out from --endpoint-url and --storage-option (None: none given)."""
        opts = parse_storage_options(self.storage_option)
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        return opts or None

    @field_validator("storage_option")
    @classmethod
    def _check_storage_option(cls, v: list[str]) -> list[str]:
        parse_storage_options(v)
        return v


def parse_storage_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as fsspec options: VALUE read as JSON when it parses (``true``, ``5``), dotted keys nest."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--storage-option {item!r} must look like KEY=VALUE (e.g. anon=true, "
                             "config_kwargs.read_timeout=60)")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, last = key.split(".")
        node = opts
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--storage-option {item!r}: {part} is already set to a value, not options")
            node = child
        node[last] = value
    return opts


# Where a worker's index and count come from when the flags are not given: (index var, count var, launcher).
_WORKER_ENV = (("RANK", "WORLD_SIZE", "torchrun"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM array"),
               ("SLURM_PROCID", "SLURM_NTASKS", "SLURM tasks"))


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"${name}={env[name]!r} is not an integer") from None


def workers_from_env(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(worker index, worker count, where from) taken from a launcher's variables; None when none is set."""
    for index_var, count_var, launcher in _WORKER_ENV:
        if index_var not in env and count_var not in env:
            continue
        if index_var not in env or count_var not in env:
            have, lack = (index_var, count_var) if index_var in env else (count_var, index_var)
            raise ValueError(f"${have} is set but ${lack} is not; set both (or pass --worker-index and "
                             "--num-workers)")
        index, count = _env_int(env, index_var), _env_int(env, count_var)
        where = f"${index_var}/${count_var} ({launcher})"
        if index_var == "SLURM_ARRAY_TASK_ID":
            low = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            index -= low
            where = f"$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN/$SLURM_ARRAY_TASK_COUNT ({launcher})"
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"{where} give worker {index} of {count}; the index must be in 0..count-1 — "
                             "check the launcher (e.g. #SBATCH --array=0-N) or pass --worker-index and --num-workers")
        return index, count, where
    return None


def resolve_workers(cfg: DumpConfig, env: Mapping[str, str] | None = None) -> DumpConfig:
    """``--worker-index``/``--num-workers`` made concrete: the flags, else the launcher's variables, else 0/1."""
    from pipeline.errors import ConfigError

    if cfg.worker_index is not None and cfg.num_workers is not None:
        return cfg
    env = os.environ if env is None else env  # a given mapping (tests) is only read; os.environ may be set
    try:
        found = workers_from_env(env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    index, count, where = found if found is not None else (0, 1, None)
    index = cfg.worker_index if cfg.worker_index is not None else index
    count = cfg.num_workers if cfg.num_workers is not None else count
    if index >= count:
        raise ConfigError(f"worker {index} of {count} (from --worker-index/--num-workers and {where or 'defaults'}): "
                          "the index must be below the count")
    if where is not None:
        print(f"note: worker {index} of {count}, from {where}", file=sys.stderr)
    if cfg.overwrite and count > 1:
        raise ConfigError("--overwrite with several workers would let one worker delete the others' work; delete the "
                          "old cache first (or choose a new --out), then start the workers without --overwrite")
    update: dict[str, Any] = {"worker_index": index, "num_workers": count}
    if "LOCAL_RANK" in env and cfg.device == "auto" and cfg.backend == "hf" and cfg.engine == "local":
        # torchrun starts one process per GPU of a node: each takes its own, not all of them cuda:0.
        import torch

        if torch.cuda.is_available():
            update["device"] = f"cuda:{_env_int(env, 'LOCAL_RANK') % torch.cuda.device_count()}"
    if "LOCAL_RANK" in env and cfg.backend == "vllm" and "CUDA_VISIBLE_DEVICES" not in env and env is os.environ:
        # vLLM takes the first visible GPUs: show each torchrun process its own --tensor-parallel-size of them.
        first = _env_int(env, "LOCAL_RANK") * cfg.tensor_parallel_size
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(cfg.tensor_parallel_size))
    return cfg.model_copy(update=update)
