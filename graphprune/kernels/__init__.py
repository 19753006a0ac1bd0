"""Triton kernels for the ``ai.graphprune`` ops (implementations of ``OpDef.compute``; tested against
``OpDef.reference``).

Each module exposes a torch-level launcher (``sparse_attention``, ``token_select``, ...) that runs on CUDA tensors,
or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package was imported (triton reads it when a
kernel is decorated). ``SOURCES`` of each module hold the plain kernel functions for ahead-of-time compilation
(:mod:`graphprune.kernels.aot`). Importing needs ``triton`` (``pip install graphprune[tensorrt]``).
"""

from __future__ import annotations

import os


def interpreted() -> bool:
    """Whether kernels were decorated for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pow2(x: int, lo: int = 16) -> int:
    """The next power of two >= ``x`` and >= ``lo``: a Triton block size for ``x`` elements."""
    return max(lo, 1 << (max(1, x) - 1).bit_length())
