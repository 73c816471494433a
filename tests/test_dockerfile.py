"""The GPU Dockerfile cannot be built here (no Docker engine), so check what a build relies on."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"

# Every instruction the Dockerfile reference defines.
KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword, args.strip()))
    if pending:
        raise ValueError(f"Dockerfile ends inside a line continuation: {pending!r}")
    return instructions


def project_extras() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["project"]["optional-dependencies"])


def installed_extras(instructions: list[tuple[str, str]]) -> list[set[str]]:
    """Extras of every ``pip install .[...]`` / ``-e .[...]`` of the project in RUN lines."""
    found = []
    for keyword, args in instructions:
        if keyword != "RUN":
            continue
        for word in shlex.split(args):
            m = re.fullmatch(r"\.\[([\w,\-]+)\]", word)
            if m:
                found.append(set(m.group(1).split(",")))
    return found


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_instructions_are_valid(instructions: list[tuple[str, str]]) -> None:
    assert instructions[0][0] in {"FROM", "ARG"}, "a Dockerfile starts with FROM (or ARG before it)"
    for keyword, args in instructions:
        assert keyword in KNOWN_INSTRUCTIONS, f"unknown Dockerfile instruction {keyword!r}"
        assert keyword.isupper(), f"write instruction {keyword!r} in upper case"
        assert args, f"{keyword} has no arguments"


def test_base_image_is_cuda_and_pinned(instructions: list[tuple[str, str]]) -> None:
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert bases
    for base in bases:
        _, _, tag = base.partition(":")
        assert "@sha256:" in base or (tag and tag != "latest" and re.search(r"\d", tag)), (
            f"base image {base} must be pinned to a versioned tag or digest"
        )
    assert any("cuda" in b or "pytorch" in b for b in bases), "the GPU image needs a CUDA base"


def test_gpu_packages_are_pinned(instructions: list[tuple[str, str]]) -> None:
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    for package in ("vllm", "flash-attn", "bitsandbytes"):
        assert re.search(rf"(?<![\w-]){re.escape(package)}==[\d.]+\w*", runs), f"{package} is not installed pinned"


def test_runs_as_non_root_with_kdpipe_entrypoint(instructions: list[tuple[str, str]]) -> None:
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["kdpipe"]
    # The USER switch must come after every RUN so nothing later needs root.
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    assert all(k != "RUN" for k, _ in instructions[last_user:])


def test_installs_the_project_with_existing_extras(instructions: list[tuple[str, str]]) -> None:
    extras = installed_extras(instructions)
    assert extras, "the Dockerfile must pip install the project itself (pip install '.[...]')"
    known = project_extras()
    for chosen in extras:
        assert chosen <= known, f"extras {sorted(chosen - known)} are not in pyproject.toml"
        assert {"vllm", "gpu"} <= chosen, "the GPU image installs the vllm and gpu extras"
        assert "vllm-cpu" not in chosen
    copies = " ".join(args for keyword, args in instructions if keyword == "COPY")
    for needed in ("pyproject.toml", "cache_format", "pipeline"):
        assert needed in copies, f"the image must COPY {needed} before installing the project"


def test_install_matches_readme_gpu_instructions(instructions: list[tuple[str, str]]) -> None:
    readme = (ROOT / "README.md").read_text()
    readme_extras = [
        set(m.group(1).split(","))
        for m in re.finditer(r"pip install (?:-e )?[\"']?\.\[([\w,\-]+)\]", readme)
    ]
    gpu_installs = [e for e in readme_extras if "vllm" in e]
    if not gpu_installs:
        pytest.skip("README.md has no GPU install line (pip install '.[vllm,...]') to compare with yet")
    assert installed_extras(instructions)[-1] in gpu_installs, (
        "the Dockerfile installs kdpipe with other extras than the README's GPU section"
    )


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "kdpipe-demo"):
        assert entry in ignored


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = "# c\nFROM a:1\nRUN echo 1 \\\n    # inner comment\n    && echo 2\nENTRYPOINT [\"x\"]\n"
    assert parse_dockerfile(text) == [("FROM", "a:1"), ("RUN", "echo 1 && echo 2"), ("ENTRYPOINT", '["x"]')]
