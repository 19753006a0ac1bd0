"""Example inputs generated from a model's input specs (for verification, calibration and benchmarks).

  * integer inputs named like ``*mask*``: ones, with the tail of every other row zeroed (padding);
  * ``token_type*`` ids: zeros; ``position*`` ids: 0..N-1;
  * other integer inputs (token ids): uniform in [0, V) where V is the row count of the embedding table the
    input indexes (a ``Gather`` on an initializer), else [0, 100);
  * bool inputs: all True; float inputs: standard normal (images for 4-D NCHW inputs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.analysis.shapes import input_dims


def _vocab(value: ir.Value) -> int:
    for user, idx in value.uses():
        if user.op_type == "Gather" and idx == 1 and user.inputs[0] is not None and user.inputs[0].const_value is not None:
            return int(user.inputs[0].const_value.shape[0])
        if user.op_type in ("Cast", "Unsqueeze", "Reshape", "Flatten"):
            v = _vocab(user.outputs[0])
            if v:
                return v
    return 0


def example_inputs(model: ir.Model, batch: int = 1, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """One feed dict for ``model`` with the given batch size."""
    rng = np.random.default_rng(seed)
    shapes = input_dims(model, batch=batch, dims=dims)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        if value.name not in shapes:
            continue
        shape = shapes[value.name]
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        name = value.name.lower()
        if np.issubdtype(dtype, np.integer):
            if "mask" in name:
                arr = np.ones(shape, dtype=dtype)
                if len(shape) >= 2 and shape[-1] > 2:
                    arr[1::2, ..., shape[-1] * 3 // 4 :] = 0
            elif "token_type" in name:
                arr = np.zeros(shape, dtype=dtype)
            elif "position" in name and shape:
                arr = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            else:
                high = _vocab(value) or 100
                arr = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            arr = np.ones(shape, dtype=bool)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feeds[value.name] = arr
    return feeds


def unbatched_inputs(model: ir.Model) -> list[str] | None:
    """Inputs that cannot share a batch axis 0, as ``name [shape]``: every input's axis 0 is static and the sizes
    differ (Qwen2-VL's ``pixel_values [patches, C·T·p·p]`` beside ``input_ids [1, S]``); else ``None``."""
    inits = model.graph.initializers
    shown, sizes = [], set()
    for value in model.graph.inputs:
        if value.name in inits:
            continue
        if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[0], int):
            return None
        sizes.add(value.shape[0])
        shown.append(f"{value.name} {list(value.shape)}")
    return shown if len(sizes) > 1 else None


def static_batch(model: ir.Model) -> int | None:
    """The batch size every input fixes on its axis 0, or ``None`` when the batch is free (or not axis 0)."""
    inits = model.graph.initializers
    sizes = set()
    for value in model.graph.inputs:
        if value.name in inits:
            continue
        if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[0], int):
            return None
        sizes.add(value.shape[0])
    return sizes.pop() if len(sizes) == 1 else None
