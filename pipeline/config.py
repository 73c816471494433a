"""One validated config per run: a pydantic model, filled from YAML then CLI overrides.

Every command builds its config with :func:`resolve_config` and saves the resolved
result into its output folder with :func:`save_resolved_config`, so a run can be
repeated from the file alone (``--config out/config.yaml``). :func:`config_command`
turns a config model into a typer command with one flag per field, help text from
each field's ``description``.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import typer
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every run config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------- flags from fields
# A field's CLI declarations live on the field: Field(json_schema_extra=cli_flags("--json")).
_CLI_KEY = "cli_flags"


def cli_flags(*decls: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field whose flag differs from ``--field-name`` (bools: ``--x/--no-x``),
    e.g. ``cli_flags("--teacher-generates/--reference-answers")``; no declarations = YAML-only."""
    return {_CLI_KEY: list(decls)}


# Fields with no sensible flag form (nested mappings); they are set in the --config YAML.
YAML_ONLY: dict[str, Any] = cli_flags()


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation


def option_type(annotation: Any) -> Any:
    """The type typer parses for a field (pydantic then validates the value, naming the flag on error)."""
    inner = _unwrap_optional(annotation)
    if get_origin(inner) is Literal:
        return type(get_args(inner)[0])
    if get_origin(inner) is list:
        return list[option_type(get_args(inner)[0])]
    if inner in (bool, int, float, str):
        return inner
    raise TypeError(f"no flag type for {annotation!r}; mark the field json_schema_extra=YAML_ONLY")


def field_flags(name: str, field: FieldInfo) -> list[str]:
    """The option declarations of a field: its ``cli_flags``, else ``--name`` (``--name/--no-name`` for bools)."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and _CLI_KEY in extra:
        return list(extra[_CLI_KEY])  # type: ignore[arg-type]
    flag = "--" + name.replace("_", "-")
    return [f"{flag}/--no-{flag[2:]}"] if option_type(field.annotation) is bool else [flag]


def flag_name(model: type[BaseModel], name: str) -> str | None:
    """The flag that sets field ``name`` (the first of its declarations), or None for YAML-only fields."""
    field = model.model_fields.get(name)
    decls = field_flags(name, field) if field is not None else ["--" + name.replace("_", "-")]
    return decls[0].split("/")[0] if decls else None


def _help_text(field: FieldInfo) -> str:
    text = field.description or ""
    inner = _unwrap_optional(field.annotation)
    if get_origin(inner) is Literal:
        text += " One of: " + ", ".join(str(c) for c in get_args(inner)) + "."
    default = field.default
    if default is not None and default is not PydanticUndefined:
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        text += f" (default: {shown})"  # not [default: ...]: rich help would read that as markup
    return text


def config_parameters(model: type[BaseModel]) -> list[inspect.Parameter]:
    """One keyword parameter per flag-able field of ``model``, each a typer option defaulting to None
    (= not given, so a ``--config`` YAML value survives unless the flag is passed)."""
    params = []
    for name, field in model.model_fields.items():
        decls = field_flags(name, field)
        if not decls:
            continue
        option = typer.Option(None, *decls, help=_help_text(field), show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=option_type(field.annotation) | None))
    return params


CONFIG_PARAM = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
    default=typer.Option(None, "--config", help="YAML with the same keys (dashes or underscores); "
                                                "flags override it."))


def config_command(model: type[ConfigT], run: Callable[..., None],
                   extra_params: Sequence[inspect.Parameter] = ()) -> Callable[..., None]:
    """A typer command: ``--config``, one flag per field of ``model``, then ``extra_params``
    (flags that are not config fields, e.g. ``--json``). It resolves the config (YAML, then the
    flags that were given) and calls ``run(cfg, **extras)``; ``run``'s docstring is the command's help."""
    extra_names = [p.name for p in extra_params]

    def command(**values: Any) -> None:
        config_path = values.pop("config")
        extras = {name: values.pop(name) for name in extra_names}
        run(resolve_config(model, config_path, values), **extras)

    command.__doc__ = run.__doc__
    command.__name__ = run.__name__
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [CONFIG_PARAM, *config_parameters(model), *extra_params])
    return command


# ----------------------------------------------------------------------------- resolving
def _format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    parts = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        msg = item["msg"].removeprefix("Value error, ")
        if not loc:  # a check across fields: its message names the flags itself
            parts.append(msg)
            continue
        flag = flag_name(model, loc[0])
        parts.append(f"{'.'.join(loc)} ({f'flag {flag}' if flag else 'YAML key only'}): {msg}")
    return f"invalid configuration from {source}: " + "; ".join(parts)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply to be a kdpipe config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}")
    # YAML files may use dashes like the flags do.
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(
    model: type[ConfigT], config_path: str | Path | None, overrides: dict[str, Any]
) -> ConfigT:
    """Merge ``config_path`` (YAML) with ``overrides`` (CLI flags that were given; ``None`` = not given)."""
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    source = f"{config_path} and command-line flags" if config_path else "command-line flags"
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, model)) from None


def resolve_device(want: str, error: type[Exception] = ConfigError) -> str:
    """The ``--device`` value to use: ``auto`` becomes cuda when visible, else cpu; a cuda device
    that is not there raises ``error`` naming the flag."""
    import torch

    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {want} was asked for but no CUDA device is visible; use --device cpu")
    return want


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_resolved_config(cfg: BaseModel, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Save the resolved config as YAML (re-loadable with ``--config``)."""
    data = json.loads(cfg.model_dump_json())
    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path
