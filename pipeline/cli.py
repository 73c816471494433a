"""The ``kdpipe`` command line.

Each stage registers its commands from its own ``cli_*`` module, which imports torch and
friends only inside the command bodies so ``kdpipe --help`` and ``kdpipe cache ...`` stay fast.
"""

from __future__ import annotations

import sys

import typer

from cache_format.errors import CacheError
from pipeline.errors import KdpipeError

app = typer.Typer(
    name="kdpipe",
    help="Offline knowledge distillation: dump a teacher's logits once into a cache, train students from it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_commands() -> None:
    # Imported here so a broken optional stage names itself instead of breaking the whole CLI.
    from pipeline import cli_cache, cli_dump, cli_eval, cli_train

    for module in (cli_cache, cli_dump, cli_train, cli_eval):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one ``error:`` line and exit code 2."""
    _register_commands()
    try:
        app(args=argv, prog_name="kdpipe")
    except (KdpipeError, CacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
