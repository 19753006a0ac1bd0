"""TensorRT Python plugins (``tensorrt.plugin``) for the ``ai.graphprune`` ops, generated from the op definitions.

For each op in ``graphprune.ops.REGISTRY``, :func:`plugin_specs` derives from ``OpDef.plugin_descriptor()``:

  * the plugin id ``graphprune::<Op>`` (namespace without dots; the lowering writes it on every node);
  * the attribute fields with TensorRT types (int, float, string, int32 arrays) and defaults;
  * the inputs: **every** port of the op, optional ones included (see below);
  * the output shapes: the op's own shape expressions evaluated with :class:`TrtDimOps` over ``trtp`` shape
    expressions (``+ - * //``, ``trtp.min``, ``trtp.max``);
  * the autotune combinations: every float port FP32|FP16, index and layout ports INT64, linear format.

:func:`register_all` turns them into ``@trtp.register`` / ``@trtp.autotune`` / ``@trtp.impl`` functions, and with
``aot=True`` into ``@trtp.aot_impl`` ones instead of ``@trtp.impl`` for the ops in :data:`AOT_KERNELS`:

  * the JIT ``impl`` wraps TensorRT's buffers as torch tensors on its stream and calls the Triton launcher
    (``graphprune.kernels``) where one exists and takes the shape (:data:`KERNELS`), else the op's torch
    implementation (``OpDef.compute`` with the torch namespace, the same code as the oracle);
  * the ``aot_impl`` returns ``(kernel name, PTX, KernelLaunchParams, SymIntExprs)``: the op's one-launch kernel
    compiled by :func:`graphprune.kernels.aot.compile_ptx` for the build GPU, specialised to the node's
    attributes and dtype (TensorRT does not serialise attributes with an AOT plugin: they are compiled in),
    its grid, and the int32 dims the kernel reads. Every op has such a kernel: TokenMerge, DiversitySelect,
    TokenSelect, and SparseAttention in two table-free kernels, one for the static patterns (sliding window, 2-D
    neighborhood: each query tile's KV span computed in the kernel) and one for the routed patterns
    (``block_topk``: each query block routes itself in the kernel; ``block_layout``: each query block reads its
    layout row). :func:`aot_refusal` names any op or pattern without one: SparseAttention ``vertical_slash``,
    whose run-time selection (a top-k over N per head) runs before its attention kernel (the JIT ``impl`` does
    both).

**Optional inputs.** A plugin has a fixed list of inputs, and a Python plugin cannot be registered twice under one
name (``plugin_version`` is always 1), so there is one plugin per op taking every port. The lowering
(:func:`graphprune.backends.tensorrt.lower`) makes every node pass every port, by the rules in
:data:`OPTIONAL_INPUTS`: an absent TokenMerge ``size`` becomes ones ``[B, N, 1]`` (the op's own default: same
numbers); an absent SparseAttention ``attn_bias`` or ``layout`` becomes a one-element placeholder that the
function body ignores (``bias="none"``, a pattern other than ``block_layout``) and that the plugin drops before
launching (:func:`used_inputs`). An op whose optional input has no rule is refused by the lowering, by name.

Importing this module never needs TensorRT; :func:`register_all` raises a one-line error naming what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from graphprune.errors import GraphpruneError
from graphprune.ops import REGISTRY, DimOps, OpDef

#: Ops with a Triton kernel launcher: (module, launcher, the module's ``supported(n, attrs)`` or None when the
#: kernel takes every shape). The others, and shapes a kernel does not take, run OpDef.compute with torch.
KERNELS = {"SparseAttention": ("graphprune.kernels.sparse_attention", "sparse_attention", None),
           "TokenSelect": ("graphprune.kernels.token_select", "token_select", None),
           "TokenMerge": ("graphprune.kernels.token_merge", "token_merge", "supported"),
           "DiversitySelect": ("graphprune.kernels.diversity_select", "diversity_select", "supported")}
#: Ops whose whole computation is one kernel launch, hence an ``@trtp.aot_impl``.
AOT_KERNELS = ("DiversitySelect", "SparseAttention", "TokenMerge", "TokenSelect")
#: SparseAttention patterns of the table-free kernels: ``graphprune.kernels.sparse_attention.STATIC_PATTERNS``
#: (``sparse_attention_static``) then ``graphprune.kernels.sparse_attention_routed.ROUTED_PATTERNS``
#: (``sparse_attention_routed``); spelled here so that the check needs no triton.
AOT_STATIC_PATTERNS = ("sliding_window", "neighborhood_2d")
AOT_ROUTED_PATTERNS = ("block_topk", "block_layout")
AOT_PATTERNS = AOT_STATIC_PATTERNS + AOT_ROUTED_PATTERNS
#: How the lowering fills an absent optional input: ``("ones_tokens", 3)`` (ones [B, N, 1] like input 0, the op's
#: default) or ``("placeholder", rank)`` (a one-element tensor of that rank, unused under the condition in
#: :func:`used_inputs`).
OPTIONAL_INPUTS = {("TokenMerge", "size"): ("ones_tokens", 3),
                   ("SparseAttention", "attn_bias"): ("placeholder", 4),
                   ("SparseAttention", "layout"): ("placeholder", 3)}
_TRT_TYPES = {"T": "FP32|FP16", "int64": "INT64", "any": "INT64"}  # a layout input is cast to int64 by the lowering


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
    inputs: tuple[str, ...]  # registered inputs: every port, optional ones included
    outputs: tuple[str, ...]
    autotune: tuple[str, str]  # (type combination over inputs then outputs, format)
    kernel: str  # "triton" or "torch"

    def output_shapes(self, input_dims, attrs: dict, ops: DimOps):
        """The outputs' dims for the inputs' dims (trailing ones may be left out), in the representation of ``ops``.
        Placeholder inputs carry no dims of the op (their shape is not the port's)."""
        full = list(input_dims) + [None] * (len(self.op.inputs) - len(input_dims))
        for i, port in enumerate(self.op.inputs):
            if OPTIONAL_INPUTS.get((self.op.name, port.name), ("",))[0] == "placeholder":
                full[i] = None
        return self.op.plugin_descriptor().shape(full, attrs, ops)


def plugin_specs() -> list[PluginSpec]:
    specs = []
    for name, op in sorted(REGISTRY.items()):
        d = op.plugin_descriptor()
        types = [_TRT_TYPES[t] for _, t, _ in d.inputs] + [_TRT_TYPES[t] for _, t in d.outputs]
        specs.append(PluginSpec(op, f"{d.namespace}::{d.name}", d.fields, tuple(n for n, _, _ in d.inputs),
                                tuple(n for n, _ in d.outputs), (", ".join(types), "LINEAR"),
                                "triton" if name in KERNELS else "torch"))
    return specs


def fill_rule(op: str, port: str) -> tuple[str, int] | None:
    """How the lowering fills ``op``'s absent optional input ``port`` (see :data:`OPTIONAL_INPUTS`)."""
    return OPTIONAL_INPUTS.get((op, port))


def used_inputs(op: str, tensors: list, attrs: dict) -> list:
    """The plugin's tensors with the lowering's placeholders replaced by ``None`` (what the kernel is given)."""
    out = list(tensors)
    if op == "SparseAttention":
        if attrs["bias"] == "none":
            out[3] = None
        if attrs["pattern"] != "block_layout":
            out[4] = None
    return out


def aot_refusal(nodes) -> str | None:
    """Why ``--aot`` cannot build a model holding ``nodes`` (``(op type, normalized attributes)`` pairs), one line,
    or ``None``: an op (or SparseAttention pattern) without a one-launch kernel (``vertical_slash``: its selection
    runs before its kernel); shape limits are :func:`aot_plan`'s."""
    bad = set()
    for op, attrs in nodes:
        if op not in AOT_KERNELS:
            bad.add(op)
        elif op == "SparseAttention" and attrs["pattern"] not in AOT_PATTERNS:
            bad.add(f"SparseAttention {attrs['pattern']}")
    if not bad:
        return None
    return (f"--aot: {', '.join(sorted(bad))} {'has' if len(bad) == 1 else 'have'} no one-launch kernel "
            f"(TensorRT's AOT launch is one kernel taking tensors and int32 dims); build without --aot")


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


def kernel_for(op: str, n: int, attrs: dict):
    """The Triton launcher that runs ``op`` at ``n`` tokens, or ``None`` (no kernel, or one that does not take n)."""
    if op not in KERNELS:
        return None
    module, fn, supported = KERNELS[op]
    mod = importlib.import_module(module)
    if supported is not None and not getattr(mod, supported)(n, attrs):
        return None
    return getattr(mod, fn)


def _launch(spec: PluginSpec, tensors: list, attrs: dict):
    import torch

    tensors = used_inputs(spec.op.name, tensors, attrs)
    n = tensors[0].shape[2 if spec.op.name == "SparseAttention" else 1]
    fn = kernel_for(spec.op.name, n, attrs)
    if fn is not None:
        outs = fn(*tensors, **attrs)
        return outs if isinstance(outs, tuple) else (outs,)
    from array_api_compat import torch as xp

    with torch.no_grad():
        return spec.op.compute(xp, *tensors, **attrs)


def register_all(aot: bool = False) -> list[str]:
    """Register every op's plugin with TensorRT (once per process); returns the plugin ids."""
    trt, trtp = _require()
    ids = []
    for spec in plugin_specs():
        use_aot = aot and spec.op.name in AOT_KERNELS
        done = _REGISTERED.get(spec.id)
        if done is not None and done != use_aot:
            raise GraphpruneError(f"{spec.id} is already registered {'ahead of time' if done else 'with a JIT impl'} "
                                  f"in this process; build with and without --aot in separate processes")
        if done is None:
            _register_one(trt, trtp, spec, use_aot)
            _REGISTERED[spec.id] = use_aot
        ids.append(spec.id)
    return ids


#: plugin id -> registered ahead of time
_REGISTERED: dict[str, bool] = {}


def _register_one(trt, trtp, spec: PluginSpec, aot: bool) -> None:

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

    if aot:
        _register_aot(trt, trtp, spec)
        return

    import torch

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


def _is_float32(trt, desc) -> bool:
    return desc.dtype == trt.float32


def _static(expr) -> int | None:
    """A ``trtp.ShapeExpr``'s value when it is a build-time constant (``is_constant`` raises for a "fake" one)."""
    try:
        return int(expr.constant_value()) if expr.is_constant else None
    except RuntimeError:
        return None


def aot_plan(op: str, dims: list[list[int | None]], attrs: dict, float32: bool) -> dict:
    """What :func:`register_all`'s ``aot_impl`` compiles and launches for ``op``, from the inputs' dims (``None``
    where not a build-time constant): ``kernel`` (a key of ``aot.sources()``), ``pointers``, ``constexprs``,
    ``num_warps``, ``scalars`` (the input dim ``(input, axis)`` behind each int32 argument, in order) and ``grid``
    (``(factors, divisor)`` per grid dim: ``cdiv`` of the product of the ``(input, axis)`` factors). TokenMerge
    and DiversitySelect need a static token count (it sizes their register blocks), SparseAttention static head
    sizes (the routed patterns also a routing block <= 128 and, for ``block_layout``, static layout dims);
    TokenSelect, a sliding window and ``block_topk`` take any N. Pure (no TensorRT), tested here."""
    t = "*fp32" if float32 else "*fp16"
    x = dims[0]
    n = x[1]
    if op == "TokenSelect":
        from graphprune.kernels import token_select as ts

        return dict(kernel="token_select", pointers={"X": t, "S": t, "Y": t, "Idx": "*i64"},
                    constexprs=ts.constexprs(attrs, 128, 64), num_warps=4, scalars=[(0, 1), (0, 2)],
                    grid=[(((0, 1),), 128), (((0, 0),), 1)])
    if op == "SparseAttention":
        from graphprune.kernels import sparse_attention as sa

        if (why := aot_refusal([(op, attrs)])) is not None:
            raise GraphpruneError(why)
        d, dv = x[3], dims[2][3]
        if d is None or dv is None:
            raise GraphpruneError("--aot: SparseAttention needs static head sizes (they size the kernel's blocks)")
        bias = None if attrs["bias"] == "none" else tuple(1 if e == 1 else 2 for e in dims[3])  # 2: "not 1"
        if attrs["pattern"] in AOT_ROUTED_PATTERNS:
            return _routed_plan(attrs, dims, bias, t)
        try:
            const = sa.static_constexprs(attrs, x[2], d, dv, bias, 64)
        except ValueError as e:
            raise GraphpruneError(f"--aot: {e}") from None
        return dict(kernel="sparse_attention_static",
                    pointers={"Q": t, "K": t, "V": t, "Bias": t, "Layout": "*i64", "Out": t}, constexprs=const,
                    num_warps=4, scalars=[(0, 1), (0, 2), (0, 3), (2, 3)],
                    grid=[(((0, 2),), 64), (((0, 0), (0, 1)), 1)])
    if n is None:
        raise GraphpruneError(f"--aot: {op} needs a static token count (the one-launch kernel's register blocks are "
                              f"sized from N at build time); give a fixed N or build without --aot")
    c = x[2] if x[2] is not None else 64
    if op == "TokenMerge":
        from graphprune.kernels import token_merge as tm

        if not tm.supported(n, attrs):
            raise GraphpruneError(f"--aot: TokenMerge at N = {n} exceeds the kernel's |A| <= {tm.MAX_SIDE}")
        d = dims[1][2] if dims[1][2] is not None else 64
        return dict(kernel="token_merge", pointers={"X": t, "Metric": t, "Size": t, "Y": t, "SizeOut": t,
                                                    "Idx": "*i64"},
                    constexprs=dict(HAS_SIZE=True, **tm.constexprs(n, c, d, attrs)), num_warps=tm.num_warps(n, attrs),
                    scalars=[(0, 1), (0, 2), (1, 2)], grid=[(((0, 0),), 1)])
    if op == "DiversitySelect":
        from graphprune.kernels import diversity_select as ds

        if not ds.supported(n, attrs):
            raise GraphpruneError(f"--aot: DiversitySelect at N = {n} needs k <= N - protect <= {ds.MAX_M}")
        k = ds.constexprs(n, c, attrs)
        return dict(kernel="diversity_select", pointers={"X": t, "Y": t, "Idx": "*i64"}, constexprs=k,
                    num_warps=8 if k["BLOCK_M"] >= 512 else 4, scalars=[(0, 1), (0, 2)], grid=[(((0, 0),), 1)])
    raise GraphpruneError(aot_refusal([(op, {})]) or f"--aot: {op} has no one-launch kernel")


def _routed_plan(attrs: dict, dims: list, bias: tuple | None, t: str) -> dict:
    """:func:`aot_plan` for SparseAttention ``block_topk`` / ``block_layout``: one program per routing block
    (``cdiv(N, block)``) × B·H, the same five inputs and int32 dims (H, N, D, DV) as the static kernel."""
    from graphprune.kernels import sparse_attention_routed as sr

    x, n = dims[0], dims[0][2]
    lay = dims[4] if len(dims) > 4 else [1, 1, 1]
    heads = 1
    if attrs["pattern"] == "block_layout":
        if any(e is None for e in lay):
            raise GraphpruneError("--aot: SparseAttention block_layout needs a layout with static dims")
        heads = lay[0]
        if heads != 1 and x[1] is not None and heads != x[1]:
            raise GraphpruneError(f"--aot: SparseAttention block_layout layout has {heads} heads, Q has {x[1]}")
        if n is not None:
            b = max(1, min(attrs["block_size"] or 64, n))
            nb = -(-n // b)
            if list(lay[1:]) != [nb, nb]:
                raise GraphpruneError(f"--aot: SparseAttention block_layout layout dims {list(lay)} do not match "
                                      f"the {nb} blocks of {b} tokens at N = {n}")
    try:
        const = sr.routed_constexprs(attrs, n, x[3], dims[2][3], bias, heads)
    except ValueError as e:
        raise GraphpruneError(f"--aot: {e}") from None
    return dict(kernel="sparse_attention_routed",
                pointers={"Q": t, "K": t, "V": t, "Bias": t, "Layout": "*i64", "Out": t}, constexprs=const,
                num_warps=sr.num_warps(const), scalars=[(0, 1), (0, 2), (0, 3), (2, 3)],
                grid=[(((0, 2),), const["BS"]), (((0, 0), (0, 1)), 1)])


def _register_aot(trt, trtp, spec: PluginSpec) -> None:
    from graphprune.kernels import aot

    n_out = len(spec.outputs)

    def aot_impl(*args, **kw):
        sig = _signature(spec, trtp.TensorDesc, [
            inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])
        bound = sig.bind(*args, **kw)
        bound.apply_defaults()
        descs = [bound.arguments[n] for n in spec.inputs]
        attrs = _attrs(spec, bound.arguments)
        dims = [[_static(e) for e in d.shape_expr] for d in descs]
        plan = aot_plan(spec.op.name, dims, attrs, _is_float32(trt, descs[0]))
        import torch

        major, minor = torch.cuda.get_device_capability()
        k = aot.compile_ptx(plan["kernel"], plan["pointers"], plan["constexprs"], arch=major * 10 + minor,
                            num_warps=plan["num_warps"])
        launch = trtp.KernelLaunchParams()
        for axis_name, (factors, div) in zip(("grid_x", "grid_y", "grid_z"), plan["grid"]):
            expr = descs[factors[0][0]].shape_expr[factors[0][1]]
            for inp, axis in factors[1:]:
                expr = expr * descs[inp].shape_expr[axis]
            setattr(launch, axis_name, trtp.cdiv(expr, div) if div > 1 else expr)
        launch.block_x = k.num_warps * 32
        launch.shared_mem = k.shared
        extra = trtp.SymIntExprs(len(plan["scalars"]))
        for i, (inp, axis) in enumerate(plan["scalars"]):
            extra[i] = trtp.SymInt32(descs[inp].shape_expr[axis])
        return k.name, k.ptx, launch, extra

    extra = [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               annotation=tuple[(trtp.TensorDesc,) * n_out]),
             inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    ret = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]
    trtp.aot_impl(spec.id)(_with_signature(aot_impl, _signature(spec, trtp.TensorDesc, extra), ret))
