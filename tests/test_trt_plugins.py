"""TensorRT plugin definitions generated from the op definitions (what can be checked without TensorRT), and the
ahead-of-time PTX of the kernels for sm_80 and sm_90 (triton compiles without a GPU)."""

from __future__ import annotations

import importlib.util

import pytest

from graphprune.backends import plugins
from graphprune.errors import GraphpruneError
from graphprune.ops import REGISTRY, SparseAttention, TokenMerge, TokenSelect
from graphprune.ops._dims import Dim, dmax, dmin

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


class FakeTrtp:
    """Stands in for ``tensorrt.plugin``: shape expressions are graphprune ``Dim`` expressions."""

    min = staticmethod(dmin)
    max = staticmethod(dmax)


def test_one_spec_per_op_with_legal_ids_and_fields():
    specs = {s.op.name: s for s in plugins.plugin_specs()}
    assert set(specs) == set(REGISTRY)
    for name, s in specs.items():
        ns, _, plugin = s.id.partition("::")
        assert ns == "graphprune" and plugin == name and "." not in ns
        assert {a.name for a in REGISTRY[name].attributes} == {f[0] for f in s.fields}
        assert all(t in ("int", "float", "string", "int32[]") for _, t, _ in s.fields)
        assert len(s.autotune[0].split(", ")) == len(s.inputs) + len(s.outputs)
    assert specs["SparseAttention"].inputs == ("Q", "K", "V")  # optional inputs are not registered
    assert specs["TokenSelect"].autotune[0] == "FP32|FP16, FP32|FP16, FP32|FP16, INT64"
    assert specs["SparseAttention"].kernel == specs["TokenSelect"].kernel == "triton"


@pytest.mark.parametrize("op,attrs,dims,n", [
    (TokenSelect, dict(keep_ratio=0.25, protect=1, fuse_rest=1), [("B", "N", "C"), ("B", "N")], 197),
    (TokenSelect, dict(k=10, protect=1), [("B", "N", "C"), ("B", "N")], 65),
    (TokenMerge, dict(r=8, protect=1), [("B", "N", "C"), ("B", "N", "D")], 65),
    (SparseAttention, dict(pattern="sliding_window", window=8), [("B", "H", "N", "D")] * 3, 40),
])
def test_shape_expressions_through_trt_dim_ops(op, attrs, dims, n):
    spec = next(s for s in plugins.plugin_specs() if s.op is op)
    exprs = spec.output_shapes([tuple(Dim.of(d) for d in shape) for shape in dims], attrs, plugins.TrtDimOps(FakeTrtp))
    env = {"B": 2, "N": n, "C": 32, "D": 16, "H": 2}
    got = [tuple(Dim.of(d).eval(env) for d in shape) for shape in exprs]
    concrete = [tuple(env[d] for d in shape) for shape in dims]
    assert got == [tuple(s) for s in op.output_shapes(concrete, op.normalize(**attrs))]


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_register_without_tensorrt_names_what_is_missing():
    with pytest.raises(GraphpruneError, match="need TensorRT >= 10.7 with tensorrt.plugin"):
        plugins.register_all()


@pytest.mark.kernels
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_ptx(arch):
    pytest.importorskip("triton")
    from graphprune.kernels import aot

    k = aot.sparse_attention_ptx("float16", "sliding_window", head_dim=64, block=64, arch=arch)
    assert k.name == "_sparse_attention_fwd" and k.arch == arch
    assert f".target sm_{arch}" in k.ptx and f".visible .entry {k.name}(" in k.ptx
    assert k.num_warps == 4
    if arch == 90:
        names = [c.name for c in aot.token_select_ptx("float32", arch=arch)]
        assert names == ["_rank", "_kept_before", "_gather", "_fuse_rest"]


@pytest.mark.kernels
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_ptx_merge_and_diversity(arch):
    """The one-launch kernels compile for sm_80 / sm_90, and their entries take exactly what TensorRT's AOT launch
    passes: the input pointers, the int32 scalars, the output pointers (Triton's unused scratch pointers dropped)."""
    pytest.importorskip("triton")
    from graphprune.kernels import aot

    merge = aot.token_merge_ptx("float16", n=65, channels=64, metric_dim=32, has_size=True, arch=arch, r=8, protect=1)
    diverse = aot.diversity_select_ptx("float32", n=65, channels=64, arch=arch, k=16, protect=1)
    for k, name, params in ((merge, "_token_merge", [".u64"] * 3 + [".u32"] * 3 + [".u64"] * 3),
                            (diverse, "_diversity_select", [".u64"] + [".u32"] * 2 + [".u64"] * 2)):
        assert k.name == name and k.arch == arch
        assert f".target sm_{arch}" in k.ptx and f".visible .entry {name}(" in k.ptx
        head = k.ptx[k.ptx.index(f".entry {name}("):]
        head = head[: head.index(")")]
        assert [p.split()[1] for p in head.splitlines()[1:]] == params
        assert len(aot.entry_params(k.ptx, name)) == len(params)
        assert "ret;" in k.ptx and k.num_warps in (4, 8)


def test_strip_unused_params_keeps_read_ones():
    from graphprune.kernels import aot

    ptx = (".visible .entry f(\n\t.param .u64 f_param_0,\n\t.param .u32 f_param_1,\n\t.param .u64 f_param_2,\n"
           "\t.param .u64 f_param_3\n)\n{\n\tld.param.b64 %rd1, [f_param_0];\n\tld.param.b32 %r1, [f_param_1];\n}\n")
    out = aot.strip_unused_params(ptx, "f")
    assert aot.entry_params(out, "f") == ["f_param_0", "f_param_1"]
    assert "f_param_1\n)" in out and "ld.param.b32 %r1, [f_param_1];" in out
    read_all = ptx.replace("}\n", "\tld.param.b64 %rd2, [f_param_3];\n}\n")
    assert aot.strip_unused_params(read_all, "f") == read_all  # the last one is read: nothing dropped
