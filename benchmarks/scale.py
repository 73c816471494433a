"""How stage 1's input side scales with the corpus: time to first shard and peak memory at 1×, 10×, 40×.

A real dump (``python -m pipeline.cli dump-teacher``, nothing else of kdpipe's API) runs in a fresh
subprocess per measurement over wikitext-2 ``test`` repeated 1×, 10× and 40×. The teacher has
SmolLM2's real tokenizer (vocab 49,152) and a tiny random Llama body (hidden 64, 2 layers), so the
teacher is not the bottleneck and what grows with the corpus is the input pipeline (read, tokenize,
pack) and what it keeps in memory. Reported per scale, the 1× corpus being the baseline of the
same run (scales are interleaved within every repeat, so machine-load drifts hit all alike):

- **TTFS**: time to first shard, from process start until the first ``shard-*.arrow`` appears in
  ``--out`` (polled every 50 ms); then the dump is stopped (SIGTERM, then SIGKILL): no need to dump
  the whole 40× corpus. The writer publishes a shard when a work unit ends, so units are made small
  (``--unit-rows`` on main, ``--unit-bytes`` where the CLI has it) and so are shards (``--max-shard-rows``).
  No ``--limit``: on main it cuts the rows read and tokenized, which would hide exactly the growth measured.
- **peak RSS**: the dump process's ``VmHWM`` (Linux ``/proc/<pid>/status``) at its first shard, raw and
  *net* of a baseline child that imports the pipeline and loads the same teacher and tokenizer with
  transformers but reads no data ("beyond the loaded teacher").
- **input pipeline**: read + tokenize + pack alone (no teacher) over the 1× corpus, in tokens per
  wall second and per CPU second of this process (all threads: the fast tokenizer batches on every
  core), median of ``--repeats``. Tokens are target positions (each corpus token once). Which API
  it calls is :func:`_input_pipeline_tokens`, the one place to adapt.

Targets (issue 11): net peak RSS at 40× ≤ 1.2× that at 1×; TTFS at 40× ≤ 1.5× that at 1×; input
pipeline ≥ 200k tokens/s per core. Medians of ``--repeats`` runs; ratios are medians of per-repeat
ratios. Printed as a markdown table, no assertions. Usage::

    .venv/bin/python -m benchmarks.scale                      # 3 repeats, scales 1,10,40
    .venv/bin/python -m benchmarks.scale --quick              # 1 repeat, scales 1,10
    .venv/bin/python -m benchmarks.scale --json docs/results/scale.json

Built once and reused: the teacher under ``--teacher-dir`` (from SmolLM2's tokenizer in ``--smollm2``,
which ``../shared/models/smollm2.py`` builds when missing) and the repeated corpora under ``--scratch``.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
# The brief's defaults on the project machines; every one is a flag.
DEFAULT_SMOLLM2 = Path(os.environ.get("KDPIPE_SMOLLM2", "/work/models/smollm2"))
DEFAULT_TEACHER_DIR = Path("/work/scratch/scale-teacher")
DEFAULT_SCRATCH = Path("/work/scratch/scale")
VOCAB_SIZE = 49152  # SmolLM2's vocabulary: the real tokenizer's ids must all be valid teacher outputs
POLL_S = 0.05  # shard polling period: 50 ms resolution on TTFS values of seconds
# The targets of issue 11, as ratios to the 1× corpus (and tokens per CPU second).
TARGET_TTFS_RATIO = 1.5
TARGET_RSS_RATIO = 1.2
TARGET_TOKENS_PER_CORE_S = 200_000
# The dump's settings (issue 11): top-k 8 and a tiny body keep the teacher cheap; 256-token windows
# and batches of 16 are a realistic CPU input shape.
DUMP_FLAGS = ["--task", "lm", "--encoding", "topk", "--top-k", "8", "--max-length", "256", "--batch-size", "16",
              "--backend", "hf", "--device", "cpu", "--no-progress", "--dataset-format", "text"]
MAX_LENGTH = 256


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None, help="runs per scale (default 3; --quick 1)")
    p.add_argument("--scales", default=None, help="corpus repetitions, comma-separated (default 1,10,40; --quick "
                                                  "1,10); the first is the baseline of the ratios")
    p.add_argument("--quick", action="store_true", help="1 repeat, scales 1,10 (unless given)")
    p.add_argument("--json", type=Path, default=None, help="also write every run and the table to this JSON file")
    p.add_argument("--smollm2", type=Path, default=DEFAULT_SMOLLM2,
                   help="SmolLM2 folder whose tokenizer the teacher uses (built by ../shared/models/smollm2.py "
                        "when missing)")
    p.add_argument("--teacher-dir", type=Path, default=DEFAULT_TEACHER_DIR, help="where the tiny teacher is built once")
    p.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH, help="repeated corpora (kept) and dump folders "
                                                                         "(removed after each run)")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "wikitext-2" / "test.txt",
                   help="the 1× corpus: a text file, one document a line (default wikitext-2 test)")
    p.add_argument("--unit-rows", type=int, default=64,
                   help="rows per work unit where the CLI counts units in rows (main): 64 windows = one shard")
    p.add_argument("--unit-bytes", type=int, default=64 * 1024,
                   help="source bytes per unit where the CLI has --unit-bytes: 64 KiB ≈ 16k tokens ≈ 64 windows")
    p.add_argument("--max-shard-rows", type=int, default=64, help="rows per shard, so the writer publishes early")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a dump may take to its first shard")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    scales = args.scales or ("1,10" if args.quick else "1,10,40")
    try:
        args.scales = [int(s) for s in scales.split(",") if s.strip()]
    except ValueError:
        p.error(f"--scales takes comma-separated integers, got {scales!r}")
    if not args.scales or min(args.scales) < 1 or args.repeats < 1:
        p.error("--scales needs positive integers and --repeats at least 1")
    return args


# ----------------------------------------------------------------------------- setup: teacher and corpora


def _setup_smollm2(folder: Path) -> None:
    """Build SmolLM2 with the shared script when missing: into a temporary folder, renamed when complete,
    so a concurrent or interrupted build never leaves a half-written model where others look."""
    if (folder / "tokenizer.json").is_file():
        return
    script = SHARED_DATA.parent / "models" / "smollm2.py"
    if not script.is_file():
        raise SystemExit(f"{folder} holds no SmolLM2 and {script} is missing; build it with "
                         f"../shared/models/smollm2.py {folder} or pass --smollm2")
    tmp = folder.with_name(f".{folder.name}-build-{os.getpid()}")
    print(f"building {folder} with {script} (a few minutes) ...", file=sys.stderr)
    subprocess.run([sys.executable, str(script), str(tmp)], check=True)
    if not (folder / "tokenizer.json").is_file():
        tmp.replace(folder)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _setup_teacher(folder: Path, smollm2: Path) -> Path:
    """SmolLM2's tokenizer + a random tiny LlamaForCausalLM (hidden 64, 2 layers, 2 heads), built once."""
    if (folder / "done.json").is_file():
        return folder
    _setup_smollm2(smollm2)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    if len(tok) > VOCAB_SIZE:
        raise SystemExit(f"{smollm2}'s tokenizer has {len(tok)} tokens, more than SmolLM2's {VOCAB_SIZE}; "
                         "pass --smollm2 a SmolLM2 folder")
    torch.manual_seed(0)  # the same random body on every build
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "done.json").write_text(json.dumps({"tokenizer_from": str(smollm2), "vocab_size": VOCAB_SIZE}) + "\n")
    return folder


