"""TensorRT plugin definitions generated from the op definitions (what can be checked without TensorRT), and the
ahead-of-time PTX of the kernels for sm_80 and sm_90 (triton compiles without a GPU)."""

from __future__ import annotations

import importlib.util

import pytest

from graphprune.backends import plugins
from graphprune.errors import GraphpruneError
from graphprune.ops import REGISTRY, DiversitySelect, SparseAttention, TokenMerge, TokenSelect
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
    # every port is registered, optional ones included (the lowering fills absent ones)
    assert specs["SparseAttention"].inputs == ("Q", "K", "V", "attn_bias", "layout")
    assert specs["SparseAttention"].autotune[0] == "FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, INT64, FP32|FP16"
    assert specs["TokenMerge"].inputs == ("x", "metric", "size")
    assert specs["TokenMerge"].autotune[0] == ", ".join(["FP32|FP16"] * 5 + ["INT64"])
    assert specs["TokenSelect"].autotune[0] == "FP32|FP16, FP32|FP16, FP32|FP16, INT64"
    assert {s.kernel for s in specs.values()} == {"triton"}
    for name, op in REGISTRY.items():  # every optional input has a fill rule
        for port in op.inputs:
            assert not port.optional or plugins.fill_rule(name, port.name) is not None, (name, port.name)


@pytest.mark.parametrize("op,attrs,dims,n", [
    (TokenSelect, dict(keep_ratio=0.25, protect=1, fuse_rest=1), [("B", "N", "C"), ("B", "N")], 197),
    (TokenSelect, dict(k=10, protect=1), [("B", "N", "C"), ("B", "N")], 65),
    (TokenMerge, dict(r=8, protect=1), [("B", "N", "C"), ("B", "N", "D")], 65),
    (TokenMerge, dict(r=40, protect=1), [("B", "N", "C"), ("B", "N", "D"), ("B", "N", 1)], 65),
    (DiversitySelect, dict(k=12, protect=1), [("B", "N", "C")], 65),
    (SparseAttention, dict(pattern="sliding_window", window=8), [("B", "H", "N", "D")] * 3, 40),
    # with the lowering's placeholders for attn_bias and layout: their dims bind nothing
    (SparseAttention, dict(pattern="sliding_window", window=8), [("B", "H", "N", "D")] * 3 + [(1, 1, 1, 1), (1, 1, 1)],
     40),
])
def test_shape_expressions_through_trt_dim_ops(op, attrs, dims, n):
    spec = next(s for s in plugins.plugin_specs() if s.op is op)
    exprs = spec.output_shapes([tuple(Dim.of(d) for d in shape) for shape in dims], attrs, plugins.TrtDimOps(FakeTrtp))
    env = {"B": 2, "N": n, "C": 32, "D": 16, "H": 2}
    got = [tuple(Dim.of(d).eval(env) for d in shape) for shape in exprs]
    concrete = [tuple(env[d] if isinstance(d, str) else d for d in shape) for shape in dims]
    assert got == [tuple(s) for s in op.output_shapes(concrete, op.normalize(**attrs))]


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_register_without_tensorrt_names_what_is_missing():
    with pytest.raises(GraphpruneError, match="need TensorRT >= 10.7 with tensorrt.plugin"):
        plugins.register_all()


@pytest.mark.kernels
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.slow
def test_aot_ptx(arch):
    pytest.importorskip("triton")
    from graphprune.kernels import aot

    k = aot.sparse_attention_ptx("float16", "sliding_window", head_dim=64, block=64, arch=arch)
    assert k.name == "_sparse_attention_fwd" and k.arch == arch
    assert f".target sm_{arch}" in k.ptx and f".visible .entry {k.name}(" in k.ptx
    assert k.num_warps == 4
    sw = aot.sparse_attention_static_ptx("float16", arch=arch, head_dim=64, pattern="sliding_window", window=256,
                                         num_global=1, bias_shape=(8, 1, 1, 1024))
    assert sw.name == "_sparse_attention_static" and f".target sm_{arch}" in sw.ptx
    assert len(aot.entry_params(sw.ptx, sw.name)) == 10  # Q K V Bias Layout, H N D DV, Out
    vs = aot.sparse_attention_vs_ptx("float16", arch=arch, head_dim=64, block=64)
    assert vs.name == "_vertical_slash_fwd" and f".target sm_{arch}" in vs.ptx
    assert len(aot.entry_params(vs.ptx, vs.name)) == 12  # Q K V Offsets Columns Out, N D DV SK VK, scale
    sel = aot.token_select_ptx("float32", arch=arch, keep_ratio=0.5, protect=1, fuse_rest=1)
    assert sel.name == "_token_select" and f".target sm_{arch}" in sel.ptx
    assert len(aot.entry_params(sel.ptx, sel.name)) == 6  # X, S, N, C, Y, Idx: Triton's scratch pointers dropped


