"""``sparse_attention``: replace the core of attention blocks with ``ai.graphprune.SparseAttention`` nodes.

Pattern (from ``analysis.attention.find_attention_blocks``; no raw matching here):
  1. ``matmul_softmax``: the nodes from the q·kᵀ MatMul through the ·v MatMul (scale, mask Add, Softmax, NaN
     guards) become one SparseAttention(q, k, v, mask) node. ``k`` is the block's [B, H, N, D] key; when the graph
     only shows kᵀ, a Transpose back is added. The scale is ``AttentionBlock.scale``; q/kᵀ scale Muls and the kᵀ
     Transpose that fed only the core are removed with it.
  2. ``attention_op`` (standard ``Attention``, 4-D inputs): the node becomes SparseAttention(q, k, v, mask), its
     ``scale`` (or 1/√D) and ``is_causal`` kept. A bool ``attn_mask`` becomes a 0 / finfo.min float bias first
     (``_ir.additive_mask``; the op clamps a bias at -1e30, so -inf and finfo.min mask alike).
Masks are kept: an additive mask of rank < 4 gets leading axes; a key mask ([.., 1, N]) and a full one ([.., N, N])
are both supported (see the op module for the fully-masked-row rule). Projections and everything outside the
core are untouched.

Patterns: those of ``ops.sparse_attention``; ``vertical_slash`` drops a purely causal mask (the pattern is causal);
``auto`` chooses one per head on the calibration data (``_sparse_choice``: recall of the dense attention mass at
``budget`` keys per query) and writes per-layer head groups.

Config: the pattern keys apply to every selected block (``layers``, 0-based as ``inspect`` numbers attention
blocks; default all); ``per_layer: {i: {key: value}}`` overrides them for block i; ``head_groups: [{heads: [...],
key: value...}]`` splits the heads (the groups must cover every head once) into separate SparseAttention nodes
whose outputs are concatenated back in head order. Unset ``num_global`` defaults to the block's prefix tokens
(CLS; every pattern), unset ``causal`` to the block's own causality, unset ``grid`` to a square grid of the non-prefix tokens.

Decision and edit are apart: ``plan(model, config)`` (pure; ``plan_block`` per block) says which blocks get which
nodes with which attributes (defaults resolved against N) or why a block is skipped; the pass then only edits. The
torch.fx pass ``graphprune.torch.sparse_attention`` places ``torch.ops.graphprune.sparse_attention`` from the same plan.

Skipped with a reason (never silently): a rewrite that would execute more FLOPs than the dense core (block routing
and padding that cost more than the skipped scores on short windows, as in Swin's; ``allow_more_flops: true``
rewrites anyway, to check a pattern's numerics), a default pattern that reaches every key, com.microsoft fused ops, 3-D ``Attention`` inputs, K/V with other heads or
another length than Q (GQA, cross attention), a dynamic sequence length, non-float attention, probabilities used
outside the core, ``Attention`` with past KV / extra outputs / softcap.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import pydantic

from graphprune._ir import NameScope, additive_mask
from graphprune.analysis.attention import AttentionBlock, find_attention_blocks, not_plain_causal
from graphprune.errors import ConfigError
from graphprune.ops import FLOAT_TYPES, add_function
from graphprune.ops import sparse_attention as op
from graphprune.passes import _sparse_choice as _choice
from graphprune.passes import register
from graphprune.passes.base import GraphPass, GraphResult, PassConfig, Rewrite, Skip, Skipped

_PATTERN_KEYS = ("pattern", "window", "num_global", "causal", "kernel", "dilation", "grid", "block_size", "topk",
                 "keep_diagonal", "keep_first", "layout", "vertical", "slash", "last_q")
_PatternName = Literal["sliding_window", "neighborhood_2d", "block_topk", "block_layout", "vertical_slash"]


#: Token count at which the report predicts the attention-FLOPs ratio of a block whose N is dynamic.
NOMINAL_N = 1024


def _length(blk: AttentionBlock):
    """The query length: an int, or the named symbolic dim of a dynamic-sequence export."""
    return blk.tokens if blk.tokens is not None else (blk.q.shape[2] if blk.q.shape is not None else None)


class PatternParams(PassConfig):
    """The pattern's keys; ``None`` means the op default or a value taken from the block."""

    pattern: _PatternName | None = None
    window: int | None = pydantic.Field(default=None, ge=1, description="sliding_window: keys per query")
    num_global: int | None = pydantic.Field(default=None, ge=0, description="leading global tokens (default: prefix)")
    causal: bool | None = None
    kernel: int | None = pydantic.Field(default=None, ge=1, description="neighborhood_2d: k of the k x k window")
    dilation: int | None = pydantic.Field(default=None, ge=1)
    grid: tuple[int, int] | None = pydantic.Field(default=None, description="neighborhood_2d: [h, w] token grid")
    block_size: int | None = pydantic.Field(default=None, ge=1)
    topk: int | None = pydantic.Field(default=None, ge=1)
    keep_diagonal: bool | None = None
    keep_first: bool | None = None
    layout: str | None = pydantic.Field(default=None, description="block_layout: .npy file, [nb, nb] or [H, nb, nb]")
    vertical: int | None = pydantic.Field(default=None, ge=1, description="vertical_slash: key columns per head")
    slash: int | None = pydantic.Field(default=None, ge=1, description="vertical_slash: block diagonals per head")
    last_q: int | None = pydantic.Field(default=None, ge=1, description="vertical_slash: queries it is estimated from")

    @pydantic.field_validator("grid")
    @classmethod
    def _grid(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError("grid sides must be >= 1")
        return v

    def set_values(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _PATTERN_KEYS if getattr(self, k) is not None}


class HeadGroup(PatternParams):
    heads: list[int] = pydantic.Field(min_length=1)


def _distinct_heads(groups):
    if groups is not None:
        heads = [h for g in groups for h in g.heads]
        if len(heads) != len(set(heads)):
            raise ValueError("a head appears in two groups")
    return groups


class LayerParams(PatternParams):
    """A ``per_layer`` entry: pattern keys for one block, and optionally its own head groups."""

    head_groups: list[HeadGroup] | None = None

    @pydantic.field_validator("head_groups")
    @classmethod
    def _groups(cls, v):
        return _distinct_heads(v)


class SparseAttentionConfig(PatternParams):
    pattern: _PatternName | Literal["auto"] = "sliding_window"
    layers: list[int] | None = pydantic.Field(default=None, description="0-based attention blocks; default all")
    per_layer: dict[int, LayerParams] = pydantic.Field(default_factory=dict)
    head_groups: list[HeadGroup] | None = None
    budget: int = pydantic.Field(512, ge=1, description="auto: keys per query every candidate pattern gets")
    candidates: list[Literal["a_shape", "vertical_slash", "block_topk"]] = pydantic.Field(
        default_factory=lambda: ["a_shape", "vertical_slash", "block_topk"], min_length=1,
        description="auto: the patterns each head chooses from (by recall on the calibration data)")
    allow_more_flops: bool = pydantic.Field(
        False, description="rewrite a block even where the pattern executes more FLOPs than the dense core (to check "
        "a pattern's numerics, e.g. a window over every key; never faster)")

    @pydantic.field_validator("head_groups")
    @classmethod
    def _groups(cls, v):
        return _distinct_heads(v)


def _load_layout(path: str, heads: int, nb: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"layout: file {path!r} not found")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's
        raise ConfigError(f"layout: cannot read {path!r} as .npy ({type(e).__name__})") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (nb, nb) or arr.shape[0] not in (1, heads):
        raise ConfigError(f"layout: shape {list(arr.shape)} must be [{nb}, {nb}] or [{heads}, {nb}, {nb}] here")
    lay = (arr != 0).astype(np.float32)
    if (lay.sum(-1) == 0).any():
        raise ConfigError("layout: every query block (row) needs at least one key block")
    return lay


@dataclasses.dataclass(frozen=True)
class SparseRewrite(Rewrite):
    """One SparseAttention node that replaced (the heads ``heads`` of) a block's attention core."""

    block: int
    heads: list[int]
    pattern: str
    tokens: int | None  # None: a dynamic sequence length (the body follows the runtime N)
    params: dict[str, Any]
    mask: str  # bias kind: none | key | full
    attention_flops_ratio: float  # dense / executed attention-core FLOPs
    node: str


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """One SparseAttention node to place: the heads it covers and its attributes."""

    group: HeadGroup | None  # the ``head_groups`` entry, or None: one node for every head
    heads: list[int]
    attrs: dict[str, Any]  # the node's full attribute set (``op.normalize``: defaults and N-dependent sizes resolved)
    layout: np.ndarray | None  # block_layout: the [H|1, nb, nb] 0/1 layout input


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The decision for one attention block: which nodes replace its core (``plan_block``)."""

    block: AttentionBlock
    mask_shape: list | None  # the mask as a rank-4 bias shape (leading 1s added); None without a mask
    groups: list[GroupPlan]  # in ``head_groups`` order; outputs are concatenated back in head order

    @property
    def bias(self) -> str:
        """The op's ``bias`` kind: none | key | full."""
        return self.groups[0].attrs["bias"]


@dataclasses.dataclass(frozen=True)
class SparsePlan:
    """What the pass will do on a model (``plan``): the blocks found, the planned ones, the skipped ones."""

    blocks: list[AttentionBlock]
    planned: list[BlockPlan]
    skipped: list[Skipped]


def model_opset(model: ir.Model) -> int:
    return model.graph.opset_imports.get("", model.opset_imports.get("", 18))


def plan(model: ir.Model, config: SparseAttentionConfig) -> SparsePlan:
    """The pass's decision on ``model``, without editing it: the attention blocks, and for each selected one either
    its :class:`BlockPlan` or the reason it is skipped. Shared by this pass and the torch.fx pass
    (``graphprune.torch.sparse_attention``), so both place the same nodes with the same attributes.

    Raises:
        ConfigError: ``layers`` / ``per_layer`` out of range, ``head_groups`` not covering the heads, a
            pattern parameter the block cannot take (a non-square grid, a bad layout file, ...).
    """
    blocks = find_attention_blocks(model)
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < len(blocks)]
        if bad:
            raise ConfigError(f"layers: {bad} out of range; the model has {len(blocks)} attention blocks")
    bad = [i for i in config.per_layer if not 0 <= i < len(blocks)]
    if bad:
        raise ConfigError(f"per_layer: {bad} out of range; the model has {len(blocks)} attention blocks")
    opset = model_opset(model)
    planned, skipped = [], []
    for blk in blocks:
        if config.layers is not None and blk.index not in config.layers:
            continue
        try:
            planned.append(plan_block(blk, config, opset))
        except Skip as e:
            skipped.append(e.record(f"block {blk.index}"))
    if not blocks:
        skipped.append(Skipped("graph", "no attention blocks found"))
    return SparsePlan(blocks, planned, skipped)


