"""Checks of user data against a model's graph inputs (names, dtype kinds, ranks, static dims).

The inputs a feed must provide are the graph inputs that are not initializers. An array (sample axis first) fits
an input when its dtype has the same kind (float / int / bool; the array is then cast to the input's dtype), its
rank equals the input's rank and every static dim after the batch axis matches. Each failure raises ``DataError``
with one line naming where the data came from, the input, what was found and what the model expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphprune.errors import DataError


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph inputs a feed must provide (those that are not initializers)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def dtype_kind(dtype: np.dtype) -> str:
    """``"float"``, ``"int"``, ``"bool"`` or the numpy kind letter for anything else."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name):  # ml_dtypes: bfloat16, float8*
        return "float"
    return dtype.kind


def shape_text(shape: ir.Shape | Sequence | None) -> str:
    """``[batch, 3, 224, 224]``: static dims as numbers, symbolic ones by name (``?`` when unnamed)."""
    if shape is None:
        return "[?]"
    return "[" + ", ".join(_dim_text(d) for d in shape) + "]"


def _dim_text(dim) -> str:
    if isinstance(dim, int):
        return str(dim)
    name = getattr(dim, "value", dim)
    return str(name) if name is not None and str(name) else "?"


def check_names(where: str, names: Sequence[str], model: ir.Model, what: str = "keys") -> None:
    """Refuse data whose names are not exactly the model's inputs; the message names both sides."""
    expected = [v.name for v in model_inputs(model)]
    if set(names) != set(expected):
        raise DataError(f"{where}: {what} {list(names)} do not match the model inputs {expected}")


def fit_array(where: str, value: ir.Value, arr: np.ndarray) -> np.ndarray:
    """Check ``arr`` (sample axis first) against the model input ``value``; return it cast to the input's dtype."""
    arr = np.asarray(arr)
    if value.dtype is not None:
        want = np.dtype(value.dtype.numpy())
        got_kind, want_kind = dtype_kind(arr.dtype), dtype_kind(want)
        if got_kind != want_kind and want_kind in ("float", "int", "bool"):
            raise DataError(
                f"{where}: input {value.name!r} has dtype {arr.dtype} ({got_kind}); "
                f"the model expects {want} ({want_kind})"
            )
        if arr.dtype != want and want_kind in ("float", "int", "bool"):
            arr = arr.astype(want)
    if value.shape is not None:
        dims = list(value.shape)
        if arr.ndim != len(dims):
            raise DataError(
                f"{where}: input {value.name!r} has rank {arr.ndim} (shape {list(arr.shape)}, sample axis first); "
                f"the model expects rank {len(dims)} {shape_text(dims)}"
            )
        for axis, d in enumerate(dims[1:], start=1):
            if isinstance(d, int) and arr.shape[axis] != d:
                raise DataError(
                    f"{where}: input {value.name!r} axis {axis} has size {arr.shape[axis]}; "
                    f"the model expects {d} {shape_text(dims)}"
                )
    return arr
