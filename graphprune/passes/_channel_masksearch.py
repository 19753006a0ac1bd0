"""Mask search under a FLOPs (or channels / params) budget, after Kwon et al. 2022, without gradients
(``channel_prune`` with ``search: mask``).

Every class of a prunable group (a head, an FFN unit, a channel) is a unit u with a mask m_u ∈ {0, 1}. The
objective is D(m), the mean 1 − cosine between the original's and the masked model's outputs on calibration
feeds (``_channel_masks.MaskedModel``). Steps:

1. **Unit scores.** A base score b_u orders the units of a group (the diagonal of D's Hessian in the mask, the
   quantity Kwon et al. estimate with the empirical Fisher; here measured or read from activations instead of
   differentiated):
   * ``measured`` — groups of at most ``measure_units`` classes (attention heads): b_u = D(u alone removed), one
     evaluation per unit;
   * otherwise (FFN units, channels; every group with ``unit_score: local``): the local Hessian diagonal of the
     consumer layer's output, b_u = Σ_consumers Σ_{k ∈ u} mean(x_k²)·‖w_k‖² (x: the consumer's input on the
     calibration feeds, w_k: the weight row reading channel k).
   Per group, D is then measured with the lowest-b 15% and 40% of its classes removed (``PROBES``) and fitted as
   D_g(B) = a_g·B^p_g, B the summed base score removed (p_g clipped to [1, 3]: interactions make removing many
   units cost more than the sum of their single costs). With ``refit`` (the pass refits afterwards) the two
   probes are measured after the least-squares refit of the group's consumers (``_channel_sensitivity.measure``),
   so the curve prices what the refitted model loses: this is the per-layer allocation from measured sensitivity.
   The refit is fitted on ``fit_feeds`` (the pass: the calibration feeds after the first ``search_feeds``), not
   on the feeds D is measured on: fitted in sample on a few feeds, a refit of a wide FFN group looks almost free
   (on MiniLM it then cut the last FFN to 23% of its units and lost 16% of test recall@1).
2. **Search** (the knapsack of Kwon et al.'s mask search): within a group units are removed in ascending b, in
   chunks of the ``round_to`` unit, chunk k costing a_g·(B_k^p − B_(k−1)^p) (increasing, so the greedy merge is
   the optimum of the separable convex model); chunks of all groups are merged in ascending cost per FLOP saved
   (``class_flops``; per channel for ``target: channels``) and the shortest prefix that meets the budget is
   taken, found by bisection on the prefix length. "Meets": predicted FLOPs (or params) ratio ≤ 1 − ratio, or
   removed channels ≥ ratio × prunable channels. So the result meets the budget and the prefix one chunk shorter
   does not. No group loses more than ``max_group_ratio`` of its classes or its last unit.
3. **Rearrangement** (Kwon et al.'s mask rearrangement, with D measured instead of a block-diagonal Fisher):
   first-improvement hill climbing over moves that keep the budget met: swapping a removed and a kept unit of one
   group (groups of ≤ ``measure_units`` classes, unit 1), and moving a chunk between groups (restore group a's
   best removed chunk, remove group b's worst kept chunks until the budget is met again; not with ``refit``,
   since D here is measured without the refit the curves priced). Moves are tried in ascending modelled Δ; one
   is kept only if the measured D falls, so D never rises. At most ``rearrange`` evaluations.
4. **Mask tuning** is the least-squares refit of the consumers (``reconstruct``), run by the pass afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from graphprune.analysis.channels import ChannelAnalysis
from graphprune.analysis.importance import Importance, fold_activations
from graphprune.analysis.vocab import is_conv
from graphprune.passes._channel_masks import MaskedModel, Runner, masked_consumers
from graphprune.passes._channel_plan import class_flops, keep_count, predicted, round_unit
from graphprune.passes._channel_sensitivity import measure

#: removal shares of the two probes that fit each group's curve
PROBES = (0.15, 0.4)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    ratio: float
    target: str = "flops"  # flops | channels | params
    round_to: int = 1
    max_group_ratio: float = 0.9
    unit_score: str = "measured"  # measured | local
    measure_units: int = 16
    rearrange: int = 64
    refit: bool = False  # curves measured after the refit; rearrangement then swaps within groups only


@dataclasses.dataclass
class SearchResult:
    kept: np.ndarray  # kept-class mask over root atoms
    base: np.ndarray  # b_u per root atom (classes of prunable groups)
    curves: dict[int, tuple[float, float]]  # group id -> (a_g, p_g)
    objective_search: float  # D after step 2
    objective: float  # D after rearrangement
    budget_met: bool
    evaluations: int
    moves: int

    def info(self) -> dict:
        return {"curves": {str(g): [float(f"{a:.4g}"), round(p, 3)] for g, (a, p) in self.curves.items()},
                "objective_search": round(self.objective_search, 7), "objective": round(self.objective, 7),
                "budget_met": self.budget_met, "evaluations": self.evaluations, "moves_accepted": self.moves}


def budget_check(analysis: ChannelAnalysis, ratio: float, target: str,
                 per_node: dict[str, int] | None = None) -> Callable[[np.ndarray], bool]:
    """``met(kept)``: the kept-class mask removes at least ``ratio`` of the target (see module docstring)."""
    if target == "channels":
        groups = [g for g in analysis.groups if g.prunable]
        total = sum(float(g.widths.sum()) for g in groups)
        return lambda kept: sum(float(g.widths[~kept[g.classes]].sum()) for g in groups) >= ratio * total - 1e-9
    key = "flops_ratio" if target == "flops" else "params_ratio"
    return lambda kept: predicted(analysis, kept, per_node)[key] <= 1.0 - ratio + 1e-12


def local_energy(model: ir.Model, analysis: ChannelAnalysis, feeds: list[dict], run: Runner) -> np.ndarray:
    """E_u per root atom: Σ over consumer layers of mean(x_k²)·‖w_k‖² over the channels k of class u."""
    ms = masked_consumers(analysis)
    xs = list(dict.fromkeys(m.node.inputs[0] for m in ms))
    axis = {id(m.node.inputs[0]): (1 if is_conv(m.node) else -1) for m in ms}

    def reduce(i, y, acc):
        y = np.moveaxis(y * y, axis[id(xs[i])], 0)
        s = y.reshape(y.shape[0], -1).mean(axis=1)
        return s if acc is None else acc + s

    sums, n = fold_activations(run(model, xs, feeds), len(xs), reduce) if xs else ([], 0)
    meansq = {id(x): s / max(n, 1) for x, s in zip(xs, sums, strict=True)}
    energy = np.zeros(len(analysis.root), dtype=np.float64)
    for m in ms:
        w = np.asarray(m.value.const_value.numpy(), dtype=np.float64)
        w = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)
        x2 = meansq[id(m.node.inputs[0])]
        if len(x2) != len(m.atoms):
            continue
        np.add.at(energy, analysis.root[m.atoms], x2 * (w * w).sum(axis=1))
    return energy


def unit_scores(mm: MaskedModel, analysis: ChannelAnalysis, energy: np.ndarray, st: SearchSettings,
                progress=None, fit_feeds: list[dict] | None = None) -> tuple[np.ndarray, dict[int, tuple[float, float]]]:
    """Step 1 of the module docstring: the base score b_u per root atom, and per group the curve (a_g, p_g) of
    D_g(B) = a_g·B^p_g, fitted to two measured probes."""
    base = np.zeros(len(analysis.root), dtype=np.float64)
    curves: dict[int, tuple[float, float]] = {}
    groups = [g for g in analysis.groups if g.prunable]
    full = np.ones(len(analysis.root), dtype=bool)

    def removed(classes: np.ndarray) -> float:
        kept = full.copy()
        kept[classes] = False
        return mm.objective(kept)

    for g in groups:
        if st.unit_score == "measured" and g.size <= st.measure_units:
            base[g.classes] = [removed(np.array([c])) for c in g.classes]
        else:
            base[g.classes] = energy[g.classes]
    counts = {g.id: [g.size - keep_count(g.size, 1.0 - f, 1) for f in PROBES] for g in groups}
    if st.refit:  # the probes measured after the least-squares refit of the consumers (as the pass will refit)
        imp = Importance({g.id: base[g.classes] for g in analysis.groups}, "mask")
        probes = [measure(mm.source, analysis, imp, mm.feeds, refit=True, probe=mm.run, probe_ratio=f, max_feeds=len(mm.feeds),
                          fit_feeds=fit_feeds) for f in PROBES]
    for i, g in enumerate(groups):
        order = g.classes[np.argsort(base[g.classes], kind="stable")]
        cum = np.cumsum(base[order])
        n1, n2 = counts[g.id]
        if st.refit:  # measure() removes size - round(size * (1 - f)) classes: the same counts
            d1, d2 = probes[0][g.id], probes[1][g.id]
        else:
            d1, d2 = removed(order[:n1]), removed(order[:n2])
        b1, b2 = max(float(cum[n1 - 1]), 1e-30), max(float(cum[n2 - 1]), 1e-30)
        p = 1.0
        if n2 > n1 and b2 > b1:
            p = float(np.clip(np.log(max(d2, 1e-30) / max(d1, 1e-30)) / np.log(b2 / b1), 1.0, 3.0))
        curves[g.id] = (max(d2, 0.0) / b2 ** p, p)
        if progress is not None:
            progress(i + 1, len(groups))
    return base, curves


@dataclasses.dataclass
class _Chunks:
    """Per prunable group: classes in removal order, the unit, how many classes it may lose, and the modelled
    D increase of removing each successive chunk (a·(B_k^p − B_(k−1)^p), increasing)."""

    order: dict[int, np.ndarray]
    unit: dict[int, int]
    limit: dict[int, int]
    value: dict[int, np.ndarray]


def _chunks(analysis: ChannelAnalysis, base: np.ndarray, curves: dict[int, tuple[float, float]],
            st: SearchSettings) -> _Chunks:
    order, unit, limit, value = {}, {}, {}, {}
    for g in analysis.groups:
        if not g.prunable:
            continue
        u = round_unit(g, st.round_to)
        order[g.id] = g.classes[np.argsort(base[g.classes], kind="stable")]
        unit[g.id] = u
        limit[g.id] = max(0, min(g.size - u, int(g.size * st.max_group_ratio)) // u * u)
        a, p = curves[g.id]
        cum = np.concatenate([[0.0], np.cumsum(base[order[g.id]])])[::u][: limit[g.id] // u + 1]
        value[g.id] = a * np.diff(cum ** p)
    return _Chunks(order, unit, limit, value)


def greedy_order(analysis: ChannelAnalysis, ch: _Chunks, target: str) -> list[tuple[int, int]]:
    """(group id, chunk index) in removal order: ascending modelled D per unit of cost, a group's chunks in order."""
    cost = class_flops(analysis) if target != "channels" else None
    widths = {}
    for g in analysis.groups:
        widths.update(zip(g.classes.tolist(), g.widths.tolist(), strict=True))
    keys = []
    for gid, order in ch.order.items():
        u, best = ch.unit[gid], 0.0
        for j in range(ch.limit[gid] // u):
            cls = order[j * u:(j + 1) * u]
            c = float(cost[cls].sum()) if cost is not None else float(sum(widths[int(k)] for k in cls))
            best = max(best, float(ch.value[gid][j]) / max(c, 1e-30))  # keeps a group's chunks in order
            keys.append((best, gid, j))
    keys.sort()
    return [(gid, j) for _, gid, j in keys]


def _prefix(n_root: int, ch: _Chunks, chunks: list[tuple[int, int]], k: int) -> np.ndarray:
    kept = np.ones(n_root, dtype=bool)
    for gid, j in chunks[:k]:
        u = ch.unit[gid]
        kept[ch.order[gid][j * u:(j + 1) * u]] = False
    return kept


def search_prefix(n_root: int, ch: _Chunks, chunks: list[tuple[int, int]],
                  met: Callable[[np.ndarray], bool]) -> tuple[np.ndarray, bool]:
    """The shortest prefix of ``chunks`` that meets the budget (bisection), and whether one does."""
    if met(_prefix(n_root, ch, chunks, 0)):
        return _prefix(n_root, ch, chunks, 0), True
    full = _prefix(n_root, ch, chunks, len(chunks))
    if not met(full):
        return full, False
    lo, hi = 0, len(chunks)  # met(hi), not met(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if met(_prefix(n_root, ch, chunks, mid)) else (mid, hi)
    return _prefix(n_root, ch, chunks, hi), True


def _moves(analysis: ChannelAnalysis, kept: np.ndarray, base: np.ndarray, curves: dict[int, tuple[float, float]],
           ch: _Chunks, st: SearchSettings, met: Callable[[np.ndarray], bool]) -> Iterator[tuple[float, np.ndarray]]:
    """Candidate masks one move away that meet the budget, with their modelled change of D (step 3)."""
    groups = [g for g in analysis.groups if g.prunable]
    for g in groups:
        if ch.unit[g.id] != 1 or g.size > st.measure_units:
            continue
        rem, kep = g.classes[~kept[g.classes]], g.classes[kept[g.classes]]
        a, p = curves[g.id]
        slope = a * p * max(float(base[rem].sum()), 1e-30) ** (p - 1)  # dD_g/dB at the current removal
        for u in rem:
            for v in kep:
                new = kept.copy()
                new[u], new[v] = True, False
                yield slope * float(base[v] - base[u]), new
    for ga in groups if not st.refit else ():
        ra = ch.order[ga.id][~kept[ch.order[ga.id]]]
        ka = len(ra) // ch.unit[ga.id]
        if ka == 0:
            continue
        back = ra[-ch.unit[ga.id]:]  # a's highest-scored removed chunk
        for gb in groups:
            if gb.id == ga.id:
                continue
            new = kept.copy()
            new[back] = True
            est = -float(ch.value[ga.id][ka - 1])
            kb = ch.order[gb.id][new[ch.order[gb.id]]]
            ub, done = ch.unit[gb.id], int((~new[gb.classes]).sum())
            taken = 0
            while not met(new) and done + taken + ub <= ch.limit[gb.id]:
                new[kb[taken:taken + ub]] = False
                j = (done + taken) // ub
                est += float(ch.value[gb.id][j]) if j < len(ch.value[gb.id]) else 0.0
                taken += ub
            if taken and met(new):
                yield est, new


def rearrange(mm: MaskedModel, analysis: ChannelAnalysis, kept: np.ndarray, base: np.ndarray,
              curves: dict[int, tuple[float, float]], ch: _Chunks, st: SearchSettings, met: Callable[[np.ndarray], bool], cur: float,
              progress=None) -> tuple[np.ndarray, float, int]:
    """Hill climbing on the measured objective from ``kept`` (objective ``cur``), step 3: (mask, D, accepted
    moves). D never rises."""
    start, accepted = mm.evaluations, 0
    improved = True
    while improved and mm.evaluations - start < st.rearrange:
        improved = False
        for _, cand in sorted(_moves(analysis, kept, base, curves, ch, st, met), key=lambda t: t[0]):
            if mm.evaluations - start >= st.rearrange:
                break
            d = mm.objective(cand)
            if progress is not None:
                progress(mm.evaluations - start, st.rearrange)
            if d < cur:
                kept, cur, accepted, improved = cand, d, accepted + 1, True
                break
    return kept, cur, accepted


def mask_search(model: ir.Model, analysis: ChannelAnalysis, feeds: list[dict], run: Runner, st: SearchSettings,
                per_node: dict[str, int] | None = None, progress=None,
                fit_feeds: list[dict] | None = None) -> SearchResult:
    """Steps 1-3 of the module docstring; ``model`` is left as it was. ``fit_feeds``: where the refit-aware probes
    fit their least-squares refits (default ``feeds``; disjoint feeds measure the refit out of sample)."""
    mm = MaskedModel(model, analysis, feeds, run)
    note = (lambda name: (lambda d, t: progress(name, d, t))) if progress is not None else (lambda name: None)
    energy = local_energy(model, analysis, feeds, run)
    base, curves = unit_scores(mm, analysis, energy, st, note("mask search: unit scores"), fit_feeds)
    ch = _chunks(analysis, base, curves, st)
    met = budget_check(analysis, st.ratio, st.target, per_node)
    kept, ok = search_prefix(len(analysis.root), ch, greedy_order(analysis, ch, st.target), met)
    d0 = mm.objective(kept)
    d, moves = d0, 0
    if ok and st.rearrange > 0:
        kept, d, moves = rearrange(mm, analysis, kept, base, curves, ch, st, met, d0, note("mask search: rearrangement"))
    return SearchResult(kept, base, curves, d0, d, ok, mm.evaluations, moves)
