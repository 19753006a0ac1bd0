"""Ahead-of-time compilation of the kernels to PTX, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` runs the whole
Triton pipeline (ttir → ttgir → llir → ptx → cubin) on a CPU-only machine; ``ptx`` is what a TensorRT
``@trtp.aot_impl`` returns. The kernel function is wrapped in a fresh ``JITFunction`` here, so this works
whether or not the modules were imported under ``TRITON_INTERPRET=1``. Triton's code generator does not work in a
process where the interpreter is on (it patches ``triton.language``), so there the compilation runs in a child
process with the variable removed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

_MODULES = ("graphprune.kernels.sparse_attention", "graphprune.kernels.sparse_attention_routed",
            "graphprune.kernels.sparse_attention_vs",
            "graphprune.kernels.token_select", "graphprune.kernels.token_merge",
            "graphprune.kernels.diversity_select")
_PTR = {"float32": "*fp32", "float16": "*fp16"}


_PARAM = re.compile(r"^\s*\.param\s.*?(\S+?),?\s*$")


def entry_params(ptx: str, name: str) -> list[str]:
    """The parameter names of PTX entry ``name``, in order."""
    head = ptx[ptx.index(f".entry {name}("):]
    head = head[: head.index(")")]
    return [m.group(1) for line in head.splitlines()[1:] if (m := _PARAM.match(line))]


def strip_unused_params(ptx: str, name: str) -> str:
    """Drop trailing entry parameters the kernel body never reads.

    Triton appends two pointers (global and profile scratch) to every kernel's parameters. TensorRT's AOT launch
    passes exactly the plugin's inputs, the extra int32 scalars and the outputs, so an entry that declares more
    parameters than that would read past the argument array. The kernels here use no scratch (checked from the
    metadata), so the trailing pointers are unread and can go.
    """
    params = entry_params(ptx, name)
    start = ptx.index(f".entry {name}(")
    close = ptx.index(")", start)
    body = ptx[close:]
    keep = len(params)
    while keep > len(params) - 2 and f"[{params[keep - 1]}]" not in body:  # at most Triton's two scratch pointers
        keep -= 1
    if keep == len(params):
        return ptx
    lines = ptx[start:close].splitlines()
    decl = [line for line in lines[1:] if _PARAM.match(line)]
    kept = [line.rstrip().rstrip(",") for line in decl[:keep]]
    new_head = "\n".join([lines[0]] + [line + ("," if i < keep - 1 else "") for i, line in enumerate(kept)]) + "\n"
    return ptx[:start] + new_head + ptx[close:]


@dataclasses.dataclass(frozen=True)
class Compiled:
    name: str  # the PTX entry
    arch: int
    ptx: str
    num_warps: int
    shared: int


def sources() -> dict:
    """Kernel name → plain kernel function, over every kernel module."""
    out = {}
    for mod in _MODULES:
        out.update(importlib.import_module(mod).SOURCES)
    return out


def signature(fn, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict[str, str]:
    """Triton signature: pointer types from ``pointers``, ``fp32`` scalars in ``floats``, ``i32`` for the rest."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def compile_ptx(kernel: str, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = (),
                arch: int = 90, num_warps: int = 4) -> Compiled:
    """PTX of ``kernel`` (a key of :func:`sources`) for ``sm_<arch>``."""
    from graphprune.kernels import interpreted

    if interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = json.dumps([kernel, pointers, constexprs, list(floats), arch, num_warps])
        res = subprocess.run([sys.executable, "-m", "graphprune.kernels.aot", args], env=env, capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"PTX compilation of {kernel} failed: {res.stderr.strip().splitlines()[-1:]}")
        return Compiled(**json.loads(res.stdout))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(sources()[kernel])
    src = ASTSource(fn, signature(fn, pointers, floats, constexprs), constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = k.asm["ptx"]
    if not getattr(k.metadata, "global_scratch_size", 0) and not getattr(k.metadata, "profile_scratch_size", 0):
        ptx = strip_unused_params(ptx, k.metadata.name)
    return Compiled(k.metadata.name, arch, ptx, k.metadata.num_warps, k.metadata.shared)


def sparse_attention_ptx(dtype: str = "float16", pattern: str = "sliding_window", causal: bool = False,
                         bias: bool = False, head_dim: int = 64, block: int = 64, arch: int = 90) -> Compiled:
    """The SparseAttention kernel specialised for one dtype, pattern family, bias and head size."""
    from graphprune.kernels.sparse_attention import MODES

    t = _PTR[dtype]
    d = max(16, 1 << (head_dim - 1).bit_length())
    return compile_ptx(
        "sparse_attention_fwd",
        {"Q": t, "K": t, "V": t, "Bias": t, "Chosen": "*i8", "Table": "*i32", "Out": t},
        dict(MODE=MODES[pattern], CAUSAL=causal, HAS_BIAS=bias, BLOCK_M=block, BLOCK_N=block, BLOCK_D=d,
             BLOCK_DV=d),
        floats=("scale",), arch=arch)


def sparse_attention_static_ptx(dtype: str = "float16", arch: int = 90, head_dim: int = 64, n: int | None = None,
                                bias_shape: tuple | None = None, block: int = 64, **attrs) -> Compiled:
    """The table-free SparseAttention kernel (sliding window, 2-D neighborhood) in TensorRT's AOT argument order,
    for one dtype, attribute set, head size and bias shape."""
    from graphprune.kernels import sparse_attention as sa

    t = _PTR[dtype]
    const = sa.static_constexprs(attrs, n, head_dim, head_dim, bias_shape, block)
    return compile_ptx("sparse_attention_static", {"Q": t, "K": t, "V": t, "Bias": t, "Layout": "*i64", "Out": t},
                       const, arch=arch)


def sparse_attention_routed_ptx(dtype: str = "float16", arch: int = 90, head_dim: int = 64, n: int | None = None,
                                bias_shape: tuple | None = None, layout_heads: int = 1, **attrs) -> Compiled:
    """The table-free routed SparseAttention kernel (``block_topk`` with its routing in the kernel,
    ``block_layout`` reading its layout row) in TensorRT's AOT argument order, for one dtype, attribute set, head
    size, bias shape and layout head count; ``n`` None compiles for a dynamic N (``block_topk``)."""
    from graphprune.kernels import sparse_attention_routed as sr

    t = _PTR[dtype]
    const = sr.routed_constexprs(attrs, n, head_dim, head_dim, bias_shape, layout_heads)
    return compile_ptx("sparse_attention_routed", {"Q": t, "K": t, "V": t, "Bias": t, "Layout": "*i64", "Out": t},
                       const, arch=arch, num_warps=sr.num_warps(const))


def sparse_attention_vs_ptx(dtype: str = "float16", arch: int = 90, head_dim: int = 64, block: int = 64,
                            block_c: int = 16) -> Compiled:
    """The ``vertical_slash`` attention kernel (selection done before it: offsets and columns are inputs) for one
    dtype, head size and block; any N, kept counts and scale (runtime arguments)."""
    t = _PTR[dtype]
    d = max(16, 1 << (head_dim - 1).bit_length())
    return compile_ptx("sparse_attention_vs",
                       {"Q": t, "K": t, "V": t, "Offsets": "*i32", "Columns": "*i32", "Out": t},
                       dict(BS=block, BLOCK_C=block_c, BLOCK_D=d, BLOCK_DV=d), floats=("scale",), arch=arch)


def token_select_ptx(dtype: str = "float16", arch: int = 90, **attrs) -> Compiled:
    """The TokenSelect kernel for one dtype and attribute set (any N)."""
    from graphprune.kernels import token_select as ts

    t = _PTR[dtype]
    return compile_ptx("token_select", {"X": t, "S": t, "Y": t, "Idx": "*i64"}, ts.constexprs(attrs or {"k": 1}),
                       arch=arch)


def token_merge_ptx(dtype: str = "float16", n: int = 197, channels: int = 384, metric_dim: int = 64,
                    has_size: bool = True, arch: int = 90, **attrs) -> Compiled:
    """The TokenMerge kernel for one dtype, attribute set and size presence; ``n`` is the largest token count it
    will see (it bounds the register blocks; any smaller N runs too)."""
    from graphprune.kernels import token_merge as tm

    t = _PTR[dtype]
    return compile_ptx("token_merge", {"X": t, "Metric": t, "Size": t, "Y": t, "SizeOut": t, "Idx": "*i64"},
                       dict(HAS_SIZE=has_size, **tm.constexprs(n, channels, metric_dim, attrs)), arch=arch,
                       num_warps=tm.num_warps(n, attrs))


def diversity_select_ptx(dtype: str = "float16", n: int = 197, channels: int = 384, arch: int = 90,
                         **attrs) -> Compiled:
    """The DiversitySelect kernel for one dtype and attribute set; ``n`` is the largest token count it will see."""
    from graphprune.kernels import diversity_select as ds

    t = _PTR[dtype]
    k = ds.constexprs(n, channels, attrs)
    return compile_ptx("diversity_select", {"X": t, "Y": t, "Idx": "*i64"}, k, arch=arch,
                       num_warps=8 if k["BLOCK_M"] >= 512 else 4)


if __name__ == "__main__":  # the child process of compile_ptx under the interpreter
    kernel, pointers, constexprs, floats, arch, num_warps = json.loads(sys.argv[1])
    print(json.dumps(dataclasses.asdict(compile_ptx(kernel, pointers, constexprs, tuple(floats), arch, num_warps))))
