"""Does a pruned eager module still run, when ``apply_plan`` has no example inputs? A shape-only check.

``graphprune.torch.optimize`` records the example inputs' shapes and dtypes in the plan (``info.torch.inputs``).
Without ``example_inputs``, :func:`shape_failure` runs the original module and the pruned copy on tensors of
those shapes under ``FakeTensorMode``: every op computes only its output's shape and dtype, so the check costs no
arithmetic and reads no weight, yet a ``reshape``/``view`` whose sizes the forward hard-codes (``reshape(B, N,
3, 12, 64)``, or ``reshape(b, n, c)`` with ``c`` read from the input) raises exactly as it would on real data.

The pruned copy is reported only when the *original* module runs cleanly under the same fake inputs and the copy
raises a shape error; anything the fake run cannot decide (data-dependent control flow, an op without a shape
rule, no recorded inputs) is not a failure, so a module that would run is never refused.
"""

from __future__ import annotations

import torch
from torch import nn

#: ``apply_plan``'s shape errors: what a hard-coded size raises in eager PyTorch.
SHAPE_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)


def recorded_inputs(plan: dict) -> list[tuple[list[int], str]] | None:
    """The example inputs' ``(shape, dtype)`` that ``graphprune.torch.optimize`` wrote into the plan, if any."""
    specs = plan.get("info", {}).get("torch", {}).get("inputs")
    if not isinstance(specs, list) or not specs:
        return None
    try:
        return [([int(d) for d in shape], str(dtype)) for shape, dtype in specs]
    except (TypeError, ValueError):
        return None


def _undecidable() -> tuple[type, ...]:
    """Errors that say the fake run could not decide, not that the shapes are wrong."""
    from torch._subclasses import fake_tensor
    from torch.fx.experimental import symbolic_shapes

    names = [(fake_tensor, "DataDependentOutputException"), (fake_tensor, "DynamicOutputShapeException"),
             (fake_tensor, "UnsupportedOperatorException"), (fake_tensor, "UnsupportedFakeTensorException"),
             (symbolic_shapes, "GuardOnDataDependentSymNode")]
    return (NotImplementedError, *(getattr(m, n) for m, n in names if isinstance(getattr(m, n, None), type)))


def _fake_run(module: nn.Module, specs: list[tuple[list[int], str]]) -> BaseException | None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    was = module.training
    module.eval()
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            args = [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in specs]
            module(*args)
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return e
    finally:
        module.train(was)
    return None


def shape_failure(original: nn.Module, pruned: nn.Module, plan: dict) -> str | None:
    """Why ``pruned`` cannot run on inputs shaped like the plan's export (one line), or ``None`` when it runs or
    the check cannot tell (see module docstring)."""
    specs = recorded_inputs(plan)
    if specs is None or any(not isinstance(getattr(torch, d, None), torch.dtype) for _, d in specs):
        return None
    if _fake_run(original, specs) is not None:
        return None  # the fake run cannot follow this forward: no verdict
    err = _fake_run(pruned, specs)
    if err is None or isinstance(err, _undecidable()) or not isinstance(err, SHAPE_ERRORS):
        return None
    first = str(err).splitlines()[0] if str(err) else ""
    shapes = ", ".join(f"{list(s)} {d}" for s, d in specs)
    return f"{type(err).__name__}: {first} (on inputs shaped {shapes})"
