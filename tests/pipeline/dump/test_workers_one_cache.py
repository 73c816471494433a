"""Many workers, one cache: dump-teacher workers (separate processes) write disjoint units into one --out
(a folder or an S3 prefix on a moto server), the last one finalizes; kill -9 of a worker loses no unit and
writes none twice. Also the worker index/count defaults from torchrun and SLURM variables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cache_format import copy_cache, open_cache, verify_cache
from cache_format.errors import MissingUnitsError
from cache_format.finalize import finalize_cache
from cache_format.manifest import MANIFEST_NAME, UNIT_MARKER_RE
from helpers.moto_s3 import CREDENTIALS, list_keys, moto_available, moto_server
from helpers.subproc import kill_when
from pipeline.dump.config import DumpConfig, resolve_workers
from pipeline.dump.run import run_dump
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]

# ----------------------------------------------------------------------------- env defaults


def _cfg(**kw: Any) -> DumpConfig:
    return DumpConfig.model_validate({"teacher": "t", "dataset": "d", "out": "o", **kw})


@pytest.mark.parametrize(("env", "want"), [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, (1, 4)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),
    # torchrun inside a SLURM allocation: torchrun's variables win.
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "6"}, (0, 2)),
])
def test_worker_defaults_from_the_launcher(env: dict[str, str], want: tuple[int, int],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = resolve_workers(_cfg(device="cpu"), env)
    assert (cfg.worker_index, cfg.num_workers) == want
    assert ("note: worker" in capsys.readouterr().err) == bool(env)


def test_explicit_flags_win_over_the_environment() -> None:
    cfg = resolve_workers(_cfg(worker_index=1, num_workers=3), {"RANK": "7", "WORLD_SIZE": "8"})
    assert (cfg.worker_index, cfg.num_workers) == (1, 3)
    cfg = resolve_workers(_cfg(num_workers=4), {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "8"})
    assert (cfg.worker_index, cfg.num_workers) == (2, 4)


@pytest.mark.parametrize(("env", "match"), [
    ({"RANK": "1"}, r"\$RANK is set but \$WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, r"\$WORLD_SIZE is set but \$RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"\$RANK/\$WORLD_SIZE .*worker 2 of 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"\$RANK='x' is not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"}, r"SLURM_ARRAY_TASK_ID.*worker 9 of 4"),
])
def test_inconsistent_launcher_variables_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_workers(_cfg(), env)


def test_overwrite_with_several_workers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--overwrite with several workers"):
        _cfg(overwrite=True, num_workers=2)
    with pytest.raises(ConfigError, match=r"--overwrite with several workers"):
        resolve_workers(_cfg(overwrite=True), {"RANK": "0", "WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------- workers in processes


def _args(model: Path, data: Path, out: str, extra: list[str]) -> list[str]:
    # Many small units (one shard each) so a kill lands between the first and the last one.
    return ["--teacher", str(model), "--dataset", str(data), "--out", out, "--top-k", "8", "--max-length",
            "16", "--unit-rows", "2", "--unit-bytes", "96", "--batch-size", "2", "--device", "cpu", "--no-progress",
            *extra]


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "dump-teacher", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen[bytes], what: str) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed: {err.decode()[-3000:]}"
    return err.decode()


class _Place:
    """--out as a local folder or an S3 prefix: its URL, extra flags, options, and what it holds."""

    def __init__(self, url: str, flags: list[str], opts: dict[str, Any] | None, keys: Callable[[], list[str]]) -> None:
        self.url, self.flags, self.opts, self.names = url, flags, opts, keys

    def markers(self) -> list[int]:
        return sorted(int(m.group(1)) for k in self.names() if (m := UNIT_MARKER_RE.fullmatch(k)))

    def local_copy(self, dest: Path) -> Path:
        if self.opts is None:
            return Path(self.url)
        copy_cache(self.url, str(dest), src_storage_options=self.opts)
        return dest


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Place]:
    if request.param == "local":
        out = tmp_path / "shared"
        yield _Place(str(out), [], None, lambda: sorted(p.name for p in out.iterdir()) if out.is_dir() else [])
        return
    if not moto_available():
        pytest.skip("moto[server] and s3fs are needed (the dev extra)")
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with moto_server() as (_, endpoint):
        yield _Place("s3://caches/shared", ["--endpoint-url", endpoint], {"endpoint_url": endpoint},
                     lambda: list_keys(endpoint, "caches", "shared"))


@pytest.fixture
def text_data(tmp_path: Path, tiny_texts: list[str]) -> Path:
    data = tmp_path / "text.txt"
    data.write_text("\n".join(tiny_texts) + "\n")
    return data


@pytest.fixture
def whole(tiny_lm_dir: Path, text_data: Path, tmp_path: Path) -> Path:
    """The one-worker dump every multi-worker result must equal.

    Run in a process of its own with the workers' environment: in the test process, libraries
    loaded earlier in the session (vLLM's CPU build) change torch's matmul settings, which moves
    a few log-probs by one quantization step and would fail a byte-for-byte comparison.
    """
    out = tmp_path / "whole"
    _wait(_spawn(_args(tiny_lm_dir, text_data, str(out), []), _env()), "the one-worker reference dump")
    return out


class _one_torch_thread:
    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(self.before)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
           and not k.startswith("SLURM_")}
    return {**env, **CREDENTIALS, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_workers_write_one_cache_equal_to_one_worker(place: _Place, tiny_lm_dir: Path, text_data: Path,
                                                         whole: Path, tmp_path: Path, same_content: Any) -> None:
    env = _env()
    # The index and count come from torchrun's variables, as `torchrun --nproc-per-node 2 -m pipeline.cli` sets them.
    procs = [_spawn(_args(tiny_lm_dir, text_data, place.url, place.flags), {**env, "RANK": str(i), "WORLD_SIZE": "2"})
             for i in range(2)]
    logs = [_wait(p, f"worker {i}") for i, p in enumerate(procs)]
    assert all("note: worker" in log and "$RANK/$WORLD_SIZE (torchrun)" in log for log in logs)
    assert MANIFEST_NAME in place.names() and not place.markers()
    assert verify_cache(place.url, place.opts)["ok"]
    same_content(place.local_copy(tmp_path / "down"), whole)
    assert finalize_cache(place.url, place.opts) == open_cache(place.url, place.opts).manifest.raw  # idempotent


@pytest.mark.slow
def test_kill_minus_9_of_one_worker_then_rerun_it(place: _Place, tiny_lm_dir: Path, text_data: Path, whole: Path,
                                                  tmp_path: Path, same_content: Any) -> None:
    env = _env()
    args = [_args(tiny_lm_dir, text_data, place.url, [*place.flags, "--num-workers", "2", "--worker-index", str(i)])
            for i in range(2)]
    kill_when(_spawn(args[1], env), lambda: len([u for u in place.markers() if u % 2 == 1]) >= 3, "worker 1",
              poll_s=0.01)
    log = _wait(_spawn(args[0], env), "worker 0")
    assert "the cache is not finalized" in log and "worker 1" in log
    assert MANIFEST_NAME not in place.names()
    with pytest.raises(MissingUnitsError, match=r"units are not complete yet: unit \d+ \(worker 1\).*rerun those workers.*kdpipe cache finalize"):
        finalize_cache(place.url, place.opts)
    log = _wait(_spawn(args[1], env), "worker 1, rerun")  # resumes its own units, then finalizes
    assert "not finalized" not in log, log[-3000:]
    m = open_cache(place.url, place.opts).manifest
    assert m.units == list(range(len(m.units))) and len({s.name for s in m.shards}) == len(m.shards)
    assert verify_cache(place.url, place.opts)["ok"]
    same_content(place.local_copy(tmp_path / "down"), whole)


def test_cache_finalize_command_names_missing_units_then_finalizes(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from cache_format import CacheWriter
    from helpers.cache import identity, topk_batch
    from pipeline.cli import main

    ident = identity(run={"num_workers": 2, "worker_index": 0})
    ident = dataclasses.replace(ident, recipe={**ident.recipe, "units": {"unit_rows": 1, "count": 4}})
    out = tmp_path / "c"

    def worker(i: int) -> None:
        with CacheWriter(out, dataclasses.replace(ident, run={"num_workers": 2, "worker_index": i}),
                         mode="shared") as w:
            for u in range(i, 4, 2):
                w.write(topk_batch([f"u{u}"], seed=u))
                w.end_unit(u)
            w.commit()

    worker(0)
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "finalize", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "2 of 4 units are not complete yet: unit 1 (worker 1), 3 (worker 1)" in err
    worker(1)
    with pytest.raises(SystemExit, match="0"):
        main(["cache", "finalize", str(out), "--verify"])
    assert "finalized" in capsys.readouterr().out
    m = open_cache(str(out)).manifest
    assert m.units == [0, 1, 2, 3] and "worker_index" not in m.identity.run
    with pytest.raises(SystemExit, match="0"):
        main(["cache", "finalize", str(out)])  # a finished cache: nothing changes
    assert open_cache(str(out)).manifest.raw == m.raw


def test_resume_of_a_cache_started_by_the_previous_version(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path,
                                                          same_content: Any) -> None:
    """A journal (.kdpipe-progress.jsonl) instead of unit markers: its units are kept, the rest done, then finalized."""
    import json

    from cache_format.manifest import INCOMPLETE_MARKER, PROGRESS_JOURNAL, dumps_marker

    def cfg(out: Path) -> DumpConfig:
        return DumpConfig.model_validate({"teacher": str(tiny_lm_dir), "dataset": str(data_dir / "wiki.txt"),
                                          "top_k": 8, "max_length": 16, "unit_rows": 4, "unit_bytes": 256,
                                          "device": "cpu",
                                          "progress": False, "out": str(out)})

    whole, old = tmp_path / "whole", tmp_path / "old"
    with _one_torch_thread():
        run_dump(cfg(whole))
    m = open_cache(str(whole)).manifest
    assert len(m.units) >= 4
    old.mkdir()
    done = m.units[: len(m.units) // 2]
    lines = []
    for s in m.shards:
        if s.unit in done:
            (old / s.name).write_bytes((whole / s.name).read_bytes())
    for u in done:
        lines.append(json.dumps({"unit": u, "shards": [s.to_dict() for s in m.shards if s.unit == u]}))
    (old / PROGRESS_JOURNAL).write_text("\n".join(lines) + "\n")
    (old / INCOMPLETE_MARKER).write_bytes(dumps_marker(m.identity, m.created_at))
    with _one_torch_thread():
        s = run_dump(cfg(old))
    assert s["units_resumed"] == len(done) and s["finalized"]
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in whole.iterdir())
    same_content(old, whole)


def test_storage_options_from_flags() -> None:
    from pipeline.dump.config import parse_storage_options

    cfg = _cfg(out="s3://b/p", endpoint_url="http://minio:9000",
               storage_option=["anon=false", "config_kwargs.read_timeout=60", "client_kwargs.region_name=eu-1"])
    assert cfg.storage_options() == {"anon": False, "config_kwargs": {"read_timeout": 60},
                                     "client_kwargs": {"region_name": "eu-1"}, "endpoint_url": "http://minio:9000"}
    assert _cfg().storage_options() is None
    for bad in (["novalue"], ["=x"], ["a..b=1"], ["a=1", "a.b=2"]):
        with pytest.raises(ValueError, match=r"--storage-option"):
            parse_storage_options(bad)
