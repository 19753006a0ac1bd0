"""Facts about a graph. Nothing here mutates a model or runs one (running belongs to ``graphprune.backends``)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from graphprune.analysis.attention import AttentionBlock, NoMatch, find_attention_blocks, match_attention
from graphprune.analysis.channels import find_channel_groups
from graphprune.analysis.flops import FlopsReport, count_flops
from graphprune.analysis.vision_language import VisionLanguage, find_vision_language


def _value_info(v: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
    return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": shape}


def summarize(model: ir.Model, flops: FlopsReport | None = None, explain: bool = False) -> dict[str, Any]:
    """What ``graphprune inspect --json`` prints: inputs, outputs, opset, flops, params, attention_blocks,
    channel_groups and vision_language (``null`` unless the model is a vision-language model: see
    :mod:`graphprune.analysis.vision_language`). With ``explain``, also ``explain``: ``unmatched_attention`` (every Softmax / Attention node that
    did not become an attention block: node, op, reason) and ``unprunable_groups`` (every channel group that is not
    prunable: id, kind, size, members, reason) — the same reasons the passes give when they skip.

    ``flops`` is the FLOPs report to show; by default the static count (``count_flops``). Pass
    ``graphprune.backends.onnxruntime.measure_flops(model)`` to have the shapes static inference misses measured.
    Nodes left uncounted are reported as ``flops_unknown_nodes``.
    """
    fr = flops if flops is not None else count_flops(model)
    blocks, misses = match_attention(model)
    groups = [g.describe() for g in find_channel_groups(model)]
    vl = find_vision_language(model, blocks)
    info: dict[str, Any] = {
        "inputs": [_value_info(v) for v in model.graph.inputs if v.name not in model.graph.initializers],
        "outputs": [_value_info(v) for v in model.graph.outputs],
        "opset": model.opset_imports.get("", model.graph.opset_imports.get("", None)),
        "opset_imports": dict(model.opset_imports),
        "nodes": sum(1 for _ in model.graph),
        "flops": fr.flops,
        "params": fr.params,
        "attention_blocks": [b.describe() for b in blocks],
        "channel_groups": groups,
        "vision_language": vl.describe() if vl is not None else None,
    }
    if explain:
        info["explain"] = {"unmatched_attention": [m.describe() for m in misses],
                           "unprunable_groups": [{k: g[k] for k in ("id", "kind", "size", "members", "reason")}
                                                 for g in groups if not g["prunable"]]}
    if fr.unknown:
        info["flops_unknown_nodes"] = len(fr.unknown)
    return info


__all__ = ["AttentionBlock", "FlopsReport", "NoMatch", "VisionLanguage", "count_flops", "find_attention_blocks",
           "find_vision_language", "match_attention", "summarize"]
