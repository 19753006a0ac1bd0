"""Pass registry. A pass is a module here plus ``@register`` on its class; nothing else needs to change."""

from __future__ import annotations

import importlib

from graphprune.errors import ConfigError
from graphprune.passes.base import GraphPass, GraphResult, NoConfig, PassConfig, PassContext, Rewrite, Skip, Skipped

_REGISTRY: dict[str, type[GraphPass]] = {}

# Modules that define registered passes, imported on first registry access.
_PASS_MODULES = ("cleanup", "token_drop", "sparse_attention", "channel_prune", "depth_prune")
_loaded = False


def register(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _PASS_MODULES:
        importlib.import_module(f"graphprune.passes.{mod}")
    _loaded = True


def registry() -> dict[str, type[GraphPass]]:
    """All registered passes by name."""
    _load()
    return dict(_REGISTRY)


def get_pass(name: str) -> type[GraphPass]:
    """The pass class registered as ``name``; a :class:`ConfigError` naming the choices otherwise."""
    reg = registry()
    if name not in reg:
        raise ConfigError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(reg))}")
    return reg[name]


__all__ = ["GraphPass", "GraphResult", "NoConfig", "PassConfig", "PassContext", "Rewrite", "Skip", "Skipped", "get_pass",
           "register", "registry"]
