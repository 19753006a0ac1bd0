"""TensorRT backend: plugin-ready lowering (pure, runs everywhere) and the engine builder (needs TensorRT).

**Lowering** (:func:`lower`) prepares an optimized model for TensorRT's ONNX parser:

  1. every ``ai.graphprune`` node gets ``plugin_namespace="graphprune"`` and ``plugin_version="1"``: the parser
     (>= 10.7) then builds the registered plugin of the same op type (``graphprune::<Op>``, see
     :mod:`graphprune.backends.plugins`) instead of inlining the model-local function body;
  2. a ``TokenSelect`` whose ``keep_ratio`` meets a static ``N`` gets the explicit count ``k`` (the same
     integer the shape rule gives); with a dynamic ``N`` the ratio stays, read as an exact fraction;
  3. every node passes every input of its op: a plugin has a fixed input list, one per op (see
     :mod:`graphprune.backends.plugins`), so an absent optional input is filled by the plugin module's rule
     (``OPTIONAL_INPUTS``): TokenMerge ``size`` becomes ones ``[B, N, 1]`` built from ``x`` (the op's default,
     same numbers), SparseAttention ``attn_bias`` / ``layout`` become one-element placeholders the body and the
     plugin ignore; a ``layout`` that is not int64 is cast to it. The node's body is re-registered for the
     present inputs. An optional input without a rule is refused by name;
  4. the function bodies stay, so ONNX Runtime still runs the file and gives the same numbers;
     ``strip_bodies`` removes them (a file for TensorRT < 10.7, which would otherwise always inline them).

Static checks (each failure is one :class:`~graphprune.errors.GraphpruneError` line):
  * no ``ai.graphprune`` op type is also a standard ONNX op (the parser would pick the builtin importer);
  * attributes are TensorRT plugin field types only: int, float, string, 1-D int32 / float32 arrays;
  * every output dim is an integer shape expression (``+ - * //``, ``min``, ``max``) of the input dims, from the
    op definition's shape rule;
  * where a body may be inlined (bodies kept), every ``TopK`` with a constant ``K`` has ``K <= 3840`` (ITopK's
    limit); a ``K`` that follows a dynamic ``N`` is reported as a note, and :func:`build` checks it against
    the optimization profile's largest ``N``.

**Building** (:func:`build`) follows TensorRT's documented Python API: ``Builder`` → strongly typed
``INetworkDefinition`` → ``OnnxParser`` (``ENABLE_PLUGIN_OVERRIDE`` where the version has it) → a check that every
``ai.graphprune`` node became a plugin layer (the parser silently inlines the body when a plugin is missing) →
``IBuilderConfig`` with one optimization profile and a timing cache → serialized ``.plan``. Strongly typed
networks take precision from the ONNX, so ``fp16`` converts the model to float16 first.
TensorRT never ran on the machines this was written on; see docs/tensorrt.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.errors import ConfigError, GraphpruneError
from graphprune.ops import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, REGISTRY, Dim, DimOps, add_node_function, op_def

#: ITopK's largest K.
TOPK_MAX = 3840
_INT32 = (-(2**31), 2**31 - 1)
_LEGAL = {ir.AttributeType.INT, ir.AttributeType.FLOAT, ir.AttributeType.STRING, ir.AttributeType.INTS,
          ir.AttributeType.FLOATS}


class LoweringError(GraphpruneError):
    """The model cannot be lowered for TensorRT (the message names the node and the rule)."""


class TensorRTMissing(GraphpruneError):
    """TensorRT (or the CUDA stack it needs) is not importable here."""


@dataclasses.dataclass
class LowerReport:
    """What :func:`lower` did: nodes marked as plugins, ratios made explicit, bodies removed, notes."""

    plugins: dict[str, int] = dataclasses.field(default_factory=dict)  # op type -> nodes
    explicit_k: list[str] = dataclasses.field(default_factory=list)
    filled: list[str] = dataclasses.field(default_factory=list)  # optional inputs given for the plugin
    stripped_bodies: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    shapes: dict[str, list[list[str]]] = dataclasses.field(default_factory=dict)  # node -> output dims


class ExprDimOps(DimOps):
    """Builds :class:`Dim` expressions and refuses anything but TensorRT's integer shape-expression operators."""

    ALLOWED = ("+", "-", "*", "//", "min", "max")

    def combine(self, op: str, a, b):
        if op not in self.ALLOWED:
            raise LoweringError(f"operator {op} is not a TensorRT shape-expression operator")
        return super().combine(op, Dim.of(a), Dim.of(b))


