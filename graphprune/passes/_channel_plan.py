"""Choose the kept classes of every channel group and write the prune plan (JSON-ready).

Selection
  * local: every prunable group keeps its best ``(1 - r)`` classes; global: scores are divided by their group's
    mean and one threshold is set over all groups (no group loses more than ``max_group_ratio``). Scores that are
    comparable as they stand (``obs``: relative output errors) are divided by the FLOPs each class saves instead.
  * ``round_to``: kept channel counts are rounded to the nearest multiple of ``round_to`` (a head of 64 channels
    already is one), at least one unit, never more than the group has.
  * target ``channels``: r = ratio; ``flops`` / ``params``: r is found by bisection so the predicted FLOPs or
    parameter count drops by ``ratio`` (predicted from the analysis' compute terms, each scaled by the kept
    fraction of its input and output channels).

Plan (format ``graphprune.channel_plan/1``): per group the kept class indices; per sliced tensor the node,
input index, initializer name, original shape, axis and kept indices; per shape constant / attribute the node,
slot and new value; per channel-indexing Gather the new indices. It is applied by ``_channel_surgery`` with no
analysis, so it can be replayed on the same model and read by the torch front-end (initializer names are the
parameter names in dynamo exports; the node's ``pkg.torch.onnx.name_scopes`` is copied when present).
"""

from __future__ import annotations

import math

import numpy as np

from graphprune._ir import const_value
from graphprune.analysis.channels import ChannelAnalysis
from graphprune.analysis.importance import Importance

FORMAT = "graphprune.channel_plan/1"


def round_unit(group, round_to: int) -> int:
    w = int(group.widths.min()) if len(group.widths) else 1
    return max(1, math.ceil(round_to / max(w, 1))) if round_to > 1 else 1


def keep_count(n: int, frac_keep: float, unit: int) -> int:
    if frac_keep >= 1.0:
        return n
    k = int(round(n * frac_keep / unit)) * unit
    return int(min(n, max(unit, k)))


def select_local(analysis: ChannelAnalysis, imp: Importance, r: float, round_to: int) -> np.ndarray:
    kept = np.ones(len(analysis.root), dtype=bool)
    for g in analysis.groups:
        if not g.prunable or r <= 0:
            continue
        k = keep_count(g.size, 1.0 - r, round_unit(g, round_to))
        order = np.argsort(-imp.scores[g.id], kind="stable")
        kept[g.classes[order[k:]]] = False
    return kept


def select_global(analysis: ChannelAnalysis, imp: Importance, r: float, round_to: int, max_group_ratio: float) -> np.ndarray:
    groups = [g for g in analysis.groups if g.prunable]
    kept = np.ones(len(analysis.root), dtype=bool)
    if not groups or r <= 0:
        return kept
    if imp.comparable:  # an output-error estimate per class: error per FLOP saved, across groups as it stands
        saved = class_flops(analysis)
        norm = [imp.scores[g.id] / np.maximum(saved[g.classes], 1e-9) for g in groups]
    else:
        norm = [imp.scores[g.id] / max(float(np.mean(imp.scores[g.id])), 1e-12) for g in groups]
    weights = np.concatenate([g.widths for g in groups]).astype(np.float64)
    allv = np.concatenate(norm)
    order = np.argsort(allv, kind="stable")
    cum = np.cumsum(weights[order])
    cut = np.searchsorted(cum, r * weights.sum())
    thresh = allv[order[min(cut, len(order) - 1)]] if cut > 0 else -np.inf
    for g, s in zip(groups, norm, strict=True):
        drop = int((s < thresh).sum())
        drop = min(drop, int(g.size * max_group_ratio))
        k = keep_count(g.size, 1.0 - drop / g.size, round_unit(g, round_to))
        order_g = np.argsort(-imp.scores[g.id], kind="stable")
        kept[g.classes[order_g[k:]]] = False
    return kept


