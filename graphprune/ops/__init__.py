"""``ai.graphprune`` ops: one :class:`~graphprune.ops._base.OpDef` per op, one module per op.

Every lowering comes from the definition: the numpy reference, the ONNX function body, the FLOPs rule, the
torch custom op (``graphprune.torch``) and the TensorRT plugin descriptor. ``REGISTRY`` maps op type → definition.
"""

from __future__ import annotations

from graphprune.ops._base import (
    DOMAIN,
    DOMAIN_VERSION,
    FLOAT_TYPES,
    INT64_MAX,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    REGISTRY,
    Attr,
    Body,
    OpDef,
    PluginDescriptor,
    Port,
    add_function,
    add_node_function,
    op_def,
    overload_key,
)
from graphprune.ops._dims import Dim, DimOps, TorchDimOps, bind, evaluate
from graphprune.ops.diversity_select import DiversitySelect
from graphprune.ops.sparse_attention import SparseAttention
from graphprune.ops.token_merge import TokenMerge
from graphprune.ops.token_select import TokenSelect

__all__ = [
    "DOMAIN", "DOMAIN_VERSION", "FLOAT_TYPES", "INT64_MAX", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "REGISTRY", "Attr",
    "Body", "Dim", "DimOps", "DiversitySelect", "OpDef", "PluginDescriptor", "Port", "SparseAttention", "TokenMerge",
    "TokenSelect", "TorchDimOps", "add_function", "add_node_function", "bind", "evaluate", "op_def", "overload_key",
]
