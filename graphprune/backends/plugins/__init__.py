"""TensorRT Python plugins (``tensorrt.plugin``) for the ``ai.graphprune`` ops, generated from the op definitions.

For each op in ``graphprune.ops.REGISTRY``, :func:`plugin_specs` derives from ``OpDef.plugin_descriptor()``:

  * the plugin id ``graphprune::<Op>`` (namespace without dots; the lowering writes it on every node);
  * the attribute fields with TensorRT types (int, float, string, int32 arrays) and defaults;
  * the output shapes: the op's own shape expressions evaluated with :class:`TrtDimOps` over ``trtp`` shape
    expressions (``+ - * //``, ``trtp.min``, ``trtp.max``);
  * the autotune combinations: every float port FP32|FP16, index ports INT64, linear format.

:func:`register_all` turns them into ``@trtp.register`` / ``@trtp.autotune`` / ``@trtp.impl`` functions. The JIT
``impl`` wraps TensorRT's buffers as torch tensors on its stream and calls the Triton kernel
(``graphprune.kernels``) where one exists, else the op's torch implementation (``OpDef.compute`` with the torch
namespace, the same code as the oracle).

Not done: ``@trtp.aot_impl``. The kernels compile to PTX (:mod:`graphprune.kernels.aot`, tested), but TensorRT's
AOT launch passes only the plugin's tensors and integer scalars, while the kernels take host-built tables (the
SparseAttention tile table, TokenSelect's rank scratch); ``register_all(aot=True)`` says so.
Plugins have a fixed number of inputs: each is registered for its required inputs, so a node that also passes
an optional input (a SparseAttention mask, TokenMerge sizes) falls back to the body and :func:`build
<graphprune.backends.tensorrt.build>`'s post-parse check reports it.

Importing this module never needs TensorRT; :func:`register_all` raises a one-line error naming what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from graphprune.errors import GraphpruneError
from graphprune.ops import REGISTRY, OpDef
from graphprune.ops._dims import DimOps

#: Ops with a Triton kernel launcher (module, function); the others run OpDef.compute with torch in the JIT impl.
KERNELS = {"SparseAttention": ("graphprune.kernels.sparse_attention", "sparse_attention"),
           "TokenSelect": ("graphprune.kernels.token_select", "token_select")}
_TRT_TYPES = {"T": "FP32|FP16", "int64": "INT64", "any": "INT64|INT32|FP32|FP16"}


class TrtDimOps(DimOps):
    """Combines ``trtp`` shape expressions: Python operators, ``trtp.min`` / ``trtp.max``."""

    def __init__(self, trtp) -> None:
        self.trtp = trtp

    def combine(self, op: str, a, b):
        if op == "min":
            return self.trtp.min(a, b)
        if op == "max":
            return self.trtp.max(a, b)
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "//": lambda: a // b}[op]()


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """What ``@trtp.register`` is given for one op (all from the op definition)."""

    op: type[OpDef]
    id: str
    fields: tuple[tuple[str, str, Any], ...]
    inputs: tuple[str, ...]  # registered (required) inputs
    outputs: tuple[str, ...]
    autotune: tuple[str, str]  # (type combination over inputs then outputs, format)
    kernel: str  # "triton" or "torch"

    def output_shapes(self, input_dims, attrs: dict, ops: DimOps):
        """The outputs' dims for the registered inputs' dims, in the representation of ``ops``."""
        full = list(input_dims) + [None] * (len(self.op.inputs) - len(input_dims))
        return self.op.plugin_descriptor().shape(full, attrs, ops)


def plugin_specs() -> list[PluginSpec]:
    specs = []
    for name, op in sorted(REGISTRY.items()):
        d = op.plugin_descriptor()
        required = [(n, t) for n, t, optional in d.inputs if not optional]
        types = [_TRT_TYPES[t] for _, t in required] + [_TRT_TYPES[t] for _, t in d.outputs]
        specs.append(PluginSpec(op, f"{d.namespace}::{d.name}", d.fields, tuple(n for n, _ in required),
                                tuple(n for n, _ in d.outputs), (", ".join(types), "LINEAR"),
                                "triton" if name in KERNELS else "torch"))
    return specs


def _require():
    try:
        trtp = importlib.import_module("tensorrt.plugin")
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:
        raise GraphpruneError(f"graphprune's TensorRT plugins need TensorRT >= 10.7 with tensorrt.plugin "
                              f"(pip install graphprune[tensorrt] on a CUDA machine); import failed: {e}") from None
    try:
        importlib.import_module("torch")
        importlib.import_module("triton")
    except ImportError as e:
        raise GraphpruneError(f"graphprune's TensorRT plugins launch Triton kernels through torch: {e}") from None
    return trt, trtp


def _field_annotation(trt_type: str):
    import numpy as np

    return {"int": int, "float": float, "string": str, "int32[]": np.ndarray}[trt_type]


def _signature(spec: PluginSpec, tensor_type, extra: list[inspect.Parameter]) -> inspect.Signature:
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=tensor_type) for n in spec.inputs]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_field_annotation(t),
                                 default=default if default is not None else inspect.Parameter.empty)
               for n, t, default in spec.fields]
    return inspect.Signature(params + extra)


def _with_signature(fn, sig: inspect.Signature, ret):
    fn.__signature__ = sig.replace(return_annotation=ret)
    fn.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()} | {"return": ret}
    return fn


def _attrs(spec: PluginSpec, kw: dict) -> dict:
    out = {}
    for name, trt_type, _ in spec.fields:
        v = kw.get(name)
        out[name] = [int(x) for x in v] if trt_type == "int32[]" and v is not None else v
    return spec.op.normalize(**{k: v for k, v in out.items() if v is not None})


def _launch(spec: PluginSpec, tensors: list, attrs: dict):
    import torch

    if spec.kernel == "triton":
        module, fn = KERNELS[spec.op.name]
        outs = getattr(importlib.import_module(module), fn)(*tensors, **attrs)
        return outs if isinstance(outs, tuple) else (outs,)
    from array_api_compat import torch as xp

    with torch.no_grad():
        return spec.op.compute(xp, *tensors, **attrs)


def register_all(aot: bool = False) -> list[str]:
    """Register every op's plugin with TensorRT (once per process); returns the plugin ids."""
    trt, trtp = _require()
    if aot:
        raise GraphpruneError("--aot: ahead-of-time plugins are not implemented yet (the kernels compile to PTX, "
                              "see graphprune.kernels.aot, but need host-built tables TensorRT's AOT launch cannot "
                              "pass); build without --aot")
    ids = []
    for spec in plugin_specs():
        if spec.id in _REGISTERED:
            ids.append(spec.id)
            continue
        _register_one(trt, trtp, spec)
        _REGISTERED.add(spec.id)
        ids.append(spec.id)
    return ids


