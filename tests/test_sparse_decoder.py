"""sparse_attention on a Llama-style decoder (causal mask, RoPE, grouped-query attention, dynamic sequence).

Reference: transformers' Mistral, which is Llama with a causal sliding window (a query sees the ``window`` keys
up to itself), on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphprune as gp
from graphprune.backends.onnxruntime import make_session
from graphprune.ops import DOMAIN

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import graphprune.torch as gtorch  # noqa: E402

WINDOW = 16
_CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

pytestmark = pytest.mark.slow  # a torch export of its own and an end-to-end run (see conftest.py)


class _Logits(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CFG)).eval()
    ids = torch.randint(0, 128, (2, 40))
    path = gtorch.export(_Logits(llama), (ids,), tmp_path_factory.mktemp("dec") / "llama.onnx",
                         dynamic_axes={0: "batch", 1: "seq"}, input_names=["input_ids"], output_names=["logits"])
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**_CFG, sliding_window=WINDOW,
                                                                         attn_implementation="eager")).eval()
    mistral.load_state_dict(llama.state_dict())
    return path, llama, mistral


@pytest.mark.parametrize("n", [24, 57])
def test_causal_sliding_window_matches_mistral(decoder, n):
    path, llama, mistral = decoder
    model = gp.load_model(path)
    records = gp.Pipeline().add("sparse_attention", pattern="sliding_window", window=WINDOW, causal=True).run(model)
    rewritten = records[0]["rewritten"]
    assert len(rewritten) == 2 and all("tokens" not in r and r["mask"] == "full" for r in rewritten)
    assert sum(nd.domain == DOMAIN for nd in model.graph) == 2
    ids = np.random.default_rng(n).integers(0, 128, (3, n))
    sess = make_session(model)
    got = sess.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = mistral(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        dense = llama(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert np.abs(dense - want)[:, WINDOW:].max() > 1e-2  # the window changes the result past WINDOW tokens


def test_causal_block_topk_keeps_the_decoder_causal(decoder):
    """block_topk on the causal mask (MInference-style prefill): every block is kept at topk = all blocks, so the
    result is the dense decoder; with fewer blocks the first block rows (which see only themselves) are unchanged."""
    path, llama, _ = decoder
    ids = np.random.default_rng(1).integers(0, 128, (2, 50))
    with torch.no_grad():
        dense = llama(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    for topk, exact in ((4, True), (2, False)):
        model = gp.load_model(path)
        gp.Pipeline().add("sparse_attention", pattern="block_topk", block_size=16, topk=topk).run(model)
        got = make_session(model).run(None, {"input_ids": ids})[0]
        if exact:
            np.testing.assert_allclose(got, dense, atol=2e-4, rtol=1e-4)
        else:
            np.testing.assert_allclose(got[:, :32], dense[:, :32], atol=2e-4, rtol=1e-4)  # ≤ 2 blocks: all kept
            assert np.abs(got - dense).max() > 1e-3


# ---------------------------------------------------------------- vertical_slash (MInference's dynamic pattern)
VS = dict(block_size=8, vertical=6, slash=2, last_q=8, num_global=2)


def _vs_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention through the op definition (``SparseAttention.compute``, torch): the reference."""
    from graphprune.ops import SparseAttention

    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    out, = SparseAttention.compute(_xp(), query, key, value, pattern="vertical_slash", seq_len=0, scale=scaling,
                                   bias="none", **VS)
    return out.transpose(1, 2).contiguous(), None


def _xp():
    from array_api_compat import torch as xp

    return xp


