"""The folder rules of the README's architecture section: no folder imports "up" or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> module prefixes it must never import (lazily inside functions included)
FORBIDDEN = {
    "cache_format": ("pipeline", "torch", "vllm", "transformers"),
    "pipeline/dump": ("pipeline.train", "pipeline.eval", "pipeline.demo"),
    "pipeline/train": ("pipeline.dump", "pipeline.eval", "pipeline.demo"),
    "pipeline/eval": ("pipeline.train", "pipeline.demo"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_never_imports_up_or_sideways(folder: str) -> None:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in _imports(path):
            if any(module == p or module.startswith(p + ".") for p in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)
