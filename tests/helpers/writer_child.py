"""A child process that writes 12 units of toy rows with ``CacheWriter(mode="resume")`` and prints each unit
as it ends, for the kill -9 tests of a local folder and of an object store: kill it at chosen moments,
rerun it to the end, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

UNITS = 12
TESTS = Path(__file__).resolve().parents[1]

# argv: the cache root, then (optional) the storage options as JSON.
SCRIPT = f"""
import json, sys, time
from helpers.cache import identity, topk_batch
from cache_format import CacheWriter
url = sys.argv[1]
opts = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
with CacheWriter(url, identity(), mode="resume", max_shard_rows=3, storage_options=opts) as w:
    for u in range({UNITS}):
        if u in w.completed_units:
            continue
        for part in range(2):
            w.write(topk_batch([f"u{{u}}-{{part}}-{{i}}" for i in range(2)], seed=100 * u + part))
            time.sleep(0.01)
        w.end_unit(u)
        print(u, flush=True)
    w.finalize()
"""


class WriterChild:
    """The script written into ``folder``; ``env`` adds variables (credentials) to this process's environment."""

    def __init__(self, folder: Path, **env: str) -> None:
        self.script = folder / "writer_child.py"
        self.script.write_text(SCRIPT)
        self.env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}

    def _argv(self, url: str, opts: dict[str, Any] | None) -> list[str]:
        return [sys.executable, str(self.script), url, *([json.dumps(opts)] if opts is not None else [])]

    def run_to_end(self, url: str, opts: dict[str, Any] | None = None) -> None:
        subprocess.run(self._argv(url, opts), check=True, env=self.env, timeout=120, stdout=subprocess.DEVNULL)

    def kill_after(self, url: str, after_unit: int, extra_s: float, opts: dict[str, Any] | None = None) -> None:
        """SIGKILL the child ``extra_s`` seconds after it reported unit ``after_unit`` ended."""
        proc = subprocess.Popen(self._argv(url, opts), env=self.env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if int(line) >= after_unit:
                break
        time.sleep(extra_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