def _setup_corpus(data: Path, scale: int, scratch: Path) -> Path:
    """``data`` repeated ``scale`` times (kept under ``scratch``: written once, reused by later runs)."""
    if not data.is_file():
        raise SystemExit(f"{data} not found (--data); the benchmark needs wikitext-2 test from ../shared/data")
    out = scratch / "corpus" / f"{data.stem}-x{scale}{data.suffix}"
    blob = data.read_bytes()
    if not blob.endswith(b"\n"):
        blob += b"\n"  # so copy i+1 starts on its own line
    if out.is_file() and out.stat().st_size == len(blob) * scale:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as fh:
        for _ in range(scale):
            fh.write(blob)
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------- the dump subprocesses


def _child_env() -> dict[str, str]:
    # This checkout's packages first, whatever is installed editable elsewhere.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cli_flags() -> set[str]:
    """The flags ``dump-teacher --help`` lists, so one script drives main and the streaming version."""
    env = {**_child_env(), "COLUMNS": "300"}  # wide help: no flag name wrapped over two lines
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "dump-teacher", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return {w.strip(",.;:()[]|") for w in out.split() if w.startswith("--")}


def _unit_flags(args: argparse.Namespace, flags: set[str]) -> list[str]:
    if "--unit-bytes" in flags:
        return ["--unit-bytes", str(args.unit_bytes)]
    return ["--unit-rows", str(args.unit_rows)]


