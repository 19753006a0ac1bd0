"""The ``token_drop`` pass: which blocks to reduce (``plan``), and the run over them, one selection or merge per
block, then restore (package doc: :mod:`graphprune.passes.token_drop`)."""

from __future__ import annotations

import onnx_ir as ir

from graphprune.analysis import streams
from graphprune.analysis.attention import AttentionBlock, find_attention_blocks
from graphprune.analysis.tokens import downstream_nodes, weight_dims
from graphprune.errors import ConfigError
from graphprune.passes import register
from graphprune.passes.base import GraphPass, GraphResult, Skip, Skipped
from graphprune.passes.token_drop import plan
from graphprune.passes.token_drop.config import TokenDropConfig, TokenReduction
from graphprune.passes.token_drop.dynamic import DynamicTokens
from graphprune.passes.token_drop.env import Env, fact, model_dims, stream_point
from graphprune.passes.token_drop.merge import merge, refuse_padding
from graphprune.passes.token_drop.restore import Level, finish, per_token_outputs
from graphprune.passes.token_drop.select import select


@register
class TokenDropPass(GraphPass):
    """Drop or merge tokens between attention and MLP (see the package docstring)."""

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
            layers = cfg.layers if cfg.layers is not None else plan.pyramid_layers(depth, cfg.stages)
            return layers, [cfg.keep_ratio] * len(layers), info
        layers = cfg.layers if cfg.layers is not None else plan.default_layers(depth)
        if isinstance(cfg.schedule, list):
            if len(cfg.schedule) != len(layers):
                raise ConfigError(f"schedule: {len(cfg.schedule)} ratios for {len(layers)} layers {layers}")
            return layers, list(cfg.schedule), info
        if isinstance(cfg.schedule, dict):
            n0 = blocks[0].tokens
            if n0 is None:
                raise ConfigError("schedule: a FLOPs budget needs a static token count")
            fm = plan.FlopsModel.build(model, blocks, self.context.runtime.measure_flops)
            pos = {id(n): i for i, n in enumerate(model.graph)}
            anchors = [pos[id(stream_point(blocks, blocks[i], cfg.placement)[1])] for i in layers]

            def predict(ratios: list[float]) -> int:
                counts = plan.counts_for(ratios, n0, protect)
                return fm.predict(list(zip(anchors, counts)))

            ratio = plan.solve_budget(cfg.schedule["flops"], layers, predict, fm.total)
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
            from graphprune.passes.token_drop import image

            return image.run(self, model)
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
                        stream_point(blocks, blocks[layer], cfg.placement)
                    except Skip as e:
                        result.skipped.append(e.record(f"block {layer}"))
                return result
            first = stream_point(blocks, blocks[layers[0]], cfg.placement)[0]
            _check_batch_axis(first)
            if cfg.method == "tome":
                refuse_padding(model, blocks)
            if n_cur is None:
                dyn = DynamicTokens(model, first)
            data = DynamicTokens(model, first, static=n_cur, model_dims=model_dims(blocks) | weight_dims(model.graph)) \
                if n_cur is not None else dyn
            per_token = per_token_outputs(model, n_cur, dyn)
            reads = streams.positional_reads(first)
            restore = cfg.restore if cfg.restore is not None else bool(per_token or reads)
            end = fact(streams.stream_end(blocks[-1])) if restore else None
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
        levels: list[Level] = []  # per reduction, for restore
        env = Env(n_cur, dyn, after_end, mask_map, data, restore=restore)
        with self.context.task("token_drop", len(layers)) as step:
            for j, layer in enumerate(layers):
                blk = blocks[layer]
                try:
                    if blk.tokens != blocks[layers[0]].tokens and blk.partition is None:  # a later stage
                        raise Skip(f"block {layer} is on another token stream ({blk.tokens} tokens; block "
                                   f"{layers[0]}, the first reduced, has {blocks[layers[0]].tokens})")
                    if cfg.method == "tome":
                        n_new, size, note, level = merge(cfg, model, blocks, blk, env, size, protect, bias_sites)
                        label = None
                        if level is not None:
                            levels.append(level)
                    else:
                        n_new, note, label, level = select(cfg, model, blocks, blk, env, ratios[j], protect)
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
            finish(model, result, restore, end, levels, per_token, out_shapes, env.n, dyn)
        return result


def _check_batch_axis(stream: ir.Value) -> None:
    """The stream's leading axis must be the batch itself: a folded one (``4*batch``: MobileViT unfolds an image
    into one short sequence per patch position) means the tokens are pixels of patches folded back afterwards."""
    d = stream.shape[0] if stream.shape is not None and len(stream.shape) == 3 else None
    if isinstance(d, ir.SymbolicDim) and d.value and not d.value.isidentifier():
        raise Skip(f"the token stream's batch axis is {d.value!r}: sequences are folded from an image (one per "
                   "patch position) and folded back after the blocks; dropping tokens would break the fold")


__all__ = ["TokenDropPass"]
