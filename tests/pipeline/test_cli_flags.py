"""Flags generated from the config models: every field has a flag (or is YAML-only) and a description,
and what the flags say parses back into the config, on top of ``--config`` YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

from pipeline.cli import app, register_commands
from pipeline.config import config_command, field_flags
from pipeline.demo.config import DemoConfig
from pipeline.dump.config import DumpConfig
from pipeline.errors import ConfigError
from pipeline.eval.config import EvalConfig
from pipeline.train.config import TrainConfig

COMMANDS: dict[str, type[BaseModel]] = {
    "dump-teacher": DumpConfig, "train-student": TrainConfig, "eval": EvalConfig, "demo": DemoConfig,
}
# Flags that are not config fields, and flags whose form differs from --field-name (--x/--no-x for bools).
EXTRA_FLAGS = {"dump-teacher": {"--config", "--json"}, "train-student": {"--config"},
               "eval": {"--config"}, "demo": {"--config"}}
SPECIAL_FORMS = {
    ("dump-teacher", "teacher_generates"): ["--teacher-generates", "--reference-answers"],
    ("dump-teacher", "load_in_4bit"): ["--load-in-4bit"],
    ("dump-teacher", "overwrite"): ["--overwrite"],
    ("eval", "json_path"): ["--json"],
    ("eval", "trust_remote_code"): ["--trust-remote-code"],
    ("demo", "quick"): ["--quick", "--full"],
    ("train-student", "resume"): ["--resume", "--no-resume"],
}


def _options_of(name: str) -> dict[str, TyperOption]:
    """The options of ``kdpipe <name>`` by parameter name, as click parses them."""
    register_commands()
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    params = group.commands[name].params
    return {p.name: p for p in params if isinstance(p, TyperOption) and p.name is not None}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_field_has_a_flag_or_is_yaml_only_and_a_description(name: str) -> None:
    model = COMMANDS[name]
    options = _options_of(name)
    for field_name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{field_name} has no description (its --help text)"
        decls = field_flags(field_name, field)
        if not decls:  # YAML-only must be said on the field, not be an accident
            assert field_name not in options and "cli_flags" in (field.json_schema_extra or {})
            continue
        assert field_name in options, f"{model.__name__}.{field_name} has no flag in `kdpipe {name}`"
        option = options[field_name]
        assert option.help and option.help.startswith(field.description)
        assert option.default is None, f"--{field_name} must default to None so --config YAML values survive"
    flags = {opt for option in options.values() for opt in (*option.opts, *option.secondary_opts)}
    field_opts = {opt for f, option in options.items() if f in model.model_fields
                  for opt in (*option.opts, *option.secondary_opts)}
    assert flags - field_opts == EXTRA_FLAGS[name]


@pytest.mark.parametrize(("key", "forms"), SPECIAL_FORMS.items())
def test_flag_forms_stay_as_they_were(key: tuple[str, str], forms: list[str]) -> None:
    option = _options_of(key[0])[key[1]]
    assert [*option.opts, *option.secondary_opts] == forms


def _resolve(model: type[BaseModel], args: list[str], yaml_values: dict[str, Any] | None = None,
             tmp_path: Path | None = None) -> tuple[BaseModel, dict[str, Any]]:
    """Invoke a command generated from ``model`` whose body only records the resolved config."""
    seen: dict[str, Any] = {}

    def record(cfg: BaseModel) -> None:
        """Record."""
        seen["cfg"] = cfg

    one = typer.Typer()
    one.command("run")(config_command(model, record))
    one.command("other")(lambda: None)  # two commands: typer keeps the name
    if yaml_values is not None and tmp_path is not None:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(yaml_values))
        args = ["--config", str(tmp_path / "c.yaml"), *args]
    result = CliRunner().invoke(one, ["run", *args])
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return seen["cfg"], seen


def test_dump_flags_parse_back_over_yaml(tmp_path: Path) -> None:
    base = {"teacher": "t", "dataset": "d.txt", "out": "o", "top_k": 4, "max-length": 16, "progress": False}
    cfg, _ = _resolve(DumpConfig, ["--top-k", "6", "--teacher-generates", "--dataset-format", "sst2",
                                   "--gpu-memory-utilization", "0.5", "--load-in-8bit"], base, tmp_path)
    assert isinstance(cfg, DumpConfig)
    assert (cfg.top_k, cfg.max_length, cfg.progress) == (6, 16, False)  # flag wins, YAML survives
    assert cfg.teacher_generates and cfg.load_in_8bit and cfg.dataset_format == "sst2"
    assert cfg.gpu_memory_utilization == 0.5
    cfg, _ = _resolve(DumpConfig, ["--reference-answers", "--progress"], {**base, "teacher_generates": True},
                      tmp_path)
    assert isinstance(cfg, DumpConfig) and not cfg.teacher_generates and cfg.progress


def test_train_flags_parse_back_over_yaml(tmp_path: Path) -> None:
    base = {"cache": "c", "student": "s", "out": "o", "max_steps": 3, "storage_options": {"anon": True},
            "lora_target_modules": ["q_proj"]}
    cfg, _ = _resolve(TrainConfig, ["--no-tail-bucket", "--lr", "0.01", "--loss", "jsd"], base, tmp_path)
    assert isinstance(cfg, TrainConfig)
    assert not cfg.tail_bucket and cfg.lr == 0.01 and cfg.loss == "jsd"
    assert cfg.storage_options == {"anon": True} and cfg.lora_target_modules == ["q_proj"]
    cfg, _ = _resolve(TrainConfig, ["--lora-target-modules", "k_proj", "--lora-target-modules", "v_proj"],
                      base, tmp_path)
    assert isinstance(cfg, TrainConfig) and cfg.lora_target_modules == ["k_proj", "v_proj"]


def test_eval_and_demo_flags_parse_back() -> None:
    cfg, _ = _resolve(EvalConfig, ["--compare", "a", "--compare", "b=x", "--json", "r.json", "--no-chat-template"])
    assert isinstance(cfg, EvalConfig)
    assert cfg.compare == ["a", "b=x"] and cfg.json_path == "r.json" and cfg.chat_template is False
    cfg, _ = _resolve(DemoConfig, ["--full", "--no-overwrite", "--student-steps", "7"])
    assert isinstance(cfg, DemoConfig) and not cfg.quick and not cfg.overwrite and cfg.student_steps == 7


def test_errors_name_the_custom_flag_or_the_yaml_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"json_path \(flag --json\)"):
        _resolve(EvalConfig, ["--model", "m"], {"json_path": ["not", "a", "path"]}, tmp_path)
    with pytest.raises(ConfigError, match=r"storage_options \(YAML key only\)"):
        _resolve(TrainConfig, [], {"cache": "c", "student": "s", "out": "o", "max_steps": 1,
                                   "storage_options": "anon"}, tmp_path)
    with pytest.raises(ConfigError, match=r"top_k \(flag --top-k\)"):
        _resolve(DumpConfig, ["--teacher", "t", "--dataset", "d", "--out", "o", "--top-k", "0"])