@pytest.mark.kernels
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.slow
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


@pytest.mark.kernels
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.slow
def test_aot_ptx_routed(arch):
    """The routed kernel (block_topk routing in the kernel, block_layout) compiles for sm_80 / sm_90 with exactly
    TensorRT's AOT parameters: Q K V Bias Layout, H N D DV, Out (Triton's unread scratch pointers dropped)."""
    pytest.importorskip("triton")
    from graphprune.kernels import aot

    topk = aot.sparse_attention_routed_ptx("float16", arch=arch, head_dim=64, n=None, bias_shape=(8, 1, 1, 1),
                                           pattern="block_topk", block_size=64, topk=8, num_global=1)
    lay = aot.sparse_attention_routed_ptx("float32", arch=arch, head_dim=64, n=1024, layout_heads=12,
                                          pattern="block_layout", block_size=64, topk=4)
    big = aot.sparse_attention_routed_ptx("float16", arch=arch, head_dim=128, n=4096, pattern="block_topk",
                                          block_size=128, topk=4)
    for k in (topk, lay, big):
        assert k.name == "_sparse_attention_routed" and k.arch == arch
        assert f".target sm_{arch}" in k.ptx and f".visible .entry {k.name}(" in k.ptx
        head = k.ptx[k.ptx.index(f".entry {k.name}("):]
        head = head[: head.index(")")]
        assert [p.split()[1] for p in head.splitlines()[1:]] == [".u64"] * 5 + [".u32"] * 4 + [".u64"]
        assert "ret;" in k.ptx
    assert ".f64" in topk.ptx and ".f64" not in lay.ptx  # block_topk routes in float64; block_layout reads a row
    assert (topk.num_warps, big.num_warps) == (4, 8)


def test_strip_unused_params_keeps_read_ones():
    from graphprune.kernels import aot

    ptx = (".visible .entry f(\n\t.param .u64 f_param_0,\n\t.param .u32 f_param_1,\n\t.param .u64 f_param_2,\n"
           "\t.param .u64 f_param_3\n)\n{\n\tld.param.b64 %rd1, [f_param_0];\n\tld.param.b32 %r1, [f_param_1];\n}\n")
    out = aot.strip_unused_params(ptx, "f")
    assert aot.entry_params(out, "f") == ["f_param_0", "f_param_1"]
    assert "f_param_1\n)" in out and "ld.param.b32 %r1, [f_param_1];" in out
    read_all = ptx.replace("}\n", "\tld.param.b64 %rd2, [f_param_3];\n}\n")
    assert aot.strip_unused_params(read_all, "f") == read_all  # the last one is read: nothing dropped


def test_used_inputs_drop_only_the_placeholders():
    t = ["q", "k", "v", "bias", "layout"]
    sw = SparseAttention.normalize(pattern="sliding_window", window=8)
    assert plugins.used_inputs("SparseAttention", t, sw) == ["q", "k", "v", None, None]
    key = SparseAttention.normalize(pattern="sliding_window", window=8, bias="key")
    assert plugins.used_inputs("SparseAttention", t, key) == ["q", "k", "v", "bias", None]
    lay = SparseAttention.normalize(pattern="block_layout", block_size=8, topk=2)
    assert plugins.used_inputs("SparseAttention", t, lay) == ["q", "k", "v", None, "layout"]
    assert plugins.used_inputs("TokenMerge", ["x", "m", "s"], TokenMerge.normalize(r=2)) == ["x", "m", "s"]


