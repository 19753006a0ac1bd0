"""``token_drop`` with ``scope: image``: drop image tokens of a vision-language model, never text tokens.

The model's structure comes from :func:`graphprune.analysis.vision_language.find_vision_language` (vision and
decoder blocks, the projector, the merge and the image positions). One ``TokenSelect`` goes on the decoder's
sequence ``[B, S, C]``, scored so that only image tokens compete:

  * ``stage: projector`` (FasterVLM, VTC-CLS, DivPrune: before the language model): on the merged sequence, right
    after the merge. Scores: ``cls_attention`` — the vision tower's last live layer's [CLS] row (FasterVLM), or
    without a [CLS] token the attention each patch receives there (mean over query rows); patches merged 4:1 by
    the projector (Qwen2-VL) average their scores; ``query: mean`` takes the attention each patch receives even
    with a [CLS] token (a [CLS] never trained scores nothing). ``diversity`` — DivPrune's greedy max-min selection
    on the projector's output. ``hiprune`` — HiPrune's anchors (the patches receiving the most attention in the
    middle vision block, ``anchor_share`` of the budget), their four grid neighbours (buffers), and registers (the
    rest, by the attention received in the last live block);
  * ``stage: decoder`` (FastV): after decoder layer K (``layers: [K]``, counted among the decoder blocks; default
    2). Scores: the last token's attention to each image token in layer K, head mean. Several layers
    (``layers: [K1, K2, ...]``, PyramidDrop) drop again after each, ``keep_ratio`` of the image tokens left each
    time; a later stage the token machinery refuses is skipped with its reason and the earlier ones stay.

Every text token is kept (its score is +∞ before the top-k), and so is the order: the kept sequence is a
subsequence of the original. The pass's token machinery then gathers every per-token tensor the decoder reads
downstream with the kept indices: the rotary tables (so the kept tokens keep their **original positions**), the
causal mask, and any padding mask. Each sample selects its own tokens; the batch stays dynamic. A per-token graph
output (logits ``[B, S, V]``) keeps its shape: the tokens are put back at the end of the stream (``restore``).
Key / value outputs of a prefill graph (``present.*``, ``[B, heads, S, D]``) of the layers after the drop hold the
kept tokens only, in order (``info.cache_outputs``); a decode step that takes ``position_ids`` continues from them
(:func:`graphprune.decoder.generate`). At ``stage: decoder`` the layers up to K keep a full cache: the layers'
caches then differ in length, which the decode step of ``export_decoder_pair(..., position_ids=True)`` takes.

Static sequence lengths only (the image count fixes the sequence in every VLM export seen so far); a dynamic one
is a skip with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune._ir import dim
from graphprune.analysis import streams
from graphprune.analysis.attention import NoMatch, find_attention_blocks
from graphprune.analysis.tokens import downstream_nodes, weight_dims
from graphprune.analysis.vision_language import VisionLanguage, find_vision_language
from graphprune.errors import ConfigError
from graphprune.ops import Body, add_node_function, diversity_select, token_select
from graphprune.passes.base import GraphResult, Skip
from graphprune.passes.token_drop import scores
from graphprune.passes.token_drop.config import TokenReduction
from graphprune.passes.token_drop.dynamic import DynamicTokens
from graphprune.passes.token_drop.env import Env, commit, gather_masks, later_masks, model_dims, retarget
from graphprune.passes.token_drop.restore import Selected, finish, per_token_outputs
from graphprune.passes.token_drop.select import name_outputs

_BIG = 3.0e38  # a text token's score: above any image token's
FASTV_LAYER = 2  # FastV's K on LLaVA-1.5
HIPRUNE_ANCHOR_SHARE = 0.1  # anchors per kept token: with their 4 buffers, about half the budget


def run(pass_, model: ir.Model) -> GraphResult:
    """``TokenDropPass.call`` for ``scope: image`` (module doc)."""
    cfg = pass_.config
    if cfg.method not in ("cls_attention", "diversity", "hiprune"):
        raise ConfigError(f"method: {cfg.method!r} is not available with scope: image; use cls_attention "
                          "(FasterVLM at the projector, FastV in the decoder), diversity (DivPrune) or hiprune")
    if cfg.anchor_share is not None and cfg.method != "hiprune":
        raise ConfigError("anchor_share: only used by method: hiprune")
    blocks = find_attention_blocks(model)
    vl = find_vision_language(model, blocks) if blocks else None
    if vl is None:
        raise ConfigError("scope: image: no image tokens found; the model is not a vision-language model graphprune "
                          "recognises (an image input whose projected features are merged into the embeddings of a "
                          "text decoder)")
    info = {"method": cfg.method, "scope": "image", "stage": cfg.stage, "vision_language": vl.describe()}
    result = GraphResult(model, False, info=info)
    if cfg.query not in (("auto", "last") if cfg.stage == "decoder" else ("auto", "cls", "mean")):
        raise ConfigError(f"query: {cfg.query!r} is not available at stage: {cfg.stage} with scope: image (projector: "
                          "auto, cls or mean; decoder: the last token's row, auto or last)")
    if cfg.stage == "decoder":
        if cfg.method in ("diversity", "hiprune"):
            raise ConfigError(f"method: {cfg.method} works at stage: projector (it selects among the image tokens "
                              "before the decoder)")
        layers = cfg.layers if cfg.layers is not None else [FASTV_LAYER]
        if not layers or max(layers) >= len(vl.decoder_blocks) - 1:
            raise ConfigError(f"layers: decoder layer {max(layers or [-1])} does not exist or is the last one; the "
                              f"model has {len(vl.decoder_blocks)} decoder blocks (0..{len(vl.decoder_blocks) - 1}) "
                              "and tokens are dropped after layer K, before layer K + 1 (set layers: [K], or --token-layers K)")
        info["layers"] = layers
        stages = [(k, vl.decoder_blocks[k], streams.stream_point(blocks, vl.decoder_blocks[k], "block"))
                  for k in layers]
    else:
        if cfg.layers:
            raise ConfigError("layers: not used at stage: projector (the tokens are dropped before the decoder); "
                              "use stage: decoder to drop after a decoder layer")
        # the blocks after the last vision block (the decoder's) read the reduced sequence
        stages = [(None, vl.vision_blocks[-1], (vl.merge.outputs[0], vl.merge))]
    try:
        for _, _, point in stages:
            if isinstance(point, NoMatch):
                raise Skip(point.reason)
        stream = stages[0][2][0]
        n, p = dim(stream, 1), vl.image_tokens
        if not isinstance(n, int) or p is None:
            raise Skip("the decoder's sequence length is not static; scope: image needs it (and the image token "
                       "count) fixed in the graph")
        if token_select.kept_count(p, 0, keep_ratio=cfg.keep_ratio) >= p:
            raise Skip(f"keep_ratio {cfg.keep_ratio} keeps all {p} image tokens; nothing to drop")
        per_token = per_token_outputs(model, n, None)
        restore = cfg.restore if cfg.restore is not None else bool(per_token)
        end = None
        if restore:
            end = streams.stream_end(blocks[-1])
            if isinstance(end, NoMatch):
                raise Skip(end.reason)
        after_end = {id(x) for x in downstream_nodes(end)} if end is not None else set()
        data = DynamicTokens(model, stream, static=n, model_dims=model_dims(blocks) | weight_dims(model.graph))
        env = Env(n, None, after_end, {}, data, restore=restore)
        # every stage's retargeting is planned on the original graph (PyramidDrop's later stages only shorten
        # further what the first one shortened), before anything changes
        later_masks(cfg, blocks, stages[0][1])
    except Skip as e:
        result.skipped.append(e.record("model"))
        return result
    out_shapes = [o.shape for o in model.graph.outputs]
    levels, first = [], None
    n_cur, p_cur, mask = n, p, None
    for j, (layer, blk, (stream, anchor)) in enumerate(stages):
        k_img = token_select.kept_count(p_cur, 0, keep_ratio=cfg.keep_ratio)
        k = n_cur - p_cur + k_img
        try:
            masked = later_masks(cfg, blocks, blk)
            plan = retarget(model, blocks, blk, stream, env, k)
            t, pre = Body(), []
            mask = _image_mask(t, vl, n) if mask is None else mask
            if cfg.stage == "decoder":
                row_scores, note = scores.cls_attention(t, blk, (-1, 0))
                label = f"last token's attention in decoder layer {layer} ({'PyramidDrop' if len(stages) > 1 else 'FastV'})"
                s = t.op("Where", [mask, row_scores, t.op("CastLike", [t.const(np.float32(_BIG)), row_scores])])
            else:
                image_scores, note, label = _projector_scores(t, vl, k_img, p, cfg.method, pre, cfg.query,
                                                                 _anchor_share(cfg))
                s = _text_kept(t, vl, mask, image_scores, n)
        except Skip as e:  # a later stage: the earlier ones stay (their record says what they did)
            result.skipped.append(e.record(f"decoder layer {layer}" if layer is not None else "model"))
            break
        name = "token_select_image" + (f"_{j}" if j else "")
        node = token_select.make_node(stream, s, name=name, dims={"N": n_cur}, k=k, protect=0, keep_order=True)
        name_outputs(node, name, stream)
        idx = node.outputs[1]
        idx.type = ir.TensorType(ir.DataType.INT64)
        commit(model, stream, [*pre, *t.nodes, node], node.outputs[0], anchor, plan, env, idx, node)
        gather_masks(model.graph, masked, node, idx, env.mask_map)
        add_node_function(model, node)
        for extra in pre:  # DivPrune's DiversitySelect
            add_node_function(model, extra)
        result.rewritten.append(TokenReduction(blk.index, n_cur, k, cfg.method, note, label))
        result.modified = True
        levels.append(Selected(stream, idx, False))
        first = first or node
        if j + 1 < len(stages):  # the image positions among the kept tokens, for the next stage
            t2 = Body()
            mask = _gathered_mask(t2, mask, idx)
            model.graph.insert_after(node, list(t2.nodes))
        env.n, n_cur, p_cur = k, k, k_img
    if not result.modified:
        return result
    info.update(image_tokens_before=p, image_tokens_after=p_cur, tokens_before=n, tokens_after=n_cur,
                after="the merge" if cfg.stage == "projector" else f"decoder layers {info['layers']}",
                restore=restore)
    if restore and per_token:  # the restored image rows hold the stream from the merge: no prediction to compare
        where_img = ({"span": list(vl.image_span)} if vl.image_span is not None else
                     {"input": vl.text_input.name, "value": vl.image_token_id})
        info["verify_skip_tokens"] = {"outputs": per_token, **where_img, "why": (
            "image-token positions not compared: token_drop (scope: image) dropped them and restored their rows "
            "from before the decoder; every text position is compared")}
    finish(model, result, restore, end, levels, per_token, out_shapes, n_cur, None)
    cache = _cache_outputs(model, first.outputs[0], n, n_cur)
    if cache:
        info["cache_outputs"] = cache
    return result


def _anchor_share(cfg) -> float:
    return cfg.anchor_share if cfg.anchor_share is not None else HIPRUNE_ANCHOR_SHARE


def _gathered_mask(t: Body, mask: ir.Value, idx: ir.Value) -> ir.Value:
    """The image-position mask ``[B|1, S]`` of the tokens ``idx [B, k]`` kept (in their order)."""
    m = t.op("Cast", [mask], {"to": ir.DataType.INT64})
    m = t.op("Expand", [m, t.op("Concat", [t.op("Shape", [idx], {"start": 0, "end": 1}),
                                           t.op("Shape", [m], {"start": 1, "end": 2})], {"axis": 0})])
    return t.op("Cast", [t.op("GatherElements", [m, idx], {"axis": 1})], {"to": ir.DataType.BOOL})


def _cache_outputs(model: ir.Model, reduced: ir.Value, n: int, k: int) -> list[str]:
    """Key / value outputs ``[B, heads, S, D]`` (a prefill's ``present``) computed after the drop: they hold the kept
    tokens only, and their declared sequence dim says so. (Those of decoder layers before a ``stage: decoder`` drop
    keep every token.)"""
    after = {id(o) for n_ in downstream_nodes(reduced) for o in n_.outputs}
    names = []
    for o in model.graph.outputs:
        if id(o) in after and o.shape is not None and len(o.shape) == 4 and o.shape[2] == n and o.shape[1] != n:
            o.shape = ir.Shape([*o.shape[:2], k, o.shape[3]])
            names.append(o.name)
    return names


def _image_mask(t: Body, vl: VisionLanguage, n: int) -> ir.Value:
    """bool ``[B|1, S]``: which positions of the decoder's sequence hold image tokens."""
    if vl.image_span is not None:
        m = np.zeros((1, n), dtype=bool)
        m[0, vl.image_span[0]:vl.image_span[1]] = True
        return t.const(m)
    cond = vl.merge.inputs[0]  # Where(input_ids == image_token_id, features, embeddings)
    if cond.shape is not None and len(cond.shape) == 3:
        cond = t.op("Squeeze", [cond, t.ints(2)])
    if cond.dtype != ir.DataType.BOOL:
        cond = t.op("Cast", [cond], {"to": ir.DataType.BOOL})
    return cond


def _text_kept(t: Body, vl: VisionLanguage, mask: ir.Value, image_scores: ir.Value, n: int) -> ir.Value:
    """``[B, S]`` scores at the merge: +∞-like for text positions; the image positions (``mask``) score
    ``image_scores`` (``[B, P]`` over the image tokens, placed where the merge put each)."""
    if vl.image_span is not None:  # image tokens at [start, stop): pad the text positions with the big score
        a, b = vl.image_span
        return t.op("Pad", [image_scores, t.ints(0, a, 0, n - b),
                            t.op("CastLike", [t.const(np.float32(_BIG)), image_scores])])
    pos = t.op("Sub", [t.op("CumSum", [t.op("Cast", [mask], {"to": ir.DataType.INT64}), t.const(np.int64(1))]),
                       t.const(np.int64(1))])  # the image token each image position holds (as the merge gathers)
    pos = t.op("Max", [pos, t.const(np.int64(0))])
    return t.op("Where", [mask, t.op("GatherElements", [_batched(t, image_scores, mask), pos], {"axis": 1}),
                          t.op("CastLike", [t.const(np.float32(_BIG)), image_scores])])


def _batched(t: Body, scores_p: ir.Value, mask: ir.Value) -> ir.Value:
    """``scores_p`` expanded to the mask's batch (a vision tower that ran once for a batch-1 prompt)."""
    shape = t.op("Concat", [t.op("Shape", [mask], {"start": 0, "end": 1}),
                            t.op("Shape", [scores_p], {"start": 1, "end": 2})], {"axis": 0})
    return t.op("Expand", [scores_p, shape])


def _projector_scores(t: Body, vl: VisionLanguage, k_img: int, p: int, method: str, pre: list[ir.Node],
                      query: str = "auto", anchor_share: float = 0.1) -> tuple[ir.Value, str | None, str]:
    """``[B, P]`` image-token scores at the projector; the note and the label of the report."""
    if vl.features.shape is None or len(vl.features.shape) != 3:
        raise Skip("the projector's output is not a [B, P, C] tensor")
    if method == "diversity":
        return _diversity_scores(t, vl, k_img, pre)
    if method == "hiprune":
        return _hiprune_scores(t, vl, k_img, p, anchor_share)
    return _vision_attention(t, vl, p, query)


def hiprune_layers(vl: VisionLanguage) -> tuple[int, int]:
    """HiPrune's two vision blocks (positions among ``vl.vision_blocks``): the middle one (object-centric: anchors)
    and the last live one (global: registers)."""
    return (len(vl.vision_blocks) - 1) // 2, len(vl.vision_blocks) - 1


def _hiprune_scores(t: Body, vl: VisionLanguage, k_img: int, p: int, anchor_share: float
                    ) -> tuple[ir.Value, str | None, str]:
    """HiPrune: ``max(1, round(anchor_share · k))`` anchors, the patches that receive the most attention in the
    middle vision block; buffers, the four grid neighbours of each anchor; registers, the rest of the budget, by the
    attention received in the last live block. One score so that a single top-k picks anchors first, then buffers
    (by their register score), then registers: ``deep + [buffer or anchor] + [anchor]`` (``deep`` ≤ 1)."""
    lead = vl.vision_prefix if vl.vision_blocks[-1].tokens == p else 0  # prefix tokens among the features
    side = int(round((p - lead) ** 0.5))
    if side * side != p - lead:
        raise Skip(f"hiprune: the {p - lead} image patches do not form a square grid; its buffers are grid "
                   "neighbours")
    mid, last = hiprune_layers(vl)
    middle, note, _ = _vision_attention(t, vl, p, "mean", vl.vision_blocks[mid])
    deep, note2, _ = _vision_attention(t, vl, p, "mean", vl.vision_blocks[last])
    f32 = {"to": ir.DataType.FLOAT}
    middle, deep = t.op("Cast", [middle], f32), t.op("Cast", [deep], f32)
    deep_lead = None
    if lead:  # the prefix features compete as registers; the grid is the rest
        deep_lead = t.op("Slice", [deep, t.ints(0), t.ints(lead), t.ints(1)])
        middle, deep = (t.op("Slice", [x, t.ints(lead), t.ints(1 << 30), t.ints(1)]) for x in (middle, deep))
    p = p - lead
    n_anchor = max(1, min(k_img, round(anchor_share * k_img)))
    _, idx = t.op_multi_out("TopK", [middle, t.ints(n_anchor)], {"axis": 1}, num_outputs=2)
    hot = t.op("OneHot", [idx, t.ints(p), t.const(np.array([0.0, 1.0], dtype=np.float32))], {"axis": -1})
    anchor = t.op("ReduceMax", [hot, t.ints(1)], {"keepdims": 0})  # [B, P]: 1 at the anchors
    cross = np.zeros((1, 1, 3, 3), dtype=np.float32)
    cross[0, 0, 1, :] = cross[0, 0, :, 1] = 1.0
    near = t.op("Conv", [t.op("Reshape", [anchor, t.ints(0, 1, side, side)]), t.const(cross)], {"pads": [1, 1, 1, 1]})
    near = t.op("Cast", [t.op("Greater", [t.op("Reshape", [near, t.ints(0, p)]), t.const(np.float32(0.5))])], f32)
    s = t.op("Add", [deep, t.op("Add", [near, anchor])])  # anchors and buffers first, then the registers
    if deep_lead is not None:
        s = t.op("Concat", [deep_lead, s], {"axis": 1})
    label = (f"HiPrune: {n_anchor} anchor(s) by the attention received in vision block {vl.vision_blocks[mid].index}, "
             f"their grid neighbours, registers by vision block {vl.vision_blocks[last].index}")
    return s, note or note2, label


def _vision_attention(t: Body, vl: VisionLanguage, p: int, query: str = "auto", blk=None
                      ) -> tuple[ir.Value, str | None, str]:
    """``[B, P]``: the [CLS] row (FasterVLM) or the attention each patch receives in vision block ``blk`` (default:
    the last live one), patches the projector merges averaged."""
    blk = blk if blk is not None else vl.vision_blocks[-1]
    pre = vl.vision_prefix
    if query == "cls" and pre == 0:
        raise ConfigError("query: cls: the vision tower has no [CLS] token; use query: mean (the attention each "
                          "patch receives)")
    if blk.tokens is None:
        raise Skip(f"vision block {blk.index}: token count unknown")
    # the projector's features hold the prefix tokens too (LLaVA's ``vision_feature_select_strategy: full``): they
    # keep their own scores and compete with the patches
    keep_prefix = pre > 0 and blk.tokens == p
    cut = 0 if keep_prefix else pre
    if pre > 0 and query in ("auto", "cls"):
        s, note = scores.cls_attention(t, blk, (0, 1))  # [B, 1 + P0]
        label = f"[CLS] attention of vision block {blk.index} (FasterVLM)"
    else:
        s, note = scores.cls_attention(t, blk, (0, 0))  # column mean: the attention each patch receives
        label = (f"attention each patch receives in vision block {blk.index}"
                 + (" (no [CLS] token)" if not pre else " (query: mean)"))
    s = t.op("Slice", [s, t.ints(cut), t.ints(1 << 30), t.ints(1)]) if cut else s
    if keep_prefix:
        label += f"; the {pre} prefix token(s) among the image features scored as the patches"
    p0 = blk.tokens - cut
    if p0 != p:
        if p0 % p:
            raise Skip(f"{p0} vision tokens do not map onto {p} image features")
        s = t.op("ReduceMean", [t.op("Reshape", [s, t.ints(0, p, p0 // p)]), t.ints(2)], {"keepdims": 0})
        label += f"; {p0 // p} patches merged into each feature: their mean"
    return s, note, label


def _diversity_scores(t: Body, vl: VisionLanguage, k_img: int, pre: list[ir.Node]
                      ) -> tuple[ir.Value, str | None, str]:
    """DivPrune: the ``k_img`` features that greedy max-min cosine diversity picks score 1, the others 0. The
    ``DiversitySelect`` node goes to ``pre`` (inserted before ``t``'s nodes)."""
    div = diversity_select.make_node(vl.features, name="diversity_select_image", k=k_img, protect=0,
                                     keep_order=True)
    div.outputs[0].name, div.outputs[1].name = "diversity_select_image_tokens", "diversity_select_image_indices"
    div.outputs[1].type = ir.TensorType(ir.DataType.INT64)
    pre.append(div)
    zeros = t.op("ReduceSum", [t.op("Mul", [vl.features, t.const(np.float32(0.0))]), t.ints(2)], {"keepdims": 0})
    ones = t.op("Add", [t.op("Cast", [t.op("Mul", [div.outputs[1], t.const(np.int64(0))])], {"to": ir.DataType.FLOAT}),
                        t.const(np.float32(1.0))])
    return (t.op("ScatterElements", [zeros, div.outputs[1], ones], {"axis": 1}), None,
            "diversity of the projected image features (DivPrune)")


__all__ = ["FASTV_LAYER", "HIPRUNE_ANCHOR_SHARE", "hiprune_layers", "run"]
