"""Shapes at fixed input sizes. ``concrete_shapes`` returns the shapes every value would have for given input
shapes; ``input_dims`` chooses those input shapes. Both leave the model untouched (shape inference that writes
shapes back into a model is ``graphprune._ir.infer_shapes``)."""

from __future__ import annotations

import onnx
import onnx_ir as ir

try:  # onnx-ir's helper that strips large initializers before calling the C++ API (2 GB limit)
    from onnx_ir.passes.common._c_api_utils import call_onnx_api
except ImportError:  # pragma: no cover - older/newer onnx-ir layouts
    def call_onnx_api(func, model):  # type: ignore[no-redef]
        return func(ir.to_proto(model))


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
    """Shape of every value for the given input shapes (dims unknown to inference stay symbolic strings).

    Inference runs on a clone (``ir.Model.clone``: the weights are shared, not copied) whose inputs carry
    ``shapes``, so ``model`` is not touched at any time.
    """
    clone = model.clone()
    for v in clone.graph.inputs:
        if v.name in shapes:
            v.shape = ir.Shape(shapes[v.name])
    proto = call_onnx_api(
        lambda p: onnx.shape_inference.infer_shapes(p, check_type=False, strict_mode=False, data_prop=True), clone
    )
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
