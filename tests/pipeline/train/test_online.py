"""`train-student --teacher` (online KD): the teacher's full distribution, computed chunk by chunk in
this process, equals a k = V cache of the same teacher; it trains; a teacher that does not fit the
cache or the student is refused naming --teacher, before --out is touched."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers.train import build_trained_teacher, one_torch_thread, write_teacher_cache
from pipeline.errors import ConfigError, ModelError
from pipeline.train.checkpoint import RUN_MARKER
from pipeline.train.collate import collate_rows
from pipeline.train.distill import OnlineTeacher, TeacherHeadTargets, cached_targets
from pipeline.train.kd_loss import SparseKDLoss
from pipeline.train.losses import LOSS_KINDS, KDTargets, LossSpec
from pipeline.train.trainer import TrainConfig, Trainer, run_train

# a short run: no bar, no TensorBoard, a small held-out slice
RUN = {"progress": False, "tensorboard": False, "eval_rows": 8, "batch_size": 4}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer, tiny_texts) -> Path:
    """The tiny teacher, trained a little, and two caches of it beside it: top-8 (the rows the online
    runs read) and k = V (its whole distribution, to compare with)."""
    root = tmp_path_factory.mktemp("online")
    teacher = build_trained_teacher(root / "teacher", tiny_tokenizer, tiny_texts, steps=40)
    write_teacher_cache(root / "topk", teacher, tiny_tokenizer, tiny_texts[:48], k=8, max_shard_rows=24)
    write_teacher_cache(root / "full", teacher, tiny_tokenizer, tiny_texts[:16], k=len(tiny_tokenizer))
    return teacher


@pytest.fixture(scope="module")
def topk_cache(teacher_dir: Path) -> Path:
    return teacher_dir.parent / "topk"


@pytest.fixture(scope="module")
def full_cache(teacher_dir: Path) -> Path:
    return teacher_dir.parent / "full"


def _teacher(teacher_dir: Path) -> OnlineTeacher:
    from transformers import AutoModelForCausalLM

    return OnlineTeacher(AutoModelForCausalLM.from_pretrained(str(teacher_dir)))


def _batch(cache: Path, rows: int = 6) -> dict[str, torch.Tensor]:
    from cache_format import open_cache

    reader = open_cache(str(cache))
    return collate_rows(list(reader.iter_rows())[:rows], "topk", pad_id=0)


def _student_hidden(student_dir: Path, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(student_dir))
    with torch.no_grad():
        hidden = student.model(input_ids=batch["input_ids"]).last_hidden_state[batch["target_mask"]]
    return hidden, student.lm_head


def _loss_and_grads(loss: SparseKDLoss, hidden: torch.Tensor, head: torch.nn.Module, targets) -> tuple:
    h = hidden.clone().requires_grad_(True)
    head.weight.grad = None
    out = loss(h, head, targets)
    out.loss.backward()
    return out.loss.detach(), h.grad, head.weight.grad.clone()


def _cfg(cache: Path, student: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(cache=str(cache), student=str(student), out=str(out), **{**RUN, **kw})


# -- the targets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [LossSpec(), LossSpec(kind="jsd", temperature=2.0, alpha=0.3)],
                         ids=["fkl", "jsd-T2-alpha"])
def test_online_targets_equal_a_full_cache_of_the_same_teacher(spec: LossSpec, teacher_dir: Path, full_cache: Path,
                                                               tiny_student_dir: Path) -> None:
    """Loss and gradients of the online teacher = those of its k = V cache, up to the codec's rounding
    (log-probs to a step of 0.125 nats: each probability within e^(±1/16), i.e. ~6 %)."""
    batch = _batch(full_cache)
    hidden, head = _student_hidden(tiny_student_dir, batch)
    loss = SparseKDLoss(spec, chunk_size=16)
    online = _teacher(teacher_dir)(batch)
    assert isinstance(online, TeacherHeadTargets) and online.num_positions == int(batch["num_targets"])
    cached = cached_targets(batch)
    exact = online[0:online.num_positions].logprobs.gather(1, cached.ids)
    assert float((exact - cached.logprobs).abs()[exact > -20].max()) <= 0.125  # half a step + the normaliser
    ref = _loss_and_grads(loss, hidden, head, cached)
    got = _loss_and_grads(loss, hidden, head, online)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-3, atol=1e-4)
    for a, b in zip(got[1:], ref[1:], strict=True):  # gradients ~ q - p: p's rounding shows (exact: next test)
        assert float((a - b).norm() / b.norm()) < 0.08


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_chunked_teacher_equals_unchunked_and_the_dense_path_equals_the_bucket_path(
    kind: str, teacher_dir: Path, full_cache: Path, tiny_student_dir: Path
) -> None:
    """The teacher's head applied per chunk of 5 = its whole [N, V] logits at once; and the dense k = V path
    of the loss = the general bucket path on the same targets (values and gradients)."""
    batch = _batch(full_cache)
    hidden, head = _student_hidden(tiny_student_dir, batch)
    teacher = _teacher(teacher_dir)
    with torch.no_grad():
        logits = teacher.model(input_ids=batch["input_ids"]).logits[batch["target_mask"]]
    whole = KDTargets.full_distribution(logits, batch["labels"][batch["target_mask"]])
    spec = LossSpec(kind=kind, temperature=1.5, alpha=0.2)
    ref = _loss_and_grads(SparseKDLoss(spec, chunk_size=10_000), hidden, head, whole)
    for targets in (teacher(batch), replace(whole, dense=False)):
        got = _loss_and_grads(SparseKDLoss(spec, chunk_size=5), hidden, head, targets)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_on_its_own_device_and_dtype_gives_targets_on_the_batch_device(teacher_dir: Path,
                                                                               full_cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    batch = _batch(full_cache, rows=2)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.bfloat16)
    chunk = OnlineTeacher(model, device="cpu")(batch)[0:3]
    assert chunk.logprobs.dtype == torch.float32 and chunk.dense and chunk.logprobs.shape[0] == 3
    torch.testing.assert_close(chunk.logprobs.exp().sum(-1), torch.ones(3))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


# -- the trainer and the CLI -----------------------------------------------------------------------


def test_online_kd_trains_and_records_the_teacher(teacher_dir: Path, topk_cache: Path, tiny_student_dir: Path,
                                                  tiny_tokenizer, tmp_path: Path) -> None:
    kw = {"max_steps": 12, "lr": 5e-3, "eval_every": 6, "save_every": 12, "lr_scheduler": "constant"}
    s = run_train(_cfg(topk_cache, tiny_student_dir, tmp_path / "online", teacher=str(teacher_dir), **kw))
    assert math.isfinite(s["final_loss"]) and s["final_loss"] < 0.8 * s["first_loss"]
    assert s["history"][-1]["eval/kd_loss"] < s["history"][0]["eval/kd_loss"]
    assert s["teacher"]["name"] == str(teacher_dir) and s["teacher"]["vocab_size"] == len(tiny_tokenizer)
    assert s["teacher"]["dtype"] == "float32" and s["teacher"]["tokenizer_fingerprint"].startswith("sha256:")
    assert s["resolved_config"]["teacher"] == str(teacher_dir)
    offline = run_train(_cfg(topk_cache, tiny_student_dir, tmp_path / "offline", **kw))
    assert offline["teacher"] is None and offline["tokens_seen"] == s["tokens_seen"]  # the same rows


@pytest.mark.parametrize(("loss", "extra"), [("rkl", {"temperature": 2.0, "alpha": 0.5}), ("tvd", {}),
                                             ("fkl", {"no_tail": True})])
def test_every_loss_setting_runs_online(loss: str, extra: dict, teacher_dir: Path, topk_cache: Path,
                                        tiny_student_dir: Path, tmp_path: Path) -> None:
    settings = {k: v for k, v in extra.items() if k != "no_tail"} | {"tail_bucket": "no_tail" not in extra}
    s = run_train(_cfg(topk_cache, tiny_student_dir, tmp_path / "r", teacher=str(teacher_dir), max_steps=2,
                       eval_rows=0, loss=loss, **settings))
    assert math.isfinite(s["final_loss"])


def test_cli_train_student_with_teacher_and_cache(teacher_dir: Path, topk_cache: Path, tiny_student_dir: Path,
                                                  tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as done:
        main(["train-student", "--cache", str(topk_cache), "--teacher", str(teacher_dir), "--teacher-device", "cpu",
              "--student", str(tiny_student_dir), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
              "--eval-rows", "0", "--no-progress", "--no-tensorboard"])
    assert done.value.code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["teacher"]["device"] == "cpu"
    assert f"teacher: {teacher_dir}" in (out / "train_config.yaml").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        main(["train-student", "--cache", str(topk_cache), "--teacher", str(tmp_path / "missing"),
              "--student", str(tiny_student_dir), "--out", str(tmp_path / "never"), "--max-steps", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert bad.value.code == 2 and len(errors) == 1 and "(--teacher)" in errors[0]
    assert not (tmp_path / "never").exists()


# -- refusals ----------------------------------------------------------------------------------------


def _occupied(tmp_path: Path) -> Path:
    """A previous run's output folder (so --overwrite may replace it) holding a file no refused run may touch."""
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / RUN_MARKER).write_text("{}\n")
    (tmp_path / "occupied" / "keep.txt").write_text("precious")
    return tmp_path / "occupied"


