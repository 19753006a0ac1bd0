"""The tensor-level pieces ``apply_plan`` (:mod:`._apply`) and its FX path (:mod:`._fx`) share: the slicing of a
plan (fqn → axis → kept indices), a module copy with those tensors sliced, and the tensors of a nested output."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from graphprune.errors import GraphpruneError


def split_fqn(fqn: str) -> tuple[str, str]:
    return fqn.rsplit(".", 1) if "." in fqn else ("", fqn)


class Slicing:
    """fqn → {axis: keep}, with a conflict check (one tensor sliced two ways is a plan the module cannot hold)."""

    def __init__(self) -> None:
        self.axes: dict[str, dict[int, tuple[int, ...]]] = {}

    def add(self, fqn: str, axis: int, keep: Sequence[int], where: str) -> None:
        cur = self.axes.setdefault(fqn, {})
        keep = tuple(int(k) for k in keep)
        if axis in cur and cur[axis] != keep:
            raise GraphpruneError(f"apply_plan: parameter {fqn!r} is sliced two different ways on axis {axis} ({where}); "
                                  "a shared tensor that the plan prunes differently per use cannot be one parameter")
        cur[axis] = keep


def slice_module(module: nn.Module, slicing: Slicing) -> nn.Module:
    """A deep copy of ``module`` with every tensor of ``slicing`` sliced (parameters stay parameters, tied ones
    stay tied); attributes are not touched."""
    pruned = copy.deepcopy(module)
    done: dict[int, tuple] = {}
    for fqn, axes in slicing.axes.items():
        owner_name, attr = split_fqn(fqn)
        owner = pruned.get_submodule(owner_name)
        t = getattr(owner, attr)
        spec = tuple(sorted(axes.items()))
        if id(t) in done:
            if done[id(t)][0] != spec:
                raise GraphpruneError(f"apply_plan: tied parameter {fqn!r} is sliced differently from its twin")
            new = done[id(t)][1]
        else:
            data = t.detach()
            for axis, keep in spec:
                if axis >= data.dim():
                    raise GraphpruneError(f"apply_plan: {fqn!r} has no axis {axis} (shape {tuple(data.shape)})")
                data = data.index_select(axis, torch.tensor(keep, dtype=torch.long, device=data.device))
            data = data.clone().contiguous()
            new = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
            done[id(t)] = (spec, new)
        if isinstance(t, nn.Parameter):
            setattr(owner, attr, new)
        else:
            owner._buffers[attr] = new
    return pruned


def flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_tensors(v)]
    return []