def _vm_kb(pid: int, key: str) -> int | None:
    """``VmHWM`` / ``VmRSS`` of a live process in kB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _has_shard(out: Path) -> bool:
    # Final names only: the writer renames a shard to shard-*.arrow once it is complete (temporaries start with ".tmp-").
    try:
        return any(e.name.startswith("shard-") and e.name.endswith(".arrow") for e in os.scandir(out))
    except FileNotFoundError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _dump_once(args: argparse.Namespace, teacher: Path, corpus: Path, unit_flags: list[str], tag: str) -> dict[str, Any]:
    """One dump in a fresh process, stopped at its first shard: TTFS and VmHWM then."""
    out = args.scratch / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(tag + ".log")
    cmd = [sys.executable, "-m", "pipeline.cli", "dump-teacher", "--teacher", str(teacher), "--dataset", str(corpus),
           "--out", str(out), *DUMP_FLAGS, *unit_flags, "--max-shard-rows", str(args.max_shard_rows)]
    hwm = 0
    with log.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            while True:
                now = time.perf_counter() - t0
                seen = _vm_kb(proc.pid, "VmHWM")
                hwm = max(hwm, seen or 0)
                if _has_shard(out):
                    ttfs = time.perf_counter() - t0
                    hwm = max(hwm, _vm_kb(proc.pid, "VmHWM") or 0)
                    break
                if proc.poll() is not None or now > args.timeout:
                    ttfs = None
                    break
                time.sleep(POLL_S)
        finally:
            _stop(proc)
    if ttfs is None:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        why = f"no shard after {args.timeout:.0f} s (--timeout)" if now > args.timeout else f"exit {proc.returncode}"
        raise SystemExit(f"dump {tag} wrote no shard ({why}); command: {' '.join(cmd)}\n" + "\n".join(tail))
    shutil.rmtree(out, ignore_errors=True)
    out.with_name(out.name + ".config.yaml").unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    return {"ttfs_s": ttfs, "peak_rss_mb": hwm / 1024}


_BASELINE_CODE = """
import json, sys
import pipeline.cli, pipeline.dump.run  # what the dump process imports before it loads anything
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with open("/proc/self/status") as fh:
    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in fh if ln.startswith(("VmHWM", "VmRSS"))}
print(json.dumps(kb))
"""


def _baseline_once(teacher: Path) -> dict[str, float]:
    """Peak RSS (MB) and wall time of a process that imports the pipeline and loads the teacher and
    tokenizer, no data: the memory every dump holds anyway, and the start-up floor under every TTFS."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _BASELINE_CODE, str(teacher)], cwd=REPO, env=_child_env(),
                         capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"baseline child failed:\n{out.stderr[-2000:]}")
    return {"peak_rss_mb": json.loads(out.stdout.strip().splitlines()[-1])["VmHWM"] / 1024, "wall_s": wall}


# ----------------------------------------------------------------------------- the input pipeline alone


def _input_pipeline_tokens(corpus: Path, tokenizer: Any, args: argparse.Namespace) -> tuple[int, int, str]:
    """ADAPTER — read + tokenize + pack the whole ``corpus`` as ``dump-teacher --task lm`` does, no teacher.

    Returns (target tokens, rows, which API). Switch here when stage 1's input API changes:
    ``pipeline.dump.sources`` (streaming: units read one at a time) when it exists, else main's
    ``load_dataset_rows`` + ``build_examples`` (the whole corpus at once). If the streaming guess
    in :func:`_tokens_via_sources` no longer fits the module, it says so and falls back.
    """
    try:
        from pipeline.dump import sources  # type: ignore[attr-defined]
    except ImportError:
        sources = None
    if sources is not None and hasattr(sources, "open_source"):
        try:
            return (*_tokens_via_sources(sources, corpus, tokenizer, args), "pipeline.dump.sources")
        except TypeError as exc:
            print(f"note: pipeline.dump.sources.open_source did not take the guessed arguments ({exc}); adapt "
                  "benchmarks/scale.py::_tokens_via_sources — measuring load_dataset_rows + build_examples",
                  file=sys.stderr)
    return (*_tokens_via_whole_load(corpus, tokenizer), "load_dataset_rows + build_examples")


