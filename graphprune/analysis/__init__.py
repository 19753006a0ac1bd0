"""Facts about a graph. Nothing here mutates a model or runs one (running belongs to ``graphprune.backends``)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from graphprune.analysis.attention import AttentionBlock, find_attention_blocks
from graphprune.analysis.channels import find_channel_groups
from graphprune.analysis.flops import FlopsReport, count_flops


def _value_info(v: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
    return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": shape}


def summarize(model: ir.Model, flops: FlopsReport | None = None) -> dict[str, Any]:
    """What ``graphprune inspect --json`` prints: inputs, outputs, opset, flops, params, attention_blocks and
    channel_groups.

    ``flops`` is the FLOPs report to show; by default the static count (``count_flops``). Pass
    ``graphprune.backends.onnxruntime.count_flops(model)`` to have the shapes static inference misses measured.
    Nodes left uncounted are reported as ``flops_unknown_nodes``.
    """
    fr = flops if flops is not None else count_flops(model)
    info: dict[str, Any] = {
        "inputs": [_value_info(v) for v in model.graph.inputs if v.name not in model.graph.initializers],
        "outputs": [_value_info(v) for v in model.graph.outputs],
        "opset": model.opset_imports.get("", model.graph.opset_imports.get("", None)),
        "opset_imports": dict(model.opset_imports),
        "nodes": sum(1 for _ in model.graph),
        "flops": fr.flops,
        "params": fr.params,
        "attention_blocks": [b.describe() for b in find_attention_blocks(model)],
        "channel_groups": [g.describe() for g in find_channel_groups(model)],
    }
    if fr.unknown:
        info["flops_unknown_nodes"] = len(fr.unknown)
    return info


__all__ = ["AttentionBlock", "FlopsReport", "count_flops", "find_attention_blocks", "summarize"]