# ---------------------------------------------------------------- lowering


def _graphprune_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph.all_nodes() if n.domain == DOMAIN]


def _name(node: ir.Node) -> str:
    return node.name or f"{node.op_type} node"


def check_op_names(names: Sequence[str] | None = None) -> None:
    """No custom op type may be a standard ONNX op: TensorRT's parser would use its builtin importer for it."""
    for name in names if names is not None else sorted(REGISTRY):
        if onnx.defs.has(name):
            raise LoweringError(f"op type {name!r} of {DOMAIN} collides with the standard ONNX op {name}; "
                                f"TensorRT would not pick the plugin")


def _check_attributes(node: ir.Node) -> None:
    for key, attr in node.attributes.items():
        if attr.type not in _LEGAL:
            raise LoweringError(f"{_name(node)}: attribute {key} has type {attr.type.name}; TensorRT plugin fields "
                                f"are int, float, string and 1-D int32/float32 arrays")
        if attr.type == ir.AttributeType.INTS and any(not _INT32[0] <= v <= _INT32[1] for v in attr.value):
            raise LoweringError(f"{_name(node)}: attribute {key} does not fit int32 (TensorRT int32[] field)")
        if attr.type == ir.AttributeType.INT and not _INT32[0] <= attr.value <= _INT32[1]:
            raise LoweringError(f"{_name(node)}: attribute {key} = {attr.value} does not fit int32")


def _input_dims(node: ir.Node) -> list[tuple | None]:
    """Each input's dims: ints where static, a :class:`Dim` symbol (unique per node and axis) elsewhere."""
    out: list[tuple | None] = []
    for i, v in enumerate(node.inputs):
        if v is None or v.shape is None:
            out.append(None)
            continue
        out.append(tuple(d if isinstance(d, int) else Dim.of(f"in{i}.{axis}") for axis, d in enumerate(v.shape)))
    return out


def output_expressions(node: ir.Node) -> list[tuple]:
    """The node's output dims as integer shape expressions over its input dims (from the op definition)."""
    opdef = op_def(node)
    desc = opdef.plugin_descriptor()
    dims = _input_dims(node)
    ports = opdef.inputs
    for port, d in zip(ports, dims):
        if d is None and not port.optional and port.dims is not None:
            raise LoweringError(f"{_name(node)}: input {port.name} has no known rank; TensorRT needs the plugin's "
                                f"output dims as expressions of its input dims")
    try:
        return desc.shape(dims, opdef.attrs_of(node), ExprDimOps())
    except KeyError as e:
        raise LoweringError(f"{_name(node)}: output dim depends on {e.args[0]}, which no input dim gives") from None


