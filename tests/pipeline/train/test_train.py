"""`kdpipe train-student` end to end on tiny models: the KD loss decreases, 2N steps equal
N + resume + N, every bad input stops with its error and leaves --out untouched."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cache_format import CacheNotFoundError
from helpers.train import (
    build_trained_teacher,
    one_torch_thread,
    student_weights,
    write_random_cache,
    write_teacher_cache,
)
from pipeline.errors import ConfigError, ModelError
from pipeline.train.checkpoint import RUN_MARKER
from pipeline.train.distill import OnlineTeacher, cached_targets
from pipeline.train.trainer import StepMetrics, TrainConfig, Trainer, TrainingError, run_train

FAST = {"progress": False, "tensorboard": False, "eval_rows": 8, "batch_size": 4}

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer, tiny_texts) -> Path:
    return build_trained_teacher(tmp_path_factory.mktemp("teacher"), tiny_tokenizer, tiny_texts, steps=40)


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path, tiny_tokenizer, tiny_texts) -> Path:
    root = tmp_path_factory.mktemp("kd")
    return write_teacher_cache(root / "cache", tiny_teacher, tiny_tokenizer, tiny_texts[:64], k=16, max_shard_rows=24)


def _cfg(cache: Path, student: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(cache=str(cache), student=str(student), out=str(out), **{**FAST, **kw})


def test_kd_loss_decreases_and_outputs_are_complete(teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    s = run_train(_cfg(teacher_cache, tiny_student_dir, out, max_steps=24, lr=5e-3, eval_every=12, save_every=12,
                       tensorboard=True))
    assert s["steps"] == 24 and s["final_loss"] < 0.8 * s["first_loss"]
    assert s["history"][-1]["eval/kd_loss"] < s["history"][0]["eval/kd_loss"]
    assert 0 <= s["eval"]["eval/top1_agreement"] <= 1
    for key in ("steps", "first_loss", "final_loss", "tokens_seen", "wall_s", "tokens_per_s", "resolved_config"):
        assert key in json.loads((out / "train_summary.json").read_text())
    assert s["tokens_seen"] > 0 and s["resolved_config"]["max_steps"] == 24
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    assert (out / "train_config.yaml").is_file() and any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-24"]


@pytest.mark.parametrize("loss", ["rkl", "jsd", "tvd"])
def test_every_loss_family_trains(teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path, loss: str):
    s = run_train(_cfg(teacher_cache, tiny_student_dir, tmp_path / "r", max_steps=3, loss=loss, temperature=2.0,
                       alpha=0.2, eval_rows=0, attn_implementation="eager"))
    assert math.isfinite(s["final_loss"])


def test_two_n_steps_equal_n_plus_resume_plus_n(teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path):
    kw = {"lr_scheduler": "constant", "lr": 3e-3, "eval_every": 100, "save_every": 3, "shuffle_buffer": 8}
    straight = run_train(_cfg(teacher_cache, tiny_student_dir, tmp_path / "a", max_steps=6, **kw))
    run_train(_cfg(teacher_cache, tiny_student_dir, tmp_path / "b", max_steps=3, **kw))
    resumed = run_train(_cfg(teacher_cache, tiny_student_dir, tmp_path / "b", max_steps=6, resume=True, **kw))
    assert resumed["steps"] == 6 and resumed["tokens_seen"] == straight["tokens_seen"]
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-5)
    wa, wb = student_weights(tmp_path / "a"), student_weights(tmp_path / "b")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=1e-5)


def test_resume_with_changed_settings_is_refused(teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path):
    run_train(_cfg(teacher_cache, tiny_student_dir, tmp_path / "r", max_steps=1, eval_rows=0))
    with pytest.raises(ConfigError, match="lr"):
        run_train(_cfg(teacher_cache, tiny_student_dir, tmp_path / "r", max_steps=2, eval_rows=0, lr=1.0,
                       resume=True))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(
    teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path
):
    calls = {"n": 0}

    def poisoned(batch):  # the cache's targets, NaN from the third step on
        calls["n"] += 1
        targets = cached_targets(batch)
        return replace(targets, logprobs=targets.logprobs * float("nan")) if calls["n"] >= 3 else targets

    out = tmp_path / "nan"
    trainer = Trainer(_cfg(teacher_cache, tiny_student_dir, out, max_steps=5, save_every=2, eval_rows=0),
                      teacher=poisoned)
    with pytest.raises(TrainingError, match=r"step 3\b.*step-2"):
        trainer.run()
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()


def test_online_teacher_seam_equals_offline_kd_on_a_full_cache(tiny_teacher, tiny_tokenizer, tiny_texts,
                                                              tiny_student_dir: Path, tmp_path: Path):
    """``Trainer(cfg, teacher=OnlineTeacher(model))`` on a cache holding the same teacher's k = V targets:
    the same loss as offline KD (up to the codec's rounding), and it trains."""
    from transformers import AutoModelForCausalLM

    vocab = AutoModelForCausalLM.from_pretrained(str(tiny_teacher)).config.vocab_size
    full = write_teacher_cache(tmp_path / "full", tiny_teacher, tiny_tokenizer, tiny_texts[:24], k=vocab)
    kw = {"lr_scheduler": "constant", "lr": 5e-3, "eval_every": 6, "save_every": 6, "max_steps": 6}
    offline = run_train(_cfg(full, tiny_student_dir, tmp_path / "offline", **kw))
    steps: list[StepMetrics] = []
    teacher = OnlineTeacher(AutoModelForCausalLM.from_pretrained(str(tiny_teacher)))
    online = Trainer(_cfg(full, tiny_student_dir, tmp_path / "online", **kw), teacher=teacher,
                     on_step=steps.append).run()
    assert [m.step for m in steps] == list(range(1, 7)) and all(m.seconds > 0 and m.targets > 0 for m in steps)
    assert online["first_loss"] == pytest.approx(offline["first_loss"], rel=2e-3)
    assert online["final_loss"] == pytest.approx(offline["final_loss"], rel=2e-2)
    assert online["final_loss"] < 0.8 * online["first_loss"] and math.isfinite(online["final_loss"])
    assert online["eval"]["eval/kd_loss"] == pytest.approx(offline["eval"]["eval/kd_loss"], rel=2e-2)


def test_setup_then_train_step_by_hand(teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path):
    """The public seams: every attribute exists before setup(); train_step takes the micro-batches."""
    trainer = Trainer(_cfg(teacher_cache, tiny_student_dir, tmp_path / "manual", max_steps=4, grad_accum=2))
    assert trainer.model is None and trainer.loader is None and trainer.resume_from is None
    with pytest.raises(RuntimeError, match="setup"):
        trainer.train()
    trainer.setup()
    first = trainer.train_step([next(trainer.loader) for _ in range(2)])
    assert first.step == 1 and trainer.state.step == 1 and math.isfinite(first.loss)
    assert first.loss == pytest.approx(first.kd_loss) and first.ce_loss > 0  # alpha = 0: the loss is the KD part
    summary = trainer.train()
    assert summary["steps"] == 4 and summary["first_loss"] == first.loss


def test_student_layers_copies_every_nth_layer(tiny_lm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pipeline.train.student import select_layers, shrink_model

    assert select_layers(12, 4) == [0, 3, 6, 9] and select_layers(5, 3) == [0, 2, 4]
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    small = shrink_model(teacher, 1, AutoModelForCausalLM)
    assert small.config.num_hidden_layers == 1
    torch.testing.assert_close(small.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(small.lm_head.weight, teacher.lm_head.weight)
    with pytest.raises(ConfigError, match="--student-layers"):
        select_layers(2, 3)


def test_shrunk_and_fresh_students_train(teacher_cache: Path, tiny_lm_dir: Path, tiny_tokenizer_dir: Path,
                                         tmp_path: Path) -> None:
    s = run_train(TrainConfig(cache=str(teacher_cache), student=str(tiny_lm_dir), student_layers=1,
                              out=str(tmp_path / "shrunk"), max_steps=2, **FAST))
    assert s["steps"] == 2
    s = run_train(TrainConfig(cache=str(teacher_cache), student_config=str(tiny_lm_dir / "config.json"),
                              tokenizer=str(tiny_tokenizer_dir), out=str(tmp_path / "fresh"), max_steps=2, **FAST))
    assert s["steps"] == 2


def test_sampled_and_class_caches_train(tmp_path: Path, tiny_tokenizer, tiny_student_dir: Path,
                                        tiny_classifier_dir: Path) -> None:
    sampled = write_random_cache(tmp_path / "s", tiny_tokenizer, kind="sampled", rows=12)
    assert run_train(_cfg(sampled, tiny_student_dir, tmp_path / "rs", max_steps=2))["steps"] == 2
    classes = write_random_cache(tmp_path / "c", tiny_tokenizer, kind="class_logits", rows=12, num_classes=2)
    s = run_train(_cfg(classes, tiny_classifier_dir, tmp_path / "rc", max_steps=3, alpha=0.5, temperature=2.0))
    assert s["steps"] == 3 and 0 <= s["eval"]["eval/top1_agreement"] <= 1


# -- bad input: each gives its error and leaves the output folder as it was -------------------------


@pytest.fixture()
def occupied(tmp_path: Path) -> Path:
    """An earlier kdpipe run (its marker) with a file in it: --overwrite may replace it, once every check passed."""
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / RUN_MARKER).write_text("{}\n")
    return out


def _untouched(out: Path) -> None:
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == sorted(["keep.txt", RUN_MARKER])


def test_non_empty_output_is_refused(teacher_cache: Path, tiny_student_dir: Path, occupied: Path) -> None:
    with pytest.raises(ConfigError, match=r"not empty.*--resume.*--overwrite"):
        run_train(_cfg(teacher_cache, tiny_student_dir, occupied, max_steps=1))
    _untouched(occupied)
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        run_train(_cfg(teacher_cache, tiny_student_dir, occupied, max_steps=1, resume=True))
    _untouched(occupied)


def test_missing_cache_passes_the_cache_error_through(tiny_student_dir: Path, occupied: Path) -> None:
    with pytest.raises(CacheNotFoundError):
        run_train(_cfg(occupied.parent / "nope", tiny_student_dir, occupied, max_steps=1, overwrite=True))
    _untouched(occupied)


def test_empty_cache_is_refused(tmp_path: Path, tiny_tokenizer, tiny_student_dir: Path, occupied: Path) -> None:
    empty = write_random_cache(tmp_path / "empty", tiny_tokenizer, rows=0)
    with pytest.raises(TrainingError, match="empty"):
        run_train(_cfg(empty, tiny_student_dir, occupied, max_steps=1, overwrite=True))
    _untouched(occupied)


def test_tokenizer_mismatch_is_refused(teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path,
                                       occupied: Path) -> None:
    from pipeline.demo.toy import build_tokenizer, make_texts

    other = tmp_path / "other_tok"
    build_tokenizer(make_texts(seed=5, n=50, words="x y z w q".split()), vocab_size=300, out_dir=other)
    with pytest.raises(ModelError, match=r"tokenizer differs.*--allow-vocab-mismatch"):
        run_train(_cfg(teacher_cache, tiny_student_dir, occupied, tokenizer=str(other), max_steps=1, overwrite=True))
    with pytest.raises(ModelError, match="cover the cache's vocabulary"):
        run_train(_cfg(teacher_cache, tiny_student_dir, occupied, tokenizer=str(other), max_steps=1, overwrite=True,
                       allow_vocab_mismatch=True))
    _untouched(occupied)


def test_student_vocab_smaller_than_cache_ids_is_refused(teacher_cache: Path, tiny_tokenizer, tmp_path: Path,
                                                         occupied: Path) -> None:
    from pipeline.demo.toy import build_llama

    small = tmp_path / "small_vocab"
    build_llama(200, hidden_size=32, num_layers=1, tokenizer=tiny_tokenizer, out_dir=small)
    with pytest.raises(ModelError, match=r"vocabulary.*smaller than the cache"):
        run_train(_cfg(teacher_cache, small, occupied, max_steps=1, overwrite=True, allow_vocab_mismatch=True))
    _untouched(occupied)


def test_wrong_task_for_the_student_head_is_refused(teacher_cache: Path, tiny_classifier_dir: Path,
                                                    tiny_student_dir: Path, tiny_tokenizer, tmp_path: Path,
                                                    occupied: Path) -> None:
    with pytest.raises(ModelError, match="sequence classifier"):
        run_train(_cfg(teacher_cache, tiny_classifier_dir, occupied, max_steps=1, overwrite=True))
    classes = write_random_cache(tmp_path / "c", tiny_tokenizer, kind="class_logits", rows=8, num_classes=3)
    with pytest.raises(ModelError, match="sequence-classification head"):
        run_train(_cfg(classes, tiny_student_dir, occupied, max_steps=1, overwrite=True))
    with pytest.raises(ModelError, match="3 classes"):
        run_train(_cfg(classes, tiny_classifier_dir, occupied, max_steps=1, overwrite=True))
    _untouched(occupied)


def test_unsupported_loss_for_sampled_cache_is_refused(tmp_path: Path, tiny_tokenizer, tiny_student_dir: Path,
                                                       occupied: Path) -> None:
    sampled = write_random_cache(tmp_path / "s", tiny_tokenizer, kind="sampled", rows=4)
    with pytest.raises(ConfigError, match="sampled"):
        run_train(_cfg(sampled, tiny_student_dir, occupied, max_steps=1, loss="rkl", overwrite=True))
    _untouched(occupied)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [({"max_steps": None}, "--max-steps"), ({"max_steps": 1, "epochs": 1.0}, "--epochs"),
     ({"max_steps": 1, "resume": True, "overwrite": True}, "--overwrite"), ({"max_steps": 1, "lr": -1.0}, "--lr"),
     ({"max_steps": 1, "loss": "kl"}, "--loss")],
)
def test_bad_flags_name_the_flag(overrides: dict, flag: str, tmp_path: Path) -> None:
    from pipeline.config import resolve_config

    base = {"cache": "c", "student": "s", "out": str(tmp_path / "o"), **overrides}
    with pytest.raises(ConfigError, match=flag):
        resolve_config(TrainConfig, None, base)


def test_cli_yaml_plus_flags_and_one_line_errors(teacher_cache: Path, tiny_student_dir: Path, tmp_path: Path,
                                                 occupied: Path, capsys) -> None:
    from pipeline.cli import main

    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(f"cache: {teacher_cache}\nstudent: {tiny_student_dir}\nmax-steps: 5\nbatch_size: 2\n"
                         "eval_rows: 0\nprogress: false\ntensorboard: false\n")
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as done:
        main(["train-student", "--config", str(yaml_path), "--out", str(out), "--max-steps", "2", "--lr", "0.001"])
    assert done.value.code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["resolved_config"]["batch_size"] == 2
    assert summary["resolved_config"]["lr"] == 0.001
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train-student", "--config", str(yaml_path), "--out", str(occupied)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output folder") and "--overwrite" in err[0]
    _untouched(occupied)


