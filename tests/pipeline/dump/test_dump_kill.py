"""A dump killed with SIGKILL mid-way, then rerun, equals an uninterrupted dump (content and verify)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cache_format import verify_cache
from cache_format.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, UNIT_MARKER_RE
from helpers.subproc import kill_when
from pipeline.dump.run import DumpConfig, run_dump

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[3]


def _args(model: Path, data: Path, out: Path) -> list[str]:
    # Many small units (one shard each) so the kill lands between the first and the last one.
    return ["--teacher", str(model), "--dataset", str(data), "--out", str(out), "--top-k", "8", "--max-length",
            "16", "--unit-rows", "2", "--unit-bytes", "96", "--batch-size", "2", "--device", "cpu", "--no-progress"]


def _committed_units(out: Path) -> int:
    """Units committed so far: one marker file each."""
    try:
        return sum(1 for p in out.iterdir() if UNIT_MARKER_RE.fullmatch(p.name))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_lm_dir: Path, tiny_texts: list[str], tmp_path: Path,
                                                  same_content: Any) -> None:
    # ~130 units of 96 bytes: after the kill point (3 units) the dump has seconds of work left, far more than
    # any scheduling delay of this polling process on a loaded machine.
    data = tmp_path / "text.txt"
    data.write_text("\n".join(tiny_texts) + "\n")
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "dump-teacher", *_args(tiny_lm_dir, data, killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(proc, lambda: _committed_units(killed) >= 3, "the dump")
    assert not (killed / MANIFEST_NAME).exists() and (killed / INCOMPLETE_MARKER).exists()
    units_before = _committed_units(killed)

    cfg = DumpConfig.model_validate({
        "teacher": str(tiny_lm_dir), "dataset": str(data), "top_k": 8, "max_length": 16, "unit_rows": 2,
        "unit_bytes": 96, "batch_size": 2, "device": "cpu", "progress": False, "out": str(killed)})
    resumed = run_dump(cfg)
    assert resumed["units_resumed"] >= units_before >= 3 and resumed["units_done"] > 0
    whole = tmp_path / "whole"
    full = run_dump(cfg.model_copy(update={"out": str(whole)}))
    assert resumed["rows"] == full["rows"] and resumed["positions"] == full["positions"]
    assert verify_cache(str(killed))["ok"]
    same_content(killed, whole)