def _fill_optional_inputs(model: ir.Model, node: ir.Node, report: LowerReport, scopes: dict) -> None:
    """Give ``node`` every input of its op (the plugin's fixed input list); see the module docstring, step 3."""
    from graphprune._ir import NameScope
    from graphprune.backends.plugins import fill_rule

    opdef = op_def(node)
    changed = False
    graph = node.graph
    scope = scopes.setdefault(id(graph), NameScope(graph))
    stem = node.name or node.op_type
    for i, port in enumerate(opdef.inputs):
        present = i < len(node.inputs) and node.inputs[i] is not None
        if present and port.dtype == "any" and node.inputs[i].dtype not in (None, ir.DataType.INT64):
            cast = ir.node("Cast", [node.inputs[i]], attributes={"to": ir.DataType.INT64},
                           name=scope.fresh(f"{stem}_{port.name}_int64"))
            graph.insert_before(node, cast)
            cast.outputs[0].name = cast.name
            cast.outputs[0].dtype = ir.DataType.INT64
            cast.outputs[0].shape = node.inputs[i].shape
            node.replace_input_with(i, cast.outputs[0])
            changed = True
        if present or not port.optional:
            continue
        rule = fill_rule(node.op_type, port.name)
        if rule is None:
            raise LoweringError(f"{_name(node)}: optional input {port.name} of {node.op_type} is absent and the "
                                f"TensorRT plugin has no rule to fill it (plugins take every input)")
        x = node.inputs[0]
        kind, rank = rule
        if kind == "ones_tokens":  # ones [B, N, 1] in x's type: Shape(x)[0:2] ++ [1] -> ConstantOfShape -> CastLike
            base = f"{stem}_{port.name}"
            shape = ir.node("Shape", [x], attributes={"start": 0, "end": 2}, name=scope.fresh(f"{base}_shape"))
            one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))},
                          name=scope.fresh(f"{base}_1"))
            full = ir.node("Concat", [shape.outputs[0], one.outputs[0]], attributes={"axis": 0},
                           name=scope.fresh(f"{base}_dims"))
            ones = ir.node("ConstantOfShape", [full.outputs[0]],
                           attributes={"value": ir.tensor(np.array([1.0], np.float32))}, name=scope.fresh(f"{base}_f32"))
            like = ir.node("CastLike", [ones.outputs[0], x], name=scope.fresh(base))
            new = [shape, one, full, ones, like]
            value = like.outputs[0]
            value.dtype = x.dtype
            value.shape = ir.Shape([x.shape[0], x.shape[1], 1]) if x.shape is not None and len(x.shape) == 3 else None
        else:  # placeholder: one element, unused
            if port.dtype == "any":
                dtype = np.dtype(np.int64)
            else:
                dtype = np.dtype(x.dtype.numpy() if x.dtype is not None else np.float32)
            const = ir.node("Constant", [], attributes={"value": ir.tensor(np.zeros((1,) * rank, dtype))},
                            name=scope.fresh(f"{stem}_{port.name}_placeholder"))
            new = [const]
            value = const.outputs[0]
            value.dtype = ir.DataType.from_numpy(dtype)
            value.shape = ir.Shape([1] * rank)
        for n in new:
            n.outputs[0].name = n.name
            graph.insert_before(node, n)
        if len(node.inputs) <= i:
            node.resize_inputs(i + 1)
        node.replace_input_with(i, value)
        report.filled.append(f"{_name(node)}: {port.name} absent -> {'ones' if kind == 'ones_tokens' else 'unused placeholder'}")
        changed = True
    if changed:
        add_node_function(model, node)  # the body for the present inputs (same numbers)


def _make_ratio_explicit(model: ir.Model, node: ir.Node, report: LowerReport) -> None:
    """TokenSelect with ``k = 0`` and a static N: write the kept count as ``k`` (same value as the shape rule)."""
    if node.op_type != "TokenSelect":
        return
    opdef = op_def(node)
    a = opdef.attrs_of(node)
    shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
    n = shape[1] if shape is not None and len(shape) == 3 else None
    if a["k"] or not isinstance(n, int):
        return
    k = opdef.kept(n, a).static
    node.attributes["k"] = ir.AttrInt64("k", k)
    add_node_function(model, node)  # the body of the new attribute set (same numbers)
    report.explicit_k.append(f"{_name(node)}: keep_ratio {a['keep_ratio']:g} of {n - a['protect']} -> k = {k}")


def _constant_k(graph_nodes: Sequence[ir.Node], topk: ir.Node) -> int | None:
    k = topk.inputs[1] if len(topk.inputs) > 1 else None
    if k is None:
        return None
    if k.const_value is not None:
        return int(np.asarray(k.const_value.numpy()).reshape(-1)[0])
    prod = k.producer()
    if prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
        return int(np.asarray(prod.attributes["value"].value.numpy()).reshape(-1)[0])
    return None


def check_topk(model: ir.Model, report: LowerReport) -> None:
    """``K <= 3840`` for every TopK TensorRT may build: the main graph's and those of bodies that may be inlined."""
    graphs: list[tuple[str, Sequence[ir.Node]]] = [("graph", list(model.graph.all_nodes()))]
    graphs += [(f"body of {f.name}", list(f)) for f in model.functions.values()]
    for where, nodes in graphs:
        for n in nodes:
            if n.op_type != "TopK" or n.domain not in ("", "ai.onnx"):
                continue
            k = _constant_k(nodes, n)
            if k is None:
                note = (f"{where}: TopK {n.name or ''} has a runtime K (it follows a dynamic N); TensorRT's ITopK "
                        f"allows K <= {TOPK_MAX}, so the profile's largest N must keep it there if the body is inlined")
                if note not in report.notes:
                    report.notes.append(note)
            elif k > TOPK_MAX:
                raise LoweringError(f"{where}: TopK {n.name or ''} has K = {k} > {TOPK_MAX} (TensorRT ITopK limit); "
                                    f"with the plugin loaded the body is not used, so lower with --strip-bodies")


