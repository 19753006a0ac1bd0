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
