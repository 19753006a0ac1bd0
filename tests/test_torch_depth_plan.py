"""``depth_prune`` through ``graphprune.torch``: the plan records the module of each removed unit, and ``apply_plan``
removes it from the module.

References: the depth-pruned ONNX model in ONNX Runtime (the pruned module must equal it), the module with the same
blocks deleted or branches zeroed by hand, and hand-counted parameters.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # exports and prunes torch modules

import graphprune.torch as gt  # noqa: E402
from graphprune.errors import GraphpruneError  # noqa: E402

PIPE_DATA = {"calibration_samples": 2, "verify_samples": 2}


def _vit(examples):
    m, _ = examples.build("vit_tiny")  # timm layout, 4 pre-norm blocks
    return m.eval(), (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def _ort(path, args):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]


def _run(module, args):
    module.eval()
    with torch.no_grad():
        out = module(*args)
    return (out if isinstance(out, torch.Tensor) else out[0]).numpy()


def _optimize(module, args, passes, tmp_path, name="o"):
    return gt.optimize(module, args, {"passes": passes, "data": PIPE_DATA}, out=tmp_path / f"{name}.onnx", force=True)


def test_removed_block_and_branches_are_replaced_and_equal_the_onnx(examples, tmp_path):
    m, args = _vit(examples)
    before = copy.deepcopy(m)
    # the second step numbers the blocks of the graph it gets: its block 1 is the module's blocks.2
    res = _optimize(m, args, [{"name": "depth_prune", "units": ["block 1"]},
                              {"name": "depth_prune", "unit": "sublayer", "units": ["block 0 attention", "block 1 mlp"]}],
                    tmp_path)
    assert [(e["unit"], e["module"], e["replace"]) for e in res.plan["depth"]] == [
        ("block 1", "blocks.1", "passthrough"), ("block 0 attention", "blocks.0.attn", "zeros"),
        ("block 1 mlp", "blocks.2.mlp", "zeros")]
    assert res.plan["slices"] == []
    pruned = gt.apply_plan(m, res.plan, args)
    x = (torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)),)
    np.testing.assert_allclose(_run(pruned, x), _ort(res.onnx_path, x), atol=2e-5, rtol=1e-4)
    # by hand: block 1 deleted, block 0's attention and block 2's MLP add nothing
    ref = copy.deepcopy(before)
    ref.blocks[1] = torch.nn.Identity()
    ref.blocks[0].attn.forward = lambda x, *a, **k: torch.zeros_like(x)
    ref.blocks[2].mlp.forward = lambda x: torch.zeros_like(x)
    np.testing.assert_allclose(_run(pruned, x), _run(ref, x), atol=1e-5, rtol=1e-5)
    gone = sum(p.numel() for mod in (before.blocks[1], before.blocks[0].attn, before.blocks[2].mlp)
               for p in mod.parameters())
    assert gt.count_parameters(pruned) == gt.count_parameters(before) - gone
    np.testing.assert_array_equal(_run(m, x), _run(before, x))  # the input module is untouched


def test_channels_and_depth_together_save_and_load(examples, tmp_path):
    """channel_prune then depth_prune: the slices of the removed block's weights are dropped with it; the rest
    are sliced. The pruned module equals the ONNX model, and save_pruned / load_pruned rebuild it."""
    m, args = _vit(examples)
    res = _optimize(m, args, [{"name": "channel_prune", "ratio": 0.5}, {"name": "depth_prune", "units": ["block 2"]}],
                    tmp_path)
    assert [e["module"] for e in res.plan["depth"]] == ["blocks.2"]
    assert any("blocks.1." in str(e.get("scope")) for e in res.plan["slices"])
    pruned = gt.apply_plan(m, res.plan, args)
    np.testing.assert_allclose(_run(pruned, args), _ort(res.onnx_path, args), atol=3e-5, rtol=1e-4)
    block2 = sum(p.numel() for p in m.blocks[2].parameters())
    assert gt.count_parameters(pruned) < gt.count_parameters(m) - block2  # and the channels of the others
    gt.save_pruned(pruned, res.plan, tmp_path / "p.pt")
    loaded = gt.load_pruned(lambda: _vit(examples)[0], tmp_path / "p.pt")
    np.testing.assert_allclose(_run(loaded, args), _run(pruned, args), atol=1e-6)


def test_llama_block_removal_equals_transformers_without_the_layer(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96)
    lm = transformers.LlamaForCausalLM(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    m = Logits(lm)
    ids = (torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1)),)
    res = gt.optimize(m, ids, {"passes": [{"name": "depth_prune", "units": ["block 2"]},
                                          {"name": "depth_prune", "unit": "sublayer", "units": ["block 0 mlp"]}],
                               "data": PIPE_DATA}, out=tmp_path / "l.onnx", dynamic_axes={0: "b", 1: "n"}, force=True)
    assert [(e["module"], e["returns"]) for e in res.plan["depth"]] == [
        ("lm.model.layers.2", 0), ("lm.model.layers.0.mlp", 0)]
    pruned = gt.apply_plan(m, res.plan, ids)
    x = (torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2)),)
    np.testing.assert_allclose(_run(pruned, x), _ort(res.onnx_path, x), atol=1e-4, rtol=1e-4)
    ref = copy.deepcopy(m)
    layers = ref.lm.model.layers
    ref.lm.model.layers = torch.nn.ModuleList([layers[i] for i in (0, 1, 3)])
    ref.lm.config.num_hidden_layers = 3
    ref.lm.model.layers[0].mlp.forward = lambda h: torch.zeros_like(h)
    np.testing.assert_allclose(_run(pruned, x), _run(ref, x), atol=1e-5, rtol=1e-5)


def test_post_norm_attention_branch_zeroes_the_projection(tmp_path):
    """BERT (post-norm): removing the attention branch leaves norm(x); the module replaced is the projection added
    to the stream inside the norm's module (attention.output.dense)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=200, max_position_embeddings=32)
    m = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    args = (ids, torch.ones(2, 10, dtype=torch.int64))
    res = _optimize(m, args, [{"name": "depth_prune", "unit": "sublayer", "units": ["block 1 attention"]}], tmp_path)
    assert [e["module"] for e in res.plan["depth"]] == ["encoder.layer.1.attention.output.dense"]
    pruned = gt.apply_plan(m, res.plan, args)
    np.testing.assert_allclose(_run(pruned, args), _ort(res.onnx_path, args), atol=1e-4, rtol=1e-4)
    ln = m.encoder.layer[1].attention.output.LayerNorm
    ref = copy.deepcopy(m)
    ref.encoder.layer[1].attention.forward = lambda h, *a, **k: (ln(h), None)
    np.testing.assert_allclose(_run(pruned, args), _run(ref, args), atol=1e-5, rtol=1e-5)


