"""`kdpipe eval` on tiny local models: all four tasks, agreement, --compare, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, KdpipeError
from pipeline.eval.compare import compare_table, parse_compare_entry
from pipeline.eval.run import EvalConfig, run_eval


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[str]) -> Path:
    d = tmp_path_factory.mktemp("eval_data")
    (d / "lm.txt").write_text("\n".join(tiny_texts[:12]) + "\n")
    (d / "sst2.dev").write_text("".join(f"{i % 2} {t}\n" for i, t in enumerate(tiny_texts[:10])))
    rows = [{"info": {"post": t}, "summary": {"text": tiny_texts[i + 1]}} for i, t in enumerate(tiny_texts[:4])]
    (d / "summ.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = [{"question": f"{t} how many?", "answer": f"so it is {i}\n#### {i}"} for i, t in enumerate(tiny_texts[:4])]
    (d / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    return d


def _cfg(**kw: object) -> EvalConfig:
    base: dict[str, object] = {"batch_size": 4, "max_length": 48, "max_new_tokens": 8}
    base.update(kw)
    return EvalConfig.model_validate(base)


def test_lm_metrics_match_a_direct_computation(tiny_lm_dir: Path, data_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_eval(_cfg(model=str(tiny_lm_dir), task="lm", dataset=str(data_dir / "lm.txt"),
                        teacher=str(tiny_lm_dir)))
    m = out["metrics"]
    assert set(m) >= {"perplexity", "acc@1", "acc@5"}
    assert 0 <= m["acc@1"] <= m["acc@5"] <= 1
    # The same windows scored by hand: packed stream of bare docs + EOS, each window opened by BOS,
    # windows of 48 overlapping so that only the `stride` new tokens are scored, no padding scored.
    from pipeline.dump.lm import default_stride

    tok = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)).eval()
    stream = []
    for line in (data_dir / "lm.txt").read_text().splitlines():
        stream += [*tok(line, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    nll, n = 0.0, 0
    t, end, stride = 0, 47, default_stride(48)
    with torch.no_grad():
        while t < len(stream):
            start = max(0, end - 47)
            w = torch.tensor([tok.bos_token_id, *stream[start:end]])[None]
            logits = model(input_ids=w).logits[0, :-1]
            new = end - t  # the last `new` tokens of the window are its targets
            nll += float(torch.nn.functional.cross_entropy(logits[-new:], w[0, -new:], reduction="sum"))
            n += new
            t, end = end, min(end + stride, len(stream))
    assert m["tokens"] == n
    assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # A model agrees perfectly with itself.
    assert out["agreement"]["top1_agreement"] == 1.0
    assert out["agreement"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
    assert out["params"] > 0


def test_classification_accuracy_and_teacher_agreement(tiny_classifier_dir: Path, data_dir: Path) -> None:
    out = run_eval(_cfg(model=str(tiny_classifier_dir), task="classification",
                        dataset=str(data_dir / "sst2.dev"), teacher=str(tiny_classifier_dir)))
    assert out["num_examples"] == 10
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0
    assert out["agreement"]["top1_agreement"] == 1.0


def test_summarization_and_reasoning_generate_and_score(tiny_lm_dir: Path, data_dir: Path) -> None:
    summ = run_eval(_cfg(model=str(tiny_lm_dir), task="summarization", dataset=str(data_dir / "summ.jsonl"),
                         generation_backend="hf"))
    assert set(summ["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert summ["generation_backend"] == "hf" and summ["num_examples"] == 4
    reas = run_eval(_cfg(model=str(tiny_lm_dir), task="reasoning", dataset=str(data_dir / "gsm.jsonl")))
    assert 0.0 <= reas["metrics"]["exact_match"] <= 1.0


def test_generations_reach_the_metrics(tiny_lm_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that writes the reference answer scores 1.0: generations and references pair up."""
    from transformers import AutoTokenizer

    import pipeline.eval.run as ev

    tok = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    answers = [json.loads(ln)["answer"] for ln in (data_dir / "gsm.jsonl").read_text().splitlines()]
    monkeypatch.setattr(ev, "_generate_hf", lambda *a, **k: [tok(x, add_special_tokens=False)["input_ids"]
                                                                for x in answers])
    out = run_eval(_cfg(model=str(tiny_lm_dir), task="reasoning", dataset=str(data_dir / "gsm.jsonl")))
    assert out["metrics"]["exact_match"] == 1.0


def test_compare_writes_markdown_and_json(tiny_lm_dir: Path, tiny_student_dir: Path, data_dir: Path,
                                          tmp_path: Path) -> None:
    first = tmp_path / "teacher.json"
    run_eval(_cfg(model=str(tiny_lm_dir), task="lm", dataset=str(data_dir / "lm.txt"), json_path=str(first)))
    assert json.loads(first.read_text())["task"] == "lm"
    assert (tmp_path / "teacher.config.yaml").is_file()
    out_json = tmp_path / "cmp.json"
    out = run_eval(_cfg(compare=[f"teacher={first}", f"student={tiny_student_dir}"], task="lm",
                        dataset=str(data_dir / "lm.txt"), json_path=str(out_json)))
    md = out["markdown"]
    assert "| task | teacher | student |" in md
    assert "LM, perplexity / acc@1 / acc@5" in md
    assert "metrics.perplexity (lower is better)" in md
    saved = json.loads(out_json.read_text())
    assert [c["name"] for c in saved["columns"]] == ["teacher", "student"]
    assert (tmp_path / "cmp.md").read_text() == md


