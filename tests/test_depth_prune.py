"""``depth_prune`` against torch: the pruned graph equals the torch module with the same blocks (or branches)
replaced by the identity, its importance scores equal the ones computed from torch's hidden states, and bad budgets
are user errors.

Models: the pre-norm example ViT (``vit_tiny``, 4 blocks) and transformers' post-norm ``BertModel`` (3 layers), both
the session's cached exports; the ViT's weights are scaled in the ONNX file and in torch alike to make a block the
least important.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest

from graphprune.passes import get_pass
from graphprune.passes.base import PassContext
from tests.helpers import cli

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import graphprune.pipeline  # noqa: E402,F401 - registers the ONNX Runtime runtime


def _save(model, path):
    """Save with the weights in a file of its own (the loaded export's tensors live in the session's cache)."""
    ir.save(model, path, external_data=path.name + ".data")
    return path


def _run(path, feed):
    sess = ort.InferenceSession(str(path))
    return sess.run(None, feed)[0]


def _prune(path, cfg, ctx=None):
    model = ir.load(path)
    res = get_pass("depth_prune")(cfg, ctx)(model)
    return model, res


def _scale(value: ir.Value, s: float) -> None:
    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(s), name=value.name)


def _vit(examples, export, tmp_path, scale: dict[int, float]):
    """vit_tiny's export and module with block ``i``'s output projections (attention and MLP) scaled by ``s``. The
    export folds the weights into transposed constants: each is found as the MatMul before its bias' Add."""
    module, _ = examples.build("vit_tiny")
    model = ir.load(export("vit_tiny"))
    inits = model.graph.initializers
    for i, s in scale.items():
        for name in (f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc2"):
            bias = inits[f"{name}.bias"]
            (add, _), = bias.uses()
            matmul = next(x.producer() for x in add.inputs if x is not bias)
            assert matmul.op_type == "MatMul"
            _scale(bias, s)
            _scale(matmul.inputs[1], s)
            with torch.no_grad():
                module.get_parameter(f"{name}.weight").mul_(s)
                module.get_parameter(f"{name}.bias").mul_(s)
    return _save(model, tmp_path / "vit.onnx"), module


def _without(module, removed):
    """A copy of the example ViT with ``(block, unit)`` replaced by the identity (a branch: adds zero)."""
    m = copy.deepcopy(module)
    for block, unit in removed:
        if unit == "block":
            m.blocks[block] = torch.nn.Identity()
        elif unit == "attention":
            m.blocks[block].attn.forward = lambda x, mask=None: torch.zeros_like(x)
        else:
            m.blocks[block].mlp.forward = lambda x: torch.zeros_like(x)
    return m


def _x(n=2):
    return np.random.default_rng(1).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _equal_to_torch(model, module, removed, tmp_path):
    out = _save(model, tmp_path / "pruned.onnx")
    x = _x()
    got = _run(out, {ir.load(out).graph.inputs[0].name: x})
    with torch.no_grad():
        ref = _without(module, removed)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


def test_least_important_consecutive_blocks_go_later_one_second(examples, export, tmp_path):
    """Blocks 2 and 3 nearly identity (2 more so): both removed, 2 first; the output is the ViT without them (block
    3's input is block 2's removed output: the rewiring must see through it)."""
    path, module = _vit(examples, export, tmp_path, {2: 1e-3, 3: 1e-2})
    model, res = _prune(path, {"ratio": 0.5})
    assert [(r.block, r.unit) for r in res.rewritten] == [(2, "block"), (3, "block")]
    assert res.info["scores"]["block 2"] < res.info["scores"]["block 3"] < min(
        res.info["scores"]["block 0"], res.info["scores"]["block 1"])
    _equal_to_torch(model, module, [(2, "block"), (3, "block")], tmp_path)
    assert sum(1 for n in model.graph if n.op_type == "Softmax") == 2


def test_both_branches_of_one_block(examples, export, tmp_path):
    """unit: sublayer removes block 2's attention and then its MLP, whose stream is the removed attention's sum."""
    path, module = _vit(examples, export, tmp_path, {2: 1e-3})
    model, res = _prune(path, {"ratio": 0.25, "unit": "sublayer"})
    assert sorted((r.block, r.unit) for r in res.rewritten) == [(2, "attention"), (2, "mlp")]
    _equal_to_torch(model, module, [(2, "attention"), (2, "mlp")], tmp_path)


@pytest.mark.parametrize("unit", ["block", "sublayer"])
def test_output_importance_is_the_output_change_torch_measures(examples, export, tmp_path, unit):
    """importance: output: the first round's score of a unit is mean(1 - cos) between the outputs with and without
    it, per sample; the same figures from torch."""
    path, module = _vit(examples, export, tmp_path, {})
    x = _x(4)
    name = ir.load(path).graph.inputs[0].name
    ctx = PassContext(calibration=[{name: x}], data_source="user")
    model, res = _prune(path, {"ratio": 0.25, "unit": unit, "importance": "output"}, ctx)
    chosen = [(r.block, r.unit) for r in res.rewritten]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy().astype(np.float64)
        for where, score in res.info["scores"].items():
            parts = where.split()
            key = (int(parts[1]), parts[2] if len(parts) > 2 else "block")
            if key in chosen[1:]:
                continue  # a later pick's score is measured with the earlier picks removed
            got = _without(module, [key])(torch.from_numpy(x)).numpy().astype(np.float64)
            cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
            assert score == pytest.approx(float(np.mean(1 - cos)), rel=1e-3, abs=1e-6), where
    _equal_to_torch(model, module, sorted(chosen), tmp_path)


@pytest.fixture(scope="module")
def bert(hf_export):
    transformers = pytest.importorskip("transformers")
    path = hf_export("bert", 18, layers=3, heads=4)
    torch.manual_seed(0)  # the fixture's weights
    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=256, vocab_size=1000, max_position_embeddings=64)
    return path, transformers.BertModel(cfg).eval()


