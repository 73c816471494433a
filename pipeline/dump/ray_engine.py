"""``dump-teacher --engine ray``: a dump's units computed by a pool of Ray actors, written by this process.

The driver (the ``kdpipe dump-teacher`` process) keeps everything that defines the cache: the
examples, the unit split (``--unit-rows``, ``--num-workers``/``--worker-index``), resume, the
one ``CacheWriter`` and the progress bar. Each actor holds one teacher (HF or vLLM, loaded by
the same ``_setup_backend`` as a local dump) and turns a unit's rows into the writer batch with
the local loop's own ``compute_unit``, so a Ray dump holds the same rows as a local one. Units
finish in any order; the writer takes them so (a unit's shards are named by the unit and the
manifest lists them sorted).

Failures: an actor that dies (process crash, OOM kill, lost node) is replaced and its unit is
rerun on the new actor, at most ``--ray-unit-retries`` times per unit. An exception raised by
the teacher code itself is not retried (it would fail again): it stops the dump naming the unit.
Only the driver writes, and only results of finished tasks, so every unit is written once; an
interrupted Ray dump resumes like a local one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.dump.config import DumpConfig
from pipeline.dump.teachers.base import Timing
from pipeline.errors import ConfigError, KdpipeError
from pipeline.hf_io import first_line

INSTALL_HINT = "--engine ray needs the ray package: pip install 'kdpipe[ray]'"

# Tests only: a file path. The first actor to finish computing a unit creates the file and exits
# its process before returning the result, i.e. dies mid-unit, once per dump.
CRASH_ONCE_MARKER: str | None = None


class RayEngineError(KdpipeError):
    """A unit could not be computed on the Ray actors."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({first_line(exc)})") from None
    return ray


def connect(ray: Any, cfg: DumpConfig) -> bool:
    """Join ``--ray-address`` (or ``$RAY_ADDRESS``) or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False  # the caller's own Ray (a notebook, a test): used as it is and left running
    # Ray reports usage statistics over the network unless told not to; a dump never reaches out unasked.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    _check_reachable(address)
    try:
        # log_to_driver off: the actors' model-loading chatter would break the progress bar; their
        # errors reach the driver with the failed task.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except Exception as exc:  # Ray raises ConnectionError, ValueError, RuntimeError... for a bad address
        where = "a local Ray" if address == "local" else f"Ray at --ray-address {address}"
        raise ConfigError(f"cannot start {where}: {first_line(exc)}; check the address (auto, host:port or "
                          "ray://host:10001) and that the cluster is up") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds on a host:port where nothing listens; Ray itself retries for ~15 minutes."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)/?", address)
    if m is None:  # "local", "auto" and other forms Ray resolves itself
        return
    host, port = m.group(1), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                          "start the cluster (ray start --head) or fix the address") from None


def actor_plan(cluster: dict[str, float], cfg: DumpConfig) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for a cluster with ``cluster`` resources (``ray.cluster_resources()``)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    per_gpu = cfg.ray_gpus_per_actor
    if per_gpu is None:
        per_gpu = float(cfg.tensor_parallel_size if cfg.backend == "vllm" else 1) if gpus and cfg.device != "cpu" \
            else 0.0
    per_cpu = cfg.ray_cpus_per_actor
    n = cfg.ray_actors or max(1, int(gpus // per_gpu) if per_gpu else int(cpus // per_cpu))
    for what, per, have in (("CPUs", per_cpu, cpus), ("GPUs", per_gpu, gpus)):
        if n * per > have:
            flag = "--ray-cpus-per-actor" if what == "CPUs" else "--ray-gpus-per-actor"
            # Ray would wait for the resources forever; say so instead of hanging.
            raise ConfigError(f"{n} Ray actors x {per:g} {what} ({flag}) need {n * per:g} {what}, but the Ray "
                              f"cluster has {have:g}; lower --ray-actors or {flag}, or add nodes")
    return n, per_cpu, per_gpu


@dataclass
class UnitResult:
    """What an actor sends back for one unit: the writer batch and this unit's counters."""

    batch: Any
    tokens: int
    counts: dict[str, int]
    teacher_s: float
    convert_s: float


class TeacherActor:
    """One teacher in a Ray actor process (``ray.remote`` is applied by :class:`RayTeacherPool`)."""

    def __init__(self, cfg: DumpConfig, tok: Any, max_length: int, crash_marker: str | None) -> None:
        from pipeline.dump.run import _setup_backend

        self.cfg, self.tok, self.max_length, self.crash_marker = cfg, tok, max_length, crash_marker
        self.error: Exception | None = None
        try:
            self.backend = _setup_backend(cfg, tok, max_length)
        except Exception as exc:  # kept for ready()/run_unit: a task error carries the exception itself back
            self.error = exc

    def ready(self) -> str:
        if self.error is not None:
            raise self.error
        return str(self.backend.name)

    def run_unit(self, unit: int, rows: list[Any]) -> UnitResult:
        from pipeline.dump.run import compute_unit

        if self.error is not None:
            raise self.error
        counts = {"truncated": 0, "skipped": 0}
        t = self.backend.timing
        before = (t.teacher_s, t.convert_s)
        batch, tokens = compute_unit(self.backend, rows, self.cfg, self.tok, self.max_length, counts, unit)
        if self.crash_marker is not None:
            _crash_once(self.crash_marker)
        return UnitResult(batch, tokens, counts, t.teacher_s - before[0], t.convert_s - before[1])