def allocate(analysis: ChannelAnalysis, imp: Importance, sensitivity: dict[int, float], r: float, round_to: int,
             max_group_ratio: float, probe_ratio: float = 0.5) -> np.ndarray:
    """Kept-class mask from measured sensitivity (``_channel_sensitivity.measure``): group ratios r_g = μ·f_g/e_g
    (capped) removing a share ``r`` of the prunable channels (the model is in ``_channel_sensitivity``'s docstring)."""
    groups = [g for g in analysis.groups if g.prunable and g.id in sensitivity]
    kept = np.ones(len(analysis.root), dtype=bool)
    if not groups or r <= 0:
        return kept
    n = np.array([float(g.widths.sum()) for g in groups])
    saved = class_flops(analysis)
    f = np.array([max(float(saved[g.classes].sum()), 1e-9) for g in groups])
    e = np.array([max(sensitivity[g.id], 1e-12) / probe_ratio ** 2 for g in groups])

    def ratios(mu: float) -> np.ndarray:
        return np.minimum(mu * f / e, max_group_ratio)

    goal = r * n.sum()
    lo, hi = 0.0, 1.0
    while (ratios(hi) * n).sum() < goal and hi < 1e30 and ratios(hi).min() < max_group_ratio:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (ratios(mid) * n).sum() < goal else (lo, mid)
    for g, rg in zip(groups, ratios(hi), strict=True):
        k = keep_count(g.size, 1.0 - float(rg), round_unit(g, round_to))
        order = np.argsort(-imp.scores[g.id], kind="stable")
        kept[g.classes[order[k:]]] = False
    return kept


def class_flops(analysis: ChannelAnalysis) -> np.ndarray:
    """FLOPs each root class would save on its own (first order: every compute term's share of that class's
    atoms along its fan-in and fan-out), indexed by root atom."""
    out = np.zeros(len(analysis.root), dtype=np.float64)
    for t in analysis.costs:
        for atoms in (t.fan_in, t.fan_out):
            if atoms is not None and len(atoms):
                np.add.at(out, analysis.root[atoms], t.flops / len(atoms))
    return out


def _frac(kept_root: np.ndarray, atoms: np.ndarray | None) -> float:
    return 1.0 if atoms is None or len(atoms) == 0 else float(kept_root[atoms].mean())


def predicted(analysis: ChannelAnalysis, kept: np.ndarray, per_node: dict[str, int] | None = None) -> dict[str, float]:
    """Predicted FLOPs and params ratios (after / before). With ``per_node`` (``count_flops``) every node counts,
    each term scaled by the kept fraction of its input and output channels; without it, the analysis' own
    estimate of the compute layers only."""
    kr = kept[analysis.root]
    if per_node:
        f0 = sum(per_node.values()) or 1
        termed = {t.node.name for t in analysis.costs}
        f1 = sum(v for k, v in per_node.items() if k not in termed)
        f1 += sum((per_node.get(t.node.name) or t.flops) * _frac(kr, t.fan_in) * _frac(kr, t.fan_out) for t in analysis.costs)
    else:
        f0 = sum(t.flops for t in analysis.costs) or 1
        f1 = sum(t.flops * _frac(kr, t.fan_in) * _frac(kr, t.fan_out) for t in analysis.costs)
    sizes: dict[int, tuple[int, float]] = {}
    for m in analysis.members:
        v = m.value
        if v is None or v.const_value is None:
            continue
        key = id(m.node), m.input_index
        size, frac = sizes.get(key, (int(np.prod(v.const_value.shape)), 1.0))
        sizes[key] = (size, frac * _frac(kr, m.atoms))
    p0 = sum(s for s, _ in sizes.values()) or 1
    p1 = sum(s * f for s, f in sizes.values())
    return {"flops_ratio": f1 / f0, "params_ratio": p1 / p0}