def _bert_feed():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1000, (2, 16)).astype(np.int64)  # the export's batch is static
    mask = np.ones((2, 16), dtype=np.int64)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_post_norm_bert_angular_scores_and_output(bert, tmp_path):
    """Post-norm BERT: the scores are 1 - cos of each layer's input and output hidden states over the real (mask 1)
    tokens, as torch computes them; the pruned graph equals BertModel without that layer."""
    path, module = bert
    feed = _bert_feed()
    model, res = _prune(path, {"ratio": 0.34}, PassContext(calibration=[feed], data_source="user"))
    with torch.no_grad():
        hs = module(input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(
            feed["attention_mask"]), output_hidden_states=True).hidden_states
    w = feed["attention_mask"].astype(np.float64)
    for i in range(3):
        a, b = hs[i].numpy().astype(np.float64), hs[i + 1].numpy().astype(np.float64)
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert res.info["scores"][f"block {i}"] == pytest.approx(float((w * (1 - cos)).sum() / w.sum()), rel=1e-4)
    (removed,) = [r.block for r in res.rewritten]
    assert removed == min(range(3), key=lambda i: res.info["scores"][f"block {i}"])
    out = _save(model, tmp_path / "bert.onnx")
    got = _run(out, feed)
    ref_module = copy.deepcopy(module)
    ref_module.encoder.layer = torch.nn.ModuleList(
        [layer for i, layer in enumerate(ref_module.encoder.layer) if i != removed])
    with torch.no_grad():
        ref = ref_module(input_ids=torch.from_numpy(feed["input_ids"]),
                         attention_mask=torch.from_numpy(feed["attention_mask"])).last_hidden_state.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_a_block_read_from_outside_is_skipped_with_the_reason(export, tmp_path):
    """A value inside block 1 that is also a graph output (exported hidden states, a KV cache's ``present``): block
    1 is not removable; the others still are, and the extra output still has its value."""
    from graphprune.analysis.depth import residual_blocks

    model = ir.load(export("vit_tiny"))
    mid = residual_blocks(model)[1].mid
    model.graph.outputs.append(mid)
    path = _save(model, tmp_path / "hidden.onnx")
    x = _x()
    before = ort.InferenceSession(str(path)).run(None, {model.graph.inputs[0].name: x})[1]
    pruned, res = _prune(path, {"ratio": 0.34, "layers": [0, 1, 2, 3]})
    assert [s.where for s in res.skipped] == ["block 1"]
    assert "graph output" in res.skipped[0].reason and "read outside" in res.skipped[0].reason
    assert all(r.block != 1 for r in res.rewritten) and res.rewritten
    out = _save(pruned, tmp_path / "out.onnx")
    if all(r.block > 1 for r in res.rewritten):  # the extra output is upstream of what was removed: unchanged
        after = ort.InferenceSession(str(out)).run(None, {model.graph.inputs[0].name: x})[1]
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("ratio", "message"), [
    ("0.99", "removes all 4 units"), ("0.05", "removes none"), ("1.5", "ratio")])
