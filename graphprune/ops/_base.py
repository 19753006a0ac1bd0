"""One definition per ``ai.graphprune`` op; every lowering is generated from it.

An op is a subclass of :class:`OpDef` registered with :func:`register`. It states, once:

  * ``attributes``: typed :class:`Attr` specs (name, type, default, range or choices) — the only attribute list;
  * ``inputs`` / ``outputs``: :class:`Port` specs with symbolic dims (``("B", "N", "C")``) and a dtype class;
  * ``shape(a)``: the output dims as :mod:`~graphprune.ops._dims` expressions over the input symbols and the
    attributes (data-independent; a dynamic ``N`` stays symbolic);
  * ``flops(shapes, a)``: FLOPs from the inputs' concrete shapes, batch included;
  * ``compute(xp, *inputs, **a)``: the semantics, written once against the array API; ``xp`` is the numpy
    namespace for the reference (the oracle) or the torch namespace for the eager implementation;
  * ``lower(t, inputs, a, dtype)``: the standard-op ONNX function body, generic over float32/float16/bfloat16
    (float literals are ``CastLike``'d to the data), recorded on a :class:`Body` tape. Runtime counts come from
    the shape expressions (``Body.dims``), never from a second formula.

Generated from that: attribute checking (``normalize``), ``make_node`` (with the body's overload key and the
outputs' shapes and types), ``make_function``, the ONNX ``OpSchema`` (used by the torch exporter), the FLOPs
rule used by ``analysis.flops``, the torch custom op ``graphprune::<snake>`` (``graphprune.torch``) and the
TensorRT plugin descriptor (:class:`PluginDescriptor`: namespace ``graphprune``, TensorRT-legal attribute types,
output shapes as integer expressions).

A body is specialised per attribute set, input dtype and set of present optional inputs: one function per
combination, told apart by the ONNX function ``overload`` field. The node keeps op type ``<Op>`` in the domain,
so a TensorRT plugin or ORT contrib op of the same name can replace the body. ORT resolves overloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as _tape

from graphprune.errors import ConfigError
from graphprune.ops import _dims
from graphprune.ops._dims import Dim

DOMAIN = "ai.graphprune"
DOMAIN_VERSION = 1
#: Opset of the standard ops used inside function bodies.
BODY_OPSET = 18
#: TensorRT plugin namespace (plugin namespaces may not contain dots) and version.
PLUGIN_NAMESPACE = "graphprune"
PLUGIN_VERSION = "1"
INT64_MAX = np.iinfo(np.int64).max

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# ---------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Attr:
    """A typed attribute. ``type``: ``int``, ``float``, ``str``, ``bool`` (stored as int 0/1), ``"ints"``."""

    name: str
    type: Any
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def check(self, op: str, value: Any) -> Any:
        """``value`` converted to the attribute's type; a :class:`ConfigError` when it is out of range."""
        if value is None:
            return None
        where = self.name
        try:
            if self.type is bool:
                value = int(bool(value))
            elif self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif self.type is float:
                value = float(value)
            elif self.type is str:
                if not isinstance(value, str):
                    raise ValueError
            elif self.type == "ints":
                value = [int(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {self.type_name}, got {value!r} ({op})") from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))} ({op})")
        for v in value if isinstance(value, list) else [value]:
            if self.min is not None and v < self.min:
                raise ConfigError(f"{where}: must be >= {self.min:g}, got {value!r} ({op})")
            if self.max is not None and v > self.max:
                raise ConfigError(f"{where}: must be <= {self.max:g}, got {value!r} ({op})")
        return value

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", float: "float", str: "string", "ints": "int list"}[self.type]

    @property
    def onnx_type(self) -> ir.AttributeType:
        return {bool: ir.AttributeType.INT, int: ir.AttributeType.INT, float: ir.AttributeType.FLOAT,
                str: ir.AttributeType.STRING, "ints": ir.AttributeType.INTS}[self.type]

    @property
    def trt_type(self) -> str:
        """TensorRT plugin field type: int, float, string or a 1-D int32 array."""
        return {bool: "int", int: "int", float: "float", str: "string", "ints": "int32[]"}[self.type]

    @property
    def torch_type(self) -> str:
        base = {bool: "int", int: "int", float: "float", str: "str", "ints": "int[]"}[self.type]
        return base if self.default is not None else base + "?"


@dataclasses.dataclass(frozen=True)
class Port:
    """An input or output. ``dtype``: ``"T"`` (the op's float type), ``"int64"``, or ``"any"``."""

    name: str
    dims: tuple[str, ...] | None
    dtype: str = "T"
    optional: bool = False
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class PluginDescriptor:
    """What a TensorRT plugin for the op needs, all from the op definition.

    ``shape(input_dims, attrs, ops)`` returns the outputs' dims: ``input_dims[i][j]`` are the inputs' dims in
    whatever representation ``ops`` (a :class:`~graphprune.ops._dims.DimOps`) combines — TensorRT shape
    expressions, ints, ... Only ``+ - * //``, ``min`` and ``max`` are used.
    """

    name: str
    namespace: str
    version: str
    fields: tuple[tuple[str, str, Any], ...]  # (name, TensorRT type, default)
    inputs: tuple[tuple[str, str, bool], ...]  # (name, dtype class, optional)
    outputs: tuple[tuple[str, str], ...]  # (name, dtype class)
    shape: Callable[[Sequence[Sequence[Any]], dict, _dims.DimOps], list[tuple]]

    def onnx_attributes(self) -> dict[str, Any]:
        """The node attributes TensorRT's ONNX parser reads to pick this plugin over the function body."""
        return {"plugin_namespace": self.namespace, "plugin_version": self.version}


# ---------------------------------------------------------------- function-body tape


def np_dtype(dtype: ir.DataType):
    """The numpy (or ml_dtypes) scalar type of an ONNX float type."""
    return dtype.numpy()


class Body(_tape.Tape):
    """A tape for function bodies (no initializers: constants are ``Constant`` nodes).

    ``dtype`` is the data type of the body's float data: float literals (``lit``) are created in it, so no
    runtime cast is needed (the body is specialised per dtype anyway); runtime values change type with
    ``CastLike``.
    """

    def __init__(self, dtype: ir.DataType = ir.DataType.FLOAT) -> None:
        super().__init__()
        self.dtype = dtype

    def const(self, array, dtype=None) -> ir.Value:
        return self.op("Constant", [], {"value": ir.tensor(np.asarray(array, dtype=dtype))})

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def lit(self, array, like: ir.Value | None = None) -> ir.Value:
        """A float literal in the body's data type (``like`` documents which value it combines with)."""
        arr = np.asarray(array, dtype=np.float64)
        if self.dtype == ir.DataType.FLOAT16:  # saturate: float16's range is ±65504 (inf stays inf)
            finite = np.isfinite(arr)
            arr = np.where(finite, np.clip(arr, -65504.0, 65504.0), arr)
        return self.op("Constant", [], {"value": ir.tensor(arr.astype(np_dtype(self.dtype)))})

    def rank(self, v: ir.Value) -> ir.Value:
        """``v`` ready for ``TopK``: opset-18 ``TopK`` has no bfloat16, so bfloat16 ranks as float32 (exact)."""
        return self.op("Cast", [v], {"to": ir.DataType.FLOAT}) if self.dtype == ir.DataType.BFLOAT16 else v

    def one_hot(self, indices: ir.Value, depth: ir.Value, off_on, axis: int) -> ir.Value:
        """``OneHot`` with float values ``(off, on)`` in the body's dtype (built as float32 for bfloat16)."""
        if self.dtype == ir.DataType.BFLOAT16:
            vals = self.op("Constant", [], {"value": ir.tensor(np.asarray(off_on, dtype=np.float32))})
            hot = self.op("OneHot", [indices, depth, vals], {"axis": axis})
            return self.op("Cast", [hot], {"to": ir.DataType.BFLOAT16})
        return self.op("OneHot", [indices, depth, self.lit(off_on)], {"axis": axis})

    def dim(self, shape: ir.Value, axis: int) -> ir.Value:
        """``shape[axis:axis+1]`` as a 1-element int64 tensor."""
        return self.op("Slice", [shape, self.ints(axis), self.ints(axis + 1)])

    def slice(self, x: ir.Value, start, end, axis: int) -> ir.Value:
        s = self.ints(start) if isinstance(start, int) else start
        e = self.ints(end) if isinstance(end, int) else end
        return self.op("Slice", [x, s, e, self.ints(axis)])

    def slice_tokens(self, x: ir.Value, start: int, axis: int = 1) -> ir.Value:
        return self.slice(x, start, INT64_MAX, axis)

    def dims(self, op: type[OpDef], inputs: Sequence[ir.Value | None], static: Sequence[tuple | None]) -> dict:
        """Symbol → int (static at build time) or a 1-element int64 value read with ``Shape`` at run time.

        Runtime reads are recorded only for the symbols a count actually uses.
        """
        tape = self
        where: dict[str, tuple[ir.Value, int]] = {}
        known: dict[str, Any] = {}
        for port, value, shape in zip(op.inputs, inputs, static):
            if port.dims is None or value is None:
                continue
            for axis, sym in enumerate(port.dims):
                if not isinstance(sym, str) or sym in known or sym in where:
                    continue
                d = shape[axis] if shape is not None else None
                if isinstance(d, int):
                    known[sym] = d
                else:
                    where[sym] = (value, axis)

        class _Env(dict):
            def __missing__(self, sym):
                value, axis = where[sym]  # KeyError for a symbol no input has
                self[sym] = tape.op("Shape", [value], {"start": axis, "end": axis + 1})
                return self[sym]

            def __contains__(self, sym):
                return dict.__contains__(self, sym) or sym in where

        return _Env(known)

    def count(self, expr, env: dict) -> int | ir.Value:
        """``expr`` (a shape expression) as an int when static, else a 1-element int64 value."""
        return Dim.of(expr).eval(env, _dims.OnnxDimOps(self))

    def value(self, x: int | ir.Value) -> ir.Value:
        return self.ints(x) if isinstance(x, int) else x

    def scalar(self, x: int | ir.Value) -> ir.Value:
        """A 0-d int64 value (``Range``/``OneHot`` depth operands)."""
        return self.const(np.int64(x)) if isinstance(x, int) else self.op("Squeeze", [x])


# ---------------------------------------------------------------- the op definition


REGISTRY: dict[str, type[OpDef]] = {}


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: make ``cls`` an ``ai.graphprune`` op (FLOPs rule, torch op, plugin descriptor)."""
    names = [a.name for a in cls.attributes]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: duplicate attribute names")
    REGISTRY[cls.name] = cls
    return cls


def overload_key(attrs: dict) -> str:
    """A short stable overload name for a set of static attributes."""
    text = json.dumps(attrs, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class OpDef:
    """Base of every op definition (see the module docstring). Subclasses set the class attributes and
    implement ``shape``, ``flops``, ``compute`` and ``lower``; ``check`` adds cross-attribute rules."""

    name: ClassVar[str]
    snake: ClassVar[str]
    doc: ClassVar[str] = ""
    attributes: ClassVar[tuple[Attr, ...]] = ()
    inputs: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[Port, ...]] = ()

    # ---- to implement

    @classmethod
    def check(cls, a: dict) -> dict:
        """Cross-attribute rules on normalized attributes; may fill derived values. Returns ``a``."""
        return a

    @classmethod
    def shape(cls, a: dict) -> list[tuple]:
        """Output dims (``Dim`` expressions, ints, or input symbol names), one tuple per output."""
        raise NotImplementedError

    @classmethod
    def constraints(cls, a: dict) -> list[tuple[Dim, Dim, str]]:
        """``(lhs, rhs, message)``: dims that must satisfy ``lhs >= rhs`` (checked where dims are known)."""
        return []

    @classmethod
    def flops(cls, shapes: list[tuple[int, ...] | None], a: dict) -> int:
        raise NotImplementedError

    @classmethod
    def compute(cls, xp, *inputs, **a):
        raise NotImplementedError

    @classmethod
    def lower(cls, t: Body, inputs: list[ir.Value | None], a: dict, dtype: ir.DataType,
              static: list[tuple | None]) -> list[ir.Value]:
        raise NotImplementedError

    # ---- generated

    @classmethod
    def attr(cls, name: str) -> Attr:
        for spec in cls.attributes:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @classmethod
    def normalize(cls, **kw) -> dict:
        """Every attribute, typed and range-checked, defaults filled in (``None`` stays for unset optional ones)."""
        unknown = set(kw) - {a.name for a in cls.attributes}
        if unknown:
            raise ConfigError(f"{cls.name}: unknown attribute(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(a.name for a in cls.attributes)}")
        a = {spec.name: spec.check(cls.name, kw.get(spec.name, spec.default)) for spec in cls.attributes}
        return cls.check(a)

    @classmethod
    def present(cls, inputs: Sequence[Any]) -> tuple[bool, ...]:
        return tuple(i < len(inputs) and inputs[i] is not None for i in range(len(cls.inputs)))

    @classmethod
    def symbolic_shapes(cls, a: dict) -> list[tuple[Dim, ...]]:
        return [tuple(Dim.of(d) for d in dims) for dims in cls.shape(a)]

    @classmethod
    def output_shapes(cls, shapes: Sequence[tuple | None], a: dict) -> list[tuple | None]:
        """Output shapes from input shapes: ints where they follow, symbol names passed through, else ``None``."""
        ports = [p.dims for p in cls.inputs]
        shapes = list(shapes) + [None] * (len(ports) - len(shapes))
        env = {k: (Dim.of(v) if isinstance(v, str) else v) for k, v in _dims.bind(ports, shapes).items()}
        out = []
        for dims in _dims.evaluate(cls.symbolic_shapes(a), env, missing=lambda s: None):
            row = []
            for d in dims:
                if isinstance(d, Dim):
                    d = d.args[0] if d.op == "sym" else None  # an expression over symbols has no ONNX dim name
                row.append(d)
            out.append(tuple(row))
        cls.check_shapes(env, a)
        return out

    @classmethod
    def check_shapes(cls, env: dict, a: dict) -> None:
        """Raise ``ValueError`` when known dims break a constraint (e.g. fewer tokens than kept)."""
        for lhs, rhs, msg in cls.constraints(a):
            if not (lhs.symbols() | rhs.symbols()) <= set(env):
                continue
            lv, rv = lhs.eval(env), rhs.eval(env)
            if isinstance(lv, int) and isinstance(rv, int) and lv < rv:
                raise ValueError(f"{cls.name}: {msg} ({lhs} = {lv} < {rhs} = {rv})")

    @classmethod
    def reference(cls, *inputs, **attrs):
        """The numpy oracle: ``compute`` with the numpy array-API namespace. Returns a tuple of arrays."""
        from array_api_compat import numpy as xp

        a = cls.normalize(**attrs)
        arrays = [None if x is None else np.asarray(x) for x in inputs]
        cls.check_shapes(_dims.bind([p.dims for p in cls.inputs], [None if x is None else x.shape for x in arrays]), a)
        out = cls.compute(xp, *arrays, **a)
        return tuple(np.asarray(o) for o in out)

    @classmethod
    def tape(cls, inputs: list[ir.Value | None], dtype: ir.DataType) -> Body:
        """The tape ``lower`` records on."""
        return Body(dtype)

    @classmethod
    def make_function(cls, dtype: ir.DataType = ir.DataType.FLOAT, present: Sequence[bool] | None = None,
                      static: Sequence[tuple | None] | None = None, opset: int = BODY_OPSET, **attrs) -> ir.Function:
        """The standard-op body for one attribute set, input dtype and set of present optional inputs.

        ``static``: input shapes known when the node is built; static dims become constants in the body
        (runtime ``Shape`` reads otherwise). They are part of the overload key. ``opset``: the default-domain
        opset the body imports (the model's, >= 18).
        """
        a = cls.normalize(**attrs)
        if dtype not in FLOAT_TYPES:
            raise ValueError(f"{cls.name}: data type {dtype.name} is not one of float32, float16, bfloat16")
        present = tuple(present) if present is not None else tuple(not p.optional for p in cls.inputs)
        present = tuple(present) + (False,) * (len(cls.inputs) - len(present))
        static = _static_key(static, len(cls.inputs))
        # inputs are positional: declare every port up to the last present one (absent ones stay unused)
        n_decl = max((i + 1 for i, on in enumerate(present) if on), default=0)
        declared = [ir.Value(name=p.name) for p in cls.inputs[:n_decl]]
        ins = [declared[i] if i < n_decl and present[i] else None for i in range(len(cls.inputs))]
        t = cls.tape(ins, dtype)
        outs = cls.lower(t, ins, a, dtype, [None if s is None else tuple(s) for s in static])
        for port, v in zip(cls.outputs, outs):
            v.name = port.name
        # an output that is an input (or appears twice) must be its own value
        seen: set[int] = {id(v) for v in declared}
        final = []
        for port, v in zip(cls.outputs, outs):
            if id(v) in seen:
                v = t.op("Identity", [v])
                v.name = port.name
            seen.add(id(v))
            final.append(v)
        graph = ir.Graph(declared, final, nodes=t.nodes, opset_imports={"": opset}, name=cls.name)
        fattrs = [ir.Attr(s.name, s.onnx_type, None) for s in cls.attributes]
        return ir.Function(DOMAIN, cls.name, cls.overload(a, dtype, present, static), graph=graph,
                           attributes=fattrs)

    @classmethod
    def overload(cls, a: dict, dtype: ir.DataType, present: Sequence[bool], static) -> str:
        """The body's overload key: attributes, dtype, present optional inputs, and the static dims it is built for."""
        key = {"attrs": a, "dtype": dtype.name, "inputs": [int(p) for p in present]}
        if any(s is not None for s in static):
            key["static"] = [None if s is None else list(s) for s in static]
        return overload_key(key)

    @classmethod
    def make_node(cls, *inputs: ir.Value | None, name: str | None = None, static_dims: bool = True,
                  dims: dict[str, int] | None = None, **attrs) -> ir.Node:
        """A node of the op whose overload matches ``function_for(node)``; output types and shapes are set.

        ``static_dims``: specialise the body to the inputs' static dims (known counts become constants, so
        ONNX shape inference sees them); False keeps every dim a runtime read. ``dims``: symbol values the
        caller knows although the inputs' shapes do not say them (e.g. ``{"N": 197}`` while a graph is being
        rewired); they specialise the body too.
        """
        a = cls.normalize(**attrs)
        present = cls.present(inputs)
        values = [inputs[i] if present[i] else None for i in range(len(cls.inputs))]
        dtype = _dtype_of(values)
        shapes = _shapes_of(values)
        if dims:
            shapes = [_with_dims(port, s, dims) if values[i] is not None else None
                      for i, (port, s) in enumerate(zip(cls.inputs, shapes))]
        static = _static_of(shapes) if static_dims else [None] * len(shapes)
        node_inputs = list(inputs)
        while node_inputs and node_inputs[-1] is None:
            node_inputs.pop()
        node_attrs = [ir.Attr(s.name, s.onnx_type, a[s.name]) for s in cls.attributes if a[s.name] is not None]
        node = ir.Node(DOMAIN, cls.name, node_inputs, node_attrs,
                       overload=cls.overload(a, dtype, present, _static_key(static, len(cls.inputs))),
                       num_outputs=len(cls.outputs), name=name)
        out_shapes = cls.output_shapes(shapes, a)
        for port, value, shp in zip(cls.outputs, node.outputs, out_shapes):
            value.dtype = dtype if port.dtype == "T" else (ir.DataType.INT64 if port.dtype == "int64" else None)
            value.shape = ir.Shape(list(shp)) if shp is not None else None
        node.meta["graphprune.static"] = static
        return node

    @classmethod
    def attrs_of(cls, node: ir.Node) -> dict:
        """A node's attributes, normalized (defaults for the absent ones)."""
        kw = {}
        for key, attr in node.attributes.items():
            if key in ("plugin_namespace", "plugin_version"):
                continue
            val = attr.value
            kw[key] = list(val) if isinstance(val, (tuple, list)) else val
        return cls.normalize(**kw)

    @classmethod
    def function_for(cls, node: ir.Node, opset: int = BODY_OPSET) -> ir.Function:
        """The body matching ``node`` (built by ``make_node``): same attributes, dtype, inputs and static dims."""
        a = cls.attrs_of(node)
        present = [i < len(node.inputs) and node.inputs[i] is not None for i in range(len(cls.inputs))]
        dtype = _dtype_of(node.inputs)
        static = node.meta.get("graphprune.static")
        if static is None:  # a node read from a file: its inputs' static dims, as make_node saw them
            static = _static_of(_shapes_of(list(node.inputs) + [None] * (len(cls.inputs) - len(node.inputs))))
        return cls.make_function(dtype=dtype, present=present, static=static, opset=opset, **a)

    @classmethod
    def node_flops(cls, node: ir.Node, shape_of: Callable[[ir.Value | None], tuple | None]) -> int | None:
        """FLOPs of ``node`` given concrete input shapes (``None`` when a needed shape is unknown)."""
        shapes = [shape_of(v) if v is not None else None for v in node.inputs]
        shapes += [None] * (len(cls.inputs) - len(shapes))
        for port, s in zip(cls.inputs, shapes):
            if s is None and not port.optional:
                return None
            if s is not None and any(not isinstance(d, int) for d in s):
                return None
        return int(cls.flops(shapes, cls.attrs_of(node)))

    @classmethod
    def onnx_schema(cls):
        """An ``onnx.defs.OpSchema`` for the op (not registered globally; the torch exporter builds nodes with it)."""
        import onnx
        from onnx.defs import OpSchema

        def param(p: Port) -> OpSchema.FormalParameter:
            opt = OpSchema.FormalParameterOption.Optional if p.optional else OpSchema.FormalParameterOption.Single
            return OpSchema.FormalParameter(p.name, "T" if p.dtype == "T" else ("I" if p.dtype == "int64" else "A"),
                                            p.doc, param_option=opt)

        attrs = []
        for s in cls.attributes:
            if s.default is None:
                attrs.append(OpSchema.Attribute(s.name, OpSchema.AttrType(int(s.onnx_type)), s.doc, required=False))
            else:
                default = s.default if s.type is not bool else int(s.default)
                attrs.append(OpSchema.Attribute(s.name, onnx.helper.make_attribute(s.name, default), s.doc))
        ports = list(cls.inputs) + list(cls.outputs)
        types = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float data")]
        if any(p.dtype == "int64" for p in ports):
            types.append(("I", ["tensor(int64)"], "indices"))
        if any(p.dtype == "any" for p in ports):
            types.append(("A", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int64)",
                                "tensor(int32)", "tensor(bool)"], "any"))
        return OpSchema(cls.name, DOMAIN, DOMAIN_VERSION, cls.doc, inputs=[param(p) for p in cls.inputs],
                        outputs=[param(p) for p in cls.outputs], type_constraints=types, attributes=attrs)

    @classmethod
    def plugin_descriptor(cls) -> PluginDescriptor:
        ports = [p.dims for p in cls.inputs]

        def shape(input_dims: Sequence[Sequence[Any]], attrs: dict, ops: _dims.DimOps) -> list[tuple]:
            a = cls.normalize(**attrs)
            env = _dims.bind(ports, [tuple(d) if d is not None else None for d in input_dims])
            return _dims.evaluate(cls.symbolic_shapes(a), env, ops)

        return PluginDescriptor(
            name=cls.name, namespace=PLUGIN_NAMESPACE, version=PLUGIN_VERSION,
            fields=tuple((s.name, s.trt_type, s.default) for s in cls.attributes),
            inputs=tuple((p.name, p.dtype, p.optional) for p in cls.inputs),
            outputs=tuple((p.name, p.dtype) for p in cls.outputs),
            shape=shape,
        )

    @classmethod
    def torch_schema(cls) -> str:
        """The ``torch.library`` schema: tensors positional, attributes keyword-only with their ONNX names."""
        ins = [("Tensor? " if p.optional else "Tensor ") + p.name + ("=None" if p.optional else "") for p in cls.inputs]
        kws = []
        for s in cls.attributes:
            default = s.default
            if default is None:
                text = "None"
            elif s.type is str:
                text = json.dumps(default)
            elif s.type is bool:
                text = str(int(default))
            elif s.type == "ints":
                text = "[" + ", ".join(map(str, default)) + "]"
            else:
                text = repr(default)
            kws.append(f"{s.torch_type} {s.name}={text}")
        outs = ", ".join("Tensor" for _ in cls.outputs)
        return f"({', '.join(ins + ['*'] + kws)}) -> ({outs})"


