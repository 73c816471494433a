"""`kdpipe demo`: a quick smoke run that checks every artifact, and the full run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.demo.run import DemoConfig, run_demo
from pipeline.errors import ConfigError


def _check_artifacts(out: Path) -> None:
    for rel in (
        "report.md", "loss_curves.png", "metrics.png", "demo_config.yaml", "kdpipe-demo.json",
        "data/teacher_train.txt", "data/train.txt", "data/valid.txt",
        "teacher/config.json", "teacher/tokenizer.json", "teacher/train_losses.json",
        "cache/manifest.json", "cache.config.yaml",
        "student-init/config.json",
        "student-kd/config.json", "student-kd/train_summary.json", "student-kd/train_config.yaml",
        "student-ce/config.json", "student-ce/train_summary.json", "student-ce/train_config.yaml",
        "eval/compare.json", "eval/compare.md", "eval/teacher.json", "eval/student-kd.json",
    ):
        assert (out / rel).is_file(), f"missing {rel}"
    for png in ("loss_curves.png", "metrics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| task | teacher | student-init | student-ce | student-kd |" in report
    assert "kdpipe dump-teacher --config" in report and "kdpipe eval --compare" in report
    assert json.loads((out / "kdpipe-demo.json").read_text())["status"] == "done"
    # Both students trained from the same cache with the only difference being the loss mix.
    kd = json.loads((out / "student-kd/train_summary.json").read_text())["resolved_config"]
    ce = json.loads((out / "student-ce/train_summary.json").read_text())["resolved_config"]
    diff = {k for k in kd if kd[k] != ce[k]}
    assert diff == {"alpha", "out"}


def test_quick_demo_writes_every_artifact(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_demo(DemoConfig(out=str(out), quick=True, backend="hf"))
    _check_artifacts(out)
    assert summary["backend"] == "hf"
    assert set(summary["timings"]) >= {"data", "teacher", "dump", "train_kd", "train_ce", "eval", "total"}
    assert "Per-word perplexity" in (out / "report.md").read_text()


def test_demo_replaces_an_earlier_demo_only_when_allowed(tmp_path: Path) -> None:
    from pipeline.demo.run import _setup_output

    out = tmp_path / "demo"
    out.mkdir()
    (out / "kdpipe-demo.json").write_text("{}")
    (out / "old.txt").write_text("earlier run")
    with pytest.raises(ConfigError, match="--overwrite"):
        _setup_output(DemoConfig(out=str(out), quick=True, backend="hf", overwrite=False))
    state = _setup_output(DemoConfig(out=str(out), quick=True, backend="hf", teacher_steps=3))
    assert not (out / "old.txt").exists() and (out / "demo_config.yaml").is_file()
    assert state.sizes.teacher_steps == 3


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier kdpipe demo"):
        run_demo(DemoConfig(out=str(tmp_path), quick=True, backend="hf"))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_full_demo_distilled_student_beats_ce(tmp_path: Path) -> None:
    """The real demo (minutes): the KD student must have lower held-out perplexity than CE."""
    summary = run_demo(DemoConfig(out=str(tmp_path / "full")))
    _check_artifacts(tmp_path / "full")
    assert summary["verdict"]["kd_beats_ce"], summary["table"]
    assert summary["timings"]["total"] < 600


def test_synthetic_language_is_reproducible_and_its_floor_is_exact() -> None:
    import math

    import numpy as np

    from pipeline.demo.synthetic import HMMLanguage, make_language, sample_documents, source_nll

    a = make_language(num_words=20, num_states=4, words_per_state=5, seed=3)
    b = make_language(num_words=20, num_states=4, words_per_state=5, seed=3)
    assert a.words == b.words and np.array_equal(a.emission, b.emission)
    docs = sample_documents(a, 5, 12, seed=1)
    assert docs == sample_documents(b, 5, 12, seed=1)
    assert all(len(d.split()) == 12 and set(d.split()) <= set(a.words) for d in docs)
    # One state emitting 4 words uniformly: every word costs log 4 nats.
    uniform = HMMLanguage(words=("ba", "ke", "lo", "mu"), start=np.ones(1), transition=np.ones((1, 1)),
                          emission=np.full((1, 4), 0.25))
    nll, n = source_nll(uniform, ["ba ke lo", "mu mu"])
    assert n == 5 and nll == pytest.approx(5 * math.log(4))
