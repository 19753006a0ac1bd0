"""``sparse_attention`` with ``pattern: auto``: an offline per-head choice of pattern, as MInference makes it.

For every causal attention block, the queries and keys are read on the calibration feeds (``Runtime.probe``) and,
per head, each candidate pattern at the same budget of keys per query is scored by its **recall**: the share of
the dense causal attention's probability mass that falls on the keys the pattern lets through (mean over
queries and feeds; ``ops.sparse_attention.allowed_mask`` says which keys, a run-time pattern estimating its own).
Each head gets the candidate with the highest recall (ties: the earlier candidate). The candidates, at a budget of
``K`` keys per query:

* ``a_shape``: ``sliding_window``, causal, ``window = K - 4`` and 4 sink tokens (``num_global``);
* ``vertical_slash``: ``K/2`` columns and ``K/2`` keys of block diagonals, 4 sinks;
* ``block_topk``: ``K/b`` blocks, ``causal`` (routed over the blocks up to the query's own);

with blocks of ``b = clamp(K/8, 4, 64)`` tokens (64 from K = 512 up).

The result is the pass's ``per_layer`` head groups (one SparseAttention node per chosen pattern, its attributes
on the node), and a report per head: the pattern and every candidate's recall.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from graphprune.analysis.attention import AttentionBlock
from graphprune.errors import ConfigError
from graphprune.ops import sparse_attention as op

CANDIDATES = ("a_shape", "vertical_slash", "block_topk")
SINKS = 4


def candidate_params(name: str, budget: int) -> dict[str, Any]:
    """The pass keys of one candidate at ``budget`` keys per query."""
    block = max(4, min(64, budget // 8))
    if name == "a_shape":
        return {"pattern": "sliding_window", "causal": True, "window": max(1, budget - SINKS), "num_global": SINKS}
    if name == "vertical_slash":
        return {"pattern": "vertical_slash", "vertical": max(1, budget // 2), "slash": max(1, budget // (2 * block)),
                "block_size": block, "num_global": SINKS}
    if name == "block_topk":
        return {"pattern": "block_topk", "block_size": block, "topk": max(2, budget // block), "causal": True}
    raise ConfigError(f"candidates: unknown {name!r}; known: {', '.join(CANDIDATES)}")


def _softmax_causal(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    n = q.shape[2]
    s = (q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)) * scale
    s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def head_recall(p: np.ndarray, q: np.ndarray, k: np.ndarray, scale: float, params: dict[str, Any]) -> np.ndarray:
    """[H]: the share of the causal attention ``p`` [B, H, N, N] (of ``q``, ``k`` [B, H, N, D]) that the pattern
    keeps, mean over batch and queries."""
    keys = {x: v for x, v in params.items() if x != "pattern"}
    allowed = op.allowed_mask(q, k, pattern=params["pattern"], seq_len=0, scale=scale, **keys)
    return (p * allowed).sum(-1).mean(axis=(0, 2))


def choose(blocks: list[AttentionBlock], probes: list[list[np.ndarray]], budget: int,
           candidates: list[str]) -> tuple[dict[int, list[dict[str, Any]]], dict[str, Any]]:
    """``(per_layer, report)``: per block index the ``head_groups`` (one per chosen candidate, heads ascending), and
    per block and head the chosen candidate and every candidate's recall.

    ``probes``: per feed, the [B, H, N, D] queries and keys of each block in ``blocks`` order (q, k, q, k, ...)."""
    per_layer: dict[int, list[dict[str, Any]]] = {}
    report: dict[str, Any] = {}
    for bi, blk in enumerate(blocks):
        scale = blk.scale if blk.scale else 1.0 / math.sqrt(blk.head_dim)
        sums = np.zeros((len(candidates), blk.heads))
        for arrays in probes:
            q, k = arrays[2 * bi], arrays[2 * bi + 1]
            if blk.k is None:  # read as kᵀ
                k = np.swapaxes(k, -1, -2)
            n = q.shape[2]
            if n <= budget:
                raise ConfigError(f"pattern auto: the calibration sequences have {n} tokens, not more than the "
                                  f"budget of {budget} keys per query (every pattern would see every key); "
                                  "calibrate on longer sequences or lower budget")
            p = _softmax_causal(q, k, scale)
            for ci, name in enumerate(candidates):
                sums[ci] += head_recall(p, q, k, scale, candidate_params(name, budget))
        recall = sums / len(probes)
        best = recall.argmax(0)  # ties: the earlier candidate
        groups = []
        for ci, name in enumerate(candidates):
            heads = [int(h) for h in np.flatnonzero(best == ci)]
            if heads:
                groups.append({"heads": heads, **candidate_params(name, budget)})
        per_layer[blk.index] = groups
        report[str(blk.index)] = {str(h): {"pattern": candidates[int(best[h])],
                                           "recall": {c: round(float(recall[ci, h]), 4)
                                                      for ci, c in enumerate(candidates)}}
                                  for h in range(blk.heads)}
    return per_layer, report


def probe_values(blocks: list[AttentionBlock]) -> list[ir.Value]:
    """The values to read per block: its [B, H, N, D] q, and k (or kᵀ where the graph only has that)."""
    return [x for blk in blocks for x in (blk.q, blk.k if blk.k is not None else blk.k_transposed)]
