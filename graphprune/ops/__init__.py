"""``ai.graphprune`` ops: one module per op (schema, numpy reference, standard-op function body)."""

from __future__ import annotations

import importlib

from graphprune.ops._base import (
    DOMAIN,
    DOMAIN_VERSION,
    FLOPS_RULES,
    OpSchema,
    add_function,
    flops_rule,
    overload_key,
)

# Op modules, imported lazily (``load_all``) so that their FLOPs rules are registered.
_OP_MODULES = ("token_select", "token_merge", "diversity_select", "sparse_attention")


def load_all() -> None:
    """Import every op module (registers FLOPs rules)."""
    for mod in _OP_MODULES:
        importlib.import_module(f"graphprune.ops.{mod}")


__all__ = ["DOMAIN", "DOMAIN_VERSION", "FLOPS_RULES", "OpSchema", "add_function", "flops_rule", "load_all", "overload_key"]
