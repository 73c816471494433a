"""``dump-teacher --engine ray`` on a local Ray (2 CPUs, two HF actors, the tiny teacher): the same
cache as one process, a killed actor's unit rerun on a new actor, the retry budget, and the errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cache_format import open_cache, verify_cache
from pipeline.dump import ray_engine
from pipeline.dump.run import DumpConfig, run_dump
from pipeline.errors import ConfigError, KdpipeError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        if os.environ.get("KDPIPE_REQUIRE_RAY") == "1":
            pytest.fail("KDPIPE_REQUIRE_RAY=1 but the ray package cannot be imported; install the ray extra")
        pytest.skip("ray is not installed (pip install 'kdpipe[ray]'; CI sets KDPIPE_REQUIRE_RAY=1)")
    return ray


def _cfg(model: Path, data: Path, out: Path, **kw: Any) -> DumpConfig:
    base: dict[str, Any] = {"teacher": str(model), "dataset": str(data), "out": str(out), "top_k": 8,
                            "max_length": 32, "unit_rows": 4, "unit_bytes": 256, "batch_size": 4, "device": "cpu",
                            "progress": False}
    return DumpConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray = _require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # One CPU per actor, as the engine asks; actors get OMP_NUM_THREADS=1, like torch_one_thread here.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_process(tiny_lm_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    out = tmp_path_factory.mktemp("ray_ref") / "local"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out))
    finally:
        torch.set_num_threads(before)
    return out


def _units(cache: Path) -> list[int]:
    return list(open_cache(str(cache)).manifest.units)


@pytest.mark.slow  # a local Ray and two actors loading torch: ~30-60 s on a busy 2-core box
def test_ray_dump_equals_one_process(local_ray: Any, one_process: Path, tiny_lm_dir: Path, data_dir: Path,
                                     tmp_path: Path, same_content: Any) -> None:
    out = tmp_path / "ray"
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, engine="ray", ray_actors=2))
    assert s["units_done"] == s["units_total"] > 2 and s["teacher_s"] > 0
    assert verify_cache(str(out))["ok"]
    same_content(one_process, out)
    assert _units(out) == _units(one_process) == list(range(s["units_total"]))
    assert local_ray.is_initialized()  # the caller's Ray is left running


@pytest.mark.slow  # a local Ray and two actors loading torch: ~30-60 s on a busy 2-core box
def test_killed_actor_unit_is_rerun(local_ray: Any, one_process: Path, tiny_lm_dir: Path, data_dir: Path,
                                    tmp_path: Path, same_content: Any, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "crashed"
    monkeypatch.setattr(ray_engine, "CRASH_ONCE_MARKER", str(marker))
    out = tmp_path / "ray"
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, engine="ray", ray_actors=2))
    assert marker.exists()  # an actor computed a unit and died before returning it
    assert "rerunning the unit on a new actor (retry 1 of 3)" in capsys.readouterr().err
    # Every unit exactly once: the manifest lists each unit once, verify checks rows and sample ids.
    assert _units(out) == list(range(s["units_total"])) and s["units_done"] == s["units_total"]
    assert verify_cache(str(out))["ok"]
    same_content(one_process, out)


def test_retry_budget_names_the_unit(capsys: pytest.CaptureFixture[str]) -> None:
    """The budget logic alone (no Ray): each actor death costs the unit one retry, then a clear error."""
    replaced: list[int] = []

    class FakeRay:
        def kill(self, actor: Any, no_restart: bool = True) -> None:
            raise RuntimeError("already dead")  # a dead actor cannot be killed again; that is fine

    class FakeCls:
        def remote(self, *args: Any) -> str:
            replaced.append(len(replaced))
            return f"actor{len(replaced)}"

    pool = object.__new__(ray_engine.RayTeacherPool)
    pool.ray, pool._cls, pool._args, pool._actors = FakeRay(), FakeCls(), (), ["actor0", "other"]
    pool._retries, pool.retried_units = 2, 0
    attempts: dict[int, int] = {}
    for _ in range(2):
        pool._replace(0, 7, RuntimeError("The actor died unexpectedly.\nmore"), attempts)
    assert pool._actors == ["actor2", "other"] and pool.retried_units == 2
    assert "unit 7 died (The actor died unexpectedly.); rerunning the unit on a new actor (retry 2 of 2)" \
        in capsys.readouterr().err
    with pytest.raises(ray_engine.RayEngineError, match=r"unit 7 was lost 3 times .*--ray-unit-retries 2 allows "
                                                        r"no more.*rerun the same command"):
        pool._replace(0, 7, RuntimeError("died"), attempts)


def test_actor_plan() -> None:
    cfg = DumpConfig(teacher="t", dataset="d", out="o", engine="ray")
    assert ray_engine.actor_plan({"CPU": 8.0}, cfg) == (8, 1.0, 0.0)
    assert ray_engine.actor_plan({"CPU": 8.0, "GPU": 4.0}, cfg) == (4, 1.0, 1.0)
    assert ray_engine.actor_plan({"CPU": 8.0, "GPU": 4.0}, cfg.model_copy(update={"device": "cpu"}))[2] == 0.0
    vllm = cfg.model_copy(update={"backend": "vllm", "tensor_parallel_size": 2})
    assert ray_engine.actor_plan({"CPU": 8.0, "GPU": 4.0}, vllm) == (2, 1.0, 2.0)
    with pytest.raises(ConfigError, match="--ray-gpus-per-actor"):
        ray_engine.actor_plan({"CPU": 8.0, "GPU": 1.0}, cfg.model_copy(update={"ray_actors": 2}))
    with pytest.raises(ConfigError, match="--ray-cpus-per-actor"):
        ray_engine.actor_plan({"CPU": 2.0}, cfg.model_copy(update={"ray_cpus_per_actor": 4.0}))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="--ray-address applies to --engine ray only"):
        DumpConfig(teacher="t", dataset="d", out="o", ray_address="auto")
    with pytest.raises(ValueError, match="Ray gives each actor its own GPUs"):
        DumpConfig(teacher="t", dataset="d", out="o", engine="ray", device="cuda:1")


def test_an_address_where_nothing_listens_fails_fast() -> None:
    import socket

    with socket.socket() as sock:  # a free port, closed again: connecting is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"--ray-address {address}: nothing answers at 127.0.0.1:{port}"):
            ray_engine._check_reachable(address)
    ray_engine._check_reachable("auto")  # left to Ray


def test_without_ray_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'kdpipe\[ray\]'"):
        ray_engine.import_ray()


def test_a_given_backend_is_refused(hf_teacher: Any, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KdpipeError, match="--engine ray loads one teacher in each Ray actor"):
        run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", tmp_path / "c", engine="ray"), backend=hf_teacher)
