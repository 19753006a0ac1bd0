"""Channel importance: one score per class (channel, head, conv group) of every channel group. Changes nothing.

Criteria
  * ``l1`` / ``l2``: magnitude of every weight slice a class owns, summed over the group: the output rows of the
    layers that produce the channels and the input columns of the layers that consume them (L1: sum of |w|;
    L2: the Euclidean norm of each slice).
  * ``bn``: |γ| of the BatchNormalization nodes in the group (network-slimming). Groups without a BatchNorm fall
    back to ``l2`` and are listed in the ``fallback`` result. Exporters that fold BatchNorm into Conv (the torch
    dynamo exporter in eval mode) leave nothing to read: that is an error naming the key.
  * ``obs``: the output error each class's removal would leave in every consumer layer *after* an optimal
    least-squares refit of the layer's other inputs (Optimal Brain Surgeon, for whole rows): with H = XᵀX + λI
    over the calibration activations and S the rows of the class, ΔE = tr(W_Sᵀ [(H⁻¹)_SS]⁻¹ W_S), divided by the
    layer's output energy tr(WᵀXᵀXW). The same objective ``reconstruct`` minimises, so selection and refit agree;
    the scores are relative output errors and are compared across groups as they stand.
  * ``activation``: for every consumer layer, mean |x_c| of its input over the calibration feeds (the caller runs
    them, e.g. with ``graphprune.backends.onnxruntime.probe``, and hands the arrays in) times the L2 norm of the weights that read channel c: the channel's contribution to the next layer
    (output-error criterion in the spirit of Wanda / activation-weighted magnitude).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphprune._ir import unmap
from graphprune.analysis.channels import ChannelAnalysis, Member
from graphprune.errors import ConfigError

METHODS = ("l1", "l2", "bn", "activation", "obs")


@dataclasses.dataclass
class Importance:
    scores: dict[int, np.ndarray]  # group id -> score per class
    method: str
    fallback: list[int] = dataclasses.field(default_factory=list)  # groups scored with l2 instead
    #: scores are comparable across groups as they stand (an output-error estimate): a global ranking uses them
    #: as they are, per channel, instead of dividing each group's scores by their mean
    comparable: bool = False


def _slice_norms(m: Member, p: float) -> np.ndarray:
    tensor = m.value.const_value
    w = np.asarray(tensor.numpy(), dtype=np.float64)
    w = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)
    norms = np.abs(w).sum(axis=1) if p == 1 else np.sqrt((w * w).sum(axis=1))
    del w
    unmap(tensor)  # scoring every weight of a large model leaves none of its pages counted
    return norms


def _per_root(analysis: ChannelAnalysis, members: list[Member], values) -> np.ndarray:
    acc = np.zeros(len(analysis.root), dtype=np.float64)
    for m, v in zip(members, values, strict=True):
        np.add.at(acc, analysis.root[m.atoms], v)
    return acc


def _magnitude(analysis: ChannelAnalysis, p: float) -> np.ndarray:
    ms = [m for m in analysis.members if m.role in ("out", "in") and m.value is not None and m.value.const_value is not None]
    return _per_root(analysis, ms, [_slice_norms(m, p) for m in ms])


def fold_activations(runs: Iterable[Sequence[np.ndarray]], count: int, reduce: Callable) -> tuple[list, int]:
    """Fold activations feed by feed: ``runs`` holds one list of ``count`` arrays per feed (as
    ``graphprune.backends.onnxruntime.probe`` yields them); ``reduce(i, array, acc)`` folds array ``i`` (float64)
    into its accumulator. Returns the accumulators and the number of feeds."""
    acc: list = [None] * count
    feeds = 0
    for arrays in runs:
        feeds += 1
        for i, y in enumerate(arrays):
            acc[i] = reduce(i, np.asarray(y, dtype=np.float64), acc[i])
    return acc, feeds


def _consumer_inputs(analysis: ChannelAnalysis) -> tuple[list[Member], dict[ir.Value, int]]:
    """Consumer members with a constant weight, and each distinct input value they read with its channel axis."""
    ms = [m for m in analysis.members if m.role == "in" and m.value is not None and m.value.const_value is not None]
    axes: dict[ir.Value, int] = {}
    for m in ms:
        x = m.node.inputs[0]
        rank = len(x.shape) if x.shape is not None else 2
        axes.setdefault(x, 1 if m.node.op_type in ("Conv", "ConvTranspose", "Gemm") else rank - 1)
    return ms, axes


def activation_values(analysis: ChannelAnalysis) -> list[ir.Value]:
    """The values whose calibration activations ``activation`` and ``obs`` importance read, in the order
    :func:`compute_importance` expects their arrays: the distinct inputs of the consumer layers."""
    return list(_consumer_inputs(analysis)[1])


def _activation(analysis: ChannelAnalysis, runs: Iterable[Sequence[np.ndarray]]) -> np.ndarray:
    ms, uniq = _consumer_inputs(analysis)
    axes = list(uniq.values())

    def reduce(i, y, acc):  # mean |x| per position of the channel axis
        y = np.moveaxis(np.abs(y), axes[i], 0)
        s = y.reshape(y.shape[0], -1).mean(axis=1)
        return s if acc is None else acc + s

    sums, feeds = fold_activations(runs, len(uniq), reduce)
    means = {x: s / max(feeds, 1) for x, s in zip(uniq, sums, strict=True)}
    vals = []
    for m in ms:
        a = means[m.node.inputs[0]]
        vals.append(a[: len(m.atoms)] * _slice_norms(m, 2) if len(a) == len(m.atoms) else _slice_norms(m, 2))
    return _per_root(analysis, ms, vals)


def _obs(analysis: ChannelAnalysis, runs: Iterable[Sequence[np.ndarray]]) -> np.ndarray:
    ms, uniq = _consumer_inputs(analysis)
    axes = list(uniq.values())

    def reduce(i, y, acc):
        y = np.moveaxis(y, axes[i], -1)
        y = y.reshape(-1, y.shape[-1])
        g = y.T @ y
        return g if acc is None else acc + g

    grams = dict(zip(uniq, fold_activations(runs, len(uniq), reduce)[0], strict=True))
    acc = np.zeros(len(analysis.root), dtype=np.float64)
    for m in ms:
        g = grams[m.node.inputs[0]]
        w = np.asarray(m.value.const_value.numpy(), dtype=np.float64)
        w = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)
        if g is None or g.shape[0] != w.shape[0]:
            continue
        energy = float(np.einsum("ij,ik,kj->", w, g, w)) or 1.0
        hinv = np.linalg.inv(g + (1e-3 * float(np.mean(np.diag(g))) + 1e-12) * np.eye(len(g)))
        roots = analysis.root[m.atoms]
        for r in np.unique(roots):
            rows = np.nonzero(roots == r)[0]
            ws = w[rows]
            if len(rows) == 1:
                delta = float(ws[0] @ ws[0]) / hinv[rows[0], rows[0]]
            else:
                delta = float(np.trace(ws.T @ np.linalg.solve(hinv[np.ix_(rows, rows)], ws)))
            acc[r] += delta / energy
    return acc


def compute_importance(
    analysis: ChannelAnalysis, method: str = "l2", activations: Iterable[Sequence[np.ndarray]] | None = None
) -> Importance:
    """Scores for every group (prunable or not).

    ``activation`` and ``obs`` need ``activations``: for every calibration feed, the arrays of
    :func:`activation_values` in order (``graphprune.backends.onnxruntime.probe`` yields them; they are folded
    feed by feed). The other criteria read only the weights.
    """
    if method not in METHODS:
        raise ConfigError(f"importance: unknown criterion {method!r}; choose one of {', '.join(METHODS)}")
    fallback: list[int] = []
    if method in ("l1", "l2"):
        per_root = _magnitude(analysis, 1 if method == "l1" else 2)
    elif method == "bn":
        bns = [m for m in analysis.members if m.role == "bn"]
        if not bns:
            raise ConfigError("importance: 'bn' needs BatchNormalization nodes; this model has none "
                              "(the exporter folded them into Conv); use l1, l2 or activation")
        per_root = _per_root(analysis, bns, [np.abs(m.value.const_value.numpy()).astype(np.float64) for m in bns])
        with_bn = {analysis.group_of_root[int(analysis.root[m.atoms[0]])] for m in bns}
        l2 = _magnitude(analysis, 2)
        for g in analysis.groups:
            if g.id not in with_bn:
                per_root[g.classes] = l2[g.classes]
                if g.prunable:
                    fallback.append(g.id)
    else:
        runs = iter(activations if activations is not None else ())
        first = next(runs, None)
        if first is None:
            raise ConfigError(f"importance: {method!r} needs calibration inputs")
        per_root = (_obs if method == "obs" else _activation)(analysis, itertools.chain([first], runs))
    return Importance({g.id: per_root[g.classes] for g in analysis.groups}, method, fallback, comparable=method == "obs")