def select(analysis: ChannelAnalysis, imp: Importance, ratio: float, target: str, round_to: int,
           global_: bool, max_group_ratio: float = 0.9, per_node: dict[str, int] | None = None,
           sensitivity: dict[int, float] | None = None) -> tuple[np.ndarray, float]:
    """Kept-class mask over root atoms, and the channel ratio used. With ``sensitivity`` (measured per group, see
    ``_channel_sensitivity``) the group ratios are allocated from it instead of from the scores."""

    def pick(r: float) -> np.ndarray:
        if sensitivity is not None:
            return allocate(analysis, imp, sensitivity, r, round_to, max_group_ratio)
        if global_:
            return select_global(analysis, imp, r, round_to, max_group_ratio)
        return select_local(analysis, imp, r, round_to)

    if target == "channels" or ratio <= 0:
        return pick(ratio), ratio
    key = "flops_ratio" if target == "flops" else "params_ratio"
    goal = 1.0 - ratio
    lo, hi = 0.0, 0.99  # predicted ratio falls (stepwise) as r grows: bisect to the step around the goal
    for _ in range(18):
        mid = (lo + hi) / 2
        if predicted(analysis, pick(mid), per_node)[key] > goal:
            lo = mid
        else:
            hi = mid
    k_lo, k_hi = pick(lo), pick(hi)
    e_lo, e_hi = (abs(predicted(analysis, k, per_node)[key] - goal) for k in (k_lo, k_hi))
    return (k_lo, lo) if e_lo <= e_hi else (k_hi, hi)


def _scopes(node) -> str | None:
    return node.metadata_props.get("pkg.torch.onnx.name_scopes") if node.metadata_props else None


def build_plan(analysis: ChannelAnalysis, kept: np.ndarray, info: dict | None = None) -> dict:
    """The replayable plan for a kept-class mask (see module docstring)."""
    kr = kept[analysis.root]
    groups = []
    for g in analysis.groups:
        keep = np.nonzero(kept[g.classes])[0]
        if len(keep) == g.size:
            continue
        groups.append({"id": g.id, "kind": g.kind, "size": g.size, "kept": int(len(keep)),
                       "keep": keep.tolist(), "members": g.describe()["members"]})
    slices = []
    for m in analysis.members:
        keep = np.nonzero(kr[m.atoms])[0]
        if len(keep) == len(m.atoms):
            continue
        v = m.value
        entry = {"node": m.node.name, "input": m.input_index, "initializer": v.name, "axis": m.axis, "role": m.role,
                 "shape": list(v.const_value.shape) if v.const_value is not None else None, "keep": keep.tolist()}
        if _scopes(m.node):
            entry["scope"] = _scopes(m.node)
        slices.append(entry)
    counts = []
    for e in analysis.count_edits:
        new = int(kr[e.lines].any(axis=1).sum())
        if new == len(e.lines) and e.attr is None and not e.always:
            continue
        rec = {"node": e.node.name, "pos": e.pos, "value": new}
        rec.update({"attr": e.attr} if e.attr else {"input": e.input_index})
        if e.base is not None:
            rec["base"] = list(e.base)
        counts.append(rec)
    gathers = []
    for e in analysis.gather_edits:
        keep = kr[e.atoms]
        if keep.all():
            continue
        newpos = np.cumsum(keep) - 1
        idx = np.asarray(const_value(e.node.inputs[e.input_index])).ravel()
        idx = np.where(idx < 0, idx + len(e.atoms), idx)
        gathers.append({"node": e.node.name, "input": e.input_index, "value": newpos[idx[keep[idx]]].tolist()})
    shapes = {}
    for value, axis, lines in analysis.shape_lines:
        new = int(kr[lines].any(axis=1).sum())
        if new != len(lines) and value.name:
            shapes[(value.name, axis)] = new
    value_shapes = [{"value": v, "axis": a, "dim": d} for (v, a), d in shapes.items()]
    return {"format": FORMAT, "info": info or {}, "groups": groups, "slices": slices, "shape_edits": counts,
            "gather_edits": gathers, "value_shapes": value_shapes}
