"""Integer dimension expressions: one shape rule per op, evaluated in every lowering.

An op's shape function builds :class:`Dim` expressions over the symbolic dims of its inputs (``"B"``, ``"N"``,
...) and its attributes. The same expression is then

  * evaluated to an ``int`` (concrete shapes, the numpy reference, FLOPs);
  * evaluated over ``torch.SymInt`` (``register_fake`` of the torch custom op);
  * emitted as int64 ONNX nodes on a tape (the function body computes its runtime counts from it);
  * printed (docs) or evaluated over TensorRT shape expressions (the plugin descriptor).

Only ``+ - * //``, ``min`` and ``max`` of non-negative integers appear, which is what TensorRT's plugin shape
expressions allow (``cdiv`` is ``(a + b - 1) // b``). Constants fold as the expression is built.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

_PY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "min": min, "max": max}


class Dim:
    """An immutable integer expression: a constant, a named symbol, or an operation on two expressions."""

    __slots__ = ("args", "op")

    def __init__(self, op: str, *args: Any) -> None:
        self.op = op
        self.args = args

    @staticmethod
    def of(x: Dim | int | str) -> Dim:
        if isinstance(x, Dim):
            return x
        if isinstance(x, str):
            return Dim("sym", x)
        return Dim("const", int(x))

    @property
    def static(self) -> int | None:
        """The value when the expression is a constant, else ``None``."""
        return self.args[0] if self.op == "const" else None

    def symbols(self) -> set[str]:
        if self.op == "sym":
            return {self.args[0]}
        if self.op == "const":
            return set()
        return self.args[0].symbols() | self.args[1].symbols()

    def eval(self, env: Mapping[str, Any], ops: DimOps | None = None) -> Any:
        """The expression with each symbol replaced by ``env[symbol]``, combined by ``ops`` (default: Python ints)."""
        ops = ops or INT_OPS
        if self.op == "const":
            return self.args[0]
        if self.op == "sym":
            return env[self.args[0]]
        a, b = (x.eval(env, ops) for x in self.args)
        return ops.apply(self.op, a, b)

    def __str__(self) -> str:
        if self.op == "const":
            return str(self.args[0])
        if self.op == "sym":
            return self.args[0]
        a, b = self.args
        if self.op in ("min", "max"):
            return f"{self.op}({a}, {b})"
        return f"({a} {self.op} {b})"

    __repr__ = __str__

    def __add__(self, o): return _bin("+", self, o)
    def __radd__(self, o): return _bin("+", o, self)
    def __sub__(self, o): return _bin("-", self, o)
    def __rsub__(self, o): return _bin("-", o, self)
    def __mul__(self, o): return _bin("*", self, o)
    def __rmul__(self, o): return _bin("*", o, self)
    def __floordiv__(self, o): return _bin("//", self, o)
    def __rfloordiv__(self, o): return _bin("//", o, self)


def _bin(op: str, a, b) -> Dim:
    a, b = Dim.of(a), Dim.of(b)
    if a.static is not None and b.static is not None:
        return Dim("const", _PY[op](a.static, b.static))
    if op in ("+", "-") and b.static is not None and a.op in ("+", "-") and a.args[1].static is not None:
        # (x ± c1) ± c2 → x + c
        c = (a.args[1].static if a.op == "+" else -a.args[1].static) + (b.static if op == "+" else -b.static)
        return _bin("+", a.args[0], c) if c >= 0 else _bin("-", a.args[0], -c)
    if op in ("+", "-") and b.static == 0:
        return a
    if op == "+" and a.static == 0:
        return b
    if op in ("*", "//") and b.static == 1:
        return a
    if op == "*" and a.static == 1:
        return b
    if op == "*" and 0 in (a.static, b.static):
        return Dim("const", 0)
    return Dim(op, a, b)


def dmin(a, b) -> Dim:
    return _bin("min", a, b)


def dmax(a, b) -> Dim:
    return _bin("max", a, b)


def cdiv(a, b) -> Dim:
    """``ceil(a / b)`` for non-negative integers."""
    return (Dim.of(a) + Dim.of(b) - 1) // b


class DimOps:
    """How to combine evaluated operands; Python ints by default, folding whenever both are ints."""

    def apply(self, op: str, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return _PY[op](a, b)
        return self.combine(op, a, b)

    def combine(self, op: str, a, b):
        if isinstance(a, Dim) or isinstance(b, Dim):
            return _bin(op, a, b)
        return _PY[op](a, b)


INT_OPS = DimOps()


class TorchDimOps(DimOps):
    """``torch.SymInt`` operands (``register_fake``): ``min``/``max`` through ``torch.sym_min``/``sym_max``."""

    def combine(self, op: str, a, b):
        import torch

        if op == "min":
            return torch.sym_min(a, b)
        if op == "max":
            return torch.sym_max(a, b)
        return _PY[op](a, b)


class OnnxDimOps(DimOps):
    """Operands are ints or 1-element int64 ONNX values recorded on ``tape`` (``Add``/``Sub``/.../``Min``/``Max``).

    Operands are non-negative, so ONNX's truncating integer ``Div`` is the floor division of the expression.
    """

    _ONNX = {"+": "Add", "-": "Sub", "*": "Mul", "//": "Div", "min": "Min", "max": "Max"}

    def __init__(self, tape) -> None:
        self.tape = tape

    def value(self, x):
        return self.tape.ints(x) if isinstance(x, int) else x

    def combine(self, op: str, a, b):
        return self.tape.op(self._ONNX[op], [self.value(a), self.value(b)])


def bind(ports_dims: list[tuple[str, ...] | None], shapes: list[tuple | None]) -> dict[str, Any]:
    """Symbol → value from the inputs' shapes (the first input naming a symbol fixes it)."""
    env: dict[str, Any] = {}
    for dims, shape in zip(ports_dims, shapes):
        if dims is None or shape is None:
            continue
        if len(shape) != len(dims):
            raise ValueError(f"expected rank {len(dims)} ({', '.join(dims)}), got shape {tuple(shape)}")
        for sym, d in zip(dims, shape):
            if isinstance(sym, str) and sym not in env and d is not None:
                env[sym] = d
    return env


def evaluate(exprs: list[tuple[Dim | str | int, ...]], env: Mapping[str, Any], ops: DimOps | None = None,
             missing: Callable[[str], Any] | None = None) -> list[tuple]:
    """Each output's dims evaluated; a symbol absent from ``env`` gives ``missing(sym)`` (default: KeyError)."""
    out = []
    for dims in exprs:
        row = []
        for d in dims:
            d = Dim.of(d)
            absent = d.symbols() - set(env)
            if absent and missing is not None:
                row.append(missing(sorted(absent)[0]))
            else:
                row.append(d.eval(env, ops))
        out.append(tuple(row))
    return out
