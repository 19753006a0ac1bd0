"""``ai.graphprune`` ops: one module per op (schema, numpy reference, standard-op function body)."""

from graphprune.ops._base import DOMAIN, DOMAIN_VERSION, OpSchema, add_function, overload_key

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OpSchema", "add_function", "overload_key"]