@pytest.fixture(scope="module")
def vs_reference(decoder):
    """The decoder's weights with every attention computed by the op definition of vertical_slash."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("graphprune_vs_reference", _vs_attention)
    AttentionMaskInterface.register("graphprune_vs_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    _, llama, _ = decoder
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CFG, attn_implementation="graphprune_vs_reference"))
    ref.load_state_dict(llama.state_dict())
    return ref.eval()


@pytest.mark.parametrize("n", [37, 100])
def test_vertical_slash_decoder_matches_the_op_definition(decoder, vs_reference, n):
    """At a dynamic N: the causal mask is dropped (the pattern is causal by itself), the rewritten decoder equals the
    transformers model whose attention is the op definition, and differs from the dense one."""
    path, llama, _ = decoder
    model = gp.load_model(path)
    records = gp.Pipeline().add("sparse_attention", pattern="vertical_slash", **VS).run(model)
    rewritten = records[0]["rewritten"]
    assert len(rewritten) == 2 and all(r["mask"] == "none" and r["pattern"] == "vertical_slash" for r in rewritten)
    ids = np.random.default_rng(n).integers(0, 128, (2, n))
    got = make_session(model).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = vs_reference(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        dense = llama(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert np.abs(dense - want)[:, 24:].max() > 1e-2  # 3 blocks: sparse from the 4th block on
    np.testing.assert_allclose(got[:, :8], dense[:, :8], atol=2e-4, rtol=1e-4)  # the first block sees every key


def test_causal_block_topk_drops_the_causal_mask_and_matches_the_decoder(decoder):
    """``block_topk`` with ``causal: true`` on the decoder: the plain causal mask goes (no N x N bias), and the
    result equals the same routing over the kept mask (``causal: false``), which the test above checks."""
    path, llama, _ = decoder
    ids = np.random.default_rng(4).integers(0, 128, (2, 70))
    outs = {}
    for causal in (False, True):
        model = gp.load_model(path)
        records = gp.Pipeline().add("sparse_attention", pattern="block_topk", block_size=16, topk=2,
                                    causal=causal).run(model)
        assert {r["mask"] for r in records[0]["rewritten"]} == {"none" if causal else "full"}
        outs[causal] = make_session(model).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(outs[True], outs[False], atol=2e-4, rtol=1e-4)


def test_vertical_slash_torch_fx_matches_the_op_definition(decoder, vs_reference):
    """``graphprune.torch.sparse_attention`` places the same pattern in the module (no mask input), at another N
    than the export's."""
    _, llama, _ = decoder
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    gm = gtorch.sparse_attention(_Logits(llama), (ids,), dynamic_axes={0: "batch", 1: "seq"},
                                 pattern="vertical_slash", **VS)
    other = torch.randint(0, 128, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = gm(other)
        got = got[0] if isinstance(got, (tuple, list)) else got
        want = vs_reference(input_ids=other, use_cache=False).logits
        dense = llama(input_ids=other, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (dense - want).abs().max() > 1e-2


def test_vertical_slash_refuses_a_padding_mask_and_a_non_causal_model(tmp_path, hf_export, capsys):
    """A mask that reads an input (padding) is a skip with its reason; a non-causal model is a user error (exit 2)."""
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CFG)).eval()

    class _Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = llama

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, 128, (2, 40))
    path = gtorch.export(_Masked(), (ids, torch.ones_like(ids)), tmp_path / "masked.onnx",
                         dynamic_axes={0: "batch", 1: "seq"}, input_names=["input_ids", "attention_mask"],
                         output_names=["logits"])
    model = gp.load_model(path)
    records = gp.Pipeline().add("sparse_attention", pattern="vertical_slash").run(model)
    assert not records[0]["rewritten"]
    assert all("reads input 'attention_mask' (padding)" in s["reason"] for s in records[0]["skipped"])

    from tests.helpers import cli

    code, out, err = cli(["optimize", hf_export("bert"), "-o", tmp_path / "out.onnx", "--sparse-attention",
                          "vertical_slash"], capsys)
    assert code == 2, err
    assert "vertical_slash (causal) on attention block 0, which is not causal" in err and "Traceback" not in err + out
    assert not (tmp_path / "out.onnx").exists()


