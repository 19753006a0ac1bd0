"""Static geometry of the SparseAttention body: which queries form a block, which keys each block reads.

Two body families (``graphprune.ops._sparse_body`` turns a plan into standard ops):

* **gathered** (``sliding_window``, ``neighborhood_2d``): the pattern is static, so everything is computed here in
  numpy. Non-global queries are grouped into ``nb`` blocks of ``bq`` queries; block ``t`` reads the keys
  ``kv_idx[t]`` (``L`` of them: the global tokens, then the union of the block's windows) and a static additive
  bias ``sbias[t]`` ([bq, L], 0 or -inf) keeps each query to exactly its own allowed set. Global queries
  (the first ``num_global`` tokens) attend densely in a separate small branch.
* **routed** (``block_topk``, ``block_layout``): queries and keys are cut into ``nb`` contiguous blocks of ``b``
  tokens (the last one padded); each query block reads ``topk`` whole key blocks chosen at run time.

Window rules (the op's semantics; the numpy reference restates them independently):
* 1-D, not causal: query ``i`` sees keys ``[s, s + w)`` with ``s = clamp(i - w//2, 0, N - w)``: always ``min(w, N)``
  keys, the window shifted inward at the borders as NATTEN does. Causal: keys ``[max(0, i - w + 1), i]``.
* 2-D: tokens after the ``num_global`` prefix form a row-major ``h × w`` grid. With dilation ``d`` the grid splits
  into ``d × d`` interleaved sub-grids (NATTEN); inside its sub-grid a query sees a ``k × k`` window clamped at the
  borders (per axis ``ka = min(k, axis length)``, ``start = clamp(pos - k//2, 0, len - ka)``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

NEG_INF = np.float32(-np.inf)


@dataclasses.dataclass(frozen=True)
class GatheredPlan:
    """A static block plan; all index tensors are int64, ``sbias`` float32."""

    seq_len: int
    num_global: int
    nb: int
    bq: int
    q_contiguous: bool  # block t holds queries g + t*bq + a: Pad + Reshape instead of a Gather
    q_idx: np.ndarray  # [nb, bq] positions in the non-global queries (pad rows → 0)
    out_idx: np.ndarray  # [N - g] row of each non-global query in the flattened [nb * bq] block output
    kv_idx: np.ndarray  # [nb, L] absolute key positions (columns that duplicate a global key are masked)
    sbias: np.ndarray  # [nb, bq, L] 0 / -inf
    causal: bool
    # Consecutive blocks (start, end, shared): blocks of a ``shared`` run all have the bias ``shared_bias``
    # [bq, L], so the body adds one small cache-resident tensor instead of their slice of ``sbias``.
    runs: tuple[tuple[int, int, bool], ...] = ()
    shared_bias: np.ndarray | None = None

    @property
    def kv_len(self) -> int:
        return int(self.kv_idx.shape[1])

    def scores_per_head(self) -> int:
        """Score entries computed per (batch, head), dense global rows included."""
        return self.nb * self.bq * self.kv_len + self.num_global * self.seq_len


def window_start_1d(pos: np.ndarray, w: int, n: int) -> np.ndarray:
    """First key of the clamped (NATTEN-style) window of size ``min(w, n)`` around ``pos``."""
    return np.clip(pos - w // 2, 0, max(n - w, 0))


def _finish(seq_len, g, q_idx, q_valid, kv_idx, allowed, causal, contiguous) -> GatheredPlan:
    nb, bq = q_idx.shape
    # A key listed twice in a block (a global key also inside the window) is kept once, in its global column.
    dup = np.zeros_like(kv_idx, dtype=bool)
    dup[:, g:] = kv_idx[:, g:] < g
    allowed = allowed & ~dup[:, None, :]
    allowed[:, :, :g] = True if not causal else allowed[:, :, :g]
    allowed |= ~q_valid[:, :, None]  # pad query rows: anything finite, the rows are dropped
    sbias = np.where(allowed, np.float32(0), NEG_INF).astype(np.float32)
    q_idx, q_valid, kv_idx, sbias, runs, shared = _share_bias(q_idx, q_valid, kv_idx, sbias, contiguous)
    out_idx = np.empty(seq_len - g, dtype=np.int64)
    flat_q = q_idx.reshape(-1)
    flat_valid = q_valid.reshape(-1)
    out_idx[flat_q[flat_valid]] = np.nonzero(flat_valid)[0]
    return GatheredPlan(seq_len, g, nb, bq, contiguous, q_idx.astype(np.int64), out_idx,
                        kv_idx.astype(np.int64), sbias, causal, runs, shared)


MAX_RUNS = 6


def _share_bias(q_idx, q_valid, kv_idx, sbias, contiguous):
    """Find the most common block bias; order blocks (gathered queries only) so its blocks are consecutive.

    Adding a [nb, bq, L] bias to the [B, H, nb, bq, L] scores is memory-bound (the bias is re-read per head);
    interior blocks of a window pattern share one bias, which then stays in cache.
    """
    nb = sbias.shape[0]
    keys = [hash(sbias[t].tobytes()) for t in range(nb)]
    counts: dict[int, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    best = max(counts, key=counts.get)
    if counts[best] < 2:
        return q_idx, q_valid, kv_idx, sbias, ((0, nb, False),), None
    shared = np.array([key == best for key in keys])
    if not contiguous:  # queries are gathered anyway: put the shared blocks first
        order = np.argsort(~shared, kind="stable")
        q_idx, q_valid, kv_idx, sbias, shared = q_idx[order], q_valid[order], kv_idx[order], sbias[order], shared[order]
    runs, start = [], 0
    for t in range(1, nb + 1):
        if t == nb or shared[t] != shared[start]:
            runs.append((start, t, bool(shared[start])))
            start = t
    if len(runs) > MAX_RUNS:
        return q_idx, q_valid, kv_idx, sbias, ((0, nb, False),), None
    return q_idx, q_valid, kv_idx, sbias, tuple(runs), sbias[int(np.argmax(shared))].copy()


def sliding_window_plan(seq_len: int, window: int, causal: bool, num_global: int, block: int) -> GatheredPlan:
    """Query blocks of ``block`` consecutive non-global tokens; each reads one contiguous key range."""
    n, g, w = seq_len, num_global, window
    nr = n - g
    bq = max(1, min(block, nr))
    nb = math.ceil(nr / bq)
    q_rel = np.arange(nb * bq).reshape(nb, bq)
    q_valid = q_rel < nr
    q_abs = np.minimum(q_rel, nr - 1) + g
    if causal:
        lo = np.maximum(q_abs - w + 1, 0)
        hi = q_abs + 1
    else:
        lo = window_start_1d(q_abs, w, n)
        hi = lo + min(w, n)
    span = int((hi - lo[:, :1]).max())
    span = min(n, -(-span // 16) * 16)  # a multiple of 16 keys packs better in the GEMMs; extras are masked
    start = np.minimum(lo[:, 0], n - span)
    rng = start[:, None] + np.arange(span)[None, :]  # [nb, span], all real keys
    kv_idx = np.concatenate([np.broadcast_to(np.arange(g), (nb, g)), rng], axis=1)
    k = kv_idx[:, None, :]
    allowed = (k >= lo[:, :, None]) & (k < hi[:, :, None])
    if causal and g:
        allowed[:, :, :g] = kv_idx[:, None, :g] <= q_abs[:, :, None]
    return _finish(n, g, q_rel, q_valid, kv_idx, allowed, causal, contiguous=True)


def _axis_windows(length: int, k: int, d: int, offset: int) -> tuple[np.ndarray, int]:
    """Sub-grid ``offset`` of one axis: (window start per sub-grid position, kernel length used)."""
    sub = len(range(offset, length, d))
    ka = min(k, sub)
    pos = np.arange(sub)
    return np.clip(pos - k // 2, 0, sub - ka), ka


def neighborhood_2d_plan(seq_len: int, grid: tuple[int, int], kernel: int, dilation: int, num_global: int,
                         tile: int) -> GatheredPlan:
    """Query tiles of ``tile × tile`` cells inside each dilation sub-grid; each reads its keys' bounding box."""
    gh, gw = grid
    g, d, k = num_global, dilation, kernel
    if g + gh * gw != seq_len:
        raise ValueError(f"grid {gh}x{gw} plus {g} prefix tokens is {g + gh * gw} tokens, not {seq_len}")
    blocks = []  # (query positions [rows x cols], allowed [bq', L'], kv positions)
    max_th = min(tile, max(len(range(a, gh, d)) for a in range(d)))
    max_tw = min(tile, max(len(range(b, gw, d)) for b in range(d)))
    for a in range(min(d, gh)):
        rs, ka = _axis_windows(gh, k, d, a)
        for b in range(min(d, gw)):
            cs, kb = _axis_windows(gw, k, d, b)
            for r0 in range(0, len(rs), max_th):
                rows = np.arange(r0, min(r0 + max_th, len(rs)))
                r_lo, r_hi = rs[rows[0]], rs[rows[-1]] + ka
                for c0 in range(0, len(cs), max_tw):
                    cols = np.arange(c0, min(c0 + max_tw, len(cs)))
                    c_lo, c_hi = cs[cols[0]], cs[cols[-1]] + kb
                    kr, kc = np.meshgrid(np.arange(r_lo, r_hi), np.arange(c_lo, c_hi), indexing="ij")
                    qr, qc = np.meshgrid(rows, cols, indexing="ij")
                    qr, qc, kr, kc = qr.ravel(), qc.ravel(), kr.ravel(), kc.ravel()
                    ok = ((kr[None] >= rs[qr][:, None]) & (kr[None] < rs[qr][:, None] + ka)
                          & (kc[None] >= cs[qc][:, None]) & (kc[None] < cs[qc][:, None] + kb))
                    q_grid = (a + d * qr) * gw + (b + d * qc)
                    k_abs = g + (a + d * kr) * gw + (b + d * kc)
                    blocks.append((q_grid, ok, k_abs))
    nb = len(blocks)
    bq = max_th * max_tw
    span = max(len(kv) for _, _, kv in blocks)
    q_idx = np.zeros((nb, bq), dtype=np.int64)
    q_valid = np.zeros((nb, bq), dtype=bool)
    kv_idx = np.zeros((nb, g + span), dtype=np.int64)
    kv_idx[:, :g] = np.arange(g)
    allowed = np.zeros((nb, bq, g + span), dtype=bool)
    for t, (qg, ok, kv) in enumerate(blocks):
        q_idx[t, : len(qg)] = qg
        q_valid[t, : len(qg)] = True
        kv_idx[t, g : g + len(kv)] = kv
        kv_idx[t, g + len(kv) :] = g  # pad columns: any real key, masked below
        allowed[t, : len(qg), g : g + len(kv)] = ok
    return _finish(seq_len, g, q_idx, q_valid, kv_idx, allowed, False, contiguous=False)