def plan_block(blk: AttentionBlock, config: SparseAttentionConfig, opset: int) -> BlockPlan:
    """One block's decision (pure): the checks, the mask's bias kind, and per head group the op attributes.

    Raises:
        Skip: the block cannot be rewritten (the reason names what is missing).
        ConfigError: the configuration does not fit this block.
    """
    n, heads = _check(blk, opset)
    shape4 = None
    if blk.mask is not None:
        shape = blk.mask.shape
        if shape is None or not 1 <= len(shape) <= 4:
            raise Skip(f"mask {blk.mask.name!r} has an unknown shape")
        shape4 = [1] * (4 - len(shape)) + list(shape)
        if shape4[3] != n or shape4[2] not in (1, n) or not isinstance(shape4[1], int):
            raise Skip(f"mask {blk.mask.name!r} of shape {list(shape)} is not [B|1, H|1, 1|{n}, {n}]")
        if blk.mask.dtype not in (blk.q.dtype, ir.DataType.BOOL):
            raise Skip(f"mask {blk.mask.name!r} has dtype {blk.mask.dtype}, not the attention's "
                       f"{blk.q.dtype} or bool")
    groups = _groups_for(blk, config)
    params = [_params_for(blk, config, g) for g in (groups or [None])]
    own = [_causal_by_itself(p, config) for p in params]  # patterns that apply the causal mask themselves
    plain = False  # is the mask exactly the causal one (only asked when a pattern applies it itself)?
    if any(own):
        name = next(p.get("pattern", config.pattern) for p, o in zip(params, own) if o)
        if not blk.causal:
            raise ConfigError(f"pattern: {name} (causal) on attention block {blk.index}, which is not causal (no "
                              "causal flag, and no mask that is exactly the causal one)")
        why = not_plain_causal(blk.mask, blk.nodes[0].graph) if blk.mask is not None else None
        if why and any(p.get("pattern", config.pattern) == "vertical_slash" for p in params):
            raise Skip(f"mask {blk.mask.name!r}: {why}; vertical_slash takes no mask but the plain causal one")
        plain = blk.mask is not None and why is None
        if why is None and all(own):
            shape4 = None  # the mask is exactly the causal one the patterns apply themselves
    bkind = "none" if shape4 is None else ("key" if shape4[2] == 1 else "full")
    if groups is not None:
        covered = sorted(h for g in groups for h in g.heads)
        if covered != list(range(heads)):
            raise ConfigError(f"head_groups: heads {covered} must cover 0..{heads - 1} once (block {blk.index})")
    parts = [_group_plan(blk, config, g, g.heads if g else list(range(heads)), bkind, plain)
             for g in (groups or [None])]
    explicit = any({"window", "kernel", "topk", "layout"} & set(_params_for(blk, config, g))
                   or _params_for(blk, config, g).get("pattern", config.pattern) == "vertical_slash"
                   for g in (groups or [None]))
    if not isinstance(n, int) and not explicit:
        raise Skip(f"the sequence length is dynamic ({n}): set window / kernel / topk for the lengths you run (the "
                   f"default {parts[0].attrs['pattern']} saves nothing below its reach)")
    if isinstance(n, int) and not explicit and all(_saves_nothing(p.attrs, blk) for p in parts):
        raise Skip(f"the default {parts[0].attrs['pattern']} reaches every key at {n} tokens; nothing to save (set "
                   "window / kernel / topk to rewrite anyway)")
    if isinstance(n, int) and not config.allow_more_flops:
        executed, dense = _core_flops(parts, blk)
        if executed > dense:  # equal: an explicit window over every key, kept (it is the dense core, exactly)
            pattern = "/".join(dict.fromkeys(p.attrs["pattern"] for p in parts))
            raise Skip(f"{pattern} at {n} tokens would execute {executed / dense:.2f}× the dense attention core's "
                       "FLOPs (routing, padding to whole blocks and kept blocks cost more than the scores it skips): "
                       "the rewrite would only add cost (allow_more_flops: true rewrites anyway)")
    return BlockPlan(blk, shape4, parts)


