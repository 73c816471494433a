"""`kdpipe dump-teacher` from the command line: YAML + flags, and one clear error line per bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["dump-teacher", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _base(model: Path, data: Path, out: Path) -> list[str]:
    return ["--teacher", str(model), "--dataset", str(data), "--out", str(out), "--top-k", "8",
            "--max-length", "32", "--unit-rows", "4", "--unit-bytes", "256", "--device", "cpu",
            "--no-progress"]


def _error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def no_pad_classifier_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A sequence classifier whose tokenizer and config have no pad token."""
    from transformers import AutoTokenizer

    from pipeline.demo.toy import build_llama

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.pad_token = None
    out = tmp_path_factory.mktemp("no_pad_classifier")
    build_llama(len(tok), num_labels=2, tokenizer=tok, out_dir=out, seed=3)
    return out


def test_yaml_config_with_flag_override(capsys: Any, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = {"teacher": str(tiny_lm_dir), "dataset": str(data_dir / "wiki.txt"), "out": str(out), "top-k": 4,
           "max_length": 16, "limit": 5, "device": "cpu", "progress": False}
    (tmp_path / "dump.yaml").write_text(yaml.safe_dump(cfg))
    code, stdout, _ = _run(capsys, "--config", str(tmp_path / "dump.yaml"), "--top-k", "6",
                           "--json", str(tmp_path / "s.json"))
    assert code == 0 and "tokens/s" in stdout and "outside teacher" in stdout
    saved = yaml.safe_load((tmp_path / "c.config.yaml").read_text())
    assert saved["top_k"] == 6 and saved["max_length"] == 16 and saved["overwrite"] is False
    # Rerunning from the saved file resumes the finished cache: nothing is redone.
    code, stdout, _ = _run(capsys, "--config", str(tmp_path / "c.config.yaml"), "--json", str(tmp_path / "s2.json"))
    assert code == 0 and json.loads((tmp_path / "s2.json").read_text())["units_done"] == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["rows"] > 0 and summary["bytes_per_token"] > 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--task", "poetry"], "--task"),
        (["--backend", "onnx"], "--backend"),
        (["--top-k", "100000"], "--top-k 100000 is larger than teacher"),
        (["--max-logprobs", "4", "--backend", "vllm"], "--top-k 8 is larger than --max-logprobs 4"),
        (["--text-field", "body"], "no field 'body' (--text-field); available fields: text"),
        (["--worker-index", "2", "--num-workers", "2"], "--worker-index 2 must be below --num-workers 2"),
        (["--chat-template", "--task", "reasoning", "--text-field", "text", "--response-field", "text"],
         "no chat template"),
        (["--limit", "0"], "limit"),
        (["--backend", "vllm", "--vllm-capture", "logprobs", "--encoding", "sampled"], "use --vllm-capture hidden"),
        (["--backend", "vllm", "--vllm-capture", "logprobs", "--task", "classification"], "use --vllm-capture hidden"),
        (["--vllm-capture", "hidden"], "--vllm-capture hidden is for --backend vllm"),
        (["--temperature", "0"], "--temperature"),
        (["--out-sampled", "x", "--encoding", "sampled"], "--out-sampled adds a sampled cache beside a top-k one"),
        (["--device", "gpu"], "--device"),
        (["--load-in-4bit"], "--load-in-4bit needs a CUDA GPU"),
    ],
)
def test_bad_flags(capsys: Any, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path, extra: list[str],
                   needle: str) -> None:
    out = tmp_path / "out"
    line = _error(*_run(capsys, *_base(tiny_lm_dir, data_dir / "wiki.txt", out), *extra)[::2])
    assert needle in line
    assert not (out / "manifest.json").exists()


def test_missing_teacher_and_empty_dataset(capsys: Any, tiny_lm_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _error(*_run(capsys, *_base(tmp_path / "nope", empty, tmp_path / "o"))[::2])
    assert "teacher path" in line and "--teacher" in line
    line = _error(*_run(capsys, *_base(tiny_lm_dir, empty, tmp_path / "o"))[::2])
    assert "has no rows" in line
    line = _error(*_run(capsys, *_base(tiny_lm_dir, tmp_path / "missing.jsonl", tmp_path / "o"))[::2])
    assert "does not exist" in line and "--dataset" in line


def test_vllm_not_installed(capsys: Any, monkeypatch: pytest.MonkeyPatch, tiny_lm_dir: Path, data_dir: Path,
                            tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    line = _error(*_run(capsys, *_base(tiny_lm_dir, data_dir / "wiki.txt", tmp_path / "o"), "--backend", "vllm")[::2])
    assert "pip install" in line and "vllm" in line


def test_tokenizer_without_pad_token(capsys: Any, no_pad_classifier_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    args = _base(no_pad_classifier_dir, data_dir / "sst2.train", tmp_path / "o")
    line = _error(*_run(capsys, *args, "--task", "classification")[::2])
    assert "no pad token" in line and "--batch-size 1" in line
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_output_folder_checks(capsys: Any, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    line = _error(*_run(capsys, *_base(tiny_lm_dir, data_dir / "wiki.txt", foreign))[::2])
    assert "not empty and holds no kdpipe cache" in line
    out = tmp_path / "cache"
    assert _run(capsys, *_base(tiny_lm_dir, data_dir / "wiki.txt", out), "--limit", "4")[0] == 0
    line = _error(*_run(capsys, *_base(tiny_lm_dir, data_dir / "wiki.txt", out), "--limit", "4", "--top-k", "5")[::2])
    assert "different settings" in line and "encoding.k: 8 != 5" in line and "--overwrite" in line
    assert (out / "manifest.json").is_file()  # the refused run left the finished cache alone


def test_too_long_rows_are_cut_to_the_context(capsys: Any, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    code, _, err = _run(capsys, *_base(tiny_lm_dir, data_dir / "gsm8k.jsonl", tmp_path / "o"), "--task",
                             "reasoning", "--max-length", "100000", "--json", str(tmp_path / "s.json"))
    assert code == 0 and "above the teacher's context of 512" in err
    assert json.loads((tmp_path / "s.json").read_text())["truncated"] == 0
    code, _, _ = _run(capsys, *_base(tiny_lm_dir, data_dir / "gsm8k.jsonl", tmp_path / "o2"), "--task",
                      "reasoning", "--max-length", "24", "--json", str(tmp_path / "s2.json"))
    assert code == 0 and json.loads((tmp_path / "s2.json").read_text())["truncated"] > 0
