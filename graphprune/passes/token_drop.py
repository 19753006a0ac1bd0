"""Pass ``token_drop``: insert TokenSelect / TokenMerge nodes into a transformer graph, training-free.

Pattern: the :class:`AttentionBlock` records of ``analysis.attention`` (never raw attention ops). For each
selected block the reducing node goes on the residual stream:
  * ``placement: mlp`` (default, EViT/ToMe): on the output of the block's residual ``Add`` (x + attn), before
    the MLP's LayerNorm. For a post-norm (BERT-style) block, whose stream goes through LayerNorm first, on the
    LayerNorm output (token selection commutes with a per-token LayerNorm).
  * ``placement: block``: at the block's end, i.e. on the next block's residual input.
Every later user of that value reads the reduced tokens; token-count constants downstream are retargeted
(``_token_rewire``).

Cases:
  1. ``cls_attention``: TokenSelect scored by the head-mean CLS row (or ``query`` rows) of the block's probs;
     fused ``Attention`` ops get those rows recomputed from Q, K (the block stays fused).
  2. ``attention_graph``: TokenSelect scored by ``iterations`` power iterations over the head-mean attention.
  3. ``diversity``: DiversitySelect (DivPrune greedy max-min cosine diversity of the stream tokens).
  4. ``tome``: TokenMerge (r per layer, keys head-mean as metric) and proportional attention (log size added to
     the logits, or to the ``Attention`` op's mask) in all following blocks.
Preserved: prefix tokens (``protect``, detected when omitted) stay first, so CLS pooling is unchanged; mean
pooling averages the kept tokens; position embeddings are already added upstream; batch stays dynamic.

Later blocks' per-token attention masks (additive or boolean, rank 4) are gathered with the kept indices (ToMe:
each merged token's representative position).

Refusals (recorded in ``skipped`` with the reason; the model is left unchanged there): no attention blocks;
no residual ``Add`` found; a later mask that is not rank 4, or ``fuse_rest`` with a later mask (the fused token
has no mask entry); fused attention without [B,H,N,D] q/k or with grouped KV heads; token counts that collide
with a model dimension in shape constants, or size constants (Split, Tile, ...) holding the token count.
Each is a :class:`Skip` for that block; one met while planning (a FLOPs budget needs every block's stream
point) skips the model. A skip is never an error: the run succeeds and reports it.
Config errors (:class:`ConfigError`, naming the key): ``layers`` beyond the model's blocks, a ``schedule`` list
of the wrong length, an unreachable FLOPs budget; value ranges are checked by the pydantic config.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir
import pydantic

from graphprune._ir import additive_mask, infer_shapes
from graphprune.analysis import streams
from graphprune.analysis.attention import AttentionBlock, NoMatch, find_attention_blocks
from graphprune.analysis.tokens import (
    downstream_nodes,
    is_token_compute,
    weight_dims,
)
from graphprune.errors import ConfigError
from graphprune.ops import Body, add_node_function, diversity_select, token_merge, token_select
from graphprune.passes import _token_rewire as rewire
from graphprune.passes import _token_schedule as sched
from graphprune.passes import _token_scores as scores
from graphprune.passes import register
from graphprune.passes._token_dynamic import DynamicTokens
from graphprune.passes.base import GraphPass, GraphResult, PassConfig, Rewrite, Skip, Skipped


class TokenDropConfig(PassConfig):
    """YAML keys of ``token_drop``."""

    method: Literal["cls_attention", "attention_graph", "tome", "diversity", "hiprune"] = "cls_attention"
    keep_ratio: float = 0.7
    layers: list[int] | None = None
    r: int = 8
    schedule: Literal["constant", "pyramid"] | list[float] | dict[str, float] = "constant"
    stages: int = 3
    protect: int | None = None
    keep_order: bool = True
    fuse_rest: bool = False
    placement: Literal["mlp", "block"] = "mlp"
    query: Literal["auto", "cls", "last", "mean"] | tuple[int, int] = "auto"
    iterations: int = 3
    restore: bool | None = None
    scope: Literal["all", "image"] = "all"
    stage: Literal["projector", "decoder"] = "projector"
    anchor_share: float | None = None

    @pydantic.field_validator("anchor_share")
    @classmethod
    def _share(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"anchor_share must be in (0, 1], got {v}")
        return v

    @pydantic.field_validator("keep_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {v}")
        return v

    @pydantic.field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError(f"layers must be distinct non-negative block indices, got {v}")
        return sorted(v) if v is not None else None

    @pydantic.field_validator("r", "iterations")
    @classmethod
    def _nonneg(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be ≥ 0, got {v}")
        return v

    @pydantic.field_validator("protect")
    @classmethod
    def _protect(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"protect must be ≥ 0, got {v}")
        return v

    @pydantic.field_validator("query")
    @classmethod
    def _query(cls, v):
        if isinstance(v, tuple) and not 0 <= v[0] < v[1]:
            raise ValueError(f"query rows [start, stop) need 0 ≤ start < stop, got {list(v)}")
        return v

    @pydantic.field_validator("schedule")
    @classmethod
    def _schedule(cls, v):
        if isinstance(v, list) and not all(0.0 < x <= 1.0 for x in v):
            raise ValueError(f"every ratio in a schedule list must be in (0, 1], got {v}")
        if isinstance(v, dict):
            if set(v) != {"flops"} or not 0.0 < v["flops"] <= 1.0:
                raise ValueError(f"a budget schedule is {{flops: F}} with F in (0, 1], got {v}")
        return v


@dataclasses.dataclass(frozen=True)
class TokenReduction(Rewrite):
    """One block whose stream was reduced: token counts before and after, and a note (e.g. scores recomputed)."""

    layer: int
    tokens_before: int | str
    tokens_after: int | str
    method: str
    note: str | None = None
    scores: str | None = None


def _stream_point(blocks: list[AttentionBlock], blk: AttentionBlock, placement: str) -> tuple[ir.Value, ir.Node]:
    """(stream value to reduce, node after which to insert); ``Skip`` with the analysis' reason when there is none."""
    return _fact(streams.stream_point(blocks, blk, placement))