def test_a_plan_naming_a_missing_module_is_refused(examples, tmp_path):
    m, args = _vit(examples)
    res = _optimize(m, args, [{"name": "depth_prune", "units": ["block 3"]}], tmp_path)
    bad = {**res.plan, "depth": [{**res.plan["depth"][0], "module": "blocks.9"}]}
    with pytest.raises(GraphpruneError, match="blocks.9"):
        gt.apply_plan(m, bad, args)


def test_unit_module_without_scopes_says_why(examples, export):
    """An export without the torch exporter's name scopes: the pass still removes the unit, and says no module
    maps to it."""
    from graphprune.passes import get_pass

    model = ir.load(export("vit_tiny"))
    for n in model.graph:
        n.metadata_props.clear()
    res = get_pass("depth_prune")({"units": ["block 1"]})(model)
    assert "no module scopes" in res.info["modules"]["block 1"]["none"]


def test_a_unit_without_a_module_of_its_own_is_kept_in_the_plan_and_refused(examples):
    """record_units on the pass records: a unit the pass could not map, and one whose module is not the stream
    (a block that changes the width), stay in the plan with why; apply_plan refuses them, naming the unit."""
    from graphprune.torch._depth import record_units

    m, args = _vit(examples)
    records = [{"name": "depth_prune", "changed": True, "info": {"modules": {
        "block 0": {"none": "the export records no module scopes for it"}, "block 1": "blocks.1",
        "block 2": "blocks.2.mlp.fc1"}}}]
    entries = record_units(m, args, records)
    assert entries[0] == {"unit": "block 0", "module": None, "why": "the export records no module scopes for it"}
    assert entries[1]["module"] == "blocks.1" and entries[1]["replace"] == "passthrough"
    assert entries[1]["returns"] == 0 and entries[1]["features"] == m.blocks[1].norm1.normalized_shape[0]
    assert entries[2]["module"] is None and "returns shape" in entries[2]["why"]
    plan = {"format": "graphprune.channel_plan/1", "slices": [], "depth": entries[:1]}
    with pytest.raises(GraphpruneError, match="block 0.*no module scopes"):
        gt.apply_plan(m, plan, args)
