"""Per-group sensitivity measured on calibration data (``allocate: sensitivity``; ``_channel_plan.allocate`` turns
it into group ratios).

Measurement: for every prunable group g, the model is changed as if g alone lost ``probe`` of its classes (the
lowest-scored first): the consumer rows reading them are zeroed and, with ``reconstruct``, each consumer is refitted
from the original's Gram matrix (the independent refit of ``_channel_reconstruct``). The calibration feeds are run
and d_g = mean over samples and float outputs of (1 − cosine(original, changed)) is recorded; then the model is
restored. One ORT session (``backends.onnxruntime.probe``) per group, over at most ``max_feeds`` feeds.

Allocation (``_channel_plan.allocate``): the output error of removing a fraction r_g of group g is modelled as e_g·r_g² with e_g = d_g / probe².
Minimising Σ e_g·r_g² for the FLOPs removed, Σ f_g·r_g (f_g: the FLOPs of g's classes, ``class_flops``), gives
r_g = μ·f_g / e_g, capped at ``max_group_ratio``; μ is found by bisection so that the target share of channels is
removed, Σ n_g·r_g = R·Σ n_g (n_g: channels of g). (For ``target: flops`` the caller bisects R as for any selection.) Within a group the classes go in
importance order, kept counts rounded to ``round_to``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.analysis.channels import ChannelAnalysis
from graphprune.analysis.importance import Importance, fold_activations
from graphprune.analysis.linear import linear_map
from graphprune.passes._channel_plan import keep_count, round_unit
from graphprune.passes._channel_reconstruct import mask_rows, refit_member, store_weights


def output_distance(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    vals = []
    for r_feed, o_feed in zip(ref, outs, strict=True):
        for a, b in zip(r_feed, o_feed, strict=True):
            a = a.reshape(a.shape[0] if a.ndim else 1, -1)
            b = b.reshape(a.shape[0], -1)
            den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            vals.append(1.0 - (a * b).sum(axis=1) / np.maximum(den, 1e-30))
    return float(np.mean(np.concatenate(vals))) if vals else 0.0


def _outputs(probe, model: ir.Model, outputs: list[ir.Value], feeds: list[dict]) -> list[list[np.ndarray]]:
    return [[np.asarray(y, dtype=np.float64) for y in ys] for ys in probe(model, outputs, feeds)]


class _Restore:
    """Remembers the weight inputs a probe changes and puts them back."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph, self.saved = graph, []

    def remember(self, node: ir.Node, index: int) -> None:
        v = node.inputs[index]
        self.saved.append((node, index, v, v.const_value))

    def restore(self) -> None:
        for node, index, value, const in reversed(self.saved):
            now = node.inputs[index]
            if now is not value:
                node.replace_input_with(index, value)
                if not now.uses() and now.name in self.graph.initializers:
                    self.graph.initializers.pop(now.name)
            value.const_value = const
        self.saved.clear()


def measure(model: ir.Model, analysis: ChannelAnalysis, imp: Importance, feeds: list[dict], refit: bool, probe,
            probe_ratio: float = 0.5, round_to: int = 1, max_feeds: int = 4, progress=None,
            fit_feeds: list[dict] | None = None) -> dict[int, float]:
    """d_g for every prunable group (see module docstring); the model is left as it was. With ``fit_feeds`` the
    refit's Gram matrices come from those feeds (e.g. disjoint from ``feeds``, so d_g is measured out of sample).
    ``probe``: the context runtime's ``probe(model, values, feeds)``."""
    feeds = list(feeds)[:max_feeds]
    groups = [g for g in analysis.groups if g.prunable]
    outputs = list(model.graph.outputs)
    ref = _outputs(probe, model, outputs, feeds)
    consumers = [m for m in analysis.members if m.role == "in" and m.value is not None and m.value.const_value is not None]
    lays = {id(m): linear_map(m) for m in consumers}
    fit = [m for m in consumers if refit and not isinstance(lays[id(m)], str)]
    fit_ids = {id(m) for m in fit}
    xs = list(dict.fromkeys(m.node.inputs[0] for m in fit))

    def reduce(i, y, acc):
        a = next(lays[id(m)] for m in fit if m.node.inputs[0] is xs[i]).rows(y)
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
        g = a.T @ a
        return g if acc is None else acc + g

    grams = dict(zip(xs, fold_activations(probe(model, xs, fit_feeds or feeds), len(xs), reduce)[0], strict=True)) if xs else {}
    restore = _Restore(model.graph)
    result: dict[int, float] = {}
    for step, g in enumerate(groups):
        kept = np.ones(len(analysis.root), dtype=bool)
        k = keep_count(g.size, 1.0 - probe_ratio, round_unit(g, round_to))
        order = np.argsort(-imp.scores[g.id], kind="stable")
        kept[g.classes[order[k:]]] = False
        kr = kept[analysis.root]
        for m in consumers:
            keep = kr[m.atoms]
            if keep.all() or not keep.any():
                continue
            lay = lays[id(m)]
            restore.remember(m.node, m.input_index)
            if id(m) in fit_ids:
                gram = grams[m.node.inputs[0]]
                kdim = lay.weight.shape[0]
                p = np.nonzero(keep)[0]
                cols = np.append(p, kdim) if lay.bias is not None else p
                new_w, shift, *_ = refit_member(m, lay, kr, gram[np.ix_(cols, cols)], gram[np.ix_(cols, np.arange(kdim))],
                                          gram[:kdim, :kdim])
                if shift is not None:
                    restore.remember(lay.bias_node, lay.bias_index)
                store_weights(model, lay, new_w, shift)
            else:
                mask_rows(model, m, kr)
        result[g.id] = output_distance(ref, _outputs(probe, model, outputs, feeds))
        restore.restore()
        if progress is not None:
            progress(step + 1, len(groups))
    return result
