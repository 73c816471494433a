"""The one validated configuration of `kdpipe demo`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config import StrictModel, cli_flags


class DemoConfig(StrictModel):
    """``kdpipe demo`` settings; ``quick`` shrinks everything for smoke tests."""

    out: str = Field("./kdpipe-demo", description="Report folder; next to where you run it, easy to find and "
                                                  "delete.")
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Teacher engine of the dump; auto = vLLM when installed (the production engine, ~40 s "
                            "start-up on CPU), else HF.")
    quick: bool = Field(False, json_schema_extra=cli_flags("--quick/--full"),
                        description="Tiny sizes (seconds) for smoke tests; default: the full run (about 5 minutes "
                                    "on 2 cores).")
    teacher_steps: int | None = Field(None, ge=1, description="Teacher training steps; default: the size "
                                                              "preset's (full: 300).")
    student_steps: int | None = Field(None, ge=1, description="Student training steps (both runs); default: the "
                                                              "size preset's (full: 200).")
    seed: int = Field(0, description="Seed of the language, the data, both inits and the data order; any fixed "
                                     "value works.")
    overwrite: bool = Field(True, description="Replace an earlier demo in --out (never a folder that is not a "
                                              "demo).")