def _fact(result):
    if isinstance(result, NoMatch):
        raise Skip(result.reason)
    return result


@register
class TokenDropPass(GraphPass):
    """Drop or merge tokens between attention and MLP (see module docstring)."""

    name = "token_drop"
    Config = TokenDropConfig
    summary = "Insert TokenSelect/TokenMerge nodes (EViT, Zero-TPrune, ToMe), training-free"

    def _plan(self, blocks: list[AttentionBlock], model: ir.Model, protect: int) -> tuple[list[int], list[float], dict]:
        cfg, depth, info = self.config, len(blocks), {}
        if cfg.method == "hiprune":
            raise ConfigError("method: hiprune selects image tokens of a vision-language model; use it with scope: "
                              "image")
        if cfg.anchor_share is not None:
            raise ConfigError("anchor_share: only used by method: hiprune (scope: image)")
        if cfg.method == "diversity" and cfg.fuse_rest:
            raise ConfigError("fuse_rest: not available with method 'diversity' (it has no scores to weight by)")
        if cfg.layers is not None and cfg.layers and max(cfg.layers) >= depth:
            raise ConfigError(f"layers: block {max(cfg.layers)} does not exist; the model has {depth} attention blocks (0..{depth - 1})")
        if cfg.method == "tome":
            return (cfg.layers if cfg.layers is not None else list(range(depth))), [], info
        if cfg.schedule == "pyramid":
            layers = cfg.layers if cfg.layers is not None else sched.pyramid_layers(depth, cfg.stages)
            return layers, [cfg.keep_ratio] * len(layers), info
        layers = cfg.layers if cfg.layers is not None else sched.default_layers(depth)
        if isinstance(cfg.schedule, list):
            if len(cfg.schedule) != len(layers):
                raise ConfigError(f"schedule: {len(cfg.schedule)} ratios for {len(layers)} layers {layers}")
            return layers, list(cfg.schedule), info
        if isinstance(cfg.schedule, dict):
            n0 = blocks[0].tokens
            if n0 is None:
                raise ConfigError("schedule: a FLOPs budget needs a static token count")
            fm = sched.FlopsModel.build(model, blocks, self.context.runtime.measure_flops)
            pos = {id(n): i for i, n in enumerate(model.graph)}
            anchors = [pos[id(_stream_point(blocks, blocks[i], cfg.placement)[1])] for i in layers]

            def predict(ratios: list[float]) -> int:
                counts = sched.counts_for(ratios, n0, protect)
                return fm.predict(list(zip(anchors, counts)))

            ratio = sched.solve_budget(cfg.schedule["flops"], layers, predict, fm.total)
            info.update(budget=cfg.schedule["flops"], solved_keep_ratio=round(ratio, 4),
                        predicted_flops=predict([ratio] * len(layers)), original_flops=fm.total)
            return layers, [ratio] * len(layers), info
        return layers, [cfg.keep_ratio] * len(layers), info

    def schedule(self, model: ir.Model) -> tuple[list[AttentionBlock], int, list[int], list[float], dict] | None:
        """The decision, without rewriting: (blocks, protected prefix, layers, per-layer keep ratios, info), or None
        without attention blocks. ``graphprune.torch``'s FX pass places its ops from this too."""
        blocks = find_attention_blocks(model)
        if not blocks:
            return None
        protect = self.config.protect if self.config.protect is not None else blocks[0].prefix_tokens
        layers, ratios, info = self._plan(blocks, model, protect)
        return blocks, protect, layers, ratios, info

    def call(self, model: ir.Model) -> GraphResult:
        cfg = self.config
        if cfg.scope == "image":
            from graphprune.passes import _token_image

            return _token_image.run(self, model)
        decided = self.schedule(model)
        if decided is None:
            return GraphResult(model, False, skipped=[Skipped("model", "no attention blocks found; nothing to drop")])
        blocks, protect, layers, ratios, info = decided
        info.update(method=cfg.method, protect=protect, layers=layers)
        result = GraphResult(model, False, info=info)
        if not layers:
            result.skipped.append(Skipped("model", f"no layer selected: the model has {len(blocks)} attention "
                                          "block(s) and the default layers (¼, ½, ¾ of the depth) never take block 0; "
                                          "set layers"))
            return result
        n_cur: int | None = blocks[layers[0]].tokens
        dyn: DynamicTokens | None = None
        try:
            if any(b.partition is not None for b in blocks):  # windowed models: each layer says why
                for layer in layers:
                    try:
                        _stream_point(blocks, blocks[layer], cfg.placement)
                    except Skip as e:
                        result.skipped.append(e.record(f"block {layer}"))
                return result
            first = _stream_point(blocks, blocks[layers[0]], cfg.placement)[0]
            _check_batch_axis(first)
            if cfg.method == "tome":
                _refuse_padding(model, blocks)
            if n_cur is None:
                dyn = DynamicTokens(model, first)
            data = DynamicTokens(model, first, static=n_cur, model_dims=_model_dims(blocks) | weight_dims(model.graph)) \
                if n_cur is not None else dyn
            per_token = _per_token_outputs(model, n_cur, dyn)
            reads = streams.positional_reads(first)
            restore = cfg.restore if cfg.restore is not None else bool(per_token or reads)
            end = _fact(streams.stream_end(blocks[-1])) if restore else None
            if reads:
                past = {id(n) for n in downstream_nodes(end)} if end is not None else set()
                inside = [n for n in reads if id(n) not in past]
                if inside:
                    raise Skip(f"{inside[0].op_type} {inside[0].name} reads token positions computed from the inputs "
                               "(e.g. the EOS token's index)" + ("" if restore else "; restore: true puts the tokens "
                                                                 "back before it"))
        except Skip as e:
            result.skipped.append(e.record("model"))
            return result
        info["restore"] = restore
        if reads and restore:
            info["positional_reads"] = [n.name for n in reads]  # why restore is on without a per-token output
        if dyn is not None:
            info["tokens"] = f"dynamic ({dyn.symbol})"
        after_end = {id(n) for n in downstream_nodes(end)} if end is not None else set()
        out_shapes = [o.shape for o in model.graph.outputs]  # by position: restore may replace an output value
        size: ir.Value | None = None
        bias_sites: dict[int, tuple[ir.Node, int]] = {}  # block -> (node, input) holding its log-size bias
        mask_map: dict[int, ir.Value] = {}  # id(original mask) -> its gathered replacement so far
        # per reduction, for restore: ("select", stream before, kept indices, fused token) or ("merge", membership)
        levels: list[tuple] = []
        env = _Env(n_cur, dyn, after_end, mask_map, data, restore=restore)
        with self.context.task("token_drop", len(layers)) as step:
            for j, layer in enumerate(layers):
                blk = blocks[layer]
                try:
                    if blk.tokens != blocks[layers[0]].tokens and blk.partition is None:  # a later stage
                        raise Skip(f"block {layer} is on another token stream ({blk.tokens} tokens; block "
                                   f"{layers[0]}, the first reduced, has {blocks[layers[0]].tokens})")
                    if cfg.method == "tome":
                        n_new, size, note, level = self._merge(model, blocks, blk, env, size, protect, bias_sites)
                        label = None
                        if level is not None:
                            levels.append(level)
                    else:
                        n_new, note, label, level = self._select(model, blocks, blk, env, ratios[j], protect)
                        levels.append(level)
                except Skip as e:
                    result.skipped.append(e.record(f"block {layer}"))
                    step(1)
                    continue
                if env.n is not None:
                    before, after = env.n, n_new
                else:  # dynamic: the counts are expressions of the runtime N
                    before, after = env.label, f"N{len(result.rewritten) + 1}"
                    rule = (f"{protect} + max(1, ceil({ratios[j]:g}·({before} − {protect})))" if cfg.method != "tome"
                            else f"{before} − min({cfg.r}, ceil(({before} − {protect})/2))")
                    note = "; ".join(x for x in (f"{after} = {rule}", note) if x)
                    env.label = after
                result.rewritten.append(TokenReduction(layer, before, after, cfg.method, note or None, label))
                result.modified = True
                env.n = n_new
                step(1)
        if result.modified:
            _finish(model, result, restore, end, levels, per_token, out_shapes, env.n, dyn)
        return result

    def _later_masks(self, blocks: list[AttentionBlock], blk: AttentionBlock, dynamic: bool = False) -> list[AttentionBlock]:
        """Later blocks whose attention mask spans the tokens (they need it gathered); refuses what cannot be.
        ``dynamic``: the masks are gathered with the other per-token tensors (``DynamicTokens``); only the
        ``fuse_rest`` refusal applies."""
        out = []
        for other in blocks[blk.index + 1:]:
            m = other.mask
            if m is None or (m.shape is not None and len(m.shape) > 0 and m.shape[-1] == 1):
                continue
            if self.config.fuse_rest and self.config.method != "tome":
                raise Skip(f"block {other.index} has a per-token attention mask; the fused rest token has none")
            if dynamic:
                continue
            if m.shape is None or len(m.shape) != 4:
                raise Skip(f"block {other.index}: attention mask is not a [B,H,Nq,Nk] tensor")
            out.append(other)
        return out

    @staticmethod
    def _gather_masks(graph: ir.Graph, masked: list[AttentionBlock], node: ir.Node, idx: ir.Value, mask_map: dict) -> None:
        """Give each later masked block its mask gathered to the kept tokens (one gather per distinct mask)."""
        done: dict[int, ir.Value] = {}
        current = [(other, mask_map.get(id(other.mask), other.mask)) for other in masked]
        for other, cur in current:
            if id(cur) not in done:
                t = Body()
                orig = other.mask  # _later_masks checked it is rank 4 with a static shape
                rows = orig.shape[2] != 1
                done[id(cur)] = rewire.gather_mask(t, cur, idx, rows)
                graph.insert_after(node, list(t.nodes))
            new = done[id(cur)]
            for n in other.nodes:
                for i, v in enumerate(n.inputs):
                    if v is cur:
                        n.replace_input_with(i, new)
            mask_map[id(other.mask)] = new

    def _retarget(self, model, blocks, blk, stream, env: _Env, n_new: int | None):
        """What the reduction at ``stream`` rewrites downstream (raises Skip before anything changes)."""
        if env.dyn is not None:
            return env.dyn.plan(stream, exclude=env.after_end)
        masks = tuple(env.mask_map.get(id(b.mask), b.mask) for b in blocks[blk.index + 1:] if b.mask is not None)
        return (rewire.plan_retarget(model.graph, stream, env.n, n_new, _model_dims(blocks), exclude=env.after_end),
                env.data.plan(stream, exclude=env.after_end, masks=masks))

    def _select(self, model, blocks, blk, env: _Env, ratio, protect):
        cfg = self.config
        stream, anchor = _stream_point(blocks, blk, cfg.placement)
        _check_saves(stream, env.after_end, blk)
        masked = self._later_masks(blocks, blk, env.dyn is not None)
        if env.n is not None:
            k = token_select.kept_count(env.n, protect, keep_ratio=ratio)
            n_new = protect + k + int(cfg.fuse_rest)
            kw: dict = dict(k=k, protect=protect, keep_order=cfg.keep_order)
        else:  # the op computes k from the runtime N (exact rational keep_ratio)
            n_new, kw = None, dict(k=0, keep_ratio=ratio, protect=protect, keep_order=cfg.keep_order)
        plan = self._retarget(model, blocks, blk, stream, env, n_new)
        dims = {"N": env.n} if env.n is not None else None
        label = None
        if cfg.method == "diversity":
            node = diversity_select.make_node(stream, name=f"diversity_select_{blk.index}", dims=dims, **kw)
            t, note = Body(), None
            label = "diversity of the stream tokens (DivPrune)"
        else:
            t = Body()
            try:
                if cfg.method == "attention_graph":
                    score, note = scores.attention_graph(t, blk, cfg.iterations)
                    label = f"attention graph, {cfg.iterations} power iterations (Zero-TPrune)"
                else:
                    rows, label = score_rows(cfg.query, protect)
                    score, note = scores.cls_attention(t, blk, rows)
            except Skip:
                rewire.detach(t.nodes)
                raise
            node = token_select.make_node(stream, score, name=f"token_select_{blk.index}", dims=dims,
                                          fuse_rest=cfg.fuse_rest, **kw)
        _name_outputs(node, f"token_select_{blk.index}", stream)
        node.outputs[1].type = ir.TensorType(ir.DataType.INT64)
        self._commit(model, stream, [*t.nodes, node], node.outputs[0], anchor, plan, env, node.outputs[1], node)
        if env.dyn is None:
            self._gather_masks(model.graph, masked, node, node.outputs[1], env.mask_map)
        add_node_function(model, node)
        return n_new, note, label, ("select", stream, node.outputs[1], cfg.fuse_rest and cfg.method != "diversity")

    def _merge(self, model, blocks, blk, env: _Env, size, protect, bias_sites):
        cfg = self.config
        stream, anchor = _stream_point(blocks, blk, cfg.placement)
        _check_saves(stream, env.after_end, blk)
        masked = self._later_masks(blocks, blk, env.dyn is not None)
        later = blocks[blk.index + 1:]
        for other in later:
            _check_logit_bias(other)
        if env.n is not None:
            r = token_merge.merged_count(env.n, protect, cfg.r)
            n_new = env.n - r
        else:
            r, n_new = cfg.r, None  # clamped by the op to the runtime size of set A
        plan = self._retarget(model, blocks, blk, stream, env, n_new)
        t = Body()
        try:
            metric = scores.key_metric(t, blk)
        except Skip:
            rewire.detach(t.nodes)
            raise
        dims = {"N": env.n} if env.n is not None else None
        node = token_merge.make_node(stream, metric, size, r=r, protect=protect, dims=dims,
                                     name=f"token_merge_{blk.index}")
        _name_outputs(node, f"token_merge_{blk.index}", stream)
        s_out = node.outputs[1]
        s_out.type = stream.type
        # proportional attention in the following blocks: + log(size) on the key axis, [B, 1, 1, N]
        t2 = Body()
        bias = t2.op("Unsqueeze", [t2.op("Log", [t2.op("Transpose", [s_out], {"perm": [0, 2, 1]})]), t2.ints(1)])
        bias.name = f"token_merge_{blk.index}_logsize"
        idx = node.outputs[2]
        idx.name, idx.type = f"token_merge_{blk.index}_indices", ir.TensorType(ir.DataType.INT64)
        extra, level, note = [], None, None
        if env.restore:  # unmerge needs which output token each input went to: the same merge of one-hot positions
            t3 = Body(stream.dtype or ir.DataType.FLOAT)
            n = t3.op("Shape", [stream], {"start": 1, "end": 2})
            eye = t3.one_hot(t3.op("Range", [t3.const(0, np.int64), t3.scalar(n), t3.const(1, np.int64)]),
                             t3.scalar(n), [0.0, 1.0], axis=-1)  # [N, N]
            eye = t3.op("Expand", [eye, t3.op("Concat", [t3.op("Shape", [stream], {"start": 0, "end": 1}), n, n],
                                                {"axis": 0})])
            member = token_merge.make_node(eye, metric, size, r=r, protect=protect, dims=dims,
                                           name=f"token_merge_{blk.index}_sources")
            member.outputs[0].name = f"token_merge_{blk.index}_members"
            for o, nm in zip(member.outputs[1:], ("sizes", "ids")):
                o.name = f"token_merge_{blk.index}_members_{nm}"
            extra = [*t3.nodes, member]
            level = ("merge", member.outputs[0])
            note = "restore: the merge is repeated on one-hot positions to unmerge (an extra N² tensor)"
        self._commit(model, stream, [*t.nodes, node, *t2.nodes, *extra], node.outputs[0], anchor, plan, env, idx, node)
        if env.dyn is None:
            self._gather_masks(model.graph, masked, node, idx, env.mask_map)
        for other in later:  # a later merge's sizes supersede this one's
            if other.index in bias_sites:
                site, i = bias_sites[other.index]
                site.replace_input_with(i, bias)
            else:
                bias_sites[other.index] = _add_logit_bias(model.graph, other, bias)
        add_node_function(model, node)
        if level is not None:
            add_node_function(model, member)
        return n_new, s_out, note, level

    @staticmethod
    def _commit(model, stream, nodes, reduced, anchor, plan, env: _Env, idx: ir.Value, node: ir.Node) -> None:
        rewire.splice(model.graph, stream, nodes, reduced, anchor)
        if env.dyn is not None:
            env.dyn.apply(plan, reduced, idx, node)
        else:
            plan[0].apply()
            env.data.apply(plan[1], reduced, idx, node)
        rewire.clear_shapes(reduced)


