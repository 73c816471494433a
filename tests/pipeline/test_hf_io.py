"""pipeline.hf_io: one-line load errors naming the flag, padding, greedy generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, ModelError
from pipeline.hf_io import (
    cut_at_eos,
    first_line,
    greedy_generate,
    load_config,
    load_model,
    load_tokenizer,
    pad,
    torch_dtype,
)


class _Silent(Exception):
    def __str__(self) -> str:
        return ""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ValueError("bad value\nTraceback detail"), "bad value"),
        (OSError("\n\n  no such folder  \nmore"), "no such folder"),
        (ValueError(""), "ValueError"),
        (ValueError("   \n  "), "ValueError"),
        (_Silent(), "_Silent"),
        (KeyError(), "KeyError"),
    ],
)
def test_first_line(exc: BaseException, expected: str) -> None:
    assert first_line(exc) == expected


def test_load_errors_name_the_flag_and_the_fix(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelError, match=r"cannot load a tokenizer from .*nope \(--teacher\): .+; pass a tokenizer"):
        load_tokenizer(missing, what="--teacher")
    with pytest.raises(ConfigError, match=r"\(--student-config\)"):
        load_config(missing, error=ConfigError, what="--student-config")
    with pytest.raises(ModelError, match=r"nope \(--student\) as a sequence classifier: .+; pass an HF model folder"):
        load_model(missing, kind="classifier", what="--student")


def test_load_error_with_an_empty_message_is_still_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(ModelError, match=r"\(--tokenizer\): OSError; pass"):
        load_tokenizer("x")


def test_load_model_moves_and_casts(tiny_lm_dir: Path) -> None:
    model = load_model(str(tiny_lm_dir), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        torch_dtype("float99")


def test_pad_right_and_left() -> None:
    rows = [np.array([5, 6, 7]), [8]]
    ids, mask = pad(rows, pad_id=0)
    assert ids.dtype == torch.long and ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad(rows, pad_id=9, left=True, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one row"):
        pad([], pad_id=0)


def test_cut_at_eos() -> None:
    assert cut_at_eos(np.array([4, 2, 9, 9]), 2).tolist() == [4, 2]
    assert cut_at_eos(np.array([4, 5]), 2).tolist() == [4, 5]
    assert cut_at_eos(np.array([4, 2]), None).tolist() == [4, 2]


def test_greedy_generate_matches_one_prompt_at_a_time(tiny_lm_dir: Path, tiny_tokenizer: Any) -> None:
    """Left padding must not change a prompt's answer: batched == unbatched."""
    model = load_model(str(tiny_lm_dir), device="cpu").eval()
    prompts = [tiny_tokenizer("a b c d e")["input_ids"], tiny_tokenizer("a")["input_ids"]]
    kw: dict[str, Any] = {"max_new_tokens": 5, "pad_id": tiny_tokenizer.pad_token_id,
                          "eos_id": tiny_tokenizer.eos_token_id}
    batched = greedy_generate(model, prompts, **kw)
    single = [greedy_generate(model, [p], **kw)[0] for p in prompts]
    assert all(b.dtype == np.int32 and 1 <= len(b) <= 5 for b in batched)
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_array_equal(b, s)
