"""Least-squares reconstruction of the layers that read pruned channels (``reconstruct: true``).

A consumer computes y = x·W (+ b). When its input keeps channels P and loses D, the kept rows and the bias are
refitted on calibration activations so that the pruned layer reproduces the original output:

    min over W', c of  ‖ X_P·W' + 1·c − X·W ‖²  +  λ‖[W'; c]‖²,    A = [X_P, 1]
    [W'; c] = (AᵀA + λI)⁻¹ · Aᵀ X · W

Only the Gram matrix G = [X, 1]ᵀ[X, 1] is accumulated (one ORT pass over the calibration feeds with the
consumer inputs as extra outputs); AᵀA and AᵀX are blocks of G. λ = 1e-3 · mean(diag AᵀA).

Cases: MatMul with a 2-D constant weight (channels on the last axis), Gemm (transA 0, transB either),
Conv 1×1, group 1, no padding (stride s reads x[:, :, ::s, ::s]). The bias shift c goes into the Gemm/Conv bias
input, or the constant of the single ``Add`` after a MatMul; with no bias only W' is refitted (A = X_P).
Activations come from the original model (errors of earlier layers are not fed forward). Shared tensors get a
private copy before they are changed. Other consumers (k×k convolutions, attention projections read through a
head merge are fine: they are MatMuls) are left as pruned, with the reason.
The refitted weights are *not* part of the prune plan: replaying a plan reproduces the structure only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.analysis.attention import const_value
from graphprune.analysis.channels import ChannelAnalysis, Member
from graphprune.analysis.importance import collect_activations


def _layout(m: Member) -> tuple[np.ndarray, ir.Value | None, ir.Node | None, int | None] | str:
    """(W as [K, N], bias value or None, bias node, bias input index) or a reason."""
    node = m.node
    w = const_value(m.value)
    op = node.op_type
    if op == "MatMul" and w.ndim == 2:
        users = [u for u, _ in node.outputs[0].uses()]
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            j = 1 if add.inputs[0] is node.outputs[0] else 0
            b = const_value(add.inputs[j])
            if b is not None and b.shape == (w.shape[1],):
                return w, add.inputs[j], add, j
        return w, None, None, None
    if op == "Gemm" and not node.attributes.get_int("transA", 0):
        wk = w.T if node.attributes.get_int("transB", 0) else w
        b = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        ok = b is not None and b.shape == (wk.shape[1],)
        return wk, (node.inputs[2] if ok else None), (node if ok else None), (2 if ok else None)
    if op == "Conv" and w.ndim == 4 and w.shape[2:] == (1, 1) and node.attributes.get_int("group", 1) == 1:
        if any(node.attributes.get_ints("pads", [0]) or [0]):
            return "1×1 Conv with padding"
        b = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        return w[:, :, 0, 0].T, (node.inputs[2] if b is not None else None), (node if b is not None else None), 2
    return f"{op} {'k×k' if op == 'Conv' else ''} consumer is not a linear map of single positions".replace("  ", " ")


def _rows(m: Member, x: np.ndarray) -> np.ndarray:
    if m.node.op_type == "Conv":
        s = list(m.node.attributes.get_ints("strides", [1, 1]) or [1, 1])
        x = np.moveaxis(x[:, :, :: s[0], :: s[1]], 1, -1)
    return x.reshape(-1, x.shape[-1])


def _write(graph: ir.Graph, node: ir.Node, index: int, arr: np.ndarray) -> None:
    v = node.inputs[index]
    arr = arr.astype(const_value(v).dtype)
    if v.is_initializer() and len(v.uses()) == 1:
        v.const_value = ir.tensor(arr, name=v.name)
        return
    name, k = f"{v.name}.refit", 1
    while name in graph.initializers:
        name, k = f"{v.name}.refit{k}", k + 1
    nv = ir.Value(name=name, shape=ir.Shape(arr.shape), type=v.type, const_value=ir.tensor(arr, name=name))
    graph.register_initializer(nv)
    node.replace_input_with(index, nv)


def _rel_err(s: np.ndarray, txx: float, atxw: np.ndarray, ata: np.ndarray) -> float:
    """‖A·s − X·W‖² / ‖X·W‖² from Gram blocks."""
    return float((txx - 2 * np.trace(s.T @ atxw) + np.trace(s.T @ ata @ s)) / max(txx, 1e-30))


def reconstruct(model: ir.Model, analysis: ChannelAnalysis, kept: np.ndarray, feeds: list[dict]) -> tuple[list, list]:
    """Refit the consumers of pruned channels in place (before surgery). Returns (rewritten, skipped) records."""
    kr = kept[analysis.root]
    todo: list[tuple[Member, tuple]] = []
    skipped = []
    for m in analysis.members:
        if m.role != "in":
            continue
        keep = kr[m.atoms]
        if keep.all() or not keep.any():
            continue
        lay = _layout(m)
        if isinstance(lay, str):
            skipped.append({"where": m.node.name, "reason": f"reconstruct: {lay}"})
            continue
        todo.append((m, lay))
    if not todo:
        return [], skipped
    xs = [m.node.inputs[0] for m, _ in todo]

    def reduce(i, y, acc):
        a = _rows(todo[i][0], y)
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
        g = a.T @ a
        return g if acc is None else acc + g

    grams = collect_activations(model, xs, feeds, reduce)
    rewritten = []
    for (m, (w, bias, bnode, bidx)), g in zip(todo, grams, strict=True):
        k = w.shape[0]
        p = np.nonzero(kr[m.atoms])[0]
        cols = np.append(p, k) if bias is not None else p
        ata = g[np.ix_(cols, cols)]
        atx = g[np.ix_(cols, np.arange(k))]
        lam = 1e-3 * float(np.mean(np.diag(ata))) + 1e-12
        w64 = w.astype(np.float64)
        sol = np.linalg.solve(ata + lam * np.eye(len(cols)), atx @ w64)
        # relative output error on the calibration data, before (kept rows as they are) and after the refit
        txx = np.trace(w64.T @ g[:k, :k] @ w64)
        base = np.zeros_like(sol)
        base[: len(p)] = w64[p]
        before, after = (_rel_err(s, txx, atx @ w64, ata) for s in (base, sol))
        if after >= before:
            skipped.append({"where": m.node.name, "reason": "reconstruct: refit did not lower the error"})
            continue
        new_w = w64.copy()
        new_w[p] = sol[: len(p)]
        node = m.node
        if node.op_type == "MatMul":
            _write(model.graph, node, 1, new_w)
        elif node.op_type == "Gemm":
            _write(model.graph, node, 1, new_w.T if node.attributes.get_int("transB", 0) else new_w)
        else:
            _write(model.graph, node, 1, new_w.T[:, :, None, None])
        if bias is not None:
            _write(model.graph, bnode, bidx, const_value(bias).astype(np.float64) + sol[len(p)])
        rewritten.append({"node": node.name, "kept_inputs": int(len(p)), "of": int(k),
                          "rel_err_before": round(float(max(before, 0.0)), 5), "rel_err_after": round(float(max(after, 0.0)), 5)})
    return rewritten, skipped