def _lm_recipe() -> Any:
    from pipeline.dump.tasks import RecipeConfig

    return RecipeConfig(task="lm", max_length=MAX_LENGTH)


def _tokens_via_whole_load(corpus: Path, tokenizer: Any) -> tuple[int, int]:
    """Main's stage 1: every row into memory, then the recipe over all of them."""
    from pipeline.dump.datasets import load_dataset_rows
    from pipeline.dump.tasks import build_examples

    ds = load_dataset_rows(str(corpus), fmt="text")
    examples = build_examples(ds, tokenizer, _lm_recipe()).examples
    return sum(len(e.positions) for e in examples), len(examples)


def _tokens_via_sources(sources: Any, corpus: Path, tokenizer: Any, args: argparse.Namespace) -> tuple[int, int]:
    """The streaming stage 1 (issue 11): ``open_source(...)`` -> ``num_units`` / ``read_unit(u)``, the recipe per unit.

    ``open_source``'s parameters are matched by name against the dump's settings (a DumpConfig for a
    ``cfg`` parameter); ``read_unit`` may return the unit's dataset or a tuple starting with it.
    """
    from pipeline.dump.tasks import build_examples

    settings: dict[str, Any] = {
        "name": str(corpus), "dataset": str(corpus), "path": str(corpus), "source": str(corpus),
        "config": None, "dataset_config": None, "split": "train", "fmt": "text", "dataset_format": "text",
        "limit": None, "unit_bytes": args.unit_bytes, "unit_rows": args.unit_rows,
    }
    params = inspect.signature(sources.open_source).parameters
    if "cfg" in params:
        from pipeline.dump.config import DumpConfig

        kwargs: dict[str, Any] = {"cfg": DumpConfig(teacher=str(args.teacher_dir), out=str(args.scratch / "unused"),
                                                    dataset=str(corpus), dataset_format="text",
                                                    unit_bytes=args.unit_bytes, unit_rows=args.unit_rows)}
    else:
        kwargs = {k: settings[k] for k in params if k in settings}
    src = sources.open_source(**kwargs)
    recipe = _lm_recipe()
    # A unit may hold only blank lines: the dump skips it (build_examples(allow_empty=True) where it exists).
    extra = {"allow_empty": True} if "allow_empty" in inspect.signature(build_examples).parameters else {}
    tokens = rows = 0
    for u in range(src.num_units):
        unit = src.read_unit(u)
        unit = unit[0] if isinstance(unit, tuple) else unit
        if unit.num_rows == 0:
            continue
        examples = build_examples(unit, tokenizer, recipe, **extra).examples
        tokens += sum(len(e.positions) for e in examples)
        rows += len(examples)
    return tokens, rows


