"""The one validated configuration of `kdpipe demo`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config import StrictModel


class DemoConfig(StrictModel):
    """``kdpipe demo`` settings; ``quick`` shrinks everything for smoke tests."""

    # ./kdpipe-demo: next to where the user runs it, easy to find and delete.
    out: str = "./kdpipe-demo"
    # auto: vLLM when installed (the production engine, ~40 s start-up on CPU), else HF.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    # off: the full-size run (about 5 minutes on 2 cores); on: seconds, for tests.
    quick: bool = False
    # None = the size preset's value (full: 300 teacher steps, 200 student steps).
    teacher_steps: int | None = Field(None, ge=1)
    student_steps: int | None = Field(None, ge=1)
    # 0: any fixed seed; the language, the data, both inits and the data order derive from it.
    seed: int = 0
    # on: a re-run replaces an earlier demo in --out (never a folder that is not a demo).
    overwrite: bool = True