def _saves_nothing(attrs: dict, blk: AttentionBlock) -> bool:
    """Does the pattern execute at least the dense core's FLOPs (a window as long as the sequence)?"""
    d = blk.head_dim if isinstance(blk.head_dim, int) else 64
    executed, dense = op.attention_flops(attrs, 1, 1, d, d)
    return executed >= dense


def _core_flops(parts: list[GroupPlan], blk: AttentionBlock) -> tuple[int, int]:
    """(executed, dense) attention-core FLOPs of a static-length block's planned nodes, per batch row, by the op's
    FLOPs rule (the one ``count_flops`` applies to the new nodes)."""
    d = blk.head_dim
    dv = blk.v.shape[-1] if blk.v.shape is not None and isinstance(blk.v.shape[-1], int) else d
    pairs = [op.attention_flops(p.attrs, 1, len(p.heads), d, dv) for p in parts]
    return sum(e for e, _ in pairs), sum(x for _, x in pairs)


def _causal_by_itself(params: dict[str, Any], config: SparseAttentionConfig) -> bool:
    """Does the group's pattern apply the causal mask itself (vertical_slash; block_topk with ``causal``)?"""
    pattern = params.get("pattern", config.pattern)
    return pattern == "vertical_slash" or (pattern == "block_topk" and bool(params.get("causal")))