@dataclasses.dataclass
class _Env:
    """Where a run stands: the static token count (``None`` when dynamic, then ``dyn`` tracks it and ``label``
    names it), the nodes past the restore point (never retargeted), the static path's gathered masks."""

    n: int | None
    dyn: DynamicTokens | None
    after_end: set[int]
    mask_map: dict[int, ir.Value]
    data: DynamicTokens  # per-token tensors computed upstream (the dynamic tracker, or a static one)
    label: str = "N"
    restore: bool = False


def _finish(model: ir.Model, result: GraphResult, restore: bool, end: ir.Value | None, levels: list[tuple],
            per_token: list[str], out_shapes: list, n: int | None, dyn: DynamicTokens | None) -> None:
    """After the reductions: restore the tokens, sort, infer shapes, keep the declared output shapes."""
    info = result.info
    if restore:
        _restore(model.graph, end, levels)
        info["restored_outputs"] = per_token
    model.graph.sort()
    infer_shapes(model)
    for out, shape in zip(model.graph.outputs, out_shapes):  # keep the declared output shapes (batch names)
        if shape is not None:
            dims = list(shape)
            if out.name in per_token and not restore:
                dims[1] = n if n is not None else f"{dyn.symbol}_kept"
            out.shape = ir.Shape(dims)
    if per_token and not restore:  # per-token outputs now carry the reduced tokens: reported, part of the contract
        info["per_token_outputs"] = per_token


