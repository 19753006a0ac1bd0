"""FX pass ``sparse_attention``: replace attention cores in a module's graph with
``torch.ops.graphprune.sparse_attention`` where the ONNX ``sparse_attention`` pass would, with the same attributes,
so the module can be fine-tuned with the sparse pattern in place and exported.

Decision (shared, not copied): the module is exported as :func:`graphprune.torch.export` does, and the ONNX pass's
own :func:`graphprune.passes.sparse_attention.plan` decides on that graph: which blocks, which head groups, the
op attributes with defaults resolved against N (``num_global`` = prefix tokens, ``causal``, the grid, block and
window sizes), a ``block_layout`` layout, or why a block is skipped. The ``torch.export`` program behind the ONNX
graph becomes a GraphModule whose node names are the ONNX value names, so q, k (or kᵀ), v, the mask and the core's
output are FX nodes by name.

Rewrite, per planned block:
  1. ``k`` is the block's key node; when the graph shows only kᵀ, ``aten.transpose(kᵀ, -2, -1)`` is added;
  2. the mask (when the block has one) becomes the op's rank-4 float bias as in the ONNX pass: a bool keep-mask
     becomes ``where(mask, 0, finfo.min)``; a mask of rank < 4 gets leading axes (``aten.unsqueeze``). A mask made
     inside one op's ONNX translation (no FX node of that name) is accepted when it is ``Where(m, 0, -inf|min)``
     of a bool FX node ``m`` (SDPA with a bool ``attn_mask``);
  3. ``sparse_attention(q, k, v, bias, layout, **attrs)``; with ``head_groups``, one op per group on the group's
     heads (``aten.slice`` + ``aten.cat``), outputs concatenated back in head order;
  4. every user of the core's output reads the op's output; the dense core is removed (dead-code elimination);
     ``aten.view`` nodes become ``aten.reshape`` (the op's output strides differ from the dense kernel's).
A ``block_layout`` layout becomes a buffer ``graphprune_sparse_layout_<block>_<first head>``.
A block the ONNX pass skips is skipped here too (``meta['graphprune_sparse_attention']['skipped']``); a planned
block whose values are not FX nodes is a :class:`GraphpruneError` naming the block. The result is a
``GraphModule`` (the eval-mode export graph); ``graphprune.torch.export`` of it writes
``ai.graphprune.SparseAttention`` nodes. Gradients reach q, k, v and the bias (the op's autograd), so it trains.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from graphprune._ir import const_value
from graphprune.errors import ConfigError, GraphpruneError
from graphprune.torch._export import export_program

aten = torch.ops.aten
META = "graphprune_sparse_attention"


def _config(config: dict):
    import pydantic

    from graphprune.passes.sparse_attention import SparseAttentionConfig

    try:
        cfg = SparseAttentionConfig.model_validate(config)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"sparse_attention: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    if cfg.pattern == "auto":
        raise ConfigError("sparse_attention: pattern auto chooses on calibration data in the ONNX pass; run it there "
                          "and pass its per_layer head groups here")
    return cfg


def sparse_attention(module: nn.Module, example_inputs: tuple, *, dynamic_axes: dict[int, str] | None = None,
                     **config) -> torch.fx.GraphModule:
    """``module`` as a GraphModule with SparseAttention ops at the ONNX pass's places (see module docstring).

    ``config`` takes the ``sparse_attention`` pass's keys (``pattern="sliding_window"``, ``window=8``,
    ``layers=[...]``, ``per_layer={...}``, ``head_groups=[...]``). The module is deep-copied. ``dynamic_axes`` is
    passed to the export (a dynamic sequence axis allows only the patterns the ONNX pass allows there).
    """
    from graphprune.passes.sparse_attention import plan
    cfg = _config(config)
    args = tuple(example_inputs)
    program = export_program(copy.deepcopy(module), args, dynamic_axes=dynamic_axes)
    decided = plan(program.model, cfg)
    if not decided.blocks:
        raise GraphpruneError("sparse_attention (torch): no attention blocks found in the module's export")
    gm = program.exported_program.module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    rw = _FxRewriter(gm, cfg)
    for bp in decided.planned:
        rw.rewrite(bp)
    if decided.planned:
        _views_to_reshapes(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.meta[META] = {"blocks": [bp.block.index for bp in decided.planned],
                     "attrs": [[dict(g.attrs) for g in bp.groups] for bp in decided.planned],
                     "skipped": [f"{s.where}: {s.reason}" for s in decided.skipped]}
    return gm


class _FxRewriter:
    """Per-call state: the GraphModule, its nodes by name, masks already converted. New nodes go right before the
    core's output node: every input of the core (q, k, kᵀ, v, the mask) comes before it."""

    def __init__(self, gm: torch.fx.GraphModule, config) -> None:
        self.gm, self.graph, self.config = gm, gm.graph, config
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.bias_cache: dict[str, torch.fx.Node] = {}

    def node(self, value, blk, what: str) -> torch.fx.Node:
        n = self.nodes.get(value.name) if value is not None else None
        if n is None:
            raise GraphpruneError(f"sparse_attention (torch): block {blk.index}: {what} "
                                  f"{getattr(value, 'name', None)!r} is not a node of the traced module")
        return n

    def op(self, target, *args, **kwargs) -> torch.fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def rewrite(self, bp) -> None:
        blk = bp.block
        q, v, out = self.node(blk.q, blk, "q"), self.node(blk.v, blk, "v"), self.node(blk.output, blk, "output")
        with self.graph.inserting_before(out):
            if blk.k is not None and blk.k.name in self.nodes:
                k = self.nodes[blk.k.name]
            else:
                k = self.op(aten.transpose.int, self.node(blk.k_transposed, blk, "kᵀ"), -2, -1)
            bias = self.bias(blk, q) if blk.mask is not None and bp.mask_shape is not None else None
            if bp.groups[0].group is None:
                result = self.sparse(blk, q, k, v, bias, bp.groups[0])
            else:
                outs = []
                for g in bp.groups:
                    gb = self.take_heads(bias, g.heads) if bias is not None and bp.mask_shape[1] == blk.heads else bias
                    outs.append(self.sparse(blk, *(self.take_heads(x, g.heads) for x in (q, k, v)), gb, g))
                result = self.op(aten.cat.default, outs, 1)
                order = [h for g in bp.groups for h in g.heads]
                if order != list(range(blk.heads)):
                    result = self.take_heads(result, [int(i) for i in np.argsort(order)])
        out.replace_all_uses_with(result)

    def take_heads(self, x: torch.fx.Node, heads: list[int]) -> torch.fx.Node:
        """``x[:, heads]`` (static head ids) as slices and one cat."""
        parts = [self.op(aten.slice.Tensor, x, 1, h, h + 1) for h in heads]
        return self.op(aten.cat.default, parts, 1) if len(parts) > 1 else parts[0]

    def sparse(self, blk, q, k, v, bias, group) -> torch.fx.Node:
        layout = None
        if group.layout is not None:
            name = f"graphprune_sparse_layout_{blk.index}_{group.heads[0]}"
            self.gm.register_buffer(name, torch.from_numpy(np.ascontiguousarray(group.layout)))
            layout = self.graph.get_attr(name)
        bias = bias if group.attrs["bias"] != "none" else None  # vertical_slash: causal by itself
        return self.op(torch.ops.graphprune.sparse_attention.default, q, k, v, bias, layout,
                       **_torch_kwargs(group.attrs))

    def bias(self, blk, q: torch.fx.Node) -> torch.fx.Node:
        """The mask as a rank-4 float bias, as the ONNX pass builds it (converted once per shared mask)."""
        mask = blk.mask
        if mask.name in self.bias_cache:
            return self.bias_cache[mask.name]
        dtype = q.meta["val"].dtype
        if mask.name in self.nodes:
            cur = self.nodes[mask.name]
            is_bool = mask.dtype == ir.DataType.BOOL
        else:
            cur, is_bool = self._where_source(mask, blk), True
        if is_bool:  # where(mask, 0, finfo.min)
            zero = self.op(aten.zeros_like.default, cur, dtype=dtype)
            cur = self.op(aten.masked_fill.Scalar, zero, self.op(aten.logical_not.default, cur), torch.finfo(dtype).min)
        for _ in range(4 - len(mask.shape)):
            cur = self.op(aten.unsqueeze.default, cur, 0)
        self.bias_cache[mask.name] = cur
        return cur

    def _where_source(self, mask, blk) -> torch.fx.Node:
        """A mask made inside one op's translation: ``Where(m, 0, -inf|min)`` of a bool FX node ``m``."""
        prod = mask.producer()
        if prod is not None and prod.op_type == "Where" and prod.inputs[0] is not None \
                and prod.inputs[0].name in self.nodes:
            zero, low = const_value(prod.inputs[1]), const_value(prod.inputs[2])
            if zero is not None and low is not None and zero.size == 1 and low.size == 1 \
                    and float(zero.reshape(())) == 0.0 and float(low.reshape(())) <= -1e30:
                return self.nodes[prod.inputs[0].name]
        raise GraphpruneError(f"sparse_attention (torch): block {blk.index}: mask {mask.name!r} is not a node of the "
                              "traced module")


def _views_to_reshapes(graph: torch.fx.Graph) -> None:
    """``aten.view`` → ``aten.reshape``: the export writes ``view`` where the dense kernel's output strides allowed
    it (SDPA returns [B, H, N, D] laid out as [B, N, H, D]); the op's output is contiguous, and reshape copies only
    where a view is impossible."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default


def _torch_kwargs(attrs: dict) -> dict:
    """Op attributes as the torch schema's keyword arguments (ints for bools, lists for ints)."""
    out = {}
    for key, val in attrs.items():
        if isinstance(val, bool | np.bool_):
            val = int(val)
        elif isinstance(val, tuple | list):
            val = [int(x) for x in val]
        elif isinstance(val, np.integer):
            val = int(val)
        elif isinstance(val, np.floating):
            val = float(val)
        out[key] = val
    return out