def _groups_for(blk: AttentionBlock, config: SparseAttentionConfig) -> list[HeadGroup] | None:
    layer = config.per_layer.get(blk.index)
    return layer.head_groups if layer is not None and layer.head_groups is not None else config.head_groups


def _params_for(blk: AttentionBlock, config: SparseAttentionConfig, group: HeadGroup | None) -> dict[str, Any]:
    merged = config.set_values()
    if blk.index in config.per_layer:
        merged |= config.per_layer[blk.index].set_values()
    if group is not None:
        merged |= group.set_values()
    return merged


def _check(blk: AttentionBlock, opset: int) -> tuple[int, int]:
    q, v = blk.q, blk.v
    if opset < 18:
        raise Skip(f"the model imports opset {opset}; the SparseAttention body needs >= 18")
    if blk.kind not in ("matmul_softmax", "attention_op"):
        raise Skip(f"{blk.kind} (com.microsoft fused attention) is not rewritten; export without ORT fusion")
    if blk.layout != "BHND" or q is None or v is None or q.shape is None or len(q.shape) != 4:
        raise Skip("attention inputs are not 4-D [B, H, N, D]")
    if blk.window_mask is not None:  # the replacement would drop it
        raise Skip(f"{blk.partition_summary()}: the shift mask is added over a [B, windows, H, T, T] view of the "
                   "scores; not supported")
    if q.dtype not in FLOAT_TYPES:
        raise Skip(f"attention runs in {q.dtype}; float32, float16 and bfloat16 are supported")
    n = _length(blk)
    if not isinstance(n, int) and not (isinstance(n, ir.SymbolicDim) and n.value):
        raise Skip("the sequence length is unknown (neither static nor a named dim)")
    heads = blk.heads
    if not isinstance(heads, int) or blk.core_kv_heads != heads or not isinstance(blk.head_dim, int):
        raise Skip(f"K/V heads ({blk.core_kv_heads}) differ from Q heads ({heads}) or are dynamic (GQA/MQA)")
    if v.shape is None or v.shape[-2] != n:
        raise Skip("keys have another length than queries (cross attention or KV cache)")
    if blk.kind == "attention_op":
        node = blk.nodes[0]
        if len(node.inputs) > 4 or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise Skip("Attention with past KV inputs or extra outputs")
        if node.attributes.get_float("softcap", 0.0) or node.attributes.get_int("qk_matmul_output_mode", 0):
            raise Skip("Attention with softcap / qk output mode")
    else:
        core = set(blk.nodes)
        for nd in blk.nodes[:-1]:
            for out in nd.outputs:
                if out.is_graph_output() or any(u not in core for u, _ in out.uses()):
                    raise Skip(f"{out.name!r} (scores/probabilities) is used outside the attention core")
    return n, heads


