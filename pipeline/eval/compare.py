"""``kdpipe eval --compare``: several models (or their earlier ``--json`` results) in one markdown table.

Table layout and formatting only; each model is scored by :func:`pipeline.eval.run.evaluate_model`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.config import atomic_write_text, save_resolved_config
from pipeline.errors import ConfigError
from pipeline.eval import metrics
from pipeline.eval.config import EvalConfig

# Metrics shown per task, in the seed table's order, and which way is better.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "lm": ("perplexity", "acc@1", "acc@5"),
    "classification": ("accuracy",),
    "summarization": ("bleu", "rouge1", "rouge2", "rougeL"),
    "reasoning": ("exact_match",),
}
LOWER_IS_BETTER = {"perplexity", "kl_to_teacher"}
TASK_TITLES = {
    "lm": "LM, perplexity / acc@1 / acc@5",
    "classification": "classification, accuracy",
    "summarization": "summarization, BLEU / ROUGE-1 / ROUGE-2 / ROUGE-L",
    "reasoning": "reasoning, exact match of the final number",
}


def parse_compare_entry(entry: str) -> tuple[str, str]:
    """``"NAME=PATH"`` -> (NAME, PATH); a bare ``PATH`` is named by its last path component."""
    if "=" in entry and not Path(entry).exists():
        name, _, path = entry.partition("=")
        if not name or not path:
            raise ConfigError(f"--compare entry {entry!r} must be NAME=PATH or PATH")
        return name, path
    return Path(entry.rstrip("/")).name or entry, entry


def run_compare(cfg: EvalConfig, echo: bool = True) -> dict[str, Any]:
    """Evaluate each ``--compare`` entry (or load its earlier ``--json`` result) into one table.

    ``echo``: print the markdown table (the CLI's output; callers that print it themselves pass False).
    """
    # Imported here: run.py imports this module for run_eval's --compare branch.
    from pipeline.eval.run import evaluate_model

    columns: list[dict[str, Any]] = []
    for entry in cfg.compare or []:
        name, path = parse_compare_entry(entry)
        if path.endswith(".json"):
            result = _load_result(path)
        else:
            result = evaluate_model(cfg.model_copy(update={"compare": None, "model": path, "json_path": None}))
        columns.append({"name": name, **result})
    markdown = compare_table(columns)
    out = {"columns": columns, "markdown": markdown}
    write_outputs(cfg, out, markdown=markdown)
    if echo:
        print(markdown)
    return out


def _load_result(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--compare result file {p} does not exist; write it first with kdpipe eval --json {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--compare result file {p} is not valid JSON ({exc}); regenerate it with --json") from None
    if not isinstance(data, dict) or "task" not in data or "params" not in data:
        raise ConfigError(f"--compare result file {p} is not a kdpipe eval result (no 'task'/'params' keys)")
    return data


def format_value(value: Any) -> str:
    """A table cell: two decimals from 10 up, three below; ``—`` for a missing value."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def compare_table(columns: list[dict[str, Any]]) -> str:
    """Markdown: the seed project's one-row-per-task table, then every metric on its own row."""
    names = [c["name"] for c in columns]
    tasks = list(dict.fromkeys(c["task"] for c in columns))
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in tasks:
        cells = [_task_cell(c, task) for c in columns]
        lines.append(f"| {TASK_TITLES[task]} | " + " | ".join(cells) + " |")
    lines += ["", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in _metric_rows(columns):
        row = [format_value(lookup(c, key)) for c in columns]
        arrow = " (lower is better)" if key.split(".")[-1] in LOWER_IS_BETTER else ""
        lines.append(f"| {key}{arrow} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _task_cell(column: dict[str, Any], task: str) -> str:
    """``ppl / acc@1 / acc@5 (params)`` of one model on ``task``; ``—`` when it was scored on another."""
    if column["task"] != task or "metrics" not in column:
        return "—"
    values = " / ".join(format_value(column["metrics"].get(m)) for m in TASK_METRICS[task])
    return f"{values} ({metrics.format_params(int(column['params']))})"


def _metric_rows(columns: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {"params": None}
    for c in columns:
        keys.update({f"metrics.{k}": None for k in TASK_METRICS.get(c["task"], ())})
        if c.get("agreement"):
            keys.update({"agreement.top1_agreement": None, "agreement.kl_to_teacher": None})
    return list(keys)


def lookup(result: dict[str, Any], dotted: str) -> Any:
    """``result["a"]["b"]`` for ``"a.b"``; None when any part is missing."""
    value: Any = result
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def write_outputs(cfg: EvalConfig, result: dict[str, Any], markdown: str | None) -> None:
    """``--json FILE``: the result, the markdown table beside it, and the resolved config."""
    if not cfg.json_path:
        return
    path = Path(cfg.json_path)
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    if markdown is not None:
        atomic_write_text(path.with_suffix(".md"), markdown)
    save_resolved_config(cfg, path.parent, name=f"{path.stem}.config.yaml")
