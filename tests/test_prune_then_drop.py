"""``channel_prune`` then ``token_drop`` on a dynamic-sequence BERT (the search combines the families in this order).

channel_prune re-infers the shapes of the values it rewrites; inference used to name the sequence axis of the
queries, keys and probabilities with fresh symbols (``unk__29``, ``unk__30``), and token_drop then took every block
for cross-attention and skipped it. References: the same plan applied in the other order (token_drop first, which
never depended on it), the channel-pruned model alone (token_drop at keep 1.0 is the identity) and the original
model's output shapes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphprune.analysis.attention import find_attention_blocks
from graphprune.backends.onnxruntime import run
from graphprune.passes import get_pass
from graphprune.pipeline import Pipeline

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ChannelPrune = get_pass("channel_prune")
TokenDrop = get_pass("token_drop")
#: data-free and deterministic, so the plan does not depend on what else the graph holds
PRUNE = {"ratio": 0.2, "importance": "l1", "reconstruct": False, "allocate": "score"}

pytestmark = pytest.mark.slow  # a torch export of its own and an end-to-end run (see conftest.py)


class _Encoder(torch.nn.Module):
    """A BERT encoder with a per-token output (``hidden``) and a masked mean (``pooled``)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return h, (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def dyn_bert(model_cache):
    """A 3-layer BERT (hidden 64, 4 heads) exported with a dynamic batch and sequence (``batch``, ``sequence``)."""

    def make(folder):
        from graphprune.torch import export

        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=200, max_position_embeddings=128)
        module = _Encoder(transformers.BertModel(cfg).eval()).eval()
        ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
        return export(module, (ids, torch.ones(2, 16, dtype=torch.int64)), folder / "bert_dyn.onnx",
                      input_names=["input_ids", "attention_mask"], output_names=["hidden", "pooled"],
                      dynamic_axes={0: "batch", 1: "sequence"})

    return model_cache.get(("prune_then_drop", "bert_dyn"), make)


def _io(model: ir.Model) -> dict[str, list]:
    return {v.name: [d.value if isinstance(d, ir.SymbolicDim) else d for d in v.shape]
            for v in (*model.graph.inputs, *model.graph.outputs)}


def _feeds(batch: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, n), np.int64)
    if batch > 1:
        mask[1, n // 2:] = 0  # a padded row
    return {"input_ids": rng.integers(0, 200, (batch, n)).astype(np.int64), "attention_mask": mask}


def test_channel_prune_then_token_drop_on_a_dynamic_bert(dyn_bert, tmp_path):
    base = ir.load(str(dyn_bert))
    io = _io(base)
    assert io["input_ids"] == ["batch", "sequence"] and io["hidden"] == ["batch", "sequence", 64]

    pruned = ir.load(str(dyn_bert))
    res = ChannelPrune({**PRUNE, "plan_out": str(tmp_path / "plan.json")})(pruned)
    assert res.modified and res.rewritten
    assert _io(pruned) == io  # the interface keeps its dim names
    for blk in find_attention_blocks(pruned):  # queries and keys: still one sequence, by name
        assert blk.probs is not None and [d.value for d in blk.probs.shape[-2:]] == ["sequence", "sequence"]

    both = pruned.clone()
    records = Pipeline().add("token_drop", keep_ratio=0.8).run(both)  # the checker runs after the pass
    td = records[0]
    assert td["changed"] and not td["skipped"]
    assert [r["layer"] for r in td["rewritten"]] == [1, 2]
    assert td["info"]["tokens"] == "dynamic (sequence)"
    assert td["info"]["restore"] is True and td["info"]["restored_outputs"] == ["hidden"]
    assert _io(both) == io

    identity = pruned.clone()
    ident = TokenDrop({"keep_ratio": 1.0})(identity)
    assert [r.layer for r in ident.rewritten] == [1, 2] and not ident.skipped

    first = ir.load(str(dyn_bert))  # the other order, with the same channel plan
    assert [r.layer for r in TokenDrop({"keep_ratio": 0.8})(first).rewritten] == [1, 2]
    ChannelPrune({"plan_in": str(tmp_path / "plan.json")})(first)

    changed = False
    for batch, n in ((1, 9), (3, 21)):
        feeds = _feeds(batch, n, seed=n)
        ref, cp, out, same, other = (run(m, feeds) for m in (base, pruned, both, identity, first))
        for r, o in zip(ref, out):
            assert o.shape == r.shape and np.isfinite(o).all()
        for a, b in zip(same, cp):
            np.testing.assert_allclose(a, b, atol=1e-5)
        for a, b in zip(out, other):
            np.testing.assert_allclose(a, b, atol=1e-5)
        changed |= not np.allclose(out[1], cp[1], atol=1e-3)
    assert changed  # tokens were dropped: the pooled embedding moved


def test_symbol_hint_keeps_only_the_inputs_dim_names():
    from graphprune._ir import symbol_hint

    names = {"batch", "sequence"}
    shape = ir.Shape(["batch", 4, "sequence", "4*sequence", "unk__3", None])
    assert list(symbol_hint(shape, names)) == ["batch", None, "sequence", None, None, None]
    assert symbol_hint(ir.Shape([2, 16, 64]), names) is None  # nothing named: cleared, as static shapes always were
    assert symbol_hint(ir.Shape(["unk__3", 64]), names) is None
    assert symbol_hint(None, names) is None