def _group_plan(blk: AttentionBlock, config: SparseAttentionConfig, group: HeadGroup | None, head_ids: list[int],
                bkind: str, plain_causal: bool = False) -> GroupPlan:
    """The node for one head group: pattern keys merged (block, per-layer, group), defaults taken from the block
    (``num_global``: prefix tokens, ``causal``, a square ``grid``), then ``op.normalize`` at the block's N.
    ``plain_causal``: the block's mask is exactly the causal one (a causal block_topk then takes no bias)."""
    params = _params_for(blk, config, group)
    pattern = params.pop("pattern", config.pattern)
    n = _length(blk)
    if not isinstance(n, int) and pattern not in op.DYNAMIC_PATTERNS:
        raise Skip(f"the sequence length is dynamic; {pattern} is defined for one N "
                   f"({' and '.join(op.DYNAMIC_PATTERNS)} run at any N)")
    if pattern != "vertical_slash":  # its num_global is the sink tokens (op default), not the prefix
        params.setdefault("num_global", blk.prefix_tokens)
    if pattern == "sliding_window":
        params.setdefault("causal", blk.causal)
    elif blk.causal and blk.mask is None and not _causal_by_itself(dict(params, pattern=pattern), config):
        # a causal mask input is kept as the bias; an is_causal flag is not
        raise Skip(f"the block is causal; {pattern} is not (use sliding_window or block_topk with causal: true, or "
                   "vertical_slash)")
    if pattern == "neighborhood_2d" and "grid" not in params:
        side = math.isqrt(n - params["num_global"])
        if side * side != n - params["num_global"]:
            raise ConfigError(f"grid: {n} tokens minus {params['num_global']} prefix is not a square; set grid: [h, w]")
        params["grid"] = [side, side]
    layout_path = params.pop("layout", None)
    lay = None
    if pattern == "block_layout":
        if layout_path is None:
            raise ConfigError("layout: block_layout needs a layout file (.npy)")
        nb = -(-n // min(params.get("block_size") or 64, n))
        lay = _load_layout(layout_path, blk.heads, nb)
        if lay.shape[0] != 1:
            lay = lay[head_ids]
        params["topk"] = int(lay.sum(-1).max())
    params = {k: v for k, v in params.items() if k in op.PATTERN_KEYS[pattern]}  # other patterns' keys do not apply
    scale = blk.scale if blk.scale else 1.0 / math.sqrt(blk.head_dim)
    if pattern == "vertical_slash":  # causal by itself: the (causal) mask is not its input
        bkind = "none"
    elif pattern == "block_topk" and params.get("causal") and plain_causal:
        bkind = "none"  # the plain causal mask: the pattern applies it without reading N x N
    return GroupPlan(group, head_ids, op.normalize(pattern, n if isinstance(n, int) else 0, scale, bkind, **params), lay)


class _Rewriter:
    """Per-call state: the model, conversions of shared masks, the report."""

    def __init__(self, model: ir.Model, config: SparseAttentionConfig) -> None:
        self.model, self.graph, self.config = model, model.graph, config
        self.mask_cache: dict[int, ir.Value] = {}
        self.rewritten: list[SparseRewrite] = []
        self.flops = [0, 0]  # executed, dense
        self.opset = model_opset(model)
        self.names = NameScope(model.graph)

    # -- graph edits --------------------------------------------------------------------------------------------
    def _insert(self, anchor: ir.Node, node: ir.Node) -> ir.Value:
        self.graph.insert_after(anchor, node)
        return node.outputs[0]

    def bias_for(self, blk: AttentionBlock, shape4: list | None) -> ir.Value | None:
        """The block's mask as a rank-4 float bias (bool → 0 / finfo.min, ``_ir.additive_mask``); converted once per
        shared mask."""
        mask = blk.mask
        if mask is None or shape4 is None:  # shape4 None: a causal mask the pattern applies itself
            return None
        if id(mask) in self.mask_cache:
            return self.mask_cache[id(mask)]
        t, cur = ir.tape.Tape(), mask
        dtype = blk.q.dtype
        if mask.dtype == ir.DataType.BOOL:
            cur = additive_mask(t, cur, dtype)
        rank = len(mask.shape)
        if rank < 4:
            cur = t.op("Unsqueeze", [cur, t.op("Constant", [], {"value": ir.tensor(np.arange(4 - rank, dtype=np.int64))})])
        new_nodes = list(t.nodes)
        if new_nodes:  # right after the mask's producer, so every later block can use it
            prod = mask.producer()
            if prod is not None:
                self.graph.insert_after(prod, new_nodes)
            else:
                self.graph.insert_before(next(iter(self.graph)), new_nodes)
            cur.shape, cur.type = ir.Shape(shape4), ir.TensorType(dtype)
        self.mask_cache[id(mask)] = cur
        return cur

    def rewrite(self, bp: BlockPlan) -> ir.Value:
        """Edit one planned block (``plan_block``: nothing here skips); return the new [B, H, N, Dv] output."""
        blk, shape4 = bp.block, bp.mask_shape
        groups = None if bp.groups[0].group is None else [g.group for g in bp.groups]
        heads = blk.heads
        plans = [(g.group, g.heads, g.attrs, g.layout) for g in bp.groups]
        anchor = blk.nodes[-1]
        bias = self.bias_for(blk, shape4)
        q, k, v = blk.q, blk.k, blk.v
        if k is None:
            tr = ir.node("Transpose", [blk.k_transposed], {"perm": [0, 1, 3, 2]})
            k = self._insert(anchor, tr)
            anchor = tr
        if groups is None:
            return self._sparse(blk, anchor, q, k, v, bias, *plans[0])
        outs = []
        for part in plans:
            head_ids = part[1]
            idx = ir.node("Constant", [], {"value": ir.tensor(np.array(head_ids, dtype=np.int64))})
            sub, parts = [idx], []
            for x in (q, k, v) + ((bias,) if bias is not None and shape4[1] == heads else ()):
                gat = ir.node("Gather", [x, idx.outputs[0]], {"axis": 1})
                shape = list(x.shape)
                shape[1] = len(head_ids)
                gat.outputs[0].shape, gat.outputs[0].type = ir.Shape(shape), x.type
                sub.append(gat)
                parts.append(gat.outputs[0])
            self.graph.insert_after(anchor, sub)
            gb = parts[3] if len(parts) == 4 else bias
            outs.append(self._sparse(blk, sub[-1], parts[0], parts[1], parts[2], gb, *part))
            anchor = outs[-1].producer()
        cat = ir.node("Concat", outs, {"axis": 1})
        result = self._insert(anchor, cat)
        order = [h for g in groups for h in g.heads]
        if order != list(range(heads)):
            inv = ir.node("Constant", [], {"value": ir.tensor(np.argsort(order).astype(np.int64))})
            back = ir.node("Gather", [result, inv.outputs[0]], {"axis": 1})
            self.graph.insert_after(cat, [inv, back])
            result = back.outputs[0]
        return result

    def _sparse(self, blk, anchor, q, k, v, bias, group, head_ids, attrs, lay) -> ir.Value:
        layout_val = None
        if lay is not None:
            layout_val = self.names.initializer(f"sparse_layout_{blk.index}_{head_ids[0]}", lay)
        node, fn = op.make_node(q, k, v, attrs, bias=bias if attrs["bias"] != "none" else None, layout=layout_val,
                                name=f"sparse_attention_{blk.index}" + (f"_h{head_ids[0]}" if group else ""),
                                opset=self.opset)
        out = self._insert(anchor, node)
        out.shape = ir.Shape([q.shape[0], len(head_ids), attrs["seq_len"] or q.shape[2], v.shape[-1]])
        out.type = ir.TensorType(q.dtype or ir.DataType.FLOAT)
        add_function(self.model, fn)
        dv = v.shape[-1] if isinstance(v.shape[-1], int) else blk.head_dim
        # predicted cost at the model's N, or at NOMINAL_N tokens when N is dynamic
        at_n = attrs if attrs["seq_len"] else dict(attrs, seq_len=NOMINAL_N)
        executed, dense = op.attention_flops(at_n, 1, len(head_ids), blk.head_dim, dv)
        self.flops[0] += executed
        self.flops[1] += dense
        self.rewritten.append(SparseRewrite(
            blk.index, head_ids, attrs["pattern"], attrs["seq_len"] or None,
            {k: v for k, v in attrs.items() if k not in ("pattern", "seq_len", "scale", "bias")}
            | {"block_size": op.effective_block(attrs)} | ({} if attrs["seq_len"] else {"ratio_at_tokens": NOMINAL_N}),
            attrs["bias"], round(dense / executed, 3), node.name,
        ))
        return out

    def replace(self, blk: AttentionBlock, new_out: ir.Value) -> None:
        old = blk.output
        if old.is_graph_output():
            outs = self.graph.outputs
            for i, o in enumerate(outs):
                if o is old:
                    outs[i] = new_out
            name = old.name
            old.name = f"{name}_dense"
            new_out.name = name
        ir.convenience.replace_all_uses_with(old, new_out)
        inputs = [x for nd in blk.nodes for x in nd.inputs if x is not None]
        self.graph.remove(blk.nodes, safe=True)
        self._remove_dead([x.producer() for x in inputs])
        for x in inputs:  # constants only the core used (the scale): drop, unless still used or a graph input
            if x.is_initializer() and not x.uses() and not x.is_graph_input() and not x.is_graph_output():
                self.graph.initializers.pop(x.name, None)

    def _remove_dead(self, nodes: list[ir.Node | None]) -> None:
        """Remove producers left without users (the kᵀ Transpose, √scale Muls), walking upstream."""
        stack = [nd for nd in nodes if nd is not None]
        seen: set[int] = set()
        while stack:
            nd = stack.pop()
            if id(nd) in seen or nd.graph is not self.graph:
                continue
            seen.add(id(nd))
            if any(o.uses() or o.is_graph_output() for o in nd.outputs):
                continue
            ups = [x.producer() for x in nd.inputs if x is not None]
            self.graph.remove(nd, safe=True)
            for x in nd.inputs:
                if x is not None and x.is_initializer() and not x.uses() and not x.is_graph_output():
                    self.graph.initializers.pop(x.name, None)
            stack += [u for u in ups if u is not None]


@register
class SparseAttentionPass(GraphPass):
    name = "sparse_attention"
    Config = SparseAttentionConfig
    summary = ("replace attention cores with SparseAttention (window, 2-D neighborhood, block top-k, block layout, "
               "vertical-slash, or a per-head choice)")

    def call(self, model: ir.Model) -> GraphResult:
        config, chosen, skipped = self.config, None, []
        if config.pattern == "auto":
            config, chosen, skipped = self._choose(model)
        decided = plan(model, config)  # every check and ConfigError before the first edit
        decided.skipped[:0] = skipped
        rw = _Rewriter(model, config)
        with self.context.task("sparse_attention", len(decided.planned)) as step:
            for bp in decided.planned:
                rw.replace(bp.block, rw.rewrite(bp))
                step()
        info = {"blocks_found": len(decided.blocks), "blocks_replaced": len({r.block for r in rw.rewritten})}
        if chosen is not None:
            info["head_patterns"] = chosen
        if rw.flops[0]:
            info["attention_flops_ratio"] = round(rw.flops[1] / rw.flops[0], 3)
        return GraphResult(model, bool(rw.rewritten), rewritten=rw.rewritten, skipped=decided.skipped, info=info)


    def _choose(self, model: ir.Model) -> tuple[SparseAttentionConfig, dict, list[Skipped]]:
        """``pattern: auto``: the per-head choice on the calibration feeds (``_sparse_choice``), as a config with
        per-layer head groups; non-causal blocks are skipped with their reason."""
        cfg = self.config
        blocks = [b for b in find_attention_blocks(model) if cfg.layers is None or b.index in cfg.layers]
        skipped = [Skipped(f"block {b.index}", "pattern auto chooses among causal patterns; the block is not causal")
                   for b in blocks if not b.causal]
        usable = [b for b in blocks if b.causal and b.q is not None and b.heads and isinstance(b.head_dim, int)]
        skipped += [Skipped(f"block {b.index}", "pattern auto: the block's heads or head size are not known")
                    for b in blocks if b.causal and b not in usable]
        per_layer, report = {}, {}
        if usable:
            feeds = self.context.feeds(model)
            probes = []
            with self.context.task("sparse_attention: reading queries and keys", len(feeds)) as step:
                for arrays in self.context.runtime.probe(model, _choice.probe_values(usable), feeds):
                    probes.append(arrays)
                    step()
            per_layer, report = _choice.choose(usable, probes, cfg.budget, list(cfg.candidates))
        keep = cfg.model_dump(exclude={"pattern", "budget", "candidates", "per_layer", "head_groups", "layers"},
                              exclude_none=True)
        resolved = SparseAttentionConfig(**keep, layers=[b.index for b in usable],
                                         per_layer={i: {"head_groups": g} for i, g in per_layer.items()})
        return resolved, report, skipped


__all__ = ["BlockPlan", "GroupPlan", "SparseAttentionConfig", "SparseAttentionPass", "SparsePlan", "SparseRewrite", "plan",
           "plan_block"]
