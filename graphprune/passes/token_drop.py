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

import onnx_ir as ir
import pydantic

from graphprune._ir import additive_mask, infer_shapes
from graphprune.analysis.attention import AttentionBlock, find_attention_blocks
from graphprune.errors import ConfigError
from graphprune.ops import add_node_function, diversity_select, token_merge, token_select
from graphprune.ops._base import Body
from graphprune.passes import _token_rewire as rewire
from graphprune.passes import _token_schedule as sched
from graphprune.passes import _token_scores as scores
from graphprune.passes import register
from graphprune.passes.base import GraphPass, GraphResult, PassConfig, Rewrite, Skip, Skipped


class TokenDropConfig(PassConfig):
    """YAML keys of ``token_drop``."""

    method: Literal["cls_attention", "attention_graph", "tome", "diversity"] = "cls_attention"
    keep_ratio: float = 0.7
    layers: list[int] | None = None
    r: int = 8
    schedule: Literal["constant", "pyramid"] | list[float] | dict[str, float] = "constant"
    stages: int = 3
    protect: int | None = None
    keep_order: bool = True
    fuse_rest: bool = False
    placement: Literal["mlp", "block"] = "mlp"
    query: Literal["cls", "last"] | tuple[int, int] = "cls"
    iterations: int = 3

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
    tokens_before: int
    tokens_after: int
    method: str
    note: str | None = None


def _stream_point(blocks: list[AttentionBlock], blk: AttentionBlock, placement: str) -> tuple[ir.Value, ir.Node]:
    """(stream value to reduce, node after which to insert)."""
    win = next((b for b in [blk, *blocks] if b.partition is not None), None)  # windows: counts are per window
    if win is not None:
        where = "" if win is blk else f" in block {win.index}"
        raise Skip(f"block {blk.index}: {win.partition_summary()}{where}; token dropping across windows is not supported")
    if blk.residual_add is None:
        raise Skip(f"block {blk.index}: no residual Add found after the attention output")
    if placement == "block":
        if blk.index + 1 >= len(blocks) or blocks[blk.index + 1].residual_in is None:
            raise Skip(f"block {blk.index}: no following block; placement 'block' needs one")
        val = blocks[blk.index + 1].residual_in
        prod = val.producer()
        if prod is None:
            raise Skip(f"block {blk.index}: block boundary value has no producer")
        return val, prod
    if blk.post_norm is not None:  # post-norm: reduce after the LayerNorm
        return blk.post_norm.outputs[0], blk.post_norm
    return blk.residual_add.outputs[0], blk.residual_add