@dataclasses.dataclass(frozen=True)
class RoutedPlan:
    """Contiguous blocks of ``block`` tokens; each query block reads ``topk`` key blocks."""

    seq_len: int
    block: int
    nb: int
    topk: int
    num_global: int = 0  # the first queries attend densely (their block rows are computed and dropped)

    @property
    def pad(self) -> int:
        return self.nb * self.block - self.seq_len

    def valid_counts(self) -> np.ndarray:
        """Real tokens per block, float32 [nb]."""
        starts = np.arange(self.nb) * self.block
        return np.minimum(self.block, self.seq_len - starts).astype(np.float32)

    def key_pad_bias(self) -> np.ndarray:
        """[nb, block]: 0 for real keys, -inf for the padding of the last block."""
        pos = np.arange(self.nb * self.block).reshape(self.nb, self.block)
        return np.where(pos < self.seq_len, np.float32(0), NEG_INF).astype(np.float32)

    def scores_per_head(self) -> int:
        return self.nb * self.block * self.topk * self.block + self.num_global * self.seq_len


def routed_plan(seq_len: int, block: int, topk: int, num_global: int = 0) -> RoutedPlan:
    b = max(1, min(block, seq_len))
    nb = math.ceil(seq_len / b)
    return RoutedPlan(seq_len, b, nb, max(1, min(topk, nb)), num_global)