def _per_token_outputs(model: ir.Model, n: int | None, dyn: DynamicTokens | None) -> list[str]:
    """Graph outputs with a token axis ``[B, N, ...]`` (static ``n``, or the dynamic token symbol)."""
    out = []
    for o in model.graph.outputs:
        if o.shape is None or len(o.shape) < 3:
            continue
        d = o.shape[1]
        if (n is not None and d == n) or (dyn is not None and isinstance(d, ir.SymbolicDim) and d.value == dyn.symbol):
            out.append(o.name)
    return out


def _refuse_padding(model: ir.Model, blocks: list[AttentionBlock]) -> None:
    """ToMe matches tokens by key similarity alone: with a padding mask read from the inputs, real tokens merge
    into padding (whose representative is masked) and vanish from the pooled output."""
    for b in blocks:
        if b.mask is not None and streams.reads_input(b.mask, model.graph.inputs):
            raise Skip(f"the attention mask (block {b.index}) comes from the model's inputs (padding): ToMe would merge "
                       "real tokens into padded ones; use a selection method (cls_attention) for padded batches")


def _check_batch_axis(stream: ir.Value) -> None:
    """The stream's leading axis must be the batch itself: a folded one (``4*batch``: MobileViT unfolds an image
    into one short sequence per patch position) means the tokens are pixels of patches folded back afterwards."""
    d = stream.shape[0] if stream.shape is not None and len(stream.shape) == 3 else None
    if isinstance(d, ir.SymbolicDim) and d.value and not d.value.isidentifier():
        raise Skip(f"the token stream's batch axis is {d.value!r}: sequences are folded from an image (one per "
                   "patch position) and folded back after the blocks; dropping tokens would break the fold")