def test_budgets_that_remove_all_or_nothing_are_user_errors(export, tmp_path, capsys, ratio, message):
    out = tmp_path / "o.onnx"
    code, _, err = cli(["optimize", export("vit_tiny"), "-o", out, "--prune-depth", ratio], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_prune_depth_writes_a_verified_smaller_model(export, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, stdout, err = cli(["optimize", export("vit_tiny"), "-o", out, "--prune-depth", "0.25", "--force"], capsys)
    assert code == 0, err
    assert sum(1 for n in ir.load(out).graph if n.op_type == "Softmax") == 3
    assert "depth importance measured on synthetic inputs" in err


def test_flops_budget_counts_the_units_flops(export):
    """target: flops removes blocks until their FLOPs reach the share: 0.3 of 4 equal blocks takes 2 (one is 25%)."""
    _, res = _prune(export("vit_tiny"), {"ratio": 0.3, "target": "flops"})
    assert len(res.rewritten) == 2 and len({r.flops for r in res.rewritten}) == 1 and res.rewritten[0].flops > 0
    _, res = _prune(export("vit_tiny"), {"ratio": 0.3})
    assert len(res.rewritten) == 1


def _zoo_without(name: str, removed: list[int]):
    """The zoo model's torch module (seeded as its export) with the layers ``removed`` deleted from its layer list."""
    from tests import _zoo

    torch.manual_seed(0)
    module, args = _zoo.BY_NAME[name].build()
    lname = next(n for n, m in module.eval().named_modules() if isinstance(m, torch.nn.ModuleList))
    parent, _, attr = lname.rpartition(".")
    layers = module.get_submodule(lname)
    setattr(module.get_submodule(parent), attr, torch.nn.ModuleList(
        [m for i, m in enumerate(layers) if i not in removed]))
    with torch.no_grad():
        out = module(*args)
    return [a.numpy() for a in args], (out if isinstance(out, torch.Tensor) else out[0]).numpy()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layer"), [("llama", 0), ("gpt2", 0), ("t5_encoder", 1), ("whisper_encoder", 1)])
def test_zoo_block_removal_equals_transformers_without_the_layer(zoo_export, tmp_path, name, layer):
    """Decoders (Llama with GQA and RoPE, GPT-2), T5's encoder (block 1: block 0 computes the relative position bias
    every block reads, which stays) and Whisper's encoder: the pruned graph equals the transformers model with that
    layer deleted."""
    model, res = _prune(zoo_export(name), {"ratio": 0.5, "layers": [layer]})
    assert [(r.block, r.unit) for r in res.rewritten] == [(layer, "block")] and not res.skipped
    args, ref = _zoo_without(name, [layer])
    out = _save(model, tmp_path / "p.onnx")
    sess = ort.InferenceSession(str(out))
    got = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), args)})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phi", "gpt_neox"])
def test_parallel_attention_and_mlp_blocks_are_skipped(zoo_export, name):
    """Phi and GPT-NeoX add attention and MLP, both computed from the block's input, to the stream at once: not two
    residual branches, so nothing is removed and each block says why."""
    model, res = _prune(zoo_export(name), {"ratio": 0.5, "layers": [0]})
    assert not res.modified and not res.rewritten
    assert [s.where for s in res.skipped] == ["block 0"] and "parallel attention and MLP" in res.skipped[0].reason