def _reference_with_groups(llama, groups: dict[str, dict[str, str]], budget: int):
    """transformers on ``llama``'s weights, each head attending as its candidate's op definition says."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from graphprune.ops import SparseAttention
    from graphprune.passes._sparse_choice import candidate_params

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(rep, dim=1) for x in (key, value))
        out = torch.empty_like(query)
        for h, name in groups[str(module.layer_idx)].items():
            h = int(h)
            params = candidate_params(name, budget)
            bias = None if params["pattern"] == "vertical_slash" else attention_mask  # the causal mask
            attrs = SparseAttention.normalize(seq_len=0, scale=scaling, bias="none" if bias is None else "full",
                                              **params)
            o, = SparseAttention.compute(_xp(), query[:, h:h + 1], key[:, h:h + 1], value[:, h:h + 1], bias, **attrs)
            out[:, h:h + 1] = o
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("graphprune_groups_reference", attention)
    AttentionMaskInterface.register("graphprune_groups_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CFG, attn_implementation="graphprune_groups_reference"))
    ref.load_state_dict(llama.state_dict())
    return ref.eval()


def test_auto_chooses_a_pattern_per_head_by_recall(decoder):
    """``pattern: auto``: each head gets the candidate keeping the most attention mass on the calibration data
    (reported per head), the nodes carry the chosen patterns, and the rewritten decoder equals transformers with
    every head attending as its chosen pattern's op definition says."""
    from graphprune.passes import PassContext
    from graphprune.passes.sparse_attention import SparseAttentionPass

    path, llama, _ = decoder
    ids = np.random.default_rng(5).integers(0, 128, (2, 96))
    model = gp.load_model(path)
    result = SparseAttentionPass({"pattern": "auto", "budget": 24}, PassContext(calibration=[{"input_ids": ids}]))(
        model)
    chosen = result.info["head_patterns"]
    assert sorted(chosen) == ["0", "1"] and all(len(chosen[b]) == 4 for b in chosen)
    for heads in chosen.values():
        for h in heads.values():
            assert h["recall"][h["pattern"]] == max(h["recall"].values())
            assert 0.0 < min(h["recall"].values()) and max(h["recall"].values()) <= 1.0 + 1e-9
    for r in result.rewritten:
        names = {chosen[str(r.block)][str(h)]["pattern"] for h in r.heads}
        assert len(names) == 1 and r.pattern == {"a_shape": "sliding_window"}.get(names.pop(), r.pattern)
    groups = {b: {h: c["pattern"] for h, c in heads.items()} for b, heads in chosen.items()}
    got = make_session(model).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = _reference_with_groups(llama, groups, 24)(input_ids=torch.from_numpy(ids), use_cache=False).logits
    np.testing.assert_allclose(got, want.numpy(), atol=2e-4, rtol=1e-4)


def test_mixed_head_groups_per_layer_match_the_op_definitions(decoder):
    """Per-layer head groups of three patterns in one block: the vertical_slash and causal block_topk heads run
    without the causal mask, the A-shape heads with it; the decoder equals the per-head reference and differs from
    dense."""
    from graphprune.passes._sparse_choice import candidate_params

    path, llama, _ = decoder
    layout = {"0": {"0": "vertical_slash", "1": "a_shape", "2": "block_topk", "3": "vertical_slash"},
              "1": {"0": "block_topk", "1": "block_topk", "2": "a_shape", "3": "vertical_slash"}}
    per_layer = {}
    for b, heads in layout.items():
        per_layer[int(b)] = {"head_groups": [
            {"heads": [int(h) for h, c in heads.items() if c == name], **candidate_params(name, 24)}
            for name in dict.fromkeys(heads.values())]}
    model = gp.load_model(path)
    records = gp.Pipeline().add("sparse_attention", per_layer=per_layer).run(model)
    assert {(r["block"], r["pattern"], r["mask"]) for r in records[0]["rewritten"]} == {
        (0, "vertical_slash", "none"), (0, "sliding_window", "full"), (0, "block_topk", "none"),
        (1, "block_topk", "none"), (1, "sliding_window", "full"), (1, "vertical_slash", "none")}
    ids = np.random.default_rng(6).integers(0, 128, (2, 90))
    got = make_session(model).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = _reference_with_groups(llama, layout, 24)(input_ids=torch.from_numpy(ids), use_cache=False).logits
        dense = llama(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want.numpy(), atol=2e-4, rtol=1e-4)
    assert np.abs(got - dense).max() > 1e-2


