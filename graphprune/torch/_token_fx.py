"""FX pass ``token_drop``: insert ``torch.ops.graphprune.token_select`` into a module's graph where the ONNX
``token_drop`` pass would, so the module can be fine-tuned with the reduction in place (EViT recipe) and exported.

Decision (shared, not copied): the module is exported as :func:`graphprune.torch.export` does; the ONNX pass's
own :meth:`TokenDropPass.schedule` picks the blocks, the protected prefix and the keep ratios on that graph,
and :func:`graphprune.analysis.streams.stream_point` says which stream value each reduction goes on. The ``torch.export`` program behind
the ONNX graph becomes a GraphModule whose node names are the ONNX value names, so the stream value and the
block's softmax probabilities are FX nodes by name.

Rewrite, per chosen block (in order):
  1. score = mean over heads and query rows ``[r0, r1)`` of the block's softmax (``aten.slice`` + ``aten.mean``:
     the ONNX pass's Slice + ReduceMean);
  2. ``token_select(stream, score, k, protect, keep_order, fuse_rest)`` after the stream node; every other user of
     the stream reads its tokens;
  3. later static shape arguments (``view`` / ``reshape`` / ``expand``) that hold the traced token count get the
     reduced count: the graph is run once on the example inputs, and a target that does not fit its input is
     retargeted (entries equal to the incoming token count).
Supported: ``method: cls_attention`` (``query``, ``placement``, ``layers``, ``keep_ratio``, ``schedule``,
``protect``, ``keep_order``, ``fuse_rest``), blocks with explicit softmax probabilities and no per-token mask.
A block the ONNX pass skips (no stream point: the reason from
:func:`graphprune.analysis.streams.stream_point`) is skipped here too (``meta['graphprune_token_drop']['skipped']``); anything else is a
:class:`GraphpruneError` naming the block. The result is a ``GraphModule`` (the eval-mode
export graph); ``graphprune.torch.export`` of it writes ai.graphprune TokenSelect nodes.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import nn

from graphprune.errors import ConfigError, GraphpruneError
from graphprune.torch._export import export_program

aten = torch.ops.aten
_TARGETS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def _schedule(model, config: dict):
    import pydantic

    from graphprune.passes.base import PassContext
    from graphprune.passes.token_drop import TokenDropConfig, TokenDropPass

    try:
        cfg = TokenDropConfig.model_validate(config)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"token_drop: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    if cfg.method != "cls_attention":
        raise ConfigError(f"token_drop (torch): method {cfg.method!r} is not available as an FX pass; use cls_attention")
    decided = TokenDropPass(cfg, PassContext()).schedule(model)
    if decided is None:
        raise GraphpruneError("token_drop (torch): no attention blocks found in the module's export")
    return cfg, decided


def _rows(cfg, protect: int, n: int) -> tuple[int, int]:
    """The ONNX pass's score rows (``score_rows``) as concrete ``[r0, r1)`` for ``n`` tokens."""
    from graphprune.passes.token_drop import score_rows

    (r0, r1), _ = score_rows(cfg.query, protect)
    return (n + r0 if r0 < 0 else r0), (n if r1 == 0 else r1)


