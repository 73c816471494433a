"""Run one ``kdpipe`` CLI command in a child process, with a wall-clock timeout and a peak-RSS measurement.

Two runners, same results:

* ``SpawnRunner``: ``python -m pipeline.cli ARGS`` in a fresh interpreter (exact, ~5 s of imports per call
  for the torch commands).
* ``ForkRunner`` (default): a *zygote* interpreter imports the heavy modules (torch, transformers, the
  pipeline) once; every command runs in a child forked from it that executes ``pipeline.cli`` exactly as
  ``python -m pipeline.cli`` would (``runpy``, ``__main__``, ``sys.argv``).  A torch command then costs
  ~1 s instead of ~6 s.  ``KDPIPE_TEST_CLI_RUNNER=spawn`` selects the spawn runner.

How the limits are measured and enforced (both runners):

* **Wall clock.** The caller polls the child; after ``timeout`` seconds its whole process group
  (the child calls ``setsid``) gets SIGKILL and the result says ``killed_for="timeout"``.
* **Peak RSS.** While the child runs, ``/proc/<pid>/status`` is polled every 20 ms; a child whose
  ``VmRSS`` exceeds ``rss_limit`` is killed (``killed_for="rss"``) so a memory bomb cannot take the machine
  down.  The reported peak is, for a forked child, ``ru_maxrss`` from ``os.wait4`` (the kernel's exact
  high-water mark; it includes the zygote's pages the child inherited, so compare it only with a baseline
  measured by the same runner) or the highest polled value if that is higher; for a spawned child, the
  highest polled ``VmHWM`` (the high-water mark of its own address space: ``ru_maxrss`` would also count
  the pytest process's pages held between fork and exec).
* **File size.** ``RLIMIT_FSIZE`` (default 256 MiB) stops a child that writes without bound (e.g. copying
  ``/dev/zero``): Python ignores SIGXFSZ, so the write past the limit fails with ``OSError: [Errno 27] File
  too large`` (a C extension that does not ignore it dies with ``signal == 25``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FSIZE_LIMIT = 256 * 1024 * 1024
_POLL_S = 0.02

# Modules the zygote imports before forking (each optional: a missing one only makes runs slower).
PRELOAD = (
    "numpy", "pyarrow", "pyarrow.ipc", "zstandard", "typer", "pydantic", "yaml", "cache_format",
    "torch", "transformers", "accelerate", "safetensors.torch", "tokenizers",
    "transformers.models.llama.modeling_llama", "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "pipeline.cli_cache", "pipeline.cli_train", "pipeline.cli_eval", "pipeline.cli_dump",
    "pipeline.train.trainer", "pipeline.train.student", "pipeline.train.stream", "pipeline.eval.run",
    "pipeline.dump.run",
)

# Environment of every child: offline, single-threaded, no progress bars (tqdm writes "\r", which the
# hostile-cache tests treat as a terminal control byte), no colour.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TERM": "dumb", "NO_COLOR": "1",
    "TRANSFORMERS_VERBOSITY": "error", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONFAULTHANDLER": "",
}


@dataclass
class Result:
    """What one CLI command did."""

    args: list[str]
    returncode: int | None  # exit status; None when it died of a signal (see ``signal``)
    signal: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    peak_rss: int  # bytes
    killed_for: str | None = None  # "timeout" | "rss" | None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def timed_out(self) -> bool:
        return self.killed_for == "timeout"

    @property
    def output(self) -> bytes:
        return self.stdout + self.stderr

    def describe(self) -> str:
        how = (f"exit {self.returncode}" if self.returncode is not None else f"signal {self.signal}")
        if self.killed_for:
            how += f" (killed: {self.killed_for})"
        tail = self.stderr.decode("utf-8", "backslashreplace")[-1500:]
        out = self.stdout.decode("utf-8", "backslashreplace")[-600:]
        return (f"kdpipe {' '.join(self.args)}\n  -> {how}, {self.wall_s:.1f} s, peak RSS "
                f"{self.peak_rss / 2**20:.0f} MiB\n  stdout tail: {out!r}\n  stderr tail: {tail!r}")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PYTHONSTARTUP", "CLICOLOR_FORCE")}
    env.update(CHILD_ENV)
    # The repo root first (its packages win), then tests/ (for the control module ``helpers.subproc``).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return {k: v for k, v in env.items() if v != ""}


def _vm(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in bytes; (0, 0) once it has exited."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def _killpg(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            target()


def _decode_status(status: int) -> tuple[int | None, int | None]:
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status), None


class _Watch:
    """Poll a running child: timeout and RSS limit; returns why it was killed (or None)."""

    def __init__(self, pid: int, timeout: float, rss_limit: int | None) -> None:
        self.pid, self.timeout, self.rss_limit = pid, timeout, rss_limit
        self.t0 = time.monotonic()
        self.max_polled = 0  # highest VmRSS / VmHWM seen
        self.killed_for: str | None = None

    def tick(self) -> None:
        if self.killed_for:
            return
        rss, hwm = _vm(self.pid)
        self.max_polled = max(self.max_polled, rss, hwm)
        if self.rss_limit is not None and rss > self.rss_limit:
            self.killed_for = "rss"
            _killpg(self.pid)
        elif time.monotonic() - self.t0 > self.timeout:
            self.killed_for = "timeout"
            _killpg(self.pid)


class SpawnRunner:
    """``python -m pipeline.cli`` in a fresh interpreter per command."""

    name = "spawn"

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def run(self, args: list[str], *, cwd: Path, timeout: float, rss_limit: int | None = None,
            fsize_limit: int = DEFAULT_FSIZE_LIMIT, env: dict[str, str] | None = None,
            module: str = "pipeline.cli") -> Result:
        boot = ("import resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize_limit}, {fsize_limit})); "
                "sys.argv = ['kdpipe', *sys.argv[1:]]; "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            proc = subprocess.Popen([self.python, "-c", boot, *args], cwd=cwd, env=child_env(env),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            watch = _Watch(proc.pid, timeout, rss_limit)
            while True:
                watch.tick()  # before wait4: the last poll of VmHWM is at most one period before the exit
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(_POLL_S)
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
            wall = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            code, sig = _decode_status(status)
            # ru_maxrss of a spawned child also counts the pages of this (pytest) process that the child
            # held between fork and exec; VmHWM (per address space, reset by exec) does not.
            peak = watch.max_polled or ru.ru_maxrss * 1024
            return Result(list(args), code, sig, out.read(), err.read(), wall, peak, watch.killed_for)

    def close(self) -> None:
        pass


# The zygote: imports PRELOAD, then serves one JSON request per line on stdin by forking a child that
# runs ``pipeline.cli`` as __main__; replies (JSON lines, written with os.write, never through sys.stdout)
# say when a child started and how it ended (wait4 status and ru_maxrss). Single-threaded: SIGCHLD
# wakes the select() loop through a wakeup fd.
_ZYGOTE = r'''
import atexit, importlib, io, json, os, resource, runpy, select, signal, sys, traceback
for _m in sys.argv[1:]:
    try:
        importlib.import_module(_m)
    except Exception:
        pass
REPLY = os.dup(1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
os.set_blocking(wake_r, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *a: None)

def reply(obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:
        n = os.write(REPLY, data)
        data = data[n:]

def child(req):
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            f = os.open(path, flags, 0o644)
            os.dup2(f, fd)
            os.close(f)
        for fd in (REPLY, wake_r, wake_w):
            os.close(fd)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=False)
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True, errors="backslashreplace")
        lim = int(req["fsize"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = ["kdpipe", *req["args"]]
        try:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            c = exc.code
            if c is None:
                code = 0
            elif isinstance(c, int):
                code = c & 0xFF
            else:
                print(c, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:
            pass
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except BaseException:
                pass
        os._exit(code)

def reap():
    while True:
        try:
            pid, status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply({"event": "exit", "pid": pid, "status": status, "maxrss_kib": ru.ru_maxrss})

buf = b""
while True:
    try:
        ready, _, _ = select.select([0, wake_r], [], [])
    except InterruptedError:
        continue
    if wake_r in ready:
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
    reap()
    if 0 in ready:
        data = os.read(0, 65536)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(req)
            reply({"event": "start", "id": req["id"], "pid": pid})
'''


class ForkRunner:
    """Commands forked from a zygote that imported the heavy modules once (thread-safe)."""

    name = "fork"

    def __init__(self, python: str = sys.executable, preload: tuple[str, ...] = PRELOAD) -> None:
        self._env = child_env()
        self._proc = subprocess.Popen([python, "-c", _ZYGOTE, *preload], cwd=REPO, env=self._env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                      start_new_session=True)
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._started: dict[int, int] = {}  # request id -> pid
        self._exited: dict[int, tuple[int, int]] = {}  # pid -> (status, maxrss KiB)
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if msg["event"] == "start":
                    self._started[msg["id"]] = msg["pid"]
                else:
                    self._exited[msg["pid"]] = (msg["status"], msg["maxrss_kib"])
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def run(self, args: list[str], *, cwd: Path, timeout: float, rss_limit: int | None = None,
            fsize_limit: int = DEFAULT_FSIZE_LIMIT, env: dict[str, str] | None = None,
            module: str = "pipeline.cli") -> Result:
        tmp = Path(tempfile.mkdtemp(prefix="kdpipe-cli-"))
        try:
            with self._lock:
                rid = self._next
                self._next += 1
                req = {"id": rid, "args": [str(a) for a in args], "cwd": str(cwd), "env": child_env(env),
                       "stdout": str(tmp / "out"), "stderr": str(tmp / "err"), "fsize": fsize_limit,
                       "module": module}
                assert self._proc.stdin is not None
                self._proc.stdin.write((json.dumps(req) + "\n").encode())
                self._proc.stdin.flush()
            t0 = time.monotonic()
            with self._cond:
                if not self._cond.wait_for(lambda: rid in self._started or self._proc.poll() is not None, 60):
                    raise RuntimeError("the CLI zygote did not fork a child within 60 s")
                if rid not in self._started:
                    raise RuntimeError(f"the CLI zygote died (exit {self._proc.returncode})")
                pid = self._started.pop(rid)
            watch = _Watch(pid, timeout, rss_limit)
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: pid in self._exited, _POLL_S)
                    done = self._exited.pop(pid, None)
                if done is not None:
                    break
                watch.tick()
            wall = time.monotonic() - t0
            status, maxrss_kib = done
            code, sig = _decode_status(status)
            return Result(list(args), code, sig, (tmp / "out").read_bytes(), (tmp / "err").read_bytes(), wall,
                          max(maxrss_kib * 1024, watch.max_polled), watch.killed_for)
        finally:
            for name in ("out", "err"):
                (tmp / name).unlink(missing_ok=True)
            tmp.rmdir()

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            _killpg(self._proc.pid)
            self._proc.wait()


def make_runner() -> SpawnRunner | ForkRunner:
    """The runner chosen by ``KDPIPE_TEST_CLI_RUNNER`` (``fork``, the default, or ``spawn``)."""
    kind = os.environ.get("KDPIPE_TEST_CLI_RUNNER", "fork")
    if kind == "spawn":
        return SpawnRunner()
    if kind != "fork":
        raise ValueError(f"KDPIPE_TEST_CLI_RUNNER must be fork or spawn, got {kind!r}")
    return ForkRunner()


def _control(argv: list[str]) -> None:
    """Control commands for testing the runners themselves: ``alloc MIB [STEP_S]``, ``sleep S``,
    ``write PATH MIB``, ``exit CODE MESSAGE``."""
    what = argv[0]
    if what == "alloc":
        step_s = float(argv[2]) if len(argv) > 2 else 0.0
        held = []
        for _ in range(int(argv[1]) // 16):
            block = bytearray(16 * 2**20)
            block[::4096] = b"\1" * (len(block) // 4096)  # touch every page (calloc'd pages may not be resident)
            held.append(block)
            time.sleep(step_s)
        print(f"allocated {len(held) * 16} MiB")
    elif what == "sleep":
        time.sleep(float(argv[1]))
    elif what == "write":
        with open(argv[1], "wb") as fh:
            for _ in range(int(argv[2])):
                fh.write(b"\0" * 2**20)
    elif what == "exit":
        print(f"error: {argv[2]}", file=sys.stderr)
        sys.exit(int(argv[1]))


if __name__ == "__main__":
    _control(sys.argv[1:])


__all__ = ["DEFAULT_FSIZE_LIMIT", "ForkRunner", "Result", "SpawnRunner", "child_env", "make_runner"]


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, *, poll_s: float = 0.005,
              timeout_s: float = 240.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (kill -9 mid-run); it must still be running then.

    Used by the tests that kill a dump after some units are committed and then resume it; the
    child's stderr pipe (if any) is closed, and its tail is shown when it ended too early.
    """
    deadline = time.monotonic() + timeout_s
    try:
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        if proc.poll() is not None:
            tail = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise AssertionError(f"{what} ended before it could be killed: {tail}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
