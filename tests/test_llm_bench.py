"""benchmarks/llm.py, the data side of the decoder trained here: the held-out split and the passkey sequences.
(Training itself is a benchmark: ``python -m benchmarks.llm``.)"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from benchmarks import llm  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "# The pass key is 12345.\n"] * 20
    return llm._train_tokenizer(texts, 300)


def test_held_out_modules_are_whole_and_disjoint():
    c = llm.corpus()
    assert c["train"] and c["eval"]
    assert not {t for t in c["train"] if t.strip()} & set(c["eval"])  # (empty __init__.py files are in both)
    assert 0.01 < sum(map(len, c["eval"])) / sum(map(len, c["train"])) < 0.15
    assert llm._held_out("json") == llm._held_out("json")  # by name, not by chance


def test_a_passkey_sequence_asks_for_the_key_it_states(tok):
    filler = llm._stream(tok, ["def f(x):\n    return x + 1\n" * 40])
    rng = np.random.default_rng(0)
    ids, mask = llm.passkey_batch(tok, filler, 5, 120, rng, depths=np.linspace(0, 1, 5))
    assert ids.shape == mask.shape == (5, 120)
    starts = []
    for row, m in zip(ids, mask):
        pos = np.flatnonzero(m)
        # the marked positions are the ones whose next token is the answer: a space, then 5 digits, at the end
        assert pos.tolist() == list(range(120 - 7, 119))
        answer = tok.decode(row[pos + 1].tolist())
        assert answer.strip().isdigit() and len(answer.strip()) == 5
        text = tok.decode(row.tolist())
        assert f"The pass key is {answer.strip()}. Remember it." in text
        assert text.endswith(f"What is the pass key? The pass key is {answer.strip()}")
        starts.append(text.index("# The pass key"))
    assert starts == sorted(starts) and starts[0] < starts[-1]  # the depths place the key from early to late


def test_a_window_too_short_for_a_key_is_refused(tok):
    filler = llm._stream(tok, ["x = 1\n" * 50])
    with pytest.raises(ValueError, match="too short"):
        llm.passkey_batch(tok, filler, 1, 20, np.random.default_rng(0))
