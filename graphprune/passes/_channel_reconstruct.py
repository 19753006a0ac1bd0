"""Least-squares reconstruction of the layers that read pruned channels (``reconstruct: true``).

A consumer computes y = x·W (+ b). When its input keeps channels P and loses D, the kept rows and the bias are
refitted on calibration activations so that the pruned layer reproduces the original output:

    min over W', c of  ‖ X_P·W' + 1·c − X·W ‖²  +  λ‖[W'; c]‖²,    A = [X_P, 1]
    [W'; c] = (AᵀA + λI)⁻¹ · Aᵀ X · W

Only the Gram matrix G = [X, 1]ᵀ[X, 1] is accumulated (one ORT pass over the calibration feeds with the
consumer inputs as extra outputs); AᵀA and AᵀX are blocks of G. λ = 1e-3 · mean(diag AᵀA).

Cases (``analysis.linear.linear_map``): MatMul with a 2-D constant weight (channels on the last axis), Gemm (transA 0, transB either),
Conv 1×1, group 1, no padding (stride s reads x[:, :, ::s, ::s]). The bias shift c goes into the Gemm/Conv bias
input, or the constant of the single ``Add`` after a MatMul; with no bias only W' is refitted (A = X_P).
By default (``refit: independent``) activations come from the original model (errors of earlier layers are not fed
forward). ``refit: sequential`` refits the consumers in graph order on the activations of the model pruned so far
(every consumer's pruned rows zeroed, a masked stand-in for the surgery that is exact except where a norm reduces
over pruned channels), with A = [X̃_P, 1] and the cross Gram ÃᵀX; on MiniLM it was no better and 3-5× slower. Shared tensors get a
private copy before they are changed. Other consumers (k×k convolutions, attention projections read through a
head merge are fine: they are MatMuls) are left as pruned, with the reason.
The refitted weights are *not* part of the prune plan: replaying a plan reproduces the structure only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from graphprune._ir import NameScope, const_value
from graphprune.analysis.channels import ChannelAnalysis, Member
from graphprune.analysis.importance import fold_activations
from graphprune.analysis.linear import LinearMap, linear_map
from graphprune.passes.base import Rewrite, Skipped


@dataclasses.dataclass(frozen=True)
class LayerRefit(Rewrite):
    """A consumer layer refitted by least squares: inputs kept of all, relative output error before and after."""

    node: str
    kept_inputs: int
    of: int
    rel_err_before: float
    rel_err_after: float

    def to_dict(self) -> dict[str, Any]:
        return {"refit": self.node, **super().to_dict()}


def _write(graph: ir.Graph, node: ir.Node, index: int, arr: np.ndarray) -> None:
    v = node.inputs[index]
    arr = arr.astype(const_value(v).dtype)
    if v.is_initializer() and len(v.uses()) == 1:
        v.const_value = ir.tensor(arr, name=v.name)
        return
    node.replace_input_with(index, NameScope(graph).initializer(f"{v.name}.refit", arr))


def _rel_err(s: np.ndarray, txx: float, atxw: np.ndarray, ata: np.ndarray) -> float:
    """‖A·s − X·W‖² / ‖X·W‖² from Gram blocks."""
    return float((txx - 2 * np.trace(s.T @ atxw) + np.trace(s.T @ ata @ s)) / max(txx, 1e-30))


def refit_member(m: Member, lay: LinearMap, kr: np.ndarray, ata: np.ndarray, atx: np.ndarray, gxx: np.ndarray):
    """Solve one consumer's refit from its Gram blocks; returns (new full-size W, bias shift or None, errors)."""
    w, bias = lay.weight, lay.bias
    k = w.shape[0]
    p = np.nonzero(kr[m.atoms])[0]
    lam = 1e-3 * float(np.mean(np.diag(ata))) + 1e-12
    w64 = w.astype(np.float64)
    rhs = atx @ w64
    sol = np.linalg.solve(ata + lam * np.eye(len(ata)), rhs)
    txx = float(np.trace(w64.T @ gxx @ w64))  # ‖X·W‖²
    base = np.zeros_like(sol)
    base[: len(p)] = w64[p]
    before, after = (_rel_err(s, txx, rhs, ata) for s in (base, sol))
    new_w = np.zeros_like(w64)  # pruned rows are removed by the surgery; zero keeps a masked model exact
    new_w[p] = sol[: len(p)]
    return new_w, (sol[len(p)] if bias is not None else None), before, after, p, k


def store_weights(model: ir.Model, lay: LinearMap, new_w: np.ndarray, shift: np.ndarray | None) -> None:
    _write(model.graph, lay.node, 1, lay.stored(new_w))
    if shift is not None:
        _write(model.graph, lay.bias_node, lay.bias_index, const_value(lay.bias).astype(np.float64) + shift)