def test_auto_choice_follows_planted_structure():
    """The per-head choice on planted attention: a head that attends to 7 columns in 7 blocks takes vertical_slash
    (block top-k has 4 free blocks), a head that attends to one far block of keys takes block top-k, and every
    candidate keeps most of a head that attends to itself; recall is the kept share of the dense causal attention."""
    from graphprune.analysis.attention import AttentionBlock
    from graphprune.passes._sparse_choice import choose

    n, d, heads = 128, 16, 3
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, heads, n, d)).astype(np.float32) * 0.1
    k = rng.standard_normal((1, heads, n, d)).astype(np.float32) * 0.1
    q[:, 0, :, 0] = 6.0
    k[:, 0, [10, 25, 38, 55, 70, 85, 100], 0] = 6.0  # head 0: 7 columns in 7 blocks that later queries attend to
    unit = rng.standard_normal((n, d)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    q[0, 1], k[0, 1] = 6 * unit, 6 * unit  # head 1: each query attends to itself (local)
    q[:, 2, :, 2] = 6.0
    k[:, 2, 40:48, 2] = 6.0  # head 2: one block of 8 keys, far back
    blk = AttentionBlock.__new__(AttentionBlock)
    blk.index, blk.heads, blk.head_dim, blk.scale, blk.k = 0, heads, d, 1 / 4.0, object()
    per_layer, report = choose([blk], [[q, k]], 24, ["a_shape", "vertical_slash", "block_topk"])
    picked = {h: report["0"][str(h)]["pattern"] for h in range(heads)}
    assert picked[0] == "vertical_slash" and picked[2] == "block_topk"
    assert min(report["0"]["1"]["recall"].values()) > 0.9  # every candidate keeps the local key
    assert {tuple(g["heads"]): g["pattern"] for g in per_layer[0]}[(0,)] == "vertical_slash"
    r0 = report["0"]["0"]["recall"]
    assert r0["vertical_slash"] > 0.9 > r0["a_shape"]


@pytest.mark.parametrize("alibi", [False, True])
def test_vertical_slash_drops_only_the_plain_causal_mask(alibi):
    """A causal mask that also carries a position bias (ALiBi-style, blocked above the diagonal) is not the pattern's
    to drop: a skip with its reason; the plain 0 / -inf one goes, and the node equals the op definition."""
    import onnx_ir as ir

    from graphprune.ops import SparseAttention
    from graphprune.passes.sparse_attention import SparseAttentionPass

    n, h, d = 16, 2, 8
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = np.where(j <= i, -0.25 * (i - j) if alibi else 0.0, np.finfo(np.float32).min).astype(np.float32)
    vals = [ir.Value(name=x, shape=ir.Shape([1, h, n, d]), type=ir.TensorType(ir.DataType.FLOAT)) for x in "qkv"]
    m = ir.Value(name="mask", shape=ir.Shape([1, 1, n, n]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(mask[None, None]))
    kt = ir.node("Transpose", [vals[1]], {"perm": [0, 1, 3, 2]})
    qk = ir.node("MatMul", [vals[0], kt.outputs[0]])
    sc = ir.node("Mul", [qk.outputs[0], ir.Value(name="s", const_value=ir.tensor(np.float32(d ** -0.5)))])
    add = ir.node("Add", [sc.outputs[0], m])
    sm = ir.node("Softmax", [add.outputs[0]], {"axis": -1})
    out = ir.node("MatMul", [sm.outputs[0], vals[2]])
    out.outputs[0].name = "y"
    graph = ir.Graph(vals, out.outputs, nodes=[kt, qk, sc, add, sm, out], opset_imports={"": 18},
                     initializers=[m, sc.inputs[1]])
    model = ir.Model(graph, ir_version=10)
    attrs = dict(block_size=4, vertical=2, slash=1, last_q=4, num_global=1)
    result = SparseAttentionPass({"pattern": "vertical_slash", **attrs})(model)
    if alibi:
        assert not result.rewritten and "position bias such as ALiBi" in result.skipped[0].reason
        return
    assert [r.mask for r in result.rewritten] == ["none"], result.skipped
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, h, n, d)).astype(np.float32) for _ in range(3))
    got = make_session(model).run(None, {"q": q, "k": k, "v": v})[0]
    want = SparseAttention.reference(q, k, v, pattern="vertical_slash", scale=d ** -0.5, **attrs)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma"])
