"""graphprune.torch.sparse_attention (FX): the ONNX sparse_attention pass's blocks and attributes, the same outputs
as the ONNX pass in ORT, an export with SparseAttention nodes, and training with the pattern in place."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx_ir as ir  # noqa: E402

import graphprune as gp  # noqa: E402
import graphprune.torch as gt  # noqa: E402
from graphprune.errors import ConfigError  # noqa: E402
from graphprune.passes.sparse_attention import SparseAttentionConfig, plan  # noqa: E402


def _vit(examples, sdpa=False):
    m, _ = examples.build("vit_tiny", sdpa=sdpa)
    return m, (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)),)


def _ort(path, args):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: a.numpy() for i, a in zip(s.get_inputs(), args)})[0]


def _check_against_onnx_pass(m, args, config, tmp_path, n_nodes, bias=None, src=None):
    """``src``: the export of ``m`` when the session already has it (default: export ``m`` here)."""
    # patterns on 16-17 tokens execute more FLOPs than the dense core; these tests compare placements and numerics
    config = {"allow_more_flops": True} | config
    gm = gt.sparse_attention(m, args, **config)
    src = src or gt.export(m, args, tmp_path / "src.onnx")
    report = gp.optimize(src, tmp_path / "sa.onnx", gp.Pipeline().add("sparse_attention", **config), force=True)
    rewritten = report["passes"][0]["rewritten"]
    meta = gm.meta["graphprune_sparse_attention"]
    assert meta["blocks"] == sorted({r["block"] for r in rewritten})
    if bias is not None:
        assert [a[0]["bias"] for a in meta["attrs"]] == bias == [r["mask"] for r in rewritten]
    ref = _ort(tmp_path / "sa.onnx", args)
    with torch.no_grad():
        got = gm(*args).numpy()
        dense = m(*args).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    for s_ in meta["skipped"]:
        assert s_ in [f"{r['where']}: {r['reason']}" for r in report["passes"][0]["skipped"]]
    assert np.abs(dense - ref).max() > 1e-3  # the pattern really changed the attention
    p = gt.export(gm, args, tmp_path / "fx.onnx")
    ops = [n.op_type for n in ir.load(str(p)).graph if n.domain == "ai.graphprune"]
    assert ops == ["SparseAttention"] * n_nodes
    np.testing.assert_allclose(_ort(p, args), got, atol=1e-4, rtol=0)
    return gm


@pytest.mark.parametrize("sdpa,config,n_nodes", [
    (False, {"pattern": "sliding_window", "window": 5}, 4),
    (True, {"pattern": "block_topk", "block_size": 4, "topk": 2}, 4),
    (False, {"pattern": "neighborhood_2d", "kernel": 3, "layers": [1, 3],
             "head_groups": [{"heads": [2, 0]}, {"heads": [1, 3], "pattern": "sliding_window", "window": 4}]}, 4),
])
@pytest.mark.slow
def test_fx_sparse_attention_equals_onnx_pass(examples, export, tmp_path, sdpa, config, n_nodes):
    m, args = _vit(examples, sdpa)
    src = export("vit_tiny", **({"sdpa": True} if sdpa else {}))  # the session's export of the same seeded module
    _check_against_onnx_pass(m, args, config, tmp_path, n_nodes, src=src)


@pytest.mark.slow
def test_fx_bool_key_mask_and_block_layout(examples, tmp_path):
    """An SDPA block with a bool keep-mask (made an additive bias inside the SDPA translation in ONNX) and a
    MatMul/Softmax block without one; block_layout from a .npy file (a buffer in the GraphModule)."""

    class TwoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = examples.Block(32, 4, sdpa=True), examples.Block(32, 4)

        def forward(self, x, keep):
            return self.b(self.a(x, keep[:, None, None, :]))

    torch.manual_seed(0)
    m = TwoBlocks().eval()
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[1, 12:] = False
    args = (torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2)), keep)
    layout = np.eye(4, dtype=bool) | (np.random.default_rng(0).random((4, 4)) > 0.5)
    np.save(tmp_path / "layout.npy", layout)
    gm = _check_against_onnx_pass(m, args, {"pattern": "block_layout", "block_size": 4,
                                            "layout": str(tmp_path / "layout.npy")}, tmp_path, 2, ["key", "none"])
    bufs = dict(gm.named_buffers())
    assert np.array_equal(bufs["graphprune_sparse_layout_0_0"].numpy(), layout[None].astype(np.float32))


@pytest.mark.slow
def test_fx_attributes_are_the_onnx_plan(examples, export):
    """Defaults resolved from the block (num_global = CLS, a square grid of the 16 patches) come from ``plan``."""
    m, args = _vit(examples)
    gm = gt.sparse_attention(m, args, pattern="neighborhood_2d", kernel=3)
    attrs = gm.meta["graphprune_sparse_attention"]["attrs"]
    model = ir.load(str(export("vit_tiny")))  # the session's export of the same seeded module (``export_program``'s)
    decided = plan(model, SparseAttentionConfig(pattern="neighborhood_2d", kernel=3))
    assert attrs == [[g.attrs for g in bp.groups] for bp in decided.planned]
    assert attrs[0][0]["num_global"] == 1 and attrs[0][0]["grid"] == [4, 4] and attrs[0][0]["seq_len"] == 17
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.graphprune.sparse_attention.default]
    assert len(ops) == 4 and ops[0].kwargs["grid"] == [4, 4] and ops[0].kwargs["num_global"] == 1
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten._softmax.default]  # dense cores are gone


@pytest.mark.slow
def test_fx_causal_decoder_equals_onnx_pass(tmp_path):
    transformers = pytest.importorskip("transformers")

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    m = Logits(transformers.LlamaForCausalLM(cfg).eval())
    args = (torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)),)
    gm = _check_against_onnx_pass(m, args, {"pattern": "sliding_window", "window": 6}, tmp_path, 2)
    # the causal mask went in as the op's full bias: a later token never changes an earlier position's logits
    ids = args[0].clone()
    ids[:, -1] = (ids[:, -1] + 1) % 128
    with torch.no_grad():
        a, b = gm(*args), gm(ids)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


@pytest.mark.slow
def test_fx_sparse_attention_trains(examples):
    m, args = _vit(examples)
    gm = gt.sparse_attention(m, args, pattern="sliding_window", window=5).train()
    opt = torch.optim.SGD(gm.parameters(), lr=1e-2)
    y = torch.tensor([3, 7])
    loss = torch.nn.functional.cross_entropy(gm(*args), y)
    opt.zero_grad()
    loss.backward()
    qkv = [p for name, p in gm.named_parameters() if "qkv.weight" in name]
    assert qkv and all(p.grad is not None and p.grad.abs().sum() > 0 for p in qkv)  # through the op's backward
    opt.step()
    assert torch.nn.functional.cross_entropy(gm(*args), y).item() < loss.item()


def test_sparse_attention_gradient_matches_masked_softmax():
    """The op's backward equals autograd through dense attention with the pattern as a -inf mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    y = torch.ops.graphprune.sparse_attention(q, k, v, pattern="sliding_window", window=3, scale=0.5)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y * w).sum(), (q, k, v))
    i, j = torch.arange(9)[:, None], torch.arange(9)[None]
    start = (i - 1).clamp(0, 9 - 3)
    allowed = (j >= start) & (j < start + 3)
    s = (q @ k.transpose(-2, -1) * 0.5).masked_fill(~allowed, float("-inf"))
    want = torch.autograd.grad(((s.softmax(-1) @ v) * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fx_sparse_attention_config_errors(examples):
    m, args = _vit(examples)
    with pytest.raises(ConfigError, match="window"):
        gt.sparse_attention(m, args, pattern="sliding_window", window=0)
    with pytest.raises(ConfigError, match="layers"):
        gt.sparse_attention(m, args, layers=[9])


@pytest.mark.slow
def test_fx_dynamic_sequence_matches_mistral():
    """A dynamic-sequence export (seq_len 0 in the plan): the FX module runs at any N and equals transformers'
    Mistral (Llama with a causal sliding window) on the same weights."""
    transformers = pytest.importorskip("transformers")

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    m = Logits(transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval())
    gm = gt.sparse_attention(m, (torch.randint(0, 128, (2, 24)),), dynamic_axes={0: "batch", 1: "seq"},
                             pattern="sliding_window", window=6, causal=True)
    assert [a[0]["seq_len"] for a in gm.meta["graphprune_sparse_attention"]["attrs"]] == [0, 0]
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        **shape, sliding_window=6, attn_implementation="eager")).eval()
    mistral.load_state_dict(m.lm.state_dict())
    for n in (24, 37):
        ids = torch.randint(0, 128, (3, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got, dense = mistral(input_ids=ids, use_cache=False).logits, gm(ids), m(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (dense - want).abs().max() > 1e-3  # the window matters at these lengths