def _measure_input_pipeline(corpus: Path, teacher: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    _input_pipeline_tokens(corpus, tok, args)  # warm-up: imports, first-call allocations, page cache
    runs = []
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        tokens, rows, api = _input_pipeline_tokens(corpus, tok, args)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        runs.append({"tokens": tokens, "rows": rows, "wall_s": wall, "cpu_s": cpu,
                     "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu})
    return {"api": api, "fast_tokenizer": bool(getattr(tok, "is_fast", False)), "tokens": runs[0]["tokens"],
            "rows": runs[0]["rows"], "runs": runs,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in runs)}


# ----------------------------------------------------------------------------- report


def _summarise(runs: dict[int, list[dict[str, Any]]], baseline_mb: float, corpora: dict[int, Path],
               tokens_1x: int, scales: list[int]) -> list[dict[str, Any]]:
    base = scales[0]
    table = []
    for s in scales:
        rs = runs[s]
        net = [r["peak_rss_mb"] - baseline_mb for r in rs]
        ttfs_ratio = statistics.median(r["ttfs_s"] / b["ttfs_s"] for r, b in zip(rs, runs[base], strict=True))
        rss_ratio = statistics.median((r["peak_rss_mb"] - baseline_mb) / (b["peak_rss_mb"] - baseline_mb)
                                      for r, b in zip(rs, runs[base], strict=True))
        row: dict[str, Any] = {
            "scale": f"{s}×", "corpus MB": corpora[s].stat().st_size / 1e6, "tokens": tokens_1x * s,
            "TTFS s": statistics.median(r["ttfs_s"] for r in rs), "TTFS ×1×": ttfs_ratio,
            "peak RSS MB": statistics.median(r["peak_rss_mb"] for r in rs), "net RSS MB": statistics.median(net),
            "net RSS ×1×": rss_ratio,
        }
        if s == base:
            row["target"], row["met?"] = "baseline", ""
        else:
            row["target"] = f"TTFS ≤ {TARGET_TTFS_RATIO}×, net RSS ≤ {TARGET_RSS_RATIO}×"
            ok_t, ok_r = ttfs_ratio <= TARGET_TTFS_RATIO, rss_ratio <= TARGET_RSS_RATIO
            row["met?"] = f"TTFS {'yes' if ok_t else 'no'}, RSS {'yes' if ok_r else 'no'}"
        table.append(row)
    return table


def _format_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _input_line(ip: dict[str, Any]) -> str:
    met = "yes" if ip["tokens_per_cpu_s"] >= TARGET_TOKENS_PER_CORE_S else "no"
    return (f"input pipeline (read + tokenize + pack, no teacher; {ip['api']}; "
            f"{'fast' if ip['fast_tokenizer'] else 'slow'} tokenizer), 1× corpus, {ip['tokens']:,} tokens: "
            f"{ip['tokens_per_s'] / 1e3:.0f}k tokens/s wall, {ip['tokens_per_cpu_s'] / 1e3:.0f}k tokens per "
            f"CPU second (per core; target ≥ {TARGET_TOKENS_PER_CORE_S // 1000}k: {met})")


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    teacher = _setup_teacher(args.teacher_dir, args.smollm2)
    corpora = {s: _setup_corpus(args.data, s, args.scratch) for s in args.scales}
    flags = _cli_flags()
    unit_flags = _unit_flags(args, flags)
    ip = _measure_input_pipeline(_setup_corpus(args.data, 1, args.scratch), teacher, args)
    tokens_1x = ip["tokens"]
    baseline = [_baseline_once(teacher) for _ in range(args.repeats)]
    baseline_mb = statistics.median(b["peak_rss_mb"] for b in baseline)
    startup_s = statistics.median(b["wall_s"] for b in baseline)
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in args.scales}
    for rep in range(args.repeats):  # scales interleaved: a slow spell on the machine hits every scale
        for s in args.scales:
            r = _dump_once(args, teacher, corpora[s], unit_flags, f"x{s}-r{rep}")
            print(f"  repeat {rep + 1}/{args.repeats}, {s}×: TTFS {r['ttfs_s']:.2f} s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            runs[s].append(r)
    table = _summarise(runs, baseline_mb, corpora, tokens_1x, args.scales)
    text = _format_table(table)
    print(f"dump-teacher over {args.data.name} repeated {', '.join(f'{s}×' for s in args.scales)}; teacher: "
          f"SmolLM2 tokenizer + random 2-layer body ({teacher}); {' '.join(unit_flags)}, --max-shard-rows "
          f"{args.max_shard_rows}; median of {args.repeats}; tokens ≈ scale × the 1× corpus's {tokens_1x:,}; "
          f"net RSS = peak − {baseline_mb:.0f} MB (pipeline imported, teacher + tokenizer loaded, no data; such "
          f"a process takes {startup_s:.1f} s, the floor under every TTFS)")
    print(text)
    print(_input_line(ip))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "unit_flags": unit_flags,
            "baseline": baseline, "baseline_mb": baseline_mb, "startup_s": startup_s, "runs": {str(s): r for s, r in runs.items()}, "table": table,
            "input_pipeline": ip,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