def test_vertical_slash_on_other_decoder_spellings(family, tmp_path):
    """GPT-2 (learned positions, mask from its own causal buffer), Qwen2 (GQA with biases) and Gemma (one KV head):
    the causal mask is dropped and the decoder equals transformers with the op definition as its attention."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("graphprune_vs_reference", _vs_attention)
    AttentionMaskInterface.register("graphprune_vs_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    small = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=256)
    make = {
        "gpt2": lambda impl: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, attn_implementation=impl)),
        "qwen2": lambda impl: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **small, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            attn_implementation=impl)),
        "gemma": lambda impl: transformers.GemmaForCausalLM(transformers.GemmaConfig(
            **small, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, attn_implementation=impl)),
    }[family]
    torch.manual_seed(0)
    lm = make("sdpa").eval()
    ref = make("graphprune_vs_reference").eval()
    ref.load_state_dict(lm.state_dict())
    path = gtorch.export(_Logits(lm), (torch.randint(0, 128, (2, 40)),), tmp_path / f"{family}.onnx",
                         dynamic_axes={0: "batch", 1: "seq"}, input_names=["input_ids"], output_names=["logits"])
    model = gp.load_model(path)
    records = gp.Pipeline().add("sparse_attention", pattern="vertical_slash", **VS).run(model)
    assert [r["mask"] for r in records[0]["rewritten"]] == ["none", "none"]
    ids = np.random.default_rng(2).integers(0, 128, (2, 80))
    got = make_session(model).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        dense = lm(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert np.abs(got - dense).max() > 1e-2


@pytest.mark.parametrize("pattern", [dict(pattern="vertical_slash", **VS),
                                     dict(pattern="block_topk", block_size=8, topk=2, causal=True)],
                         ids=["vertical_slash", "block_topk-causal"])
def test_causal_patterns_replace_an_is_causal_attention_op(pattern):
    """The standard ``Attention`` op with ``is_causal`` (no mask input): the causal patterns replace it (a
    non-causal one is skipped), and the node equals the op definition."""
    import onnx_ir as ir

    from graphprune.ops import SparseAttention
    from graphprune.passes.sparse_attention import SparseAttentionPass

    n, h, d = 40, 2, 8
    vals = [ir.Value(name=x, shape=ir.Shape([1, h, n, d]), type=ir.TensorType(ir.DataType.FLOAT)) for x in "qkv"]
    att = ir.node("Attention", vals, {"is_causal": 1, "scale": 0.3})
    att.outputs[0].name = "y"
    model = ir.Model(ir.Graph(vals, att.outputs, nodes=[att], opset_imports={"": 23}), ir_version=10)
    result = SparseAttentionPass(pattern)(model)
    assert [r.mask for r in result.rewritten] == ["none"], result.skipped
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, h, n, d)).astype(np.float32) for _ in range(3))
    got = make_session(model).run(None, {"q": q, "k": k, "v": v})[0]
    want = SparseAttention.reference(q, k, v, scale=0.3, **pattern)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