def lower(model: ir.Model, strip_bodies: bool = False) -> LowerReport:
    """Make ``model`` (in memory, changed in place) ready for TensorRT's ONNX parser; see the module docstring."""
    report = LowerReport()
    scopes: dict = {}
    nodes = _graphprune_nodes(model)
    check_op_names(sorted({n.op_type for n in nodes} | set(REGISTRY)))
    if "." in PLUGIN_NAMESPACE or PLUGIN_NAMESPACE in ("", "trt", "tensorrt", "std"):
        raise LoweringError(f"plugin namespace {PLUGIN_NAMESPACE!r} is reserved or has a dot")
    for node in nodes:
        if node.op_type not in REGISTRY:
            raise LoweringError(f"{_name(node)}: {DOMAIN}.{node.op_type} has no op definition (no plugin exists)")
        _check_attributes(node)
        try:
            _make_ratio_explicit(model, node, report)
            _fill_optional_inputs(model, node, report, scopes)
        except (ConfigError, ValueError) as e:
            raise LoweringError(f"{_name(node)}: {e}") from None
        node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE)
        node.attributes["plugin_version"] = ir.AttrString("plugin_version", PLUGIN_VERSION)
        exprs = output_expressions(node)
        report.shapes[_name(node)] = [[str(d) for d in dims] for dims in exprs]
        report.plugins[node.op_type] = report.plugins.get(node.op_type, 0) + 1
    if strip_bodies:
        for key in [k for k, f in model.functions.items() if f.domain == DOMAIN]:
            del model.functions[key]
            report.stripped_bodies += 1
        for node in nodes:
            node.overload = ""
    else:
        check_topk(model, report)
    _drop_unused_functions(model)
    return report


def check_aot(model: ir.Model) -> None:
    """Before TensorRT: every ``ai.graphprune`` node of the lowered ``model`` has an AOT kernel plan at its static
    dims (:func:`graphprune.backends.plugins.aot_plan`), else one line naming the node and the reason."""
    from graphprune.backends import plugins

    for node in _graphprune_nodes(model):
        dims = [[d if isinstance(d, int) else None for d in v.shape] if v is not None and v.shape is not None
                else [None] * 4 for v in node.inputs]
        float32 = node.inputs[0].dtype != ir.DataType.FLOAT16
        try:
            plugins.aot_plan(node.op_type, dims, op_def(node).attrs_of(node), float32)
        except GraphpruneError as e:
            raise GraphpruneError(f"{_name(node)}: {e}") from None


def _drop_unused_functions(model: ir.Model) -> None:
    """Bodies no node calls any more (a TokenSelect whose attributes changed points at a new one)."""
    used = {(n.domain, n.op_type, n.overload) for n in model.graph.all_nodes()}
    for key, f in list(model.functions.items()):
        if f.domain == DOMAIN and (f.domain, f.name, f.overload) not in used:
            del model.functions[key]


