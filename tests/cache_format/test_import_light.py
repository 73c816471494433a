"""``cache_format`` must import with numpy and pyarrow only: a reading team never pays for torch."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "vllm", "datasets", "fsspec", "typer", "pydantic")


def test_importing_cache_format_does_not_import_torch() -> None:
    code = f"import sys, cache_format; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing cache_format pulled in: {out.stdout.strip()}"


def test_cli_cache_module_imports_nothing_heavy() -> None:
    code = "import sys, pipeline.cli_cache; print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
