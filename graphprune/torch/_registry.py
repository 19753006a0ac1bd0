"""One ONNX translation table per process for the dynamo exporter.

``torch.onnx.export(dynamo=True)`` builds its table of ATen → ONNX translations (``ONNXRegistry.from_torchlib``)
anew on every call, inferring the signature of each of ~2,000 torchlib functions: 0.5–1.3 s per export on this
project's 2-core machine, which is most of the cost of exporting a small module and a tenth of exporting a small
BERT. The table depends only on the torch/onnxscript install and the opset, so :func:`reused_registry` builds it
once per opset and hands each export its own copy (the exporter adds a call's custom translations to the copy, never
to the shared one). The translations, and so the exported models, are the same.

Only the exports graphprune runs (``graphprune.torch.export``) use it; a user's own ``torch.onnx.export`` calls
are untouched. It relies on torch's private exporter module: when that is missing or changed, exports run as
before, without the reuse.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator

_lock = threading.RLock()
_depth = 0
_original = None
_tables: dict[tuple[type, int], object] = {}


def _registry_class():
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return None
    cls = getattr(_registration, "ONNXRegistry", None)
    raw = cls.__dict__.get("from_torchlib") if cls is not None else None
    if not isinstance(raw, classmethod) or not isinstance(getattr(cls(), "functions", None), dict):
        return None
    return cls


def _copy(table):
    """A registry that shares the (never mutated) translation entries of ``table`` but not its lists."""
    out = copy.copy(table)
    out.functions = {k: list(v) for k, v in table.functions.items()}
    return out


@contextlib.contextmanager
def reused_registry() -> Iterator[None]:
    """Within the block, ``ONNXRegistry.from_torchlib(opset)`` returns a copy of a table built once per opset."""
    global _depth, _original
    cls = _registry_class()
    if cls is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _original = cls.__dict__["from_torchlib"]
            build = _original.__func__

            def from_torchlib(klass, opset_version=None):
                args = () if opset_version is None else (opset_version,)
                key = (klass, opset_version)
                if key not in _tables:
                    _tables[key] = build(klass, *args)
                return _copy(_tables[key])

            cls.from_torchlib = classmethod(from_torchlib)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                cls.from_torchlib = _original
                _original = None