def test_a_removed_block_whose_output_is_a_graph_output_keeps_the_name(export, tmp_path):
    """Block 3's output exported as a graph output: removed, the output keeps its name and takes block 3's input
    (block 2's output, also exported) as its value."""
    from graphprune.analysis.depth import residual_blocks

    model = ir.load(export("vit_tiny"))
    rb = residual_blocks(model)
    model.graph.outputs.extend([rb[2].out, rb[3].out])
    names = [v.name for v in model.graph.outputs]
    path = _save(model, tmp_path / "outs.onnx")
    feed = {model.graph.inputs[0].name: _x()}
    before = ort.InferenceSession(str(path)).run(None, feed)
    pruned, res = _prune(path, {"ratio": 0.5, "layers": [3]})
    assert [(r.block, r.unit) for r in res.rewritten] == [(3, "block")]
    out = _save(pruned, tmp_path / "p.onnx")
    sess = ort.InferenceSession(str(out))
    assert [o.name for o in sess.get_outputs()] == names
    after = sess.run(None, feed)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after[2], before[1], rtol=1e-6, atol=1e-6)


def test_search_default_space_removes_blocks_last(export, tmp_path):
    """search's default space: depth_prune (ratio up to DEPTH_MAX_RATIO, blocks or branches) last in the pipeline on
    a model with removable blocks; a model without attention says why it is left out."""
    from graphprune.search.space import DEPTH_MAX_RATIO, default_space
    from tests.test_fidelity import mlp

    space = default_space(ir.load(export("vit_tiny")))
    assert [p.name for p in space.passes][-1] == "depth_prune"
    params = {q.key: q for q in space.passes[-1].params}
    assert params["ratio"].high == DEPTH_MAX_RATIO and params["unit"].choices == ("block", "sublayer")
    plain = default_space(ir.load(mlp(tmp_path / "mlp.onnx", hidden=16)))
    assert "depth_prune: 0 removable transformer blocks (needs 3)" in plain.excluded
    # a ViT's embedding width (pruned by ignore_stem: auto) stays whole in the default space, written into every
    # trial's pipeline; a model without one has no such key
    channels = {p.name: {q.key: q for q in p.params} for p in space.passes}["channel_prune"]
    assert channels["ignore_stem"].choices is None and channels["ignore_stem"].to_yaml() is True
    plain_channels = {p.name: {q.key: q for q in p.params} for p in plain.passes}["channel_prune"]
    assert "ignore_stem" not in plain_channels


class _CrossLayer(torch.nn.Module):
    """A pre-norm decoder layer: self-attention, cross-attention to a memory, MLP (three residual branches)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.n1, self.n2, self.n3 = (torch.nn.LayerNorm(d) for _ in range(3))
        self.self_attn = torch.nn.MultiheadAttention(d, 4, batch_first=True)
        self.cross = torch.nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def forward(self, x, memory):
        h = self.n1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.cross(self.n2(x), memory, memory, need_weights=False)[0]
        return x + self.mlp(self.n3(x))


class _CrossDecoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_CrossLayer() for _ in range(3)])

    def forward(self, x, memory):
        for layer in self.layers:
            x = layer(x, memory)
        return x


@pytest.mark.slow
def test_decoder_layers_with_cross_attention_are_skipped(model_cache):
    """Self-attention, cross-attention, MLP: the branch after the self-attention is another attention, so the layer
    is not read as a (attention, MLP) pair, and nothing is removed; the reason says why."""
    from graphprune.analysis.attention import find_attention_blocks
    from graphprune.torch import export as gexport

    def make(folder):
        torch.manual_seed(0)
        args = (torch.randn(2, 8, 32), torch.randn(2, 5, 32))
        return gexport(_CrossDecoder().eval(), args, folder / "cross.onnx", input_names=["x", "memory"])

    path = model_cache.get(("depth", "cross_decoder"), make)
    assert len(find_attention_blocks(ir.load(path))) == 6
    model, res = _prune(path, {"ratio": 0.34})
    assert not res.rewritten, [r.to_dict() for r in res.rewritten]
    assert any("cross-attention" in s.reason for s in res.skipped), res.skipped
