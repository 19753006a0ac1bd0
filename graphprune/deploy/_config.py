"""Triton model configuration (``config.pbtxt``) generated from an ONNX model's inputs and outputs.

What is generated, per backend:
  1. ``onnxruntime``: ``backend: "onnxruntime"``, ``default_model_filename: "model.onnx"``; threads as the ORT
     backend's ``intra_op_thread_count`` / ``inter_op_thread_count`` parameters, the graph optimisation level as
     ``optimization { graph { level } }`` (the ORT backend's numbering: -1 basic, 1 extended, 2 disabled; left
     out for ``all``, its default);
  2. ``python``: ``backend: "python"``; graphprune's ``model.py`` reads ``model_file``, ``providers``,
     ``intra_op_threads``, ``inter_op_threads`` and ``graph_optimization_level`` from ``parameters``;
  3. ``tensorrt``: ``platform: "tensorrt_plan"``, ``default_model_filename: "model.plan"``, on GPU.

Inputs and outputs keep the ONNX names and map the ONNX element type to Triton's (``FLOAT`` → ``TYPE_FP32``).
With ``max_batch_size > 0`` the dims leave out axis 0, which Triton treats as the batch; every other dynamic axis
is ``-1`` (a tensor left with no dims is written ``dims: [1]`` with ``reshape { shape: [] }``, Triton's
form for it). A model is batchable only when every input and output has a dynamic axis 0 and the inputs share one
name for it (outputs may leave it unnamed); otherwise ``max_batch_size`` is 0, the dims are the full shapes, and
:func:`batch_axis` says why. ``dynamic_batching`` is written only for a batchable model.

The text is rendered from a plain dict (field names as in Triton's ``ModelConfig`` protobuf); enum values are
:class:`Enum` strings so that they are written bare.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from graphprune.errors import GraphpruneError

BACKENDS = ("onnxruntime", "python", "tensorrt")
GRAPH_LEVELS = ("disable", "basic", "extended", "all")
#: The ORT backend's ``optimization.graph.level`` for each level (its README: -1 basic, 1 extended, 2 disabled).
_ORT_BACKEND_LEVEL = {"disable": 2, "basic": -1, "extended": 1}

_TRITON_TYPES = {
    ir.DataType.BOOL: "BOOL", ir.DataType.UINT8: "UINT8", ir.DataType.UINT16: "UINT16",
    ir.DataType.UINT32: "UINT32", ir.DataType.UINT64: "UINT64", ir.DataType.INT8: "INT8",
    ir.DataType.INT16: "INT16", ir.DataType.INT32: "INT32", ir.DataType.INT64: "INT64",
    ir.DataType.FLOAT16: "FP16", ir.DataType.FLOAT: "FP32", ir.DataType.DOUBLE: "FP64",
    ir.DataType.BFLOAT16: "BF16", ir.DataType.STRING: "BYTES",
}


class Enum(str):
    """A protobuf enum value: rendered without quotes (``TYPE_FP32``, ``KIND_CPU``)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output: ONNX name, element types, and shape (int, a dim name, or None if unknown)."""

    name: str
    onnx_dtype: str
    datatype: str  # Triton's wire name: FP32, INT64, ...
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "onnx_dtype": self.onnx_dtype, "datatype": self.datatype,
                "shape": list(self.shape)}

    def dims(self, batched: bool) -> list[int]:
        """Triton dims: -1 for a dynamic axis; axis 0 left out when ``batched``."""
        shape = self.shape[1:] if batched else self.shape
        return [d if isinstance(d, int) else -1 for d in shape]


def _spec(value: ir.Value, kind: str) -> TensorSpec:
    if value.dtype is None:
        raise GraphpruneError(f"{kind} {value.name!r} has no element type; Triton needs one")
    datatype = _TRITON_TYPES.get(value.dtype)
    if datatype is None:
        raise GraphpruneError(f"{kind} {value.name!r} has element type {value.dtype.name}, which Triton cannot serve")
    if value.shape is None:
        raise GraphpruneError(f"{kind} {value.name!r} has no shape; Triton needs its rank")
    dims = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
    return TensorSpec(value.name, value.dtype.name, datatype, dims)


def io_specs(model: ir.Model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's graph inputs (initializers excluded) and outputs as :class:`TensorSpec` lists."""
    inputs = [_spec(v, "input") for v in model.graph.inputs if v.name not in model.graph.initializers]
    outputs = [_spec(v, "output") for v in model.graph.outputs]
    return inputs, outputs


