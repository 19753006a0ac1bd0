"""The VLM benchmark's data (``benchmarks/vlm.py``): every answer is what the drawn pixels say, the held-out scenes
differ from the training ones, and the question types are balanced."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")

from benchmarks import vlm  # noqa: E402

WORD = {i: w for w, i in vlm.VOCAB.items()}


def _cells(px: np.ndarray) -> dict[tuple[int, int], str]:
    """The colour name drawn in each non-empty cell, read from the pixels (the exact RGB of the palette)."""
    img = np.rint((px.transpose(1, 2, 0) + 1.0) * 127.5).astype(int)
    out = {}
    for r in range(vlm.GRID):
        for c in range(vlm.GRID):
            cell = img[r * vlm.CELL:(r + 1) * vlm.CELL, c * vlm.CELL:(c + 1) * vlm.CELL].reshape(-1, 3)
            names = {n for n, rgb in vlm.COLOURS.items() if (np.abs(cell - rgb).sum(1) == 0).any()}
            assert len(names) <= 1, (r, c, names)  # one shape per cell
            if names:
                out[(r, c)] = names.pop()
    return out


def test_answers_match_the_pixels():
    d = vlm.scenes(200, seed=3)
    for px, ids, ans, t in zip(d["pixel_values"], d["input_ids"], d["answer"], d["type"]):
        cells = _cells(px)
        words = [WORD[i] for i in ids]
        assert words[0] == "<bos>" and words[-1] == "answer" and len(words) == vlm.TEXT_TOKENS
        answer = WORD[int(ans)]
        assert 3 <= len(cells) <= 7
        if vlm.TYPES[t] == "bottom":
            bottom = [col for (r, _), col in cells.items() if r == vlm.GRID - 1]
            assert bottom == [answer]
        elif vlm.TYPES[t] == "colour":
            assert answer in cells.values()
        elif vlm.TYPES[t] == "count":
            assert vlm.NUMBERS.index(answer) <= len(cells)
        else:
            assert answer == "nothing" or answer in vlm.KINDS


def test_types_cycle_and_answers_vary():
    d = vlm.scenes(400, seed=4)
    assert np.bincount(d["type"]).tolist() == [100] * 4
    for i in range(4):
        a = d["answer"][d["type"] == i]
        assert np.bincount(a).max() / len(a) < 0.5  # no type answered by one word most of the time


def test_held_out_scenes_differ_from_training():
    train = vlm.scenes(64, seed=1_000_000)  # the first training batch
    held = vlm.scenes(64, seed=7)  # the evaluation seed
    assert not np.array_equal(train["pixel_values"], held["pixel_values"])
    flat = {x.tobytes() for x in train["pixel_values"]}
    assert not any(x.tobytes() in flat for x in held["pixel_values"])