def test_compare_table_formats_seed_style() -> None:
    cols = [
        {"name": "t", "task": "classification", "params": 67_000_000, "metrics": {"accuracy": 0.911}},
        {"name": "s", "task": "classification", "params": 14_400_000, "metrics": {"accuracy": 0.893}},
    ]
    md = compare_table(cols)
    assert "| classification, accuracy | 0.911 (67M) | 0.893 (14.4M) |" in md


def test_parse_compare_entry(tmp_path: Path) -> None:
    assert parse_compare_entry("kd=runs/student") == ("kd", "runs/student")
    assert parse_compare_entry("runs/student/") == ("student", "runs/student/")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, "--model"),
        ({"model": "m", "compare": ["a"]}, "exclude each other"),
        ({"model": "m", "limit": 0}, "limit"),
        ({"model": "m", "task": "translate"}, "task"),
        ({"model": "m", "device": "tpu"}, "device"),
    ],
)
def test_config_errors_name_the_flag(kw: dict[str, object], match: str) -> None:
    from pipeline.config import resolve_config

    with pytest.raises(ConfigError, match=match):
        resolve_config(EvalConfig, None, kw)


def test_missing_model_and_dataset_are_clear(tiny_lm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KdpipeError, match="--model"):
        run_eval(_cfg(model=str(tmp_path / "nope"), task="lm", dataset=str(tmp_path / "x.txt")))
    with pytest.raises(KdpipeError, match="does not exist"):
        run_eval(_cfg(model=str(tiny_lm_dir), task="lm", dataset=str(tmp_path / "x.txt")))
    with pytest.raises(ConfigError, match="result file"):
        run_eval(_cfg(compare=[str(tmp_path / "missing.json")], task="lm"))


def _cli(argv: list[str]) -> int:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0)


def test_cli_eval_json_then_compare_positional_list(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    res = tmp_path / "a.json"
    assert _cli(["eval", "--model", str(tiny_lm_dir), "--task", "lm", "--dataset", str(data_dir / "lm.txt"),
                 "--max-length", "48", "--json", str(res)]) == 0
    assert "perplexity" in capsys.readouterr().out
    # `--compare A B C`: one flag, the rest as a list.
    assert _cli(["eval", "--compare", f"a={res}", f"b={res}", f"c={res}", "--task", "lm"]) == 0
    assert "| task | a | b | c |" in capsys.readouterr().out


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["eval", "--task", "lm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--model" in err[0]
    assert _cli(["eval", str(tmp_path / "x.json")]) == 2
    assert "--compare" in capsys.readouterr().err


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_generation_matches_hf_greedy(vllm_teacher: object, tiny_lm_dir: Path, data_dir: Path) -> None:
    """The vLLM generation path (the session's one engine, CPU build) gives HF generate's greedy answers."""
    cfg = _cfg(model=str(tiny_lm_dir), task="reasoning", dataset=str(data_dir / "gsm.jsonl"), max_new_tokens=6,
               max_length=96)
    vllm_out = run_eval(cfg.model_copy(update={"generation_backend": "vllm"}), engine=vllm_teacher)
    hf_out = run_eval(cfg.model_copy(update={"generation_backend": "hf"}))
    assert vllm_out["generation_backend"] == "vllm" and hf_out["generation_backend"] == "hf"
    assert [s["prediction"] for s in vllm_out["samples"]] == [s["prediction"] for s in hf_out["samples"]]
    # Counted on an empty model while vLLM holds the weights: the same number.
    assert vllm_out["params"] == hf_out["params"]


def test_agreement_with_a_cache_of_the_same_model(tiny_lm_dir: Path, tiny_classifier_dir: Path, data_dir: Path,
                                                  tmp_path: Path) -> None:
    """A model compared with its own cached distributions: full top-1 agreement, KL ~ 0 (codec error only)."""
    from pipeline.dump.run import DumpConfig, run_dump

    lm_cache = tmp_path / "lm-cache"
    run_dump(DumpConfig(teacher=str(tiny_lm_dir), task="lm", dataset=str(data_dir / "lm.txt"), out=str(lm_cache),
                        max_length=48, top_k=16, progress=False))
    out = run_eval(_cfg(model=str(tiny_lm_dir), task="lm", cache=str(lm_cache), limit=3))
    assert out["agreement"]["against"] == f"cache:{lm_cache}"
    assert out["agreement"]["top1_agreement"] == 1.0
    assert out["agreement"]["kl_to_teacher"] == pytest.approx(0.0, abs=2e-3)
    from pipeline.dump.lm import default_stride

    assert out["agreement"]["agreement_positions"] == 47 + 2 * default_stride(48)  # later windows: new tokens only
    assert "metrics" not in out  # no --dataset: agreement only

    cls_cache = tmp_path / "cls-cache"
    run_dump(DumpConfig(teacher=str(tiny_classifier_dir), task="classification", dataset=str(data_dir / "sst2.dev"),
                        out=str(cls_cache), max_length=48, progress=False))
    out = run_eval(_cfg(model=str(tiny_classifier_dir), task="classification", cache=str(cls_cache),
                        dataset=str(data_dir / "sst2.dev")))
    assert out["agreement"]["top1_agreement"] == 1.0 and out["agreement"]["agreement_positions"] == 10
    assert out["agreement"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-4)
