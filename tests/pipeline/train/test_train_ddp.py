"""Two processes under torchrun (gloo, CPU) reach the same weights as one process with twice the
batch: their parts of the stream are disjoint and the loss is normalised by the global count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.train import one_torch_thread, student_weights, write_random_cache
from pipeline.train.trainer import TrainConfig, run_train

REPO = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = {"max_steps": 3, "shuffle_buffer": 1, "eval_rows": 4, "eval_every": 3, "save_every": 3,
          "lr_scheduler": "constant", "lr": 5e-3, "progress": False, "tensorboard": False}

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path: Path, tiny_tokenizer, tiny_student_dir: Path):
    # One shard: ranks take alternate rows, so step s of rank r holds rows {4s + r, 4s + r + 2},
    # and the union over ranks is exactly the single process's batch of 4.
    cache = write_random_cache(tmp_path / "cache", tiny_tokenizer, rows=32, length=12, rows_per_unit=32)
    from cache_format import open_cache

    assert len(open_cache(str(cache)).manifest.shards) == 1
    single = run_train(TrainConfig(cache=str(cache), student=str(tiny_student_dir), out=str(tmp_path / "one"),
                                   batch_size=4, **COMMON))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items() if not isinstance(v, bool)]
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pipeline.cli", "train-student",
           "--cache", str(cache), "--student", str(tiny_student_dir), "--out", str(tmp_path / "two"),
           "--batch-size", "2", "--no-progress", "--no-tensorboard", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    two = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1
    assert two["tokens_seen"] == single["tokens_seen"]
    assert two["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    w1, w2 = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=2e-5, rtol=1e-4)
