"""Shared machinery for ``ai.graphprune`` ops.

Each op module in this package holds, for one op:
  * ``SCHEMA``: an :class:`OpSchema` (inputs, outputs, attributes, the shape rule in words);
  * ``reference(...)``: a numpy implementation, the semantics that tests compare against;
  * ``make_function(...) -> ir.Function``: a model-local function body made only of standard ONNX ops;
  * ``make_node(...) -> ir.Node``: a node of the op, carrying its attributes and the body's overload key.

A body that depends on static attributes (window, k, ...) is specialised: one function per attribute
set, told apart by the ONNX function ``overload`` field. The node keeps op type ``<Op>`` in the domain,
so a TensorRT plugin or ORT contrib op of the same name can replace the body. ORT 1.31 resolves
overloads (checked: two overloads of one op in one model give the right results).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable

import onnx_ir as ir

DOMAIN = "ai.graphprune"
DOMAIN_VERSION = 1
#: Opset of the standard ops used inside function bodies.
BODY_OPSET = 18


@dataclasses.dataclass(frozen=True)
class OpSchema:
    """Human- and tool-readable description of an op."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, str]
    shape_rule: str
    doc: str = ""


def overload_key(attrs: dict) -> str:
    """A short stable overload name for a set of static attributes."""
    text = json.dumps(attrs, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def add_function(model: ir.Model, function: ir.Function) -> None:
    """Add ``function`` to ``model`` (once per identifier) and import the ``ai.graphprune`` domain."""
    if function.identifier() not in model.functions:
        model.functions[function.identifier()] = function
    model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    model.graph.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    # Function bodies use standard ops; the model must import a default opset they can run under.
    model.graph.opset_imports.setdefault("", BODY_OPSET)


#: FLOPs rules for ``ai.graphprune`` ops, by op type: ``rule(node) -> int`` (multiply-add = 2 FLOPs).
FLOPS_RULES: dict[str, Callable[[ir.Node], int]] = {}


def flops_rule(op_type: str) -> Callable[[Callable[[ir.Node], int]], Callable[[ir.Node], int]]:
    """Decorator: register the FLOPs rule of an ``ai.graphprune`` op (used by ``analysis.flops``)."""

    def deco(fn: Callable[[ir.Node], int]) -> Callable[[ir.Node], int]:
        FLOPS_RULES[op_type] = fn
        return fn

    return deco