def test_options_bf16_checkpointing_accumulation_epochs(teacher_cache: Path, tiny_student_dir: Path,
                                                        tmp_path: Path) -> None:
    """bf16 autocast, gradient checkpointing, accumulation, warmup, epochs and evaluation every step
    (the evaluation reads the last shard while the stream is inside another one)."""
    s = run_train(_cfg(teacher_cache, tiny_student_dir, tmp_path / "o", epochs=0.25, precision="bf16",
                       gradient_checkpointing=True, grad_accum=2, warmup_steps=1, eval_every=1, save_every=100,
                       lr_scheduler="linear", num_workers=1))
    from cache_format import open_cache

    train_rows = open_cache(str(teacher_cache)).manifest.num_rows - FAST["eval_rows"]
    assert s["steps"] == math.ceil(0.25 * train_rows / (FAST["batch_size"] * 2))
    assert math.isfinite(s["final_loss"]) and len(s["history"]) == s["steps"]


@pytest.mark.parametrize(("overrides", "package"), [({"wandb": True}, "wandb"), ({"lora_r": 4}, "peft"),
                                                    ({"optimizer": "adamw_8bit"}, "bitsandbytes")])
def test_missing_optional_extras_are_named(teacher_cache: Path, tiny_student_dir: Path, occupied: Path,
                                           overrides: dict, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ConfigError, match=rf"needs the {package} package.*pip install 'kdpipe\["):
        run_train(_cfg(teacher_cache, tiny_student_dir, occupied, max_steps=1, overwrite=True, **overrides))
    _untouched(occupied)


def test_pure_kd_from_a_cache_with_a_large_tail_warns_once(tmp_path: Path, tiny_tokenizer, tiny_student_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Random top-2 distributions over a 384-token vocabulary leave most of the mass in the tail.
    cache = write_random_cache(tmp_path / "c", tiny_tokenizer, k=2)
    run_train(_cfg(cache, tiny_student_dir, tmp_path / "kd", max_steps=2))
    assert capsys.readouterr().err.count("outside the stored top-k") == 1
    run_train(_cfg(cache, tiny_student_dir, tmp_path / "mixed", max_steps=2, alpha=0.5))
    assert "outside the stored top-k" not in capsys.readouterr().err