def _restore(graph: ir.Graph, end: ir.Value, levels: list[tuple]) -> None:
    """Put the tokens back at ``end``, innermost reduction first: a selection scatters its kept tokens into the
    stream it reduced (dropped tokens keep the value they had when dropped); a merge copies each merged token
    back to every input token it absorbed (ToMe's unmerge; ``members [B, N_out, N]`` is the merge of one-hot
    positions: row j is non-zero at the inputs of output j)."""
    uses = list(end.uses())  # before the restore nodes read it
    t = Body()
    y = end
    for level in reversed(levels):
        if level[0] == "merge":
            src = t.op("ArgMax", [level[1]], {"axis": 1, "keepdims": 0})  # [B, N]: the output holding each input
            target = t.op("Concat", [t.op("Shape", [src]), t.op("Shape", [y], {"start": 2, "end": 3})], {"axis": 0})
            y = t.op("GatherElements", [y, t.op("Expand", [t.op("Unsqueeze", [src, t.ints(2)]), target])], {"axis": 1})
            continue
        _, full, idx, fused = level
        if fused:  # the fused rest token has no position: it is dropped at the restore
            y = t.op("Slice", [y, t.ints(0), t.ints(-1), t.ints(1)])
        ix = t.op("Expand", [t.op("Unsqueeze", [idx, t.ints(2)]), t.op("Shape", [y])])
        y = t.op("ScatterElements", [full, ix, y], {"axis": 1})
    graph.insert_after(end.producer(), list(t.nodes))
    for user, i in uses:
        user.replace_input_with(i, y)
    is_output = False
    for j, out in enumerate(graph.outputs):
        if out is end:
            graph.outputs[j] = y
            is_output = True
    if is_output:  # the graph output keeps its name
        name, end.name = end.name, f"{end.name}_reduced"
        y.name = name
    else:
        y.name = f"{end.name or 'stream'}_restored"


