"""``depth_prune``: remove whole transformer blocks, or single attention / MLP residual branches.

Units come from ``analysis.depth.residual_blocks`` (pre-norm and post-norm blocks; a block of another shape is
skipped with the reason). Removing a unit rewires the value it produces to the value it started from (a block:
its output stream → its input stream; a branch: its residual Add's output → the stream it adds to), then removes
what nothing reads any more. A unit whose inside is read from outside it (a graph output of hidden states, a value
another block reads) is not removable and is skipped with the reason. A decoder's KV cache is the exception
(``analysis.depth.cache_io``): a removed unit's ``present`` outputs and its ``past`` inputs leave the graph with it,
and the result lists them (``cache_removed``), since the generation loop must stop feeding them.

Config::

    - name: depth_prune
      ratio: 0.25            # share of the units to remove (rounded to a whole count; at least one)
      unit: block            # block | sublayer (attention and MLP branches separately)
      importance: angular    # angular | output
      target: units          # units | flops | params: what ``ratio`` is a share of
      layers: null           # candidate blocks (0-based, as ``inspect`` numbers them); default every block
      units: null            # or exactly these units ("block 3", "block 5 attention"): no importance, no ratio

Importance is measured on the calibration feeds (the user's ``--data``; generated inputs otherwise, with a warning):
  * ``angular`` (ShortGPT, Men et al. 2024): ``1 - cos(x_in, x_out)`` of the unit's input and output stream per
    token, averaged (tokens weighted by a 0/1 input shaped like them, an attention mask, when there is one); the
    units that change the stream least go first. One run of the model.
  * ``output`` (FinerCut, Zhang et al. 2024): greedily, the unit whose removal changes the model's outputs least
    (1 - cosine per sample, averaged over the outputs) given the units already removed. About units × removed
    runs of the model, on the first ``search_feeds`` feeds.

``target: flops`` / ``params`` removes units in importance order until their FLOPs (static count per node, with
measured shapes) or their own weights reach ``ratio`` of the blocks' total. A budget that removes every candidate
is a user error, as is one that removes none.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import pydantic

from graphprune.analysis.attention import NoMatch
from graphprune.analysis.depth import (
    CacheIO,
    ResidualBlock,
    cache_io,
    interior,
    outside_reads,
    residual_blocks,
    unit_module,
)
from graphprune.errors import ConfigError
from graphprune.passes import register
from graphprune.passes.base import GraphPass, GraphResult, PassConfig, Rewrite, Skipped


class DepthPruneConfig(PassConfig):
    ratio: float = pydantic.Field(0.25, gt=0, lt=1, description="share of the units (or their FLOPs / params) to remove")
    unit: Literal["block", "sublayer"] = "block"
    importance: Literal["angular", "output"] = "angular"
    target: Literal["units", "flops", "params"] = "units"
    layers: list[int] | None = pydantic.Field(default=None, description="candidate blocks (0-based); default all")
    units: list[str] | None = pydantic.Field(default=None, description=(
        "remove exactly these units, named as the result's 'removed' names them ('block 3', 'block 5 attention'); "
        "no importance is measured and ratio is ignored"))
    search_feeds: int = pydantic.Field(4, ge=1, description="importance 'output': calibration feeds each trial runs")


@dataclasses.dataclass(frozen=True)
class UnitRemoved(Rewrite):
    """One removed unit: block ``block``'s ``unit`` (block | attention | mlp) and its measured importance."""

    block: int
    unit: str
    importance: float
    nodes_removed: int
    flops: int | None = None
    params: int | None = None


@dataclasses.dataclass
class _Unit:
    block: ResidualBlock
    kind: str  # block | attention | mlp
    nodes: list[ir.Node]
    cache: CacheIO = CacheIO()
    score: float = 0.0
    flops: int = 0
    params: int = 0

    @property
    def where(self) -> str:
        return f"block {self.block.index}" + ("" if self.kind == "block" else f" {self.kind}")

    def pair(self) -> tuple[ir.Value, ir.Value]:
        return self.block.unit(self.kind)