def test_aot_refusal_takes_every_op_and_pattern_but_vertical_slash():
    pytest.importorskip("triton")
    from graphprune.kernels.sparse_attention import STATIC_PATTERNS
    from graphprune.kernels.sparse_attention_routed import ROUTED_PATTERNS
    from graphprune.ops.sparse_attention import PATTERNS

    assert plugins.AOT_STATIC_PATTERNS == STATIC_PATTERNS and plugins.AOT_ROUTED_PATTERNS == ROUTED_PATTERNS
    assert set(plugins.AOT_PATTERNS) == set(PATTERNS) - {"vertical_slash"}
    sparse = [SparseAttention.normalize(pattern="sliding_window", window=8),
              SparseAttention.normalize(pattern="block_topk", block_size=8, topk=2),
              SparseAttention.normalize(pattern="block_layout", block_size=8, topk=2)]
    ok = [("TokenMerge", {}), ("DiversitySelect", {}), ("TokenSelect", {})] + [("SparseAttention", a) for a in sparse]
    assert plugins.aot_refusal(ok) is None
    why = plugins.aot_refusal(ok + [("Fancy", {})])
    assert why.startswith("--aot: Fancy has no one-launch kernel") and "\n" not in why
    with pytest.raises(GraphpruneError, match="^--aot: Fancy has no one-launch kernel"):
        plugins.aot_plan("Fancy", [[1, 2, 3]], {}, True)
    vs = SparseAttention.normalize(pattern="vertical_slash")
    assert plugins.aot_refusal(ok + [("SparseAttention", vs)]).startswith(
        "--aot: SparseAttention vertical_slash has no one-launch kernel")


def test_aot_plan_needs_a_static_token_count():
    with pytest.raises(GraphpruneError, match="TokenMerge needs a static token count"):
        plugins.aot_plan("TokenMerge", [[None, None, 64], [None, None, 32], [None, None, 1]],
                         TokenMerge.normalize(r=4), True)
    with pytest.raises(GraphpruneError, match=r"exceeds the kernel's \|A\| <= 512"):
        plugins.aot_plan("TokenMerge", [[None, 1200, 64], [None, 1200, 32], [None, 1200, 1]],
                         TokenMerge.normalize(r=4), True)
    topk = SparseAttention.normalize(pattern="block_topk", block_size=8, topk=2)
    plan = plugins.aot_plan("SparseAttention", [[None, 2, None, 8]] * 3 + [[1] * 4, [1] * 3], topk, True)
    assert plan["kernel"] == "sparse_attention_routed" and plan["grid"] == [(((0, 2),), 8), (((0, 0), (0, 1)), 1)]
    assert plan["constexprs"]["BS"] == 8 and plan["constexprs"]["KK"] == 2  # any N: the block resolved in-kernel
    with pytest.raises(GraphpruneError, match=r"block_size 256 > 128"):
        plugins.aot_plan("SparseAttention", [[None, 2, 1024, 8]] * 3 + [[1] * 4, [1] * 3],
                         SparseAttention.normalize(pattern="block_topk", block_size=256, topk=2), True)
    lay = SparseAttention.normalize(pattern="block_layout", block_size=8, topk=2)
    with pytest.raises(GraphpruneError, match="block_layout needs a static sequence length"):
        plugins.aot_plan("SparseAttention", [[None, 2, None, 8]] * 3 + [[1] * 4, [1, 3, 3]], lay, True)
    with pytest.raises(GraphpruneError, match=r"layout dims \[1, 3, 3\] do not match the 4 blocks of 8 tokens"):
        plugins.aot_plan("SparseAttention", [[None, 2, 29, 8]] * 3 + [[1] * 4, [1, 3, 3]], lay, True)
    with pytest.raises(GraphpruneError, match="layout has 3 heads, Q has 2"):
        plugins.aot_plan("SparseAttention", [[None, 2, 29, 8]] * 3 + [[1] * 4, [3, 4, 4]], lay, True)
    with pytest.raises(GraphpruneError, match="block_layout needs a layout with static dims"):
        plugins.aot_plan("SparseAttention", [[None, 2, 29, 8]] * 3 + [[1] * 4, [None, 4, 4]], lay, True)
    hood = SparseAttention.normalize(pattern="neighborhood_2d", grid=[4, 5], kernel=3)
    with pytest.raises(GraphpruneError, match="neighborhood_2d needs a static sequence length"):
        plugins.aot_plan("SparseAttention", [[None, 2, None, 8]] * 3 + [[1] * 4, [1] * 3], hood, True)
    plan = plugins.aot_plan("TokenSelect", [[None, None, 8], [None, None]], TokenSelect.normalize(k=4), True)
    assert plan["grid"] == [(((0, 1),), 128), (((0, 0),), 1)]  # any N: cdiv(N, 128) tiles × B
    sw = SparseAttention.normalize(pattern="sliding_window", window=8, bias="key")
    plan = plugins.aot_plan("SparseAttention", [[None, 2, None, 16]] * 3 + [[None, 1, 1, None], [1] * 3], sw, False)
    assert plan["grid"] == [(((0, 2),), 64), (((0, 0), (0, 1)), 1)]  # any N for a window; B·H programs per tile
    assert plan["constexprs"]["BIAS_B"] and not plan["constexprs"]["BIAS_H"] and plan["pointers"]["Q"] == "*fp16"