def token_drop(module: nn.Module, example_inputs: tuple, *, dynamic_axes: dict[int, str] | None = None,
               **config) -> torch.fx.GraphModule:
    """``module`` as a GraphModule with TokenSelect ops at the ONNX pass's places (see module docstring).

    ``config`` takes the ``token_drop`` pass's keys (``keep_ratio=0.7``, ``layers=[...]``, ...). The module is
    deep-copied; the example inputs fix the token count (it must be static, as for the ONNX pass).
    """
    from graphprune.analysis.attention import NoMatch
    from graphprune.analysis.streams import stream_point
    from graphprune.ops.token_select import kept_count
    args = tuple(example_inputs)
    program = export_program(copy.deepcopy(module), args, dynamic_axes=dynamic_axes)
    cfg, (blocks, protect, layers, ratios, _) = _schedule(program.model, config)
    gm = program.exported_program.module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    n0 = blocks[0].tokens
    if n0 is None:
        raise GraphpruneError("token_drop (torch): the token count is not static in the export")
    n_cur = n0
    cuts: list[tuple[torch.fx.Node, int]] = []
    skipped: list[str] = []
    for layer, ratio in zip(layers, ratios):
        blk = blocks[layer]
        if blk.probs is None:
            raise GraphpruneError(f"token_drop (torch): block {layer}: fused attention exposes no probabilities")
        if any(b.mask is not None and b.mask.shape is not None and len(b.mask.shape) > 0 and b.mask.shape[-1] != 1
               for b in blocks[layer + 1:]):
            raise GraphpruneError(f"token_drop (torch): block {layer}: a later block has a per-token attention mask")
        point = stream_point(blocks, blk, cfg.placement)
        if isinstance(point, NoMatch):  # as the ONNX pass: that block is left alone, with the reason
            skipped.append(f"block {layer}: {point.reason}")
            continue
        stream, _ = point
        if stream.name not in nodes or blk.probs.name not in nodes:
            raise GraphpruneError(f"token_drop (torch): block {layer}: value {stream.name!r} or {blk.probs.name!r} "
                                  "is not a node of the traced module")
        k = kept_count(n_cur, protect, keep_ratio=ratio)
        x, probs = nodes[stream.name], nodes[blk.probs.name]
        users = list(x.users)
        r0, r1 = _rows(cfg, protect, n_cur)
        with gm.graph.inserting_after(x):
            rows = gm.graph.call_function(aten.slice.Tensor, (probs, 2, r0, r1))
        with gm.graph.inserting_after(rows):
            score = gm.graph.call_function(aten.mean.dim, (rows, [1, 2]))
        with gm.graph.inserting_after(score):
            sel = gm.graph.call_function(torch.ops.graphprune.token_select.default, (x, score),
                                         {"k": k, "protect": protect, "keep_order": cfg.keep_order,
                                          "fuse_rest": cfg.fuse_rest})
        with gm.graph.inserting_after(sel):
            y = gm.graph.call_function(operator.getitem, (sel, 0))
        for u in users:
            u.replace_input_with(x, y)
        n_cur = protect + k + int(cfg.fuse_rest)
        cuts.append((y, n_cur))
    _retarget(gm, args, n0, cuts)
    gm.graph.lint()
    gm.recompile()
    gm.meta["graphprune_token_drop"] = {"layers": layers, "protect": protect,
                                        "tokens": [n0] + [n for _, n in cuts], "skipped": skipped}
    return gm


def _retarget(gm: torch.fx.GraphModule, args: tuple, n0: int, cuts: list[tuple[torch.fx.Node, int]]) -> None:
    """Run the graph once; a view/reshape/expand target holding the traced count ``n0`` that does not fit its input
    gets the count in effect (that of the last reduction before it in graph order)."""
    after = {node: n for node, n in cuts}
    n_cur = n0
    interp = torch.fx.Interpreter(gm)
    env = interp.env
    placeholders = iter(args)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            if node.op == "placeholder":
                env[node] = next(placeholders)
                continue
            if node.op == "call_function" and node.target in _TARGETS and n_cur != n0:
                src = env[node.args[0]]
                shape = list(node.args[1])
                concrete = [int(env[s]) if isinstance(s, torch.fx.Node) else int(s) for s in shape]
                if not _fits(node.target, src, concrete):
                    new = [n_cur if (not isinstance(s, torch.fx.Node) and s == n0) else s for s in shape]
                    concrete = [int(env[s]) if isinstance(s, torch.fx.Node) else int(s) for s in new]
                    if not _fits(node.target, src, concrete):
                        raise GraphpruneError(f"token_drop (torch): cannot retarget {node.name} {concrete} to input "
                                              f"{list(src.shape)}")
                    node.args = (node.args[0], new, *node.args[2:])
            a, kw = interp.fetch_args_kwargs_from_env(node)
            env[node] = getattr(interp, node.op)(node.target, a, kw)
            if node in after:
                n_cur = after[node]


def _fits(target, src: torch.Tensor, shape: list) -> bool:
    ints = shape
    if target is aten.expand.default:
        pad = [1] * (len(ints) - src.dim()) + list(src.shape)
        return all(s == -1 or d == s or d == 1 for s, d in zip(ints, pad))
    known = [s for s in ints if s != -1]
    total = 1
    for s in known:
        total *= s
    return total == src.numel() if len(known) == len(ints) else (total and src.numel() % total == 0)