@register
class TokenDropPass(GraphPass):
    """Drop or merge tokens between attention and MLP (see module docstring)."""

    name = "token_drop"
    Config = TokenDropConfig
    summary = "Insert TokenSelect/TokenMerge nodes (EViT, Zero-TPrune, ToMe), training-free"

    def _plan(self, blocks: list[AttentionBlock], model: ir.Model, protect: int) -> tuple[list[int], list[float], dict]:
        cfg, depth, info = self.config, len(blocks), {}
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
            fm = sched.FlopsModel.build(model, blocks)
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
        decided = self.schedule(model)
        if decided is None:
            return GraphResult(model, False, skipped=[Skipped("model", "no attention blocks found; nothing to drop")])
        blocks, protect, layers, ratios, info = decided
        info.update(method=cfg.method, protect=protect, layers=layers)
        result = GraphResult(model, False, info=info)
        n_cur = blocks[0].tokens
        if n_cur is None:
            result.skipped.append(Skipped("model", "token count is not static; cannot retarget reshapes"))
            return result
        if not layers:
            result.skipped.append(Skipped("model", f"no layer selected: the model has {len(blocks)} attention "
                                          "block(s) and the default layers (¼, ½, ¾ of the depth) never take block 0; "
                                          "set layers"))
            return result
        out_shapes = {o: o.shape for o in model.graph.outputs}
        per_token = [o.name for o in model.graph.outputs if o.shape is not None and len(o.shape) == 3
                     and o.shape[1] == n_cur]
        size: ir.Value | None = None
        bias_sites: dict[int, tuple[ir.Node, int]] = {}  # block -> (node, input) holding its log-size bias
        mask_map: dict[int, ir.Value] = {}  # id(original mask) -> its gathered replacement so far
        with self.context.task("token_drop", len(layers)) as step:
            for j, layer in enumerate(layers):
                blk = blocks[layer]
                try:
                    if cfg.method == "tome":
                        n_new, size, note = self._merge(model, blocks, blk, n_cur, size, protect, bias_sites, mask_map)
                    else:
                        n_new, note = self._select(model, blocks, blk, n_cur, ratios[j], protect, mask_map)
                except Skip as e:
                    result.skipped.append(e.record(f"block {layer}"))
                    step(1)
                    continue
                result.rewritten.append(TokenReduction(layer, n_cur, n_new, cfg.method, note or None))
                result.modified = True
                n_cur = n_new
                step(1)
        if result.modified:
            model.graph.sort()
            infer_shapes(model)
            for out, shape in out_shapes.items():  # keep the declared output shapes (symbolic batch names)
                if shape is not None:
                    dims = list(shape)
                    if out.name in per_token:
                        dims[1] = n_cur
                    out.shape = ir.Shape(dims)
            if per_token:  # per-token outputs now carry the reduced tokens: reported, part of the contract
                info["per_token_outputs"] = per_token
        return result

    def _later_masks(self, blocks: list[AttentionBlock], blk: AttentionBlock) -> list[AttentionBlock]:
        """Later blocks whose attention mask spans the tokens (they need it gathered); refuses what cannot be."""
        out = []
        for other in blocks[blk.index + 1:]:
            m = other.mask
            if m is None or (m.shape is not None and len(m.shape) > 0 and m.shape[-1] == 1):
                continue
            if self.config.fuse_rest and self.config.method != "tome":
                raise Skip(f"block {other.index} has a per-token attention mask; the fused rest token has none")
            if m.shape is None or len(m.shape) != 4:
                raise Skip(f"block {other.index}: attention mask is not a [B,H,Nq,Nk] tensor")
            out.append(other)
        return out

    def _rows(self, n: int) -> tuple[int, int]:
        q = self.config.query
        if q == "cls":
            return (0, 1)
        if q == "last":
            return (n - 1, n)
        return (int(q[0]), int(q[1]))

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

    def _select(self, model, blocks, blk, n_cur, ratio, protect, mask_map) -> tuple[int, str | None]:
        cfg = self.config
        stream, anchor = _stream_point(blocks, blk, cfg.placement)
        masked = self._later_masks(blocks, blk)
        k = token_select.kept_count(n_cur, protect, keep_ratio=ratio)
        n_new = protect + k + int(cfg.fuse_rest)
        plan = rewire.plan_retarget(model.graph, stream, n_cur, n_new, _model_dims(blocks))
        if cfg.method == "diversity":
            kw = dict(k=k, protect=protect, keep_order=cfg.keep_order)
            node = diversity_select.make_node(stream, name=f"diversity_select_{blk.index}", dims={"N": n_cur}, **kw)
            t, note = Body(), None
        else:
            t = Body()
            try:
                if cfg.method == "attention_graph":
                    score, note = scores.attention_graph(t, blk, cfg.iterations)
                else:
                    score, note = scores.cls_attention(t, blk, self._rows(n_cur))
            except Skip:
                rewire.detach(t.nodes)
                raise
            kw = dict(k=k, protect=protect, keep_order=cfg.keep_order, fuse_rest=cfg.fuse_rest)
            node = token_select.make_node(stream, score, name=f"token_select_{blk.index}", dims={"N": n_cur}, **kw)
        _name_outputs(node, f"token_select_{blk.index}", stream)
        node.outputs[1].type = ir.TensorType(ir.DataType.INT64)
        self._commit(model, stream, [*t.nodes, node], node.outputs[0], anchor, plan)
        self._gather_masks(model.graph, masked, node, node.outputs[1], mask_map)
        add_node_function(model, node)
        return n_new, note

    def _merge(self, model, blocks, blk, n_cur, size, protect, bias_sites, mask_map) -> tuple[int, ir.Value, str | None]:
        cfg = self.config
        stream, anchor = _stream_point(blocks, blk, cfg.placement)
        masked = self._later_masks(blocks, blk)
        later = blocks[blk.index + 1:]
        for other in later:
            _check_logit_bias(other)
        r = token_merge.merged_count(n_cur, protect, cfg.r)
        n_new = n_cur - r
        plan = rewire.plan_retarget(model.graph, stream, n_cur, n_new, _model_dims(blocks))
        t = Body()
        try:
            metric = scores.key_metric(t, blk)
        except Skip:
            rewire.detach(t.nodes)
            raise
        node = token_merge.make_node(stream, metric, size, r=r, protect=protect, dims={"N": n_cur},
                                 name=f"token_merge_{blk.index}")
        _name_outputs(node, f"token_merge_{blk.index}", stream)
        s_out = node.outputs[1]
        s_out.type = stream.type
        # proportional attention in the following blocks: + log(size) on the key axis, [B, 1, 1, N]
        t2 = Body()
        bias = t2.op("Unsqueeze", [t2.op("Log", [t2.op("Transpose", [s_out], {"perm": [0, 2, 1]})]), t2.ints(1)])
        bias.name = f"token_merge_{blk.index}_logsize"
        self._commit(model, stream, [*t.nodes, node, *t2.nodes], node.outputs[0], anchor, plan)
        idx = node.outputs[2]
        idx.name, idx.type = f"token_merge_{blk.index}_indices", ir.TensorType(ir.DataType.INT64)
        self._gather_masks(model.graph, masked, node, idx, mask_map)
        for other in later:  # a later merge's sizes supersede this one's
            if other.index in bias_sites:
                site, i = bias_sites[other.index]
                site.replace_input_with(i, bias)
            else:
                bias_sites[other.index] = _add_logit_bias(model.graph, other, bias)
        add_node_function(model, node)
        return n_new, s_out, None

    @staticmethod
    def _commit(model, stream, nodes, reduced, anchor, plan) -> None:
        rewire.splice(model.graph, stream, nodes, reduced, anchor)
        plan.apply()
        rewire.clear_shapes(reduced)


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


stream_point = _stream_point
"""Public name of the stream-point rule (where a block's reduction goes), shared with the torch FX pass."""

__all__ = ["TokenDropConfig", "TokenDropPass", "stream_point"]