def _plan_refits(analysis: ChannelAnalysis, kr: np.ndarray) -> tuple[list, list, list]:
    """(refittable consumers with their layout, other consumers that lose inputs, skipped records)."""
    todo, others, skipped = [], [], []
    for m in analysis.members:
        if m.role != "in":
            continue
        keep = kr[m.atoms]
        if keep.all() or not keep.any():
            continue
        lay = linear_map(m)
        if isinstance(lay, str):
            skipped.append(Skipped(m.node.name, f"reconstruct: {lay}"))
            others.append(m)
            continue
        todo.append((m, lay))
    return todo, others, skipped


def mask_rows(model: ir.Model, m: Member, kr: np.ndarray) -> None:
    """Zero the weight slices of ``m`` that read pruned channels (a masked stand-in for the surgery)."""
    w = const_value(m.value)
    drop = ~kr[m.atoms]
    idx = [slice(None)] * w.ndim
    idx[m.axis] = np.nonzero(drop)[0]
    w = w.copy()
    w[tuple(idx)] = 0
    _write(model.graph, m.node, m.input_index, w)


def reconstruct(model: ir.Model, analysis: ChannelAnalysis, kept: np.ndarray, feeds: list[dict], runtime,
                sequential: bool = False, progress=None) -> tuple[list[LayerRefit], list[Skipped]]:
    """Refit the consumers of pruned channels in place (before surgery). Returns (rewritten, skipped) records.

    ``sequential``: consumers are refitted in graph order on the activations of the model pruned so far (every
    consumer's pruned rows zeroed, earlier consumers already refitted), against the original layer output
    X·W, so each refit also absorbs the error of the layers before it:
    min ‖[X̃_P, 1]·s − X·W‖². Otherwise all refits use the original activations (A = [X_P, 1]).
    ``runtime``: the context's model runtime (``probe`` / ``prober``).
    """
    kr = kept[analysis.root]
    todo, others, skipped = _plan_refits(analysis, kr)
    if not todo:
        return [], skipped
    order = {id(n): i for i, n in enumerate(model.graph)}
    todo.sort(key=lambda t: order.get(id(t[0].node), 0))
    xs = [m.node.inputs[0] for m, _ in todo]
    rewritten: list[LayerRefit] = []

    def finish(m, lay, new_w, shift, before, after, p, k):
        """Write a refit that lowers the calibration error, and record it; otherwise say why not."""
        if after >= before:
            skipped.append(Skipped(m.node.name, "reconstruct: refit did not lower the error"))
            return
        store_weights(model, lay, new_w, shift)
        rewritten.append(LayerRefit(m.node.name, int(len(p)), int(k), round(float(max(before, 0.0)), 5),
                                    round(float(max(after, 0.0)), 5)))

    if not sequential:
        def reduce(i, y, acc):
            a = todo[i][1].rows(y)
            a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
            g = a.T @ a
            return g if acc is None else acc + g

        grams, _ = fold_activations(runtime.probe(model, xs, feeds), len(xs), reduce)
        for (m, lay), g in zip(todo, grams, strict=True):
            k = lay.weight.shape[0]
            p = np.nonzero(kr[m.atoms])[0]
            cols = np.append(p, k) if lay.bias is not None else p
            finish(m, lay, *refit_member(m, lay, kr, g[np.ix_(cols, cols)], g[np.ix_(cols, np.arange(k))], g[:k, :k]))
        return rewritten, skipped

    run_original = runtime.prober(model, xs)  # built now: the masking below does not reach it
    for m in [t[0] for t in todo] + others:
        mask_rows(model, m, kr)
    for step, (m, lay) in enumerate(todo):
        x = m.node.inputs[0]
        k = lay.weight.shape[0]
        p = np.nonzero(kr[m.atoms])[0]
        n = len(p) + (1 if lay.bias is not None else 0)
        ata, atx, gxx = np.zeros((n, n)), np.zeros((n, k)), np.zeros((k, k))
        run_pruned = runtime.prober(model, [x])
        for feed in feeds:
            xo = lay.rows(np.asarray(run_original(feed)[step], dtype=np.float64))
            xp = lay.rows(np.asarray(run_pruned(feed)[0], dtype=np.float64))[:, p]
            if lay.bias is not None:
                xp = np.concatenate([xp, np.ones((xp.shape[0], 1))], axis=1)
            ata += xp.T @ xp
            atx += xp.T @ xo
            gxx += xo.T @ xo
        finish(m, lay, *refit_member(m, lay, kr, ata, atx, gxx))
        if progress is not None:
            progress(step + 1, len(todo))
    return rewritten, skipped
