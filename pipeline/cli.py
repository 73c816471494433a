"""The ``kdpipe`` command line: the stage commands here, ``kdpipe cache ...`` in :mod:`pipeline.cli_cache`.

Each stage command's flags are generated from its config model (:func:`pipeline.config.config_command`),
so flags, ``--config`` YAML keys and the saved resolved config never drift apart. The command bodies
import torch and friends only when they run, so ``kdpipe --help`` and ``kdpipe cache ...`` stay fast.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback
from pathlib import Path

import typer

from pipeline import cli_cache
from pipeline.config import config_command
from pipeline.demo.config import DemoConfig
from pipeline.dump.config import DumpConfig
from pipeline.errors import ConfigError, describe_expected
from pipeline.eval.config import EvalConfig
from pipeline.hf_io import first_line
from pipeline.train.config import TrainConfig

app = typer.Typer(
    name="kdpipe",
    help="Offline knowledge distillation: dump a teacher's logits once into a cache, train students from it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def dump_teacher(cfg: DumpConfig, json_out: Path | None) -> None:
    """Stage 1: run the teacher over a dataset and write its distributions into a cache."""
    from pipeline.dump.run import format_summary, run_dump

    summary = run_dump(cfg)
    typer.echo(format_summary(summary))
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=2) + "\n")


def train_student(cfg: TrainConfig) -> None:
    """Train a student from a cache with a sparse KD loss (DDP/FSDP via torchrun or accelerate launch)."""
    from pipeline.train.trainer import run_train

    summary = run_train(cfg)
    if summary:  # empty on the non-main ranks of a distributed run
        keys = ("steps", "first_loss", "final_loss", "tokens_seen", "wall_s", "tokens_per_s")
        typer.echo(json.dumps({k: summary.get(k) for k in keys}))
        typer.echo(f"student saved to {cfg.out}")


def eval_command(cfg: EvalConfig, extra: list[str] | None) -> None:
    """Score a model with the seed project's metrics, or several side by side with --compare."""
    from pipeline.eval.run import print_result, run_eval

    if extra:  # `--compare A B C`: click binds A to the flag, B and C arrive as arguments
        if not cfg.compare:
            raise ConfigError(f"unexpected arguments {' '.join(extra)}; models to compare go after --compare")
        cfg.compare = [*cfg.compare, *extra]
    print_result(run_eval(cfg))


def demo_command(cfg: DemoConfig) -> None:
    """Run the whole pipeline offline on a synthetic language: teacher, cache, KD and CE students, report."""
    from pipeline.demo.run import run_demo

    typer.echo(run_demo(cfg)["table"])


def _keyword(name: str, annotation: object, default: object) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


JSON_SUMMARY = _keyword("json_out", Path | None,
                        typer.Option(None, "--json", help="Also write the summary to this JSON file."))
COMPARE_ARGUMENTS = _keyword("extra", list[str] | None, typer.Argument(
    None, help="More --compare entries (kdpipe eval --compare A B C).", show_default=False))


def register_commands() -> None:
    if app.registered_commands:  # main() runs many times in one test process
        return
    cli_cache.register(app)
    app.command("dump-teacher")(config_command(DumpConfig, dump_teacher, [JSON_SUMMARY]))
    app.command("train-student")(config_command(TrainConfig, train_student))
    app.command("eval")(config_command(EvalConfig, eval_command, [COMPARE_ARGUMENTS]))
    app.command("demo")(config_command(DemoConfig, demo_command))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one ``error:`` line and exit code 2.

    "User errors" are kdpipe's own (:class:`KdpipeError`, :class:`CacheError`) and the library
    exceptions that bad input or a bad environment raise (:func:`describe_expected`: a full or
    read-only disk, a non-UTF-8 file, corrupt Arrow/safetensors data, remote storage refusing, ...).
    Any other exception is a bug: its traceback is shown, then a line asking to report it (exit 1).
    """
    register_commands()
    try:
        app(args=argv, prog_name="kdpipe")
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        message = describe_expected(exc)
        if message is None:
            traceback.print_exc()
            print(f"error: unexpected {type(exc).__name__} (a bug in kdpipe): {first_line(exc)}; please report it "
                  "with the traceback above", file=sys.stderr)
            sys.exit(1)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