_REGISTERED: set[str] = set()


def _register_one(trt, trtp, spec: PluginSpec) -> None:
    import torch

    n_out = len(spec.outputs)
    float_out = [p.dtype == "T" for p in spec.op.outputs]

    def describe(*args, **kw):
        bound = _signature(spec, trtp.TensorDesc, []).bind(*args, **kw)
        bound.apply_defaults()
        descs = [bound.arguments[n] for n in spec.inputs]
        attrs = _attrs(spec, bound.arguments)
        dims = [list(d.shape_expr) for d in descs]
        shapes = spec.output_shapes(dims, attrs, TrtDimOps(trtp))
        outs = []
        for shape, is_float in zip(shapes, float_out):
            o = descs[0].like()
            o.shape_expr = trtp.ShapeExprs(len(shape))
            for i, d in enumerate(shape):
                o.shape_expr[i] = d
            o.dtype = descs[0].dtype if is_float else trt.int64
            outs.append(o)
        return tuple(outs)

    trtp.register(spec.id)(_with_signature(describe, _signature(spec, trtp.TensorDesc, []),
                                           tuple[(trtp.TensorDesc,) * n_out]))

    def autotune(*args, **kw):
        return [trtp.AutoTuneCombination(*spec.autotune)]

    out_param = inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  annotation=tuple[(trtp.TensorDesc,) * n_out])
    trtp.autotune(spec.id)(_with_signature(autotune, _signature(spec, trtp.TensorDesc, [out_param]),
                                           list[trtp.AutoTuneCombination]))

    def impl(*args, **kw):
        sig = _signature(spec, trtp.Tensor, [
            inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
        bound = sig.bind(*args, **kw)
        attrs = _attrs(spec, bound.arguments)
        tensors = [torch.as_tensor(bound.arguments[n], device="cuda") for n in spec.inputs]
        with torch.cuda.stream(torch.cuda.ExternalStream(bound.arguments["stream"])):
            results = _launch(spec, tensors, attrs)
            for dst, src in zip(bound.arguments["outputs"], results):
                torch.as_tensor(dst, device="cuda").copy_(src)

    extra = [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               annotation=tuple[(trtp.Tensor,) * n_out]),
             inspect.Parameter("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    trtp.impl(spec.id)(_with_signature(impl, _signature(spec, trtp.Tensor, extra), None))
