"""``torch.ops.graphprune.<snake_name>``: every ``ai.graphprune`` op as a torch custom op, from its definition.

For each :class:`~graphprune.ops._base.OpDef` in the registry:
  * the schema takes the op's inputs as tensors and its attributes as keyword arguments with the ONNX
    attribute names (``OpDef.torch_schema``);
  * the eager kernel is ``OpDef.compute`` run with the torch array-API namespace (the same code the numpy
    reference runs);
  * ``register_fake`` evaluates the op's shape expressions over the inputs' ``SymInt`` dims;
  * autograd: the backward differentiates the same ``compute`` (``_autograd``);
  * ``TRANSLATIONS`` maps each op overload to an ONNX translation for ``torch.onnx.export``: it emits the
    ``ai.graphprune`` node; ``graphprune.torch.export`` then attaches the function body (``add_node_function``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from array_api_compat import torch as _xp

from graphprune.ops import DOMAIN, DOMAIN_VERSION, REGISTRY, OpDef, TorchDimOps, bind, evaluate

_LIB = "graphprune"
TRANSLATIONS: dict[Callable, Callable] = {}


def _kernel(spec: type[OpDef]):
    n_in = len(spec.inputs)

    def kernel(*args, **kwargs):
        inputs = list(args[:n_in]) + [kwargs.pop(p.name, None) for p in spec.inputs[len(args):]]
        # compute reshapes with the array API, which views: a strided input (q from a permuted qkv) is copied first
        inputs = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in inputs]
        a = spec.normalize(**kwargs)
        outs = spec.compute(_xp, *inputs, **a)
        ins = {x.data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
        outs = tuple(o.clone() if o.data_ptr() in ins else o.contiguous() for o in outs)
        return outs if len(outs) > 1 else outs[0]

    return kernel


def _fake(spec: type[OpDef]):
    n_in = len(spec.inputs)
    ports = [p.dims for p in spec.inputs]

    def fake(*args, **kwargs):
        inputs = list(args[:n_in]) + [kwargs.pop(p.name, None) for p in spec.inputs[len(args):]]
        a = spec.normalize(**kwargs)
        env = bind(ports, [None if x is None else tuple(x.shape) for x in inputs])
        shapes = evaluate(spec.symbolic_shapes(a), env, TorchDimOps())
        x0 = inputs[0]
        outs = tuple(x0.new_empty(shape, dtype=x0.dtype if port.dtype == "T" else torch.int64)
                     for port, shape in zip(spec.outputs, shapes))
        return outs if len(outs) > 1 else outs[0]

    return fake


def _autograd(spec: type[OpDef]):
    """Backward by differentiating ``OpDef.compute`` itself (torch namespace): gathers and weighted sums carry
    gradients to the float inputs; indices (TopK, argsort) carry none. So a module can train with the op in place."""
    n_in = len(spec.inputs)

    def setup_context(ctx, inputs, keyword_only_inputs, output):
        ctx.inputs = inputs
        ctx.kwargs = dict(keyword_only_inputs)

    def backward(ctx, *grads):
        inputs = [x.detach().contiguous().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                  for x in ctx.inputs]
        kw = dict(ctx.kwargs)
        with torch.enable_grad():
            ins = list(inputs[:n_in]) + [kw.pop(p.name, None) for p in spec.inputs[len(inputs):]]
            outs = spec.compute(_xp, *ins, **spec.normalize(**kw))
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.is_floating_point() and o.requires_grad]
        wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                   if pairs and wrt else [None] * len(wrt))
        return tuple(next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs)

    return backward, setup_context


def _translation(spec: type[OpDef]):
    from onnxscript.values import Op, Opset

    op = Op(Opset(DOMAIN, DOMAIN_VERSION), spec.name, spec.onnx_schema())
    n_in = len(spec.inputs)

    def translate(*args, **kwargs):
        inputs = list(args[:n_in]) + [kwargs.pop(p.name, None) for p in spec.inputs[len(args):]]
        a = spec.normalize(**kwargs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        return op(*inputs, **{k: v for k, v in a.items() if v is not None})

    translate.__name__ = f"graphprune_{spec.snake}"
    return translate


def _register_all() -> None:
    for spec in REGISTRY.values():
        qualname = f"{_LIB}::{spec.snake}"
        if hasattr(torch.ops, _LIB) and hasattr(getattr(torch.ops, _LIB), spec.snake):
            continue
        op = torch.library.custom_op(qualname, _kernel(spec), mutates_args=(), schema=spec.torch_schema())
        op.register_fake(_fake(spec))
        backward, setup = _autograd(spec)
        op.register_autograd(backward, setup_context=setup)
        TRANSLATIONS[getattr(getattr(torch.ops, _LIB), spec.snake).default] = _translation(spec)


_register_all()