def batch_axis(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str | None:
    """None when axis 0 of every input and output can be Triton's batch axis, else the reason it cannot."""
    if not inputs:
        return "the model has no inputs"
    names = set()
    for kind, specs in (("input", inputs), ("output", outputs)):
        for s in specs:
            if not s.shape:
                return f"{kind} {s.name!r} is a scalar (no axis 0 to batch on)"
            first = s.shape[0]
            if isinstance(first, int):
                return f"axis 0 of {kind} {s.name!r} is fixed at {first}, so it is not a batch axis"
            if kind == "input":
                if first is None:
                    return f"axis 0 of input {s.name!r} is dynamic but unnamed; cannot tell it is the batch"
                names.add(first)
            elif first is not None and names and first not in names:
                return (f"axis 0 of output {s.name!r} is {first!r}, not the inputs' {sorted(names)[0]!r}; "
                        "it is not the batch axis")
    if len(names) > 1:
        return f"the inputs' axis 0 have different names ({', '.join(sorted(names))}), so it is not one batch axis"
    return None


def _parameters(values: Mapping[str, Any]) -> list[dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def model_config(
    name: str,
    backend: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int,
    instances: int = 1,
    device: str = "cpu",
    queue_delay_us: int = 500,
    threads: int = 0,
    graph_level: str = "all",
) -> dict[str, Any]:
    """The ``ModelConfig`` fields for one model, as a dict (render it with :func:`render_pbtxt`)."""
    if backend not in BACKENDS:
        raise GraphpruneError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if graph_level not in GRAPH_LEVELS:
        raise GraphpruneError(f"unknown graph optimisation level {graph_level!r} (choose from {', '.join(GRAPH_LEVELS)})")
    batched = max_batch_size > 0
    cfg: dict[str, Any] = {"name": name}
    if backend == "onnxruntime":
        cfg |= {"backend": "onnxruntime", "default_model_filename": "model.onnx"}
    elif backend == "python":
        cfg |= {"backend": "python"}
    else:
        cfg |= {"platform": "tensorrt_plan", "default_model_filename": "model.plan"}
    cfg["max_batch_size"] = max_batch_size

    def tensors(specs: Sequence[TensorSpec]) -> list[dict]:
        out = []
        for s in specs:
            t = {"name": s.name, "data_type": Enum(f"TYPE_{'STRING' if s.datatype == 'BYTES' else s.datatype}"),
                 "dims": s.dims(batched)}
            if not t["dims"]:  # Triton needs at least one dim: a [batch] or scalar tensor is [1] reshaped to []
                t |= {"dims": [1], "reshape": {"shape": []}}
            out.append(t)
        return out

    cfg["input"] = tensors(inputs)
    cfg["output"] = tensors(outputs)
    if batched:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": queue_delay_us}
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    cfg["instance_group"] = [{"count": instances, "kind": Enum(kind)}]
    if backend == "onnxruntime":
        if graph_level != "all":
            cfg["optimization"] = {"graph": {"level": _ORT_BACKEND_LEVEL[graph_level]}}
        if threads:
            cfg["parameters"] = _parameters({"intra_op_thread_count": threads, "inter_op_thread_count": 1})
    elif backend == "python":
        providers = "cuda,cpu" if device == "gpu" else "cpu"
        cfg["parameters"] = _parameters({"model_file": "model.onnx", "providers": providers,
                                         "intra_op_threads": threads, "inter_op_threads": 1,
                                         "graph_optimization_level": graph_level})
    return cfg


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a double-quoted string with the escapes text format also reads
    raise TypeError(f"cannot render {type(value).__name__} in a model config")


def _render(fields: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in fields.items():
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", *_render(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                lines += [f"{pad}  {{", *_render(item, indent + 2), f"{pad}  }}{',' if i < len(value) - 1 else ''}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def render_pbtxt(config: Mapping[str, Any], comments: Sequence[str] = ()) -> str:
    """``config`` in protobuf text format, with ``comments`` as ``#`` lines at the top."""
    head = [f"# {line}" for c in comments for line in c.splitlines()]
    return "\n".join([*head, *_render(config, 0)]) + "\n"