# ---------------------------------------------------------------- TensorRT: import, profiles, build, run


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTMissing` naming what is missing (one line)."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise TensorRTMissing(f"--backend tensorrt needs TensorRT: the tensorrt Python package with its libraries "
                              f"(pip install graphprune[tensorrt] on a CUDA machine); import failed: {e}") from None
    except OSError as e:  # the bindings wheel without tensorrt-libs
        raise TensorRTMissing(f"--backend tensorrt needs the TensorRT libraries (tensorrt-cu12-libs): {e}") from None


_SHAPE_SPEC = re.compile(r"^([^:]+):(\S+)$")


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``name:min/opt/max`` with each shape ``AxBxC`` (``name:AxB`` alone means min = opt = max)."""
    out = {}
    for spec in specs:
        m = _SHAPE_SPEC.match(spec.strip())
        if not m:
            raise ConfigError(f"--shapes: {spec!r} is not name:min/opt/max (e.g. x:1x3x224x224/8x3x224x224/16x3x224x224)")
        name, rest = m.groups()
        parts = rest.split("/")
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3:
            raise ConfigError(f"--shapes: {spec!r} needs one shape or three (min/opt/max)")
        try:
            shapes = tuple(tuple(int(d) for d in p.split("x")) for p in parts)
        except ValueError:
            raise ConfigError(f"--shapes: {spec!r} has a dim that is not an integer") from None
        if len({len(s) for s in shapes}) != 1 or any(
                not lo <= op <= hi for lo, op, hi in zip(*shapes)):
            raise ConfigError(f"--shapes: {spec!r} needs one rank and min <= opt <= max in every dim")
        out[name] = shapes
    return out


def profile_shapes(model: ir.Model, shapes: Mapping[str, tuple] | None = None, batch: tuple[int, int, int] = (1, 1, 8),
                   dims: Mapping[str, int] | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max per graph input: from ``shapes``, else the model's dims (static ones fixed; a symbolic batch
    axis from ``batch``; other symbols from ``dims`` or an error naming them)."""
    shapes = dict(shapes or {})
    dims = dict(dims or {})
    out = {}
    for value in model.graph.inputs:
        if value.name in shapes:
            out[value.name] = shapes.pop(value.name)
            continue
        if value.shape is None:
            raise ConfigError(f"--shapes: input {value.name} has no known shape; give {value.name}:min/opt/max")
        lo, op, hi = [], [], []
        for axis, d in enumerate(value.shape):
            if isinstance(d, int):
                lo.append(d), op.append(d), hi.append(d)
            elif axis == 0:
                lo.append(batch[0]), op.append(batch[1]), hi.append(batch[2])
            elif isinstance(d, ir.SymbolicDim) and d.value in dims:
                lo.append(dims[d.value]), op.append(dims[d.value]), hi.append(dims[d.value])
            else:
                raise ConfigError(f"--shapes: input {value.name} axis {axis} ({d}) is dynamic; give "
                                  f"{value.name}:min/opt/max")
        out[value.name] = (tuple(lo), tuple(op), tuple(hi))
    if shapes:
        raise ConfigError(f"--shapes: no graph input named {', '.join(sorted(shapes))}")
    return out


def to_fp16(model: ir.Model) -> ir.Model:
    """The model with float32 initializers, inputs and outputs in float16 (the ops are dtype-generic).

    Strongly typed networks run in the ONNX's precision, so this is what ``--fp16`` means for TensorRT.
    """
    from graphprune.backends.onnxruntime import float16_proto

    half = ir.serde.deserialize_model(float16_proto(ir.serde.serialize_model(model)))
    for node in _graphprune_nodes(half):  # bodies are specialised per dtype: point each node at its float16 body
        add_node_function(half, node)
    _drop_unused_functions(half)
    return half


@dataclasses.dataclass
class BuildResult:
    plan: Path
    plugin_layers: dict[str, int]
    profile: dict[str, tuple]
    seconds: float
    tensorrt_version: str
    notes: list[str]


def _parser_flags(trt, parser) -> list[str]:
    flag = getattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
    if flag is None:
        return ["OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE is not in this TensorRT; plugins are preferred over bodies "
                "because nodes carry plugin_namespace (>= 10.7)"]
    parser.set_flag(flag)
    return []


def plugin_layer_counts(trt, network) -> dict[str, int]:
    """Plugin layers of the parsed network, by plugin name (``IPluginV3Layer`` or a V2 plugin layer)."""
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in (getattr(trt.LayerType, "PLUGIN_V3", None), getattr(trt.LayerType, "PLUGIN_V2", None)):
            continue
        plugin = getattr(layer, "plugin", None)
        name = getattr(plugin, "plugin_name", None) or getattr(plugin, "name", None) or layer.name
        for op in REGISTRY:
            if op in str(name):
                counts[op] = counts.get(op, 0) + 1
    return counts


def check_plugin_layers(expected: Mapping[str, int], found: Mapping[str, int]) -> None:
    """Every ``ai.graphprune`` node must have become a plugin layer; the parser's fallback to the body is silent."""
    missing = {op: n - found.get(op, 0) for op, n in expected.items() if found.get(op, 0) < n}
    if missing:
        text = ", ".join(f"{op} ({n} of {expected[op]})" for op, n in sorted(missing.items()))
        raise GraphpruneError(f"TensorRT inlined the function body instead of the plugin for {text}: the plugin is "
                              f"not registered (import graphprune.backends.plugins before building) or TensorRT < 10.7")


def build(model_path: str | os.PathLike, plan_path: str | os.PathLike, *, fp16: bool = False,
          shapes: Mapping[str, tuple] | None = None, aot: bool = False, timing_cache: str | os.PathLike | None = None,
          workspace_mb: int = 4096, strip_bodies: bool = False) -> BuildResult:
    """Lower ``model_path`` and build a serialized TensorRT engine at ``plan_path`` (see the module docstring)."""
    from graphprune.io import check_output_path, load_model

    trt = require_tensorrt()
    from graphprune.backends import plugins

    model = load_model(model_path)
    out = check_output_path(plan_path, model, (Path(model_path),))
    if aot and (why := plugins.aot_refusal([(n.op_type, op_def(n).attrs_of(n)) for n in _graphprune_nodes(model)])):
        raise GraphpruneError(why)
    plugins.register_all(aot=aot)
    if fp16:
        model = to_fp16(model)
    report = lower(model, strip_bodies=strip_bodies)
    if aot:
        check_aot(model)
    profile = profile_shapes(model, shapes)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    notes = list(report.notes) + _parser_flags(trt, parser)
    proto = ir.serde.serialize_model(model)
    if not parser.parse(proto.SerializeToString(), str(Path(model_path).resolve())):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GraphpruneError(f"TensorRT's ONNX parser failed: {errors}")
    found = plugin_layer_counts(trt, network)
    check_plugin_layers(report.plugins, found)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    opt = builder.create_optimization_profile()
    for name, (lo, op, hi) in profile.items():
        opt.set_shape(name, lo, op, hi)
    config.add_optimization_profile(opt)
    cache_path = Path(timing_cache) if timing_cache else out.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise GraphpruneError("TensorRT failed to build the engine (see TensorRT's log above)")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(bytes(engine))
    os.replace(tmp, out)
    ctmp = cache_path.with_name(f".{cache_path.name}.tmp")
    ctmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(ctmp, cache_path)
    return BuildResult(out, found, profile, time.perf_counter() - t0, trt.__version__, notes)


class EngineRunner:
    """A deserialized engine and its execution context; ``runner(feeds)`` runs it (inputs copied through torch)."""

    def __init__(self, plan_path: str | os.PathLike, aot: bool = False) -> None:
        self.trt = trt = require_tensorrt()
        import torch

        from graphprune.backends import plugins

        plugins.register_all(aot=aot)
        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise GraphpruneError(f"{plan_path}: TensorRT could not deserialize the engine")
        self.ctx = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        trt, torch, engine, ctx = self.trt, self.torch, self.engine, self.ctx
        keep: list[Any] = []
        for name in self.names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
        outputs = []
        for name in self.names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
                t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
                ctx.set_tensor_address(name, t.data_ptr())
                outputs.append(t)
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise GraphpruneError("TensorRT engine execution failed")
        stream.synchronize()
        return [o.cpu().numpy() for o in outputs]


def verify_and_bench(model_path: str | os.PathLike, plan_path: str | os.PathLike, feeds: Mapping[str, np.ndarray],
                     runs: int = 20, aot: bool = False) -> dict[str, Any]:
    """Max abs error of the engine against ONNX Runtime on ``feeds``, and interleaved latencies of both
    (each round runs both, alternating which goes first, so both see the same machine load)."""
    from graphprune.backends.onnxruntime import make_session
    from graphprune.io import load_model

    sess = make_session(load_model(model_path))
    engine = EngineRunner(plan_path, aot=aot)
    ref = sess.run(None, dict(feeds))
    got = engine(feeds)
    err = max(float(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)).max()) for g, r in zip(got, ref))
    fns = {"onnxruntime": lambda: sess.run(None, dict(feeds)), "tensorrt": lambda: engine(feeds)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(runs):
        for k in (list(fns) if i % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {"max_abs_err": err, "median_ms": {k: float(np.median(v) * 1e3) for k, v in times.items()}}
