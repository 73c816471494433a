"""`kdpipe eval` and `kdpipe demo`: flags and ``--config file.yaml`` -> config model -> ``run_*``.

Every option defaults to ``None`` (= not given), so a YAML file's value is kept unless the flag
is passed; the real defaults live in ``EvalConfig`` / ``DemoConfig`` (one place, each with its reason).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Opt = typer.Option


def eval_command(
    model: Annotated[str | None, Opt("--model", help="Model to evaluate: HF folder or hub name.")] = None,
    task: Annotated[str | None, Opt("--task", help="lm | classification | summarization | reasoning")] = None,
    dataset: Annotated[str | None, Opt("--dataset", help="Local file/folder or hub dataset name.")] = None,
    config: Annotated[Path | None, Opt("--config", help="YAML with the same keys; flags override it.")] = None,
    dataset_config: Annotated[str | None, Opt("--dataset-config", help="Hub dataset config.")] = None,
    dataset_format: Annotated[str | None, Opt("--dataset-format",
                                              help="auto | json | parquet | csv | text | sst2")] = None,
    split: Annotated[str | None, Opt("--split", help="Dataset split (default validation).")] = None,
    limit: Annotated[int | None, Opt("--limit", help="Use only the first N rows.")] = None,
    text_field: Annotated[str | None, Opt("--text-field", help="Text / document / question field.")] = None,
    label_field: Annotated[str | None, Opt("--label-field", help="Gold label field (classification).")] = None,
    response_field: Annotated[str | None, Opt("--response-field", help="Reference summary / answer field.")] = None,
    template: Annotated[str | None, Opt("--template", help="Prompt template with {text}.")] = None,
    chat_template: Annotated[bool | None, Opt("--chat-template/--no-chat-template",
                                              help="Wrap prompts in the tokenizer's chat template.")] = None,
    max_length: Annotated[int | None, Opt("--max-length", help="Tokens per row (default 512).")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="Rows per forward / generate call.")] = None,
    max_new_tokens: Annotated[int | None, Opt("--max-new-tokens", help="Generated tokens per answer.")] = None,
    generation_backend: Annotated[str | None, Opt("--generation-backend", help="auto | hf | vllm")] = None,
    device: Annotated[str | None, Opt("--device", help="auto | cpu | cuda | cuda:N")] = None,
    dtype: Annotated[str | None, Opt("--dtype", help="float32 | bfloat16 | float16")] = None,
    teacher: Annotated[str | None, Opt("--teacher", help="Teacher model: adds top-1 agreement and KL.")] = None,
    cache: Annotated[str | None, Opt("--cache", help="Teacher cache: agreement on the cache's rows.")] = None,
    json_path: Annotated[str | None, Opt("--json", help="Write the result (and config) as JSON here.")] = None,
    compare: Annotated[list[str] | None, Opt("--compare", help="NAME=PATH or PATH (model or earlier --json "
                                                               "result); repeat, or list after one flag.")] = None,
    trust_remote_code: Annotated[bool | None, Opt("--trust-remote-code", help="Run the model repo's code.")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Seed for generation backends.")] = None,
    extra: Annotated[list[str] | None, typer.Argument(help="More --compare entries (kdpipe eval --compare A B C).",
                                                      show_default=False)] = None,
) -> None:
    """Score a model with the seed project's metrics, or several side by side with --compare."""
    from pipeline.config import resolve_config
    from pipeline.errors import ConfigError
    from pipeline.eval.run import EvalConfig, print_result, run_eval

    if extra and not compare:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}; models to compare go after --compare")
    if compare is not None:
        compare = [*compare, *(extra or [])]
    overrides: dict[str, Any] = {k: v for k, v in locals().items() if k in EvalConfig.model_fields}
    cfg = resolve_config(EvalConfig, config, overrides)
    print_result(run_eval(cfg))


def demo_command(
    out: Annotated[str | None, Opt("--out", help="Report folder (default ./kdpipe-demo).")] = None,
    config: Annotated[Path | None, Opt("--config", help="YAML with the same keys; flags override it.")] = None,
    backend: Annotated[str | None, Opt("--backend", help="auto | hf | vllm (teacher engine of the dump)")] = None,
    quick: Annotated[bool | None, Opt("--quick/--full", help="Tiny sizes (seconds) for smoke tests.")] = None,
    teacher_steps: Annotated[int | None, Opt("--teacher-steps", help="Teacher training steps.")] = None,
    student_steps: Annotated[int | None, Opt("--student-steps", help="Student training steps (both runs).")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Seed of the language, data and models.")] = None,
    overwrite: Annotated[bool | None, Opt("--overwrite/--no-overwrite",
                                          help="Replace an earlier demo in --out (default on).")] = None,
) -> None:
    """Run the whole pipeline offline on a synthetic language: teacher, cache, KD and CE students, report."""
    from pipeline.config import resolve_config
    from pipeline.demo.run import DemoConfig, run_demo

    overrides: dict[str, Any] = {k: v for k, v in locals().items() if k in DemoConfig.model_fields}
    cfg = resolve_config(DemoConfig, config, overrides)
    summary = run_demo(cfg)
    typer.echo(summary["table"])


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `kdpipe` app."""
    app.command("eval")(eval_command)
    app.command("demo")(demo_command)
