"""One validated config per run: a pydantic model, filled from YAML then CLI overrides.

Every command builds its config with :func:`resolve_config` and saves the resolved
result into its output folder with :func:`save_resolved_config`, so a run can be
repeated from the file alone (``--config out/config.yaml``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every run config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        flag = "--" + field.replace("_", "-")
        parts.append(f"{field} (flag {flag}): {item['msg']}")
    return f"invalid configuration from {source}: " + "; ".join(parts)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
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
        raise ConfigError(_format_validation_error(exc, source)) from None


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
