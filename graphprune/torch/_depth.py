"""Removed blocks and branches (``depth_prune``) in the prune plan, and on an ``nn.Module``.

``depth_prune`` names, for each unit it removes from the export, the module that computes it (``info.modules``,
from the exporter's name scopes): a whole block (``model.layers.3``), or a residual branch (``model.layers.3.mlp``).
:func:`record_units` runs the module once on the example inputs to see what each of those returns, and writes
the plan's ``depth`` entries::

    {"unit": "block 3", "module": "model.layers.3", "replace": "passthrough", "returns": 1, "features": 256}

:func:`remove_units` puts a :class:`RemovedUnit` in each one's place: a block returns its input stream, a branch
returns zeros (its residual ``Add`` then passes the stream on, a post-norm block's norm still applies: what the
ONNX pass does). ``returns`` is the original's output: ``0`` a tensor, ``n`` a tuple of ``n`` whose first item is
the tensor (the rest become ``None``, as attention weights that were not asked for are).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from graphprune.errors import GraphpruneError


class RemovedUnit(nn.Module):
    """Stands where a removed block (``passthrough``: its first tensor input) or branch (``zeros``: zeros with
    ``features`` channels, shaped like its first tensor input otherwise) was."""

    def __init__(self, replace: str, returns: int, features: int):
        super().__init__()
        self.replace, self.returns, self.features = replace, int(returns), int(features)

    def extra_repr(self) -> str:
        return f"{self.replace}, returns={self.returns}, features={self.features}"

    def forward(self, *args, **kwargs):
        x = _first_tensor(args, kwargs)
        if x is None:
            raise GraphpruneError("a removed unit was called without a tensor input")
        if self.replace == "zeros":
            x = x.new_zeros((*x.shape[:-1], self.features))
        return x if self.returns == 0 else (x, *([None] * (self.returns - 1)))


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def record_units(module: nn.Module, args: tuple, records: list[dict]) -> list[dict]:
    """The plan's ``depth`` entries for the ``depth_prune`` steps in ``records`` (the pipeline report's ``passes``),
    with what each named module returns on ``args``. A unit no module stands for, alone, gets ``module: None`` and
    ``why`` (:func:`remove_units` refuses it)."""
    units = []
    for rec in records:
        if rec.get("name") != "depth_prune" or not rec.get("changed"):
            continue
        for where, target in ((rec.get("info") or {}).get("modules") or {}).items():
            units.append((where, target, where.count(" ") == 1))  # "block 3" | "block 3 attention"
    if not units:
        return []
    named = dict(module.named_modules())
    seen: dict[str, tuple] = {}
    hooks = []
    for _, target, _ in units:
        if isinstance(target, str) and target in named:
            def hook(mod, a, kw, out, target=target):
                seen.setdefault(target, (_first_tensor(a, kw), out))
            hooks.append(named[target].register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    entries = []
    for where, target, block in units:
        if isinstance(target, dict):
            entries.append({"unit": where, "module": None, "why": target.get("none", "no module computes it")})
            continue
        if target not in named:
            entries.append({"unit": where, "module": None, "why": f"{target!r} is not a submodule"})
            continue
        x, out = seen.get(target, (None, None))
        first = out[0] if isinstance(out, tuple) and out else out
        why = None
        if x is None:
            why = f"its module {target!r} did not run on the example inputs"
        elif not isinstance(first, torch.Tensor):
            why = f"its module {target!r} returns {type(out).__name__}, not a tensor or a tuple starting with one"
        elif block and first.shape != x.shape:
            why = f"its module {target!r} returns shape {list(first.shape)} for an input of {list(x.shape)}"
        if why is not None:
            entries.append({"unit": where, "module": None, "why": why})
            continue
        entries.append({"unit": where, "module": target, "replace": "passthrough" if block else "zeros",
                        "returns": len(out) if isinstance(out, tuple) else 0, "features": int(first.shape[-1])})
    return entries


def removed_modules(plan: dict) -> list[str]:
    return [e["module"] for e in plan.get("depth") or [] if e.get("module")]


def remove_units(module: nn.Module, plan: dict) -> nn.Module:
    """A copy of ``module`` with each of the plan's ``depth`` units replaced by a :class:`RemovedUnit`."""
    out = copy.deepcopy(module)
    named = dict(out.named_modules())
    for e in plan.get("depth") or []:
        target = e.get("module")
        if not target:
            raise GraphpruneError(f"apply_plan: the plan removes {e.get('unit')} from the ONNX model, but no module "
                                  f"of {type(module).__name__} computes it alone ({e.get('why')})")
        if target not in named:
            raise GraphpruneError(f"apply_plan: the plan removes {e.get('unit')} as module {target!r}, which "
                                  f"{type(module).__name__} does not have")
        parent, _, leaf = target.rpartition(".")
        setattr(named[parent] if parent else out, leaf, RemovedUnit(e["replace"], e["returns"], e["features"]))
    return out


def outside_removed(plan: dict) -> dict:
    """``plan`` without the slices of nodes computed inside a removed module (their weights are gone with it)."""
    gone = removed_modules(plan)
    if not gone:
        return plan

    def inside(entry: dict) -> bool:
        scope = str(entry.get("scope") or "")
        return any(f"'{m}'" in scope or f"'{m}." in scope for m in gone)
    return {**plan, "slices": [e for e in plan.get("slices", []) if not inside(e)]}
