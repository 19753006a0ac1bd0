"""Shape inference. ``infer_shapes`` updates the model's value shapes (onnx-ir pass); ``concrete_shapes`` returns
the shapes every value would have for fixed input sizes, leaving the model untouched."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

try:  # onnx-ir's helper that strips large initializers before calling the C++ API (2 GB limit)
    from onnx_ir.passes.common._c_api_utils import call_onnx_api
except ImportError:  # pragma: no cover - older/newer onnx-ir layouts
    def call_onnx_api(func, model):  # type: ignore[no-redef]
        return func(ir.to_proto(model))


def infer_shapes(model: ir.Model) -> ir.Model:
    """Run ONNX shape inference (with data propagation) in place; a failure leaves shapes as they were."""
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return model


def input_dims(model: ir.Model, batch: int = 1, default_dim: int = 32, dims: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: symbolic axis 0 → ``batch``, other symbolic axes → ``dims[name]`` or ``default_dim``."""
    dims = dims or {}
    out: dict[str, tuple[int, ...]] = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        shape = value.shape if value.shape is not None else ir.Shape([])
        concrete = []
        for axis, d in enumerate(shape):
            if isinstance(d, int):
                concrete.append(d)
            elif str(d) in dims:
                concrete.append(dims[str(d)])
            else:
                concrete.append(batch if axis == 0 else default_dim)
        out[value.name] = tuple(concrete)
    return out


def concrete_shapes(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Shape of every value for the given input shapes (dims unknown to inference stay symbolic strings)."""
    saved = [(v, v.shape) for v in model.graph.inputs]
    try:
        for v in model.graph.inputs:
            if v.name in shapes:
                v.shape = ir.Shape(shapes[v.name])
        proto = call_onnx_api(
            lambda p: onnx.shape_inference.infer_shapes(p, check_type=False, strict_mode=False, data_prop=True), model
        )
    finally:
        for v, s in saved:
            v.shape = s
    result: dict[str, tuple] = {}
    g = proto.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            result[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    for init in g.initializer:
        result[init.name] = tuple(init.dims)
    for name, value in model.graph.initializers.items():
        if value.const_value is not None:
            result.setdefault(name, tuple(value.const_value.shape))
    return result
