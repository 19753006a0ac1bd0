"""A masked twin of a model, for measuring what removing any set of classes does (``search: mask``).

Construction: the model is cloned; every consumer layer that reads channels of a prunable group (a
``Member`` with role ``in`` and a constant weight: MatMul, Gemm, Conv) gets its activation input through a new
``Mul(x, mask)``, with ``mask`` a new graph input holding one value per position of x's channel axis (shape
``[K]`` for channels on the last axis, ``[K, 1, …]`` for Conv). Consumers that read the same value share one Mul.
The original model is not changed.

Masking a class sets its mask positions to 0: the consumer then reads nothing from it, which is what the
surgery does when it slices the consumer's rows (the mask of Kwon et al. 2022, on the consumer side). Where the
pruned channels reach nothing else this *is* the pruned model (heads: the output projection is their only
constant-weight reader; FFN units: the down projection). A class whose channels also feed a norm or a graph
output is in an unprunable group and never masked.

The objective of a mask is D = mean over the calibration samples and float outputs of 1 − cos(original,
masked) (``_channel_sensitivity.output_distance``). One ORT session serves every evaluation: a mask is only a feed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphprune.analysis.channels import ChannelAnalysis, Member
from graphprune.analysis.vocab import is_conv
from graphprune.passes._channel_sensitivity import output_distance

#: ``run(model, values, feeds)`` → one list of arrays per feed, as ``backends.onnxruntime.probe`` (the pass hands
#: it in: passes do not import backends)
Runner = Callable[[ir.Model, Sequence[ir.Value], Iterable[Mapping[str, np.ndarray]]], Iterator[list[np.ndarray]]]

MASK_PREFIX = "graphprune_mask_"


def masked_consumers(analysis: ChannelAnalysis) -> list[Member]:
    """Consumer members (role ``in``, constant weight, activation on input 0) of prunable groups."""
    prunable = np.zeros(len(analysis.root), dtype=bool)
    for g in analysis.groups:
        if g.prunable:
            prunable[g.classes] = True
    return [m for m in analysis.members
            if m.role == "in" and m.value is not None and m.value.const_value is not None and m.input_index != 0
            and len(m.atoms) and prunable[analysis.root[m.atoms]].any()]


def _channel_axis(node: ir.Node, x: ir.Value) -> tuple[int, int]:
    """(axis, rank) of x's channels as ``node`` reads them: 1 for Conv, the last axis otherwise."""
    rank = len(x.shape) if x.shape is not None else (4 if is_conv(node) else 2)
    return (1 if is_conv(node) else rank - 1), rank


class _Session:
    """One session over ``model`` whose feeds are handed in one at a time (built once from ``run``)."""

    def __init__(self, run: Runner, model: ir.Model, values: Sequence[ir.Value]) -> None:
        self._box: list = []
        self._it = run(model, values, iter(self._box.pop, object()))

    def __call__(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self._box.append(feed)
        return next(self._it)


class MaskedModel:
    """The masked twin (see module docstring). ``objective(kept)`` is D for a kept-class mask over root atoms;
    ``outputs(kept, feed)`` the float outputs of one feed under that mask; ``evaluations`` counts objective calls."""

    def __init__(self, model: ir.Model, analysis: ChannelAnalysis, feeds: Sequence[Mapping[str, np.ndarray]],
                 run: Runner) -> None:
        self.analysis, self.source, self.run = analysis, model, run
        self.feeds = list(feeds)
        self.evaluations = 0
        clone = model.clone()
        twin = dict(zip(map(id, model.graph), clone.graph, strict=True))
        # input name, root class per position, shape, dtype
        self.masks: list[tuple[str, np.ndarray, tuple[int, ...], np.dtype]] = []
        made: dict[int, ir.Value] = {}
        for m in masked_consumers(analysis):
            node = twin[id(m.node)]
            x = node.inputs[0]
            if x is None:
                continue
            if id(x) not in made:
                axis, rank = _channel_axis(node, x)
                k = len(m.atoms)
                shape = (k,) + (1,) * (rank - 1 - axis)
                name = f"{MASK_PREFIX}{len(self.masks)}"
                dtype = x.dtype or ir.DataType.FLOAT
                mask = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
                clone.graph.inputs.append(mask)
                mul = ir.Node("", "Mul", [x, mask], name=f"{name}_mul", num_outputs=1)
                mul.outputs[0].name = f"{name}_x"
                mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
                clone.graph.append(mul)
                made[id(x)] = mul.outputs[0]
                self.masks.append((name, analysis.root[m.atoms], shape, dtype.numpy()))
            node.replace_input_with(0, made[id(x)])
        clone.graph.sort()
        self.model = clone
        self._session = _Session(run, clone, list(clone.graph.outputs))
        self.reference = [self.outputs(np.ones(len(analysis.root), dtype=bool), f) for f in self.feeds]

    def mask_feed(self, kept: np.ndarray) -> dict[str, np.ndarray]:
        """The mask inputs for a kept-class mask over root atoms (1 kept, 0 removed)."""
        return {name: kept[roots].astype(dt).reshape(shape) for name, roots, shape, dt in self.masks}

    def outputs(self, kept: np.ndarray, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(y, dtype=np.float64) for y in self._session({**feed, **self.mask_feed(kept)})]

    def objective(self, kept: np.ndarray) -> float:
        """D(kept): mean 1 − cosine between the original's and the masked model's outputs over the feeds."""
        self.evaluations += 1
        return output_distance(self.reference, [self.outputs(kept, f) for f in self.feeds])