def _crash_once(marker: str) -> None:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class RayTeacherPool:
    """The teachers of an ``--engine ray`` dump; stands in for the backend in ``run_dump``.

    ``timing`` holds the teacher time per actor (the sum over actors / their number), so the
    summary's teacher share stays a fraction of the wall time.
    """

    def __init__(self, cfg: DumpConfig, tok: Any, max_length: int) -> None:
        self.ray = import_ray()
        self.name = cfg.backend
        self.timing = Timing()
        self.retried_units = 0
        self._retries = cfg.ray_unit_retries
        self._actors: list[Any] = []
        self._started = connect(self.ray, cfg)
        try:
            n, per_cpu, per_gpu = actor_plan(self.ray.cluster_resources(), cfg)
            self._cls = self.ray.remote(TeacherActor).options(num_cpus=per_cpu, num_gpus=per_gpu, max_restarts=0)
            # Actors build their backend with engine=local; the tokenizer is shipped once, not per actor.
            self._args = (cfg.model_copy(update={"engine": "local"}), self.ray.put(tok), max_length,
                          CRASH_ONCE_MARKER)
            self._actors = [self._cls.remote(*self._args) for _ in range(n)]
            # Wait for every teacher now: a load error stops the dump before the cache is opened.
            self._get_all([a.ready.remote() for a in self._actors])
        except BaseException:
            self.close()
            raise

    def _get_all(self, refs: list[Any]) -> list[Any]:
        ex = self.ray.exceptions
        try:
            return self.ray.get(refs)
        except ex.RayTaskError as exc:
            raise _task_error("loading the teacher", exc) from exc
        except ex.RayActorError as exc:
            raise RayEngineError(f"a Ray actor died while loading the teacher: {first_line(exc)}; see the Ray "
                                 "logs (often out of memory: raise --ray-cpus-per-actor or lower --ray-actors)"
                                 ) from None

    def _crash_errors(self) -> tuple[type[BaseException], ...]:
        ex = self.ray.exceptions
        return (ex.RayActorError, ex.WorkerCrashedError, ex.NodeDiedError, ex.ObjectLostError,
                ex.LocalRayletDiedError)

    def unit_batches(self, todo: list[int], rows_of: Callable[[int], list[Any]],
                     counts: dict[str, int]) -> Iterator[tuple[int, Any, int]]:
        """(unit, writer batch or None, tokens) of every unit in ``todo``, as they finish."""
        queue = deque(todo)
        idle = list(range(len(self._actors)))
        running: dict[Any, tuple[int, int]] = {}  # result ref -> (unit, actor slot)
        attempts: dict[int, int] = {}
        crashes = self._crash_errors()
        teacher_sum = convert_sum = 0.0

        def fill() -> None:
            while queue and idle:
                slot, u = idle.pop(), queue.popleft()
                running[self._actors[slot].run_unit.remote(u, rows_of(u))] = (u, slot)

        while queue or running:
            fill()
            [ref], _ = self.ray.wait(list(running), num_returns=1)
            u, slot = running.pop(ref)
            idle.append(slot)
            try:
                res: UnitResult = self.ray.get(ref)
            except crashes as exc:
                self._replace(slot, u, exc, attempts)
                queue.appendleft(u)
                continue
            except self.ray.exceptions.RayTaskError as exc:
                raise _task_error(f"unit {u}", exc) from exc
            for key, v in res.counts.items():
                counts[key] = counts.get(key, 0) + v
            teacher_sum, convert_sum = teacher_sum + res.teacher_s, convert_sum + res.convert_s
            self.timing.teacher_s = teacher_sum / len(self._actors)
            self.timing.convert_s = convert_sum / len(self._actors)
            fill()  # the freed actor starts its next unit while the driver hands this one to the writer
            yield u, res.batch, res.tokens

    def _replace(self, slot: int, unit: int, exc: BaseException, attempts: dict[int, int]) -> None:
        """A fresh actor in ``slot`` after its actor died running ``unit``; refuse past the retry budget."""
        attempts[unit] = attempts.get(unit, 0) + 1
        if attempts[unit] > self._retries:
            raise RayEngineError(
                f"unit {unit} was lost {attempts[unit]} times because its Ray actor died (last: {first_line(exc)}); "
                f"--ray-unit-retries {self._retries} allows no more. See the Ray logs for why actors die (often "
                "out of memory), then rerun the same command: finished units are kept") from None
        self.retried_units += 1
        print(f"note: the Ray actor running unit {unit} died ({first_line(exc)}); rerunning the unit on a new "
              f"actor (retry {attempts[unit]} of {self._retries})", file=sys.stderr)
        with contextlib.suppress(Exception):  # usually dead already; kill makes sure it cannot come back
            self.ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._cls.remote(*self._args)

    def close(self) -> None:
        """Stop the actors (frees their GPUs); shut Ray down when this pool started it."""
        for actor in self._actors:
            with contextlib.suppress(Exception):  # an actor that already died
                self.ray.kill(actor, no_restart=True)
        self._actors = []
        if self._started:
            self.ray.shutdown()
            self._started = False


def _task_error(what: str, exc: Any) -> KdpipeError:
    """The teacher code's own exception from a failed Ray task: a kdpipe error as it is, else wrapped."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, KdpipeError):
        return cause
    return RayEngineError(f"{what} failed on a Ray actor: {type(cause).__name__}: "
                          f"{first_line(cause) if cause is not None else first_line(exc)}")
