"""Facts about a graph. Nothing here mutates a model."""

from __future__ import annotations

import importlib
from typing import Any

import onnx_ir as ir

from graphprune.analysis.attention import AttentionBlock, find_attention_blocks
from graphprune.analysis.flops import FlopsReport, count_flops


def _value_info(v: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
    return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": shape}


def summarize(model: ir.Model) -> dict[str, Any]:
    """What ``graphprune inspect --json`` prints: inputs, outputs, opset, flops, params, attention_blocks,
    and channel_groups (when the channel analysis is available)."""
    fr = count_flops(model)
    info: dict[str, Any] = {
        "inputs": [_value_info(v) for v in model.graph.inputs if v.name not in model.graph.initializers],
        "outputs": [_value_info(v) for v in model.graph.outputs],
        "opset": model.opset_imports.get("", model.graph.opset_imports.get("", None)),
        "opset_imports": dict(model.opset_imports),
        "nodes": sum(1 for _ in model.graph),
        "flops": fr.flops,
        "params": fr.params,
        "attention_blocks": [b.describe() for b in find_attention_blocks(model)],
    }
    try:
        channels = importlib.import_module("graphprune.analysis.channels")
    except ModuleNotFoundError as e:
        if e.name != "graphprune.analysis.channels":
            raise
    else:
        info["channel_groups"] = [g.describe() for g in channels.find_channel_groups(model)]
    return info


__all__ = ["AttentionBlock", "FlopsReport", "count_flops", "find_attention_blocks", "summarize"]