def _weights(feed: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray | None:
    """Token weights for stream values shaped ``shape`` ([B, N, C]): a 0/1 integer or bool input of shape [B, N]
    (an attention mask), else ``None`` (every token counts)."""
    for arr in feed.values():
        if arr.shape == shape[:-1] and (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)):
            if np.isin(arr, (0, 1)).all() and arr.any():
                return arr.astype(np.float64)
    return None


def _row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` [R, C] with the same row of ``b`` (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def _angular(a: np.ndarray, b: np.ndarray, w: np.ndarray | None) -> tuple[float, float]:
    """(Σ w·(1 - cos(a_t, b_t)), Σ w) over the tokens of one feed."""
    cos = _row_cos(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    w = np.ones_like(cos) if w is None else w.reshape(-1)
    return float((w * (1 - cos)).sum()), float(w.sum())


def _output_change(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean over outputs and samples of 1 - cosine between the flattened per-sample outputs."""
    vals = []
    for r, g in zip(ref, got):
        if not np.issubdtype(r.dtype, np.floating) or r.ndim == 0:
            continue
        if g.shape != r.shape:
            return float("inf")
        vals.append(float(np.mean(1 - _row_cos(r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)))))
    return float(np.mean(vals)) if vals else 0.0


def _resolve(v: ir.Value, replaced: dict[int, ir.Value]) -> ir.Value:
    """``v``, or what replaced it when its unit was removed (a unit's input may be an earlier removed one's output:
    consecutive blocks, or an MLP branch after its own block's attention branch)."""
    while id(v) in replaced:
        v = replaced[id(v)]
    return v


class _Rewired:
    """Rewire a unit's output uses (and graph outputs) to its input; ``undo()`` puts them back."""

    def __init__(self, graph: ir.Graph, old: ir.Value, new: ir.Value, replaced: dict[int, ir.Value]) -> None:
        new = _resolve(new, replaced)
        self.graph, self.old, self.new, self.replaced = graph, old, new, replaced
        replaced[id(old)] = new
        self.uses = list(old.uses())
        self.outputs = [i for i, v in enumerate(graph.outputs) if v is old]
        for node, idx in self.uses:
            node.replace_input_with(idx, new)
        for i in self.outputs:
            graph.outputs[i] = new

    def undo(self) -> None:
        del self.replaced[id(self.old)]
        for node, idx in self.uses:
            node.replace_input_with(idx, self.old)
        for i in self.outputs:
            self.graph.outputs[i] = self.old


def _remove(model: ir.Model, unit: _Unit, replaced: dict[int, ir.Value]) -> None:
    """Remove ``unit`` for good: rewire, keeping graph output names (an Identity of the replacement takes the name
    where the unit's output was a graph output)."""
    old, new = unit.pair()
    graph = model.graph
    if any(v is old for v in graph.outputs):
        keep = ir.Value(name=old.name, shape=old.shape, type=old.type)
        old.name = f"{old.name}__depth_pruned"
        graph.insert_after(old.producer(), ir.Node("", "Identity", [_resolve(new, replaced)], outputs=[keep],
                                                   name=f"{keep.name}__depth_identity"))
        new = keep
    _Rewired(graph, old, new, replaced)
    cache = {id(v) for v in unit.cache.outputs}
    keep_outputs = [v for v in graph.outputs if id(v) not in cache]
    graph.outputs.clear()
    graph.outputs.extend(keep_outputs)


def _move_length_reads(graph: ir.Graph, unit: _Unit, pasts: set[int]) -> None:
    """Point the ``Shape`` nodes outside ``unit`` that read one of its cache inputs (the past length) at a cache
    input of the same shape that stays, so the removed one can leave the graph."""
    inside = {id(n) for n in unit.nodes}
    for x in unit.cache.inputs:
        reads = [(n, i) for n, i in x.uses() if id(n) not in inside]
        stay = next((v for v in graph.inputs if id(v) not in pasts and v.dtype == x.dtype and v.shape is not None
                     and x.shape is not None and list(v.shape) == list(x.shape)), None)
        if reads and stay is not None:
            for node, i in reads:
                node.replace_input_with(i, stay)


@register
class DepthPrunePass(GraphPass):
    name = "depth_prune"
    Config = DepthPruneConfig
    summary = "remove whole transformer blocks or attention / MLP branches (ShortGPT / FinerCut importance)"

    def call(self, model: ir.Model) -> GraphResult:
        cfg: DepthPruneConfig = self.config
        units, skipped, others = self._units(model, cfg)
        if not units:
            return GraphResult(model, False, skipped=skipped or [Skipped("model", "no attention blocks found")])
        kinds = ("block",) if cfg.unit == "block" else ("attention", "mlp")
        if cfg.units is not None:
            return self._remove_named(model, units, skipped, cfg, kinds)
        if cfg.target == "units":
            self._count(units, cfg, others)  # a budget that removes none or all fails before anything runs
        warnings = []
        calib = self.context.feeds(model)
        if not self.context.real_data:
            warnings.append(f"depth importance measured on {'synthetic' if self.context.calibration else 'generated'}"
                            " inputs, which do not carry over to real data; pass --data with real samples")
        self._costs(model, units)
        with self.context.task("depth importance", 1) as step:
            if cfg.importance == "angular":
                chosen = self._by_angle(model, units, calib, cfg, others)
            else:
                chosen = self._by_output(model, units, calib, cfg, others)
            step(1)
        return self._finish(model, chosen, units, skipped, cfg, kinds, warnings)

    def _remove_named(self, model: ir.Model, units: list[_Unit], skipped: list[Skipped], cfg, kinds) -> GraphResult:
        by_name = {u.where: u for u in units}
        why = {s.where: s.reason for s in skipped}
        for name in cfg.units:
            if name not in by_name:
                reason = why.get(name, f"not a unit of this model with unit: {cfg.unit}")
                raise ConfigError(f"depth_prune: units: {name!r} cannot be removed ({reason})")
        if len(set(cfg.units)) >= len(units) and not skipped:
            raise ConfigError(f"depth_prune: units: removing all {len(units)} units of the model")
        return self._finish(model, [by_name[n] for n in dict.fromkeys(cfg.units)], units, skipped, cfg, kinds, [])

    def _finish(self, model: ir.Model, chosen: list[_Unit], units: list[_Unit], skipped: list[Skipped], cfg, kinds,
                warnings: list[str]) -> GraphResult:
        before = sum(1 for _ in model.graph)
        modules = {}  # what graphprune.torch.apply_plan replaces: the module computing each unit, or why none does
        for u in chosen:
            try:
                modules[u.where] = unit_module(u.block, u.kind, u.nodes, model.graph,
                                               allowed={id(v) for v in u.cache.outputs})
            except ValueError as e:
                modules[u.where] = {"none": str(e)}
        replaced: dict[int, ir.Value] = {}
        for u in chosen:
            _remove(model, u, replaced)
        pasts = {id(v) for u in chosen for v in u.cache.inputs}
        for u in chosen:
            _move_length_reads(model.graph, u, pasts)
        common.RemoveUnusedNodesPass()(model)
        gone = [v for v in model.graph.inputs if id(v) in pasts and not v.uses()]
        kept_inputs = [v for v in model.graph.inputs if not any(v is g for g in gone)]
        model.graph.inputs.clear()
        model.graph.inputs.extend(kept_inputs)
        stuck = [v.name for v in model.graph.inputs if id(v) in pasts and v.uses()]
        if stuck:  # no cache input of the same shape stayed to read the past length from
            warnings.append(f"cache inputs {', '.join(stuck)} stay: the graph reads the past length off them, and "
                            "no cache input of the same shape is left to read it from; keep feeding them")
        cache_removed = [v.name for u in chosen for v in u.cache.outputs] + [v.name for v in gone]
        if cache_removed:
            warnings.append(f"the removed units' KV cache left the graph ({len(cache_removed)} inputs and outputs: "
                            f"{', '.join(cache_removed[:4])}{', ...' if len(cache_removed) > 4 else ''}); a "
                            "generation loop must stop feeding them")
        removed = before - sum(1 for _ in model.graph)
        info = {"unit": cfg.unit, "importance": cfg.importance, "target": cfg.target, "candidates": len(units),
                "removed": [u.where for u in chosen],
                "scores": {u.where: float(f"{u.score:.6g}") for u in units}, "nodes_removed": removed,
                "kinds": list(kinds), "cache_removed": cache_removed, "modules": modules}
        rewritten: list[Rewrite] = [UnitRemoved(u.block.index, u.kind, float(f"{u.score:.6g}"), len(u.nodes),
                                                u.flops or None, u.params or None) for u in chosen]
        return GraphResult(model, True, rewritten=rewritten, skipped=skipped, info=info, warnings=warnings)

    # -- units ----------------------------------------------------------------------------------------------------

    def _units(self, model: ir.Model, cfg: DepthPruneConfig) -> tuple[list[_Unit], list[Skipped], bool]:
        """The candidate units, the skipped ones with their reasons, and whether blocks stay whatever the budget
        (not candidates, or not removable: then removing every candidate is allowed)."""
        found = residual_blocks(model)
        if cfg.layers is not None:
            bad = [i for i in cfg.layers if not 0 <= i < len(found)]
            if bad:
                raise ConfigError(f"depth_prune: layers {bad} out of range; the model has {len(found)} attention "
                                  "blocks (0-based)")
        units, skipped = [], []
        for i, rb in enumerate(found):
            if cfg.layers is not None and i not in cfg.layers:
                continue
            if isinstance(rb, NoMatch):
                skipped.append(Skipped(f"block {i}", rb.reason))
                continue
            for kind in (("block",) if cfg.unit == "block" else ("attention", "mlp")):
                old, new = rb.unit(kind)
                nodes = interior(new, old)
                cache = cache_io(nodes, old, model.graph)
                why = cache if isinstance(cache, str) else outside_reads(
                    nodes, old, model.graph, allowed={id(v) for v in cache.outputs})
                unit = _Unit(rb, kind, nodes, cache if isinstance(cache, CacheIO) else CacheIO())
                if not nodes:
                    skipped.append(Skipped(unit.where, "its output does not depend on its input stream"))
                elif why is not None:
                    skipped.append(Skipped(unit.where, why if why.startswith("its cache") else (
                        f"{why} is computed inside it and read outside; removing it would change that read (exported "
                        "hidden states)")))
                else:
                    units.append(unit)
        others = bool(skipped) or (cfg.layers is not None and len(set(cfg.layers)) < len(found))
        return units, skipped, others

    def _costs(self, model: ir.Model, units: list[_Unit]) -> None:
        per_node = {}
        try:
            per_node = dict(self.context.runtime.measure_flops(model).per_node)
        except Exception:  # noqa: BLE001 - FLOPs are reported when known; target flops then refuses below
            per_node = {}
        inits = {id(v) for v in model.graph.initializers.values()}
        for u in units:
            inside = {id(n) for n in u.nodes}
            u.flops = sum(per_node.get(n.name, 0) for n in u.nodes)
            own = {}
            for n in u.nodes:
                for x in n.inputs:
                    if x is not None and id(x) in inits and all(id(user) in inside for user, _ in x.uses()):
                        own[id(x)] = x
            u.params = sum(int(v.const_value.size) for v in own.values() if v.const_value is not None)

    def _count(self, units: list[_Unit], cfg: DepthPruneConfig, others: bool) -> int:
        """How many units the budget removes, taking them in ``units``' order (most removable first)."""
        if cfg.target == "units":
            n = int(cfg.ratio * len(units) + 0.5)  # half up: 0.5 of one unit removes it
        else:
            cost = [u.flops if cfg.target == "flops" else u.params for u in units]
            total = sum(cost)
            if total <= 0:
                raise ConfigError(f"depth_prune: target {cfg.target}: the units' {cfg.target} are not known here; "
                                  "use target: units")
            n, acc = 0, 0
            while n < len(units) and acc < cfg.ratio * total - 1e-9:
                acc += cost[n]
                n += 1
        if n < 1:
            raise ConfigError(f"depth_prune: ratio {cfg.ratio} of {len(units)} candidate units removes none; the "
                              f"smallest ratio that removes one is {0.5 / len(units):.3f}")
        if n >= len(units) and not others:
            raise ConfigError(f"depth_prune: ratio {cfg.ratio} removes all {len(units)} units of the model; lower it")
        return min(n, len(units))

    # -- importance -----------------------------------------------------------------------------------------------

    def _by_angle(self, model: ir.Model, units: list[_Unit], calib: list[dict], cfg, others: bool) -> list[_Unit]:
        values: list[ir.Value] = []
        index: dict[int, int] = {}
        for u in units:
            for v in u.pair():
                if id(v) not in index:
                    index[id(v)] = len(values)
                    values.append(v)
        sums = np.zeros(len(units))
        weights = np.zeros(len(units))
        for feed, arrays in zip(calib, self.context.runtime.probe(model, values, calib)):
            for j, u in enumerate(units):
                old, new = u.pair()
                a, b = arrays[index[id(new)]], arrays[index[id(old)]]
                w = _weights(feed, a.shape) if a.ndim == 3 else None
                s, n = _angular(a, b, w)
                sums[j] += s
                weights[j] += n
        for j, u in enumerate(units):
            u.score = float(sums[j] / max(weights[j], 1e-12))
        order = sorted(units, key=lambda u: u.score)
        return order[:self._count(order, cfg, others)]

    def _by_output(self, model: ir.Model, units: list[_Unit], calib: list[dict], cfg, others: bool) -> list[_Unit]:
        feeds = calib[:cfg.search_feeds]
        graph = model.graph
        cache = {id(v) for u in units for v in u.cache.outputs}
        where = [i for i, v in enumerate(graph.outputs) if id(v) not in cache]  # a removed unit's KV cache is gone
        run = self.context.runtime.prober(model, [graph.outputs[i] for i in where])
        ref = [run(f) for f in feeds]
        done = 0
        replaced: dict[int, ir.Value] = {}

        def change_without(u: _Unit) -> float:
            nonlocal done
            trial = _Rewired(graph, *u.pair(), replaced)
            try:
                probe = self.context.runtime.prober(model, [graph.outputs[i] for i in where])
                return float(np.mean([_output_change(r, probe(f)) for r, f in zip(ref, feeds)]))
            finally:
                trial.undo()
                done += 1
                self.context.notify("depth search", done, total)

        total = len(units)
        first = {id(u): change_without(u) for u in units}
        n = self._count(sorted(units, key=lambda u: first[id(u)]), cfg, others)
        total = len(units) + sum(len(units) - k for k in range(1, n))
        chosen: list[_Unit] = []
        rewired: list[_Rewired] = []
        left = list(units)
        scores = [first[id(u)] for u in left]
        while True:
            best = int(np.argmin(scores))
            u = left.pop(best)
            u.score = scores[best]
            chosen.append(u)
            if len(chosen) >= n:
                break
            rewired.append(_Rewired(graph, *u.pair(), replaced))  # the next choice is made with the chosen ones removed
            scores = [change_without(x) for x in left]
        for r in reversed(rewired):
            r.undo()
        for u in left:
            u.score = first[id(u)]
        return chosen


__all__ = ["DepthPruneConfig", "DepthPrunePass", "UnitRemoved"]
