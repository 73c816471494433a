"""Shared caches and user folders are untrusted input (issue 10, pipeline side).

No command deletes what kdpipe did not create; train-student and eval verify shard checksums (also in
DataLoader workers) and eval checks the tokenizer like train-student; a rerun of a dump repairs missing
or damaged shards; stuck states recover; a checkpoint that cannot be read or written is a clear error
or a fallback; every expected failure is one ``error:`` line with exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from cache_format import CacheWriter, open_cache, read_identity, verify_cache
from cache_format.errors import InvariantError
from helpers.train import one_torch_thread, write_random_cache
from pipeline.cli import main
from pipeline.dump.run import DumpConfig, run_dump
from pipeline.errors import TrainingError, describe_expected
from pipeline.train.checkpoint import RUN_MARKER
from pipeline.train.trainer import TrainConfig, Trainer, run_train

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

FAST = {"progress": False, "tensorboard": False, "eval_rows": 0, "batch_size": 4}


def cli(capsys: Any, *args: str) -> tuple[int, str]:
    """Run ``kdpipe ARGS`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    return int(done.value.code or 0), capsys.readouterr().err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash: equal snapshots = nothing deleted or changed."""
    return {str(p.relative_to(root)): ("link" if p.is_symlink() else "dir" if p.is_dir()
                                       else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def flip_byte(path: Path, at: float = 0.5) -> None:
    """Damage a file in place, same size: one byte inverted."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A random top-k cache of the tiny tokenizer, three shards."""
    return write_random_cache(tmp_path_factory.mktemp("kd") / "cache", tiny_tokenizer, rows=24, max_shard_rows=8)


def train_args(cache: Path, student: Path, out: Path, *extra: Any) -> list[Any]:
    return ["train-student", "--cache", cache, "--student", student, "--out", out, "--max-steps", 1,
            "--batch-size", 4, "--eval-rows", 0, "--no-progress", "--no-tensorboard", *extra]


def _cfg(cache: Path, student: Path, out: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(cache=str(cache), student=str(student), out=str(out), **{**FAST, **kw})


# ----------------------------------------------------------------------------- --overwrite never loses data


@pytest.mark.parametrize("case", ["the cache", "the cache's parent", "inside the cache", "a user folder",
                                  "the student", "the student's parent"])
def test_train_overwrite_refuses_folders_kdpipe_did_not_create(case: str, tmp_path: Path, tiny_tokenizer: Any,
                                                               tiny_student_dir: Path, capsys: Any) -> None:
    cache = write_random_cache(tmp_path / "data" / "cache", tiny_tokenizer, rows=8)
    student = Path(shutil.copytree(tiny_student_dir, tmp_path / "models" / "student"))
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "chapter1.tex").write_text("years of work")
    out = {"the cache": cache, "the cache's parent": cache.parent, "inside the cache": cache / "run",
           "a user folder": user, "the student": student, "the student's parent": student.parent}[case]
    before = snapshot(tmp_path)
    code, err = cli(capsys, *train_args(cache, student, out, "--overwrite"))
    one_line_error(code, err, str(out))
    assert snapshot(tmp_path) == before
    if case == "inside the cache":  # writing a run into a cache folder is refused even without --overwrite
        one_line_error(*cli(capsys, *train_args(cache, student, out)), "overlaps the cache")
        assert snapshot(tmp_path) == before


def test_train_overwrite_replaces_an_earlier_run_old_or_new(cache: Path, tiny_student_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train(_cfg(cache, tiny_student_dir, out, max_steps=1))
    assert (out / RUN_MARKER).is_file()
    (out / RUN_MARKER).unlink()  # a run of an older kdpipe: recognised by its train_config.yaml
    (out / "old.txt").write_text("x")
    run_train(_cfg(cache, tiny_student_dir, out, max_steps=1, overwrite=True))
    assert (out / RUN_MARKER).is_file() and not (out / "old.txt").exists()


def _dump_cfg(teacher: Path, data: Path, out: Path, **kw: Any) -> DumpConfig:
    return DumpConfig(teacher=str(teacher), dataset=str(data), out=str(out), top_k=8, max_length=32, unit_rows=4,
                      unit_bytes=256, batch_size=4, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def reference_dump(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, data_dir: Path) -> Path:
    """One uninterrupted dump: every repaired or recovered dump must equal it."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_dump(_dump_cfg(tiny_lm_dir, data_dir / "wiki.txt", out))
    return out


def _shards(cache: Path) -> list[tuple[str, str]]:
    return [(s.name, s.sha256) for s in open_cache(str(cache)).manifest.shards]


def test_dump_overwrite_refuses_a_cache_with_user_files_before_deleting_anything(
        reference_dump: Path, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = Path(shutil.copytree(reference_dump, tmp_path / "cache"))
    (tmp_path / "cache.config.yaml").write_text("teacher: mine\n")
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = cli(capsys, "dump-teacher", "--teacher", tiny_lm_dir, "--dataset", data_dir / "wiki.txt", "--out", out,
                    "--top-k", 8, "--max-length", 32, "--device", "cpu", "--no-progress", "--overwrite")
    one_line_error(code, err, "notes.txt", "nothing was deleted")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- consumers verify checksums


def test_damaged_same_size_shard_is_refused_by_train_and_eval(tmp_path: Path, tiny_tokenizer: Any,
                                                               tiny_student_dir: Path, capsys: Any) -> None:
    cache = write_random_cache(tmp_path / "cache", tiny_tokenizer, rows=8)  # one shard
    shard = cache / open_cache(str(cache)).manifest.shards[0].name
    flip_byte(shard)
    one_line_error(*cli(capsys, *train_args(cache, tiny_student_dir, tmp_path / "a")), "sha256", shard.name)
    # The DataLoader workers' readers verify too, and their error stays one line.
    one_line_error(*cli(capsys, *train_args(cache, tiny_student_dir, tmp_path / "b", "--num-workers", 1)), "sha256")
    one_line_error(*cli(capsys, "eval", "--model", tiny_student_dir, "--cache", cache, "--device", "cpu"), "sha256")
    # Opting out reads the damaged bytes: they decode to data the decoder accepts, or to a one-line error.
    code, err = cli(capsys, *train_args(cache, tiny_student_dir, tmp_path / "c", "--no-verify-checksums"))
    assert code in (0, 2) and "Traceback" not in err, err


def test_eval_refuses_a_model_with_another_tokenizer(cache: Path, tiny_student_dir: Path, tmp_path: Path,
                                                     capsys: Any) -> None:
    from pipeline.demo.toy import build_tokenizer, make_texts

    other = Path(shutil.copytree(tiny_student_dir, tmp_path / "other"))
    build_tokenizer(make_texts(seed=5, n=50, words="x y z w q".split()), vocab_size=300, out_dir=other)
    args = ["eval", "--model", other, "--cache", cache, "--device", "cpu", "--limit", 2]
    one_line_error(*cli(capsys, *args), "differs from the cache's", "--allow-vocab-mismatch")
    code, err = cli(capsys, *args, "--allow-vocab-mismatch")
    assert code == 0, err


# ----------------------------------------------------------------------------- dump resume repairs


@pytest.mark.parametrize("damage", ["deleted", "same-size damage", "symlink out", "unfinished + damage"])
def test_dump_rerun_repairs_missing_or_damaged_shards(damage: str, reference_dump: Path, tiny_lm_dir: Path,
                                                      data_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = Path(shutil.copytree(reference_dump, tmp_path / "cache"))
    shard = out / _shards(out)[1][0]
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    if damage == "deleted":
        shard.unlink()
    elif damage == "symlink out":
        shard.unlink()
        shard.symlink_to(outside)
    else:
        if damage == "unfinished + damage":  # as if the dump was killed before finalize: unit markers, no manifest
            CacheWriter(out, read_identity(str(out)), mode="resume").close()
            assert not (out / "manifest.json").exists()
        flip_byte(shard)
    capsys.readouterr()
    summary = run_dump(_dump_cfg(tiny_lm_dir, data_dir / "wiki.txt", out))
    assert summary["units_done"] == 1 and shard.name in capsys.readouterr().err
    assert _shards(out) == _shards(reference_dump) and verify_cache(str(out))["ok"]
    assert outside.read_text() == "not yours" and not shard.is_symlink()


def test_dump_stopped_before_its_marker_starts_clean(reference_dump: Path, tiny_lm_dir: Path, data_dir: Path,
                                                      tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    (out / f".tmp-{'0' * 32}-.kdpipe-incomplete.json").write_text("{")  # the marker's temp file, never renamed
    run_dump(_dump_cfg(tiny_lm_dir, data_dir / "wiki.txt", out))
    assert _shards(out) == _shards(reference_dump)
    (out / ".tmp-mine").mkdir()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / ".tmp-notes").write_text("mine")  # not a name kdpipe's writer makes: left alone, refused
    code, err = cli(capsys, "dump-teacher", "--teacher", tiny_lm_dir, "--dataset", data_dir / "wiki.txt",
                    "--out", stranger, "--no-progress")
    one_line_error(code, err, "holds no kdpipe cache")
    assert (stranger / ".tmp-notes").read_text() == "mine"


# ----------------------------------------------------------------------------- bad settings, stuck runs


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_non_finite_or_non_positive_temperature_is_refused(value: str, cache: Path, tiny_student_dir: Path,
                                                          tmp_path: Path, capsys: Any) -> None:
    code, err = cli(capsys, *train_args(cache, tiny_student_dir, tmp_path / "o", "--temperature", value))
    one_line_error(code, err, "--temperature")
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint_falls_back_to_the_previous_one(cache: Path, tiny_student_dir: Path, tmp_path: Path,
                                                             capsys: Any) -> None:
    out = tmp_path / "run"
    run_train(_cfg(cache, tiny_student_dir, out, max_steps=4, save_every=2))
    optimizer = out / "checkpoints" / "step-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    capsys.readouterr()
    summary = run_train(_cfg(cache, tiny_student_dir, out, max_steps=6, save_every=2, resume=True))
    err = capsys.readouterr().err
    assert summary["steps"] == 6 and "step-4" in err and "cannot be loaded" in err
    for step in (4, 6):  # no checkpoint left that loads: a clear error, not a traceback
        path = out / "checkpoints" / f"step-{step}" / "optimizer.bin"
        path.write_bytes(path.read_bytes()[:100])
    code, err = cli(capsys, *train_args(cache, tiny_student_dir, out, "--max-steps", 8, "--save-every", 2,
                                        "--resume"))
    one_line_error(code, err, "no usable checkpoint", "step-6")


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(failure: Exception, cache: Path,
                                                              tiny_student_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self: Any, output_dir: str, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(self, output_dir, **kw)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise failure

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="disk full" if isinstance(failure, OSError) else "full disk") as exc:
        run_train(_cfg(cache, tiny_student_dir, out, max_steps=4, save_every=2))
    assert str(out / "checkpoints") in str(exc.value) and "step-2" in str(exc.value)
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_non_finite_targets_blame_the_cache_and_a_diverging_student_the_lr(cache: Path, tiny_student_dir: Path,
                                                                          tmp_path: Path) -> None:
    trainer = Trainer(_cfg(cache, tiny_student_dir, tmp_path / "run", max_steps=2))
    trainer.setup()
    batch = next(trainer.loader)
    shard, row = batch["row_ref"][1].tolist()
    poisoned = {k: v.clone() for k, v in batch.items()}
    t = int(poisoned["target_mask"][1].nonzero()[0, 0])
    poisoned["logprobs"][1, t, 0] = float("nan")
    name = trainer.manifest.shards[shard].name
    with pytest.raises(InvariantError, match=rf"shard {name} row {row} holds NaN/inf.*verify"):
        trainer.train_step([poisoned])
    with torch.no_grad():
        for p in trainer.student.parameters():
            p.fill_(float("nan"))
    with pytest.raises(TrainingError, match="lower --lr"):
        trainer.train_step([batch])


# ----------------------------------------------------------------------------- one-line errors


def test_unusable_out_paths_are_one_line_errors(cache: Path, tiny_student_dir: Path, tmp_path: Path, capsys: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(*cli(capsys, *train_args(cache, tiny_student_dir, a_file)), "is a file")
    one_line_error(*cli(capsys, *train_args(cache, tiny_student_dir, a_file / "out")), "which is a file")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    one_line_error(*cli(capsys, *train_args(cache, tiny_student_dir, dangling)), "symbolic link")
    read_only = tmp_path / "ro" / "out"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kw: Any) -> None:  # root ignores chmod 555: simulate a read-only mount
        if self == read_only:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_mkdir(self, *args, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    one_line_error(*cli(capsys, *train_args(cache, tiny_student_dir, read_only)), "read-only", str(read_only))


def test_non_utf8_config_and_dataset_name_the_file(tiny_lm_dir: Path, tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "train.yaml"
    config.write_bytes(b"cache: caf\xe9\n")
    one_line_error(*cli(capsys, "train-student", "--config", config), str(config), "UTF-8")
    data = tmp_path / "data.txt"
    data.write_bytes(b"hello world\nna\xefve caf\xe9\n")
    code, err = cli(capsys, "dump-teacher", "--teacher", tiny_lm_dir, "--dataset", data, "--out", tmp_path / "c",
                    "--device", "cpu", "--no-progress")
    one_line_error(code, err, str(data), "UTF-8")


def test_corrupt_teacher_weights_are_one_line(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path,
                                              capsys: Any) -> None:
    teacher = Path(shutil.copytree(tiny_lm_dir, tmp_path / "teacher"))
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = cli(capsys, "dump-teacher", "--teacher", teacher, "--dataset", data_dir / "wiki.txt",
                    "--out", tmp_path / "c", "--device", "cpu", "--no-progress")
    one_line_error(code, err)
    assert "model.safetensors" in err


def _pyarrow_error() -> Exception:
    import pyarrow as pa

    return pa.ArrowInvalid("Buffer 0 did not start on 8-byte aligned offset")


def _botocore_error() -> Exception:
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


def _safetensors_error() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/data/out"), "disk full"),
    (lambda: OSError(errno.EROFS, "Read-only file system", "/data/out"), "read-only"),
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/out"), "permission denied"),
    (lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/out"), "not a folder"),
    (lambda: OSError(errno.ELOOP, "Too many levels of symbolic links", "/data/loop"), "symlink loop"),
    (lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "remote storage"),
    (lambda: RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (lambda: MemoryError(), "out of memory"),
    (_pyarrow_error, "Arrow could not read"),
    (_botocore_error, "remote storage"),
    (_safetensors_error, "corrupt or truncated"),
])
def test_expected_library_errors_become_one_line(make: Any, needle: str) -> None:
    message = describe_expected(make())
    assert message is not None and needle in message and "\n" not in message


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any) -> None:
    import pipeline.demo.run

    def broken(cfg: Any) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(pipeline.demo.run, "run_demo", broken)
    assert describe_expected(ValueError("boom")) is None and describe_expected(KeyError("k")) is None
    code, err = cli(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 1 and "Traceback" in err and "ValueError" in err and "report" in err.strip().splitlines()[-1]