def test_teacher_with_another_vocabulary_is_refused(topk_cache: Path, tiny_student_dir: Path, tiny_tokenizer,
                                                    tmp_path: Path) -> None:
    occupied = _occupied(tmp_path)
    from pipeline.demo.toy import build_llama, build_tokenizer, make_texts

    other_tok = tmp_path / "other_tok"
    tok = build_tokenizer(make_texts(seed=5, n=50, words="x y z w q".split()), vocab_size=300, out_dir=other_tok)
    other = tmp_path / "other_teacher"
    build_llama(300, tokenizer=tok, out_dir=other, seed=3)
    with pytest.raises(ModelError, match=r"--teacher .*differs from the cache's.*--allow-vocab-mismatch"):
        run_train(_cfg(topk_cache, tiny_student_dir, occupied, teacher=str(other), max_steps=1, overwrite=True))
    vocab = len(tiny_tokenizer)
    with pytest.raises(ModelError, match=rf"--teacher .*fewer than the {vocab}"):
        run_train(_cfg(topk_cache, tiny_student_dir, occupied, teacher=str(other), max_steps=1, overwrite=True,
                       allow_vocab_mismatch=True))
    wide = tmp_path / "wide_teacher"
    build_llama(500, tokenizer=tiny_tokenizer, out_dir=wide, seed=3)  # same tokenizer, more output rows
    with pytest.raises(ModelError, match=rf"--teacher .*500 output rows.*larger than the student's \({vocab}\)"):
        run_train(_cfg(topk_cache, tiny_student_dir, occupied, teacher=str(wide), max_steps=1, overwrite=True))
    assert sorted(p.name for p in occupied.iterdir()) == sorted(["keep.txt", RUN_MARKER])


def test_teacher_settings_are_checked(topk_cache: Path, teacher_dir: Path, tiny_student_dir: Path,
                                      tmp_path: Path) -> None:
    occupied = _occupied(tmp_path)
    from pipeline.config import resolve_config

    with pytest.raises(ConfigError, match="--teacher-device"):
        resolve_config(TrainConfig, None, {"cache": "c", "student": "s", "out": "o", "max_steps": 1,
                                           "teacher_device": "gpu"})
    trainer = Trainer(_cfg(topk_cache, tiny_student_dir, occupied, teacher=str(teacher_dir), max_steps=1,
                           overwrite=True), teacher=cached_targets)
    with pytest.raises(ConfigError, match=r"--teacher.*Trainer\(teacher=...\)"):
        trainer.setup()
    assert sorted(p.name for p in occupied.iterdir()) == sorted(["keep.txt", RUN_MARKER])