@pytest.mark.kernels
@pytest.mark.parametrize("op", ["TokenMerge", "DiversitySelect", "TokenSelect", "window", "neighborhood", "block_topk",
                                "block_topk_dynamic", "block_layout"])
def test_aot_plan_launch_matches_the_reference(op):
    """TensorRT's AOT launch, simulated in the interpreter: the plan's kernel with its constexprs, grid and
    arguments in TensorRT's order (input pointers, the plan's int32 dims, output pointers) gives the reference.
    ``block_topk_dynamic`` is planned with N unknown at build time (as TensorRT's shape expressions give it)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import numpy as np

    from graphprune import kernels

    if not kernels.interpreted():
        pytest.skip("simulates the launch on CPU tensors in Triton's interpreter")
    from graphprune.kernels import diversity_select as ds
    from graphprune.kernels import token_merge as tm
    from graphprune.kernels import token_select as ts

    rng = np.random.default_rng(0)
    n, c = 29, 24
    plan = None
    x = rng.standard_normal((3, n, c)).astype(np.float32)
    if op == "TokenMerge":
        attrs = TokenMerge.normalize(r=6, protect=1)
        metric = rng.standard_normal((3, n, 16)).astype(np.float32)
        size = np.ones((3, n, 1), np.float32)  # what the lowering fills in for an absent size
        inputs, ref = [x, metric, size], TokenMerge.reference(x, metric, None, **attrs)
        kernel = tm.token_merge_kernel
    elif op == "DiversitySelect":
        attrs = DiversitySelect.normalize(k=9, protect=1, keep_order=0)
        inputs, ref = [x], DiversitySelect.reference(x, **attrs)
        kernel = ds.diversity_select_kernel
    elif op == "TokenSelect":
        attrs = TokenSelect.normalize(keep_ratio=0.4, protect=1, fuse_rest=1)
        scores = rng.random((3, n)).astype(np.float32)
        inputs, ref = [x, scores], TokenSelect.reference(x, scores, **attrs)
        kernel = ts.token_select_kernel
    elif op.startswith("block_"):  # the routed patterns: key bias (topk), a per-head layout and a global (layout)
        from graphprune.kernels import sparse_attention_routed as sr

        q, k, v = (rng.standard_normal((2, 2, 45, 16)).astype(np.float32) for _ in range(3))
        layout = np.zeros((1, 1, 1), np.int64)
        if op == "block_layout":
            attrs = SparseAttention.normalize(pattern="block_layout", block_size=8, topk=3, num_global=2)
            layout = (rng.random((2, 6, 6)) < 0.4).astype(np.int64)
            layout[:, np.arange(6), np.arange(6)] = 1
            bias = np.zeros((1, 1, 1, 1), np.float32)
            ref = SparseAttention.reference(q, k, v, None, layout, **attrs)
        else:
            attrs = SparseAttention.normalize(pattern="block_topk", block_size=8, topk=2, num_global=1, bias="key")
            bias = np.zeros((2, 1, 1, 45), np.float32)
            bias[1, ..., 30:] = -np.inf
            ref = SparseAttention.reference(q, k, v, bias, **attrs)
        inputs = [q, k, v, bias, layout]
        kernel = sr.sparse_attention_routed
        if op == "block_topk_dynamic":
            dims = [list(a.shape) for a in inputs]
            for i in range(3):
                dims[i][2] = None
            plan = plugins.aot_plan("SparseAttention", dims, attrs, True)
        op = "SparseAttention"
    else:  # SparseAttention, with the placeholders the lowering adds (window) or a key bias (neighborhood)
        from graphprune.kernels import sparse_attention as sa

        q, k, v = (rng.standard_normal((2, 2, 70, 16)).astype(np.float32) for _ in range(3))
        if op == "window":
            attrs = SparseAttention.normalize(pattern="sliding_window", window=24, causal=1, num_global=1)
            bias, ref_bias = np.zeros((1, 1, 1, 1), np.float32), None
        else:
            attrs = SparseAttention.normalize(pattern="neighborhood_2d", grid=[7, 10], kernel=3, num_global=0,
                                              bias="key")
            bias = np.zeros((2, 1, 1, 70), np.float32)
            bias[1, ..., 60:] = -np.inf
            ref_bias = bias
        inputs = [q, k, v, bias, np.zeros((1, 1, 1), np.int64)]
        ref = SparseAttention.reference(q, k, v, ref_bias, **attrs)
        kernel = sa.sparse_attention_static
        op = "SparseAttention"
    if plan is None:
        plan = plugins.aot_plan(op, [list(a.shape) for a in inputs], attrs, True)
    assert list(plan["pointers"])[: len(inputs)] == [p for p in kernel.arg_names[: len(inputs)]]
    scalars = [inputs[i].shape[axis] for i, axis in plan["scalars"]]
    outs = [torch.empty(r.shape, dtype=torch.from_numpy(r).dtype) for r in ref]
    grid = tuple(-(-int(np.prod([inputs[i].shape[axis] for i, axis in factors])) // div)
                 for factors, div in plan["grid"])
    kernel[grid](*[torch.from_numpy(a) for a in inputs], *scalars, *outs, **plan["constexprs"])
    for got, want in zip(outs, ref):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-5)
    assert outs[-1].dtype == (torch.float32 if op == "SparseAttention" else torch.int64)


@pytest.mark.kernels
def test_jit_launch_uses_the_kernels_and_drops_placeholders():
    """The JIT impl's dispatch (``_launch``), on CPU tensors in the interpreter: kernels where they take the shape,
    OpDef.compute beyond that, placeholders dropped."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import numpy as np

    from graphprune import kernels

    if not kernels.interpreted():
        pytest.skip("runs the launch on CPU tensors in Triton's interpreter")
    specs = {s.op.name: s for s in plugins.plugin_specs()}
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 24, 16)).astype(np.float32) for _ in range(3))
    attrs = SparseAttention.normalize(pattern="sliding_window", window=8)
    placeholders = [np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int64)]
    (y,) = plugins._launch(specs["SparseAttention"], [torch.from_numpy(a) for a in [q, k, v] + placeholders], attrs)
    np.testing.assert_allclose(y.numpy(), SparseAttention.reference(q, k, v, **attrs)[0], atol=1e-5)
    assert plugins.kernel_for("TokenMerge", 1025, TokenMerge.normalize(r=2)) is None  # |A| = 513: torch fallback
    assert plugins.kernel_for("TokenMerge", 1024, TokenMerge.normalize(r=2)) is not None
    x = rng.standard_normal((1, 1100, 8)).astype(np.float32)
    attrs = DiversitySelect.normalize(k=3)
    assert plugins.kernel_for("DiversitySelect", 1100, attrs) is None
    y, i = plugins._launch(specs["DiversitySelect"], [torch.from_numpy(x)], attrs)
    np.testing.assert_array_equal(i.numpy(), DiversitySelect.reference(x, **attrs)[1])