def score_rows(query, protect: int) -> tuple[tuple[int, int], str]:
    """The query rows ``[start, stop)`` whose attention scores the tokens (``start`` -1: the last row; ``stop`` 0:
    to the end) and what the report calls them. ``auto``: the CLS row when the model has a prefix token, else
    the column mean (the attention each token receives). Shared with the torch FX pass."""
    q = "cls" if query == "auto" and protect > 0 else "mean" if query == "auto" else query
    if q == "cls":
        return (0, 1), "CLS row of the attention"
    if q == "last":
        return (-1, 0), "last query row of the attention (FastV)"
    if q == "mean":
        why = " (no CLS token found)" if query == "auto" else ""
        return (0, 0), f"column mean of the attention: attention each token receives{why}"
    return (int(q[0]), int(q[1])), f"query rows [{int(q[0])}, {int(q[1])}) of the attention"


def _check_saves(stream: ir.Value, after_end: set[int], blk: AttentionBlock) -> None:
    """Refuse a reduction that would only add cost: nothing that scales with the tokens (a matrix product,
    convolution or attention) reads the reduced stream before the tokens are restored or the graph ends. This is
    the last block of a model whose MLP reads the block input (parallel attention and MLP: Phi, GPT-NeoX, GPT-J)."""
    if not any(is_token_compute(n) for n in downstream_nodes(stream) if id(n) not in after_end):
        raise Skip(f"nothing that scales with the tokens reads the stream reduced at block {blk.index} before the "
                   "tokens are restored (e.g. the last block of a model whose MLP reads the block input, as in "
                   "parallel attention/MLP blocks): the reduction would only add cost")


