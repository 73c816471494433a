"""A learnable synthetic language for the offline demo: a hidden Markov model over made-up words.

Why an HMM: the next word depends on a hidden state the reader can only infer from the words
so far, so the best prediction is a genuinely spread-out distribution (several words are
plausible, with different odds). A trained teacher's soft distribution then carries real
information that one sampled next word (the hard label) does not, which is exactly the
situation where distillation from soft targets should beat cross-entropy on held-out data.
Because the source is known, its exact per-word perplexity (the floor no model can beat) is
computed with the forward algorithm and reported beside the models.

Nothing here downloads or reads anything: the language is generated from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class HMMLanguage:
    """Words, and the HMM that emits them: ``start[h]``, ``transition[h, h2]``, ``emission[h, w]``."""

    words: tuple[str, ...]
    start: np.ndarray
    transition: np.ndarray
    emission: np.ndarray

    @property
    def num_states(self) -> int:
        return int(self.start.shape[0])


def make_words(n: int, rng: np.random.Generator) -> tuple[str, ...]:
    """``n`` distinct pronounceable words of two or three syllables (``"kelo"``, ``"basumi"``)."""
    words: dict[str, None] = {}
    while len(words) < n:
        syllables = int(rng.integers(2, 4))
        word = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(syllables))
        words[word] = None
    return tuple(words)


def make_language(
    *,
    num_words: int = 64,
    num_states: int = 12,
    words_per_state: int = 10,
    seed: int = 0,
) -> HMMLanguage:
    """A random sparse HMM: each hidden state favours ``words_per_state`` words with uneven odds.

    States share words (the sets are drawn independently), so a word does not reveal its
    state and the next word stays ambiguous; transitions are sparse enough that the history
    narrows the state down, which a model must learn to use.
    """
    if words_per_state > num_words:
        raise ConfigError(f"words_per_state ({words_per_state}) cannot exceed num_words ({num_words})")
    rng = np.random.default_rng(seed)
    words = make_words(num_words, rng)
    emission = np.zeros((num_states, num_words))
    for h in range(num_states):
        support = rng.choice(num_words, size=words_per_state, replace=False)
        # Dirichlet(1): uneven but not degenerate odds within the state's words.
        emission[h, support] = rng.dirichlet(np.ones(words_per_state))
    transition = np.zeros((num_states, num_states))
    for h in range(num_states):
        # Each state leads to 3 others: the history is informative, but not deterministic.
        nxt = rng.choice(num_states, size=3, replace=False)
        transition[h, nxt] = rng.dirichlet(np.full(3, 2.0))
    start = rng.dirichlet(np.ones(num_states))
    return HMMLanguage(words=words, start=start, transition=transition, emission=emission)


def sample_documents(
    lang: HMMLanguage, num_docs: int, words_per_doc: int, seed: int
) -> list[str]:
    """``num_docs`` documents of ``words_per_doc`` words, each word preceded by a space.

    The leading space on the first word too: a byte-level BPE marks a word start by its space,
    so every word, the first included, becomes the same single token.
    """
    rng = np.random.default_rng(seed)
    docs = []
    cum_t = lang.transition.cumsum(axis=1)
    cum_e = lang.emission.cumsum(axis=1)
    for _ in range(num_docs):
        h = int(rng.choice(lang.num_states, p=lang.start))
        out = []
        for _ in range(words_per_doc):
            w = int(np.searchsorted(cum_e[h], rng.random() * cum_e[h, -1]))
            out.append(lang.words[min(w, len(lang.words) - 1)])
            h = int(np.searchsorted(cum_t[h], rng.random() * cum_t[h, -1]))
            h = min(h, lang.num_states - 1)
        docs.append(" " + " ".join(out))
    return docs


def source_nll(lang: HMMLanguage, docs: list[str]) -> tuple[float, int]:
    """Exact negative log-likelihood (nats) of ``docs`` under the source, and the word count.

    The forward algorithm gives log p(w_1..w_n) per document; exp(nll / words) is the
    source's own per-word perplexity, the floor for any model of this language.
    """
    index = {w: i for i, w in enumerate(lang.words)}
    total = 0.0
    count = 0
    for doc in docs:
        ids = [index[w] for w in doc.split()]
        alpha = lang.start * lang.emission[:, ids[0]]
        for i, w in enumerate(ids):
            if i > 0:
                alpha = (alpha @ lang.transition) * lang.emission[:, w]
            norm = alpha.sum()
            total -= float(np.log(norm))
            alpha = alpha / norm
        count += len(ids)
    return total, count


@dataclass(frozen=True)
class SyntheticSplits:
    """Paths of the generated text files (one document a line) and the source's floor."""

    teacher_train: Path
    student_train: Path
    valid: Path
    source_word_perplexity: float


def write_splits(
    out_dir: Path,
    lang: HMMLanguage,
    *,
    teacher_docs: int,
    student_docs: int,
    valid_docs: int,
    words_per_doc: int,
    seed: int,
) -> SyntheticSplits:
    """Write three disjoint samples: the teacher's training text, the distillation text, held-out text.

    The student's text is a separate draw from the teacher's: the cache then holds the
    teacher's predictions on text it never trained on, as with a real pretrained teacher.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {
        "teacher_train.txt": sample_documents(lang, teacher_docs, words_per_doc, seed + 1),
        "train.txt": sample_documents(lang, student_docs, words_per_doc, seed + 2),
        "valid.txt": sample_documents(lang, valid_docs, words_per_doc, seed + 3),
    }
    for name, docs in splits.items():
        (out_dir / name).write_text("\n".join(docs) + "\n")
    nll, words = source_nll(lang, splits["valid.txt"])
    return SyntheticSplits(
        teacher_train=out_dir / "teacher_train.txt",
        student_train=out_dir / "train.txt",
        valid=out_dir / "valid.txt",
        source_word_perplexity=float(np.exp(nll / words)),
    )