def _dtype_of(values) -> ir.DataType:
    return next((v.dtype for v in values if v is not None and v.dtype in FLOAT_TYPES), ir.DataType.FLOAT)


def _shapes_of(values) -> list[tuple | None]:
    """Each value's dims: ints, symbolic names, or ``None`` where unknown."""
    return [None if v is None or v.shape is None else tuple(
        d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) and d.value else None)
        for d in v.shape) for v in values]


def _with_dims(port: Port, shape: tuple | None, dims: dict[str, int]) -> tuple | None:
    if port.dims is None:
        return shape
    shape = shape if shape is not None else (None,) * len(port.dims)
    return tuple(dims.get(sym, d) if isinstance(sym, str) else d for sym, d in zip(port.dims, shape))


def _static_of(shapes) -> list[tuple | None]:
    return [None if s is None else tuple(d if isinstance(d, int) else None for d in s) for s in shapes]


def _static_key(static, n: int) -> list:
    if static is None:
        return [None] * n
    out = [None if s is None or all(d is None for d in s) else tuple(s) for s in static]
    return out + [None] * (n - len(out))


def add_function(model: ir.Model, function: ir.Function) -> None:
    """Add ``function`` to ``model`` (once per identifier) and import the ``ai.graphprune`` domain."""
    if function.identifier() not in model.functions:
        model.functions[function.identifier()] = function
    model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    model.graph.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    # Function bodies use standard ops; the model must import a default opset they can run under.
    model.graph.opset_imports.setdefault("", BODY_OPSET)


def add_node_function(model: ir.Model, node: ir.Node) -> None:
    """Register the body of an ``ai.graphprune`` node in ``model``, and point the node's overload at it.

    For a node built by ``make_node`` the overload is unchanged; a node from elsewhere (an exporter, a file)
    gets the overload of the body its attributes, input dtype and static input dims select.
    """
    opset = model.graph.opset_imports.get("", model.opset_imports.get("", BODY_OPSET))
    fn = REGISTRY[node.op_type].function_for(node, opset=max(opset, BODY_OPSET))
    node.overload = fn.overload
    add_function(model, fn)


def op_def(node: ir.Node) -> type[OpDef] | None:
    """The definition of an ``ai.graphprune`` node, else ``None``."""
    return REGISTRY.get(node.op_type) if node.domain == DOMAIN else None
