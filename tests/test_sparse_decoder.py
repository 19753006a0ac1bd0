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
    assert all("reads input 'attention_mask'" in s["reason"] for s in records[0]["skipped"])

    from tests.helpers import cli

    code, out, err = cli(["optimize", hf_export("bert"), "-o", tmp_path / "out.onnx", "--sparse-attention",
                          "vertical_slash"], capsys)
    assert code == 2, err
    assert "vertical_slash is causal" in err and "Traceback" not in err + out
    assert not (tmp_path / "out.onnx").exists()