def _model_dims(blocks: list[AttentionBlock]) -> set[int]:
    return {d for b in blocks for d in (b.heads, b.kv_heads, b.head_dim) if d}


def _name_outputs(node: ir.Node, base: str, stream: ir.Value) -> None:
    node.outputs[0].name = f"{base}_tokens"
    node.outputs[1].name = f"{base}_aux"
    node.outputs[0].type = stream.type  # shapes come from shape inference at the end of the pass


def _check_logit_bias(blk: AttentionBlock) -> None:
    if blk.kind == "matmul_softmax" and blk.probs is not None:
        return
    if blk.kind == "attention_op" and blk.layout == "BHND":
        return
    raise Skip(f"block {blk.index}: proportional attention not supported for {blk.kind} ({blk.layout})")


def _add_logit_bias(graph: ir.Graph, blk: AttentionBlock, bias: ir.Value) -> tuple[ir.Node, int]:
    """logits + bias before the softmax (or into a fused ``Attention`` op's additive mask)."""
    if blk.kind == "matmul_softmax":
        sm = blk.probs.producer()
        add = ir.Node("", "Add", [sm.inputs[0], bias], num_outputs=1, name=f"{sm.name}_prop_attn")
        add.outputs[0].type = sm.inputs[0].type
        add.outputs[0].shape = sm.inputs[0].shape
        graph.insert_before(sm, add)
        sm.replace_input_with(0, add.outputs[0])
        return add, 1
    if blk.kind == "attention_op" and blk.layout == "BHND":
        # ORT's Attention wants the mask's query axis spelled out: Expand [B,1,1,N] to [B,1,Nq,N] (Nq from q).
        node = blk.nodes[0]
        t = Body()
        nq = t.op("Slice", [t.op("Shape", [node.inputs[0]]), t.ints(2), t.ints(3)])
        full = t.op("Expand", [bias, t.op("Concat", [t.ints(1, 1), nq, t.ints(1)], {"axis": 0})])
        expand = full.producer()
        old = node.inputs[3] if len(node.inputs) > 3 else None
        if old is not None:
            if blk.mask is not None and blk.mask.dtype == ir.DataType.BOOL:  # boolean keep-mask → additive
                old = additive_mask(t, old, node.inputs[0].dtype or ir.DataType.FLOAT)
            full = t.op("Add", [old, full])
        graph.insert_before(node, list(t.nodes))
        if len(node.inputs) < 4:
            node.resize_inputs(4)
        node.replace_input_with(3, full)
        blk.nodes.extend(t.nodes)  # so that a later mask gather also reaches the mask feeding these helpers
        return expand, 0
    raise Skip(f"block {blk.index}: proportional attention not supported for {blk.kind}")


__all__ = ["TokenDropConfig", "TokenDropPass", "score_rows"]
