"""sparse_attention pass: structure of the rewritten graph, numerics against the unoptimized model in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pydantic
import pytest

from graphprune.analysis import count_flops
from graphprune.analysis.attention import find_attention_blocks
from graphprune.analysis.inputs import example_inputs
from graphprune.backends.onnxruntime import run
from graphprune.errors import ConfigError
from graphprune.io import load_model, save_model
from graphprune.ops import sparse_attention as sa
from graphprune.passes import get_pass
from graphprune.passes.sparse_attention import SparseAttentionPass


def _apply(path, config: dict):
    """The pass on ``path``. These tests check patterns' numerics on small models, where a window over every key or
    all blocks kept executes more FLOPs than the dense core: ``allow_more_flops`` keeps those rewrites."""
    model = load_model(path)
    result = SparseAttentionPass({"allow_more_flops": True} | config)(model)
    return model, result


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _bert_feeds(model: ir.Model, batch: int = 2, valid: int = 40, seed: int = 0) -> dict:
    feeds = example_inputs(model, batch=batch, seed=seed)
    mask = np.ones_like(feeds["attention_mask"])
    mask[1:, valid:] = 0
    feeds["attention_mask"] = mask
    return feeds


def test_registered():
    assert get_pass("sparse_attention") is SparseAttentionPass


@pytest.mark.parametrize("opset", [18, 23])
def test_vit_exact_window_matches_and_core_is_gone(export, opset, tmp_path):
    path = export("vit_tiny", opset=opset, **({"sdpa": True} if opset == 23 else {}))
    base = load_model(path)
    n_blocks = len(find_attention_blocks(base))
    model, result = _apply(path, {"pattern": "sliding_window", "window": 64})
    ops = _ops(model)
    assert ops.count("SparseAttention") == n_blocks == 4
    assert "Softmax" not in ops and "Attention" not in ops
    if opset == 18:  # the kᵀ Transposes and the q·kᵀ / ·v MatMuls went with the core
        assert ops.count("MatMul") == _ops(base).count("MatMul") - 2 * n_blocks
        assert ops.count("Transpose") <= _ops(base).count("Transpose") - n_blocks
    unused = [name for name, val in model.graph.initializers.items() if not val.uses()]
    assert not unused  # the scale constants went with the core
    assert [r.block for r in result.rewritten] == [0, 1, 2, 3] and not result.skipped
    save_model(model, tmp_path / "sparse.onnx")
    onnx.checker.check_model(str(tmp_path / "sparse.onnx"))  # the body's opset is the model's
    assert all(r.params["num_global"] == 1 for r in result.rewritten)  # CLS from the prefix analysis
    feeds = example_inputs(base, batch=2)
    np.testing.assert_allclose(run(model, feeds)[0], run(base, feeds)[0], atol=1e-5, rtol=0)


def test_vit_sparse_patterns_match_op_reference(export):
    """A pattern that is not dense: block 0's output equals the numpy reference on the block's q, k, v."""
    path = export("vit_tiny")
    base = load_model(path)
    blk = find_attention_blocks(base)[0]
    for name in ("q", "k", "v", "out"):  # expose the core's inputs and output as graph outputs
        val = {"q": blk.q, "k": blk.k, "v": blk.v, "out": blk.output}[name]
        base.graph.outputs.append(val)
    feeds = example_inputs(base, batch=2)
    _, q, k, v, dense = run(base, feeds)
    cfg = {"pattern": "neighborhood_2d", "kernel": 3, "layers": [0]}
    model, result = _apply(path, cfg)
    out_val = model.graph.node(result.rewritten[0].node).outputs[0]
    model.graph.outputs.append(out_val)
    got = run(model, feeds)[-1]
    ref = sa.reference(q, k, v, pattern="neighborhood_2d", grid=[4, 4], kernel=3, num_global=1, scale=blk.scale)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert np.abs(got - dense).max() > 1e-3
    assert result.rewritten[0].attention_flops_ratio > 0


@pytest.mark.parametrize("config", [
    {"window": 64},
    {"pattern": "block_topk", "block_size": 16, "topk": 4},
    {"pattern": "neighborhood_2d", "grid": [8, 8], "kernel": 8},
])
def test_bert_padding_mask_exact(export, config):
    path = export("bert")
    base = load_model(path)
    model, result = _apply(path, config)
    assert _ops(model).count("SparseAttention") == 4 and all(r.mask == "key" for r in result.rewritten)
    feeds = _bert_feeds(base)
    np.testing.assert_allclose(run(model, feeds)[0], run(base, feeds)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [{"window": 8}, {"pattern": "block_topk", "block_size": 8, "topk": 2}])
def test_bert_padding_mask_kept_for_sparse_patterns(export, config):
    """Tokens behind the padding mask must not change the valid tokens' outputs.

    For block_topk the padding starts on a block boundary: block means include masked tokens (see the op), but
    a fully masked block ranks last, so the valid blocks' routing cannot see the padded content.
    """
    path = export("bert")
    model, _ = _apply(path, config)
    feeds = _bert_feeds(model, valid=40)
    other = {k: v.copy() for k, v in feeds.items()}
    other["input_ids"][1, 40:] = (other["input_ids"][1, 40:] + 7) % 1000
    a, b = run(model, feeds)[0], run(model, other)[0]
    np.testing.assert_allclose(a[1, :40], b[1, :40], atol=1e-5)
    base = load_model(path)
    assert np.abs(a - run(base, feeds)[0]).max() > 1e-3  # and the pattern did change something


@pytest.mark.parametrize("opset", [18, 23])  # 18: Where-built float mask [B, 1, N, N]; 23: Attention, bool mask
def test_hf_bert_mask(hf_export, opset):
    path = hf_export("bert", opset=opset)
    base = load_model(path)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 1000, (2, 16)), "attention_mask": np.ones((2, 16), np.int64)}
    feeds["attention_mask"][1, 10:] = 0
    for cfg in ({"window": 16}, {"pattern": "block_topk", "block_size": 4, "topk": 4}):
        model, result = _apply(path, cfg)
        assert len(result.rewritten) == 2 and not result.skipped
        assert not {"IsNaN", "Softmax", "Attention"} & set(_ops(model))
        assert all(r.mask == "full" for r in result.rewritten)
        np.testing.assert_allclose(run(model, feeds)[0], run(base, feeds)[0], atol=1e-4, rtol=0)
    model, _ = _apply(path, {"window": 3})
    other = {k: v.copy() for k, v in feeds.items()}
    other["input_ids"][1, 10:] = 5
    np.testing.assert_allclose(run(model, feeds)[0][1, :10], run(model, other)[0][1, :10], atol=1e-5)


def test_layers_per_layer_and_head_groups(export, tmp_path):
    path = export("vit_tiny", opset=23, sdpa=True)
    base = load_model(path)
    feeds = example_inputs(base, batch=1)
    layout = tmp_path / "layout.npy"
    np.save(layout, np.ones((4, 5, 5)))
    cfg = {
        "window": 32, "layers": [1, 2, 3],
        "per_layer": {2: {"pattern": "block_layout", "block_size": 4, "layout": str(layout)}},
        "head_groups": [{"heads": [3, 1]}, {"heads": [0, 2], "pattern": "block_topk", "block_size": 4, "topk": 5}],
    }
    model, result = _apply(path, cfg)
    ops = _ops(model)
    assert ops.count("Attention") == 1 and ops.count("SparseAttention") == 6
    by_block = {(r.block, tuple(r.heads)): r.pattern for r in result.rewritten}
    assert by_block[(1, (3, 1))] == "sliding_window" and by_block[(1, (0, 2))] == "block_topk"
    assert by_block[(2, (3, 1))] == "block_layout"
    np.testing.assert_allclose(run(model, feeds)[0], run(base, feeds)[0], atol=1e-5, rtol=0)


def test_probabilities_used_elsewhere_are_skipped_with_reason(export):
    path = export("vit_tiny")
    model = load_model(path)
    blk = find_attention_blocks(model)[1]
    model.graph.outputs.append(blk.probs)
    result = SparseAttentionPass({"window": 4, "allow_more_flops": True})(model)
    assert [s.where for s in result.skipped] == ["block 1"]
    assert "outside the attention core" in result.skipped[0].reason
    assert len(result.rewritten) == 3 and _ops(model).count("Softmax") == 1


@pytest.mark.parametrize(("config", "key"), [
    ({"window": 0}, "window"),
    ({"pattern": "blocky"}, "pattern"),
    ({"windw": 3}, "windw"),
])
def test_config_errors_name_the_key(config, key):
    with pytest.raises(pydantic.ValidationError, match=key):
        SparseAttentionPass(config)


@pytest.mark.parametrize(("config", "key"), [
    ({"layers": [9]}, "layers"),
    ({"pattern": "block_layout"}, "layout"),
    ({"pattern": "block_layout", "layout": "/nonexistent.npy"}, "layout"),
    ({"pattern": "neighborhood_2d", "grid": [3, 3]}, "grid"),
    ({"head_groups": [{"heads": [0, 1]}]}, "head_groups"),
])
def test_model_dependent_errors_name_the_key(export, config, key):
    model = load_model(export("vit_tiny"))
    with pytest.raises(ConfigError, match=f"^{key}"):
        SparseAttentionPass(config)(model)


def test_a_costlier_explicit_pattern_is_skipped_unless_allowed(export):
    """window 64 on vit_tiny's 17 tokens executes a padded 64-wide block: more FLOPs than the dense core, so each
    block is a skip with that reason and the model keeps its FLOPs; ``allow_more_flops`` rewrites it (exactly)."""
    path = export("vit_tiny")
    base = load_model(path)
    model = load_model(path)
    result = SparseAttentionPass({"pattern": "sliding_window", "window": 64})(model)
    assert not result.rewritten and [s.where for s in result.skipped] == [f"block {i}" for i in range(4)]
    assert all(s.reason.startswith("sliding_window at 17 tokens would execute") and "only add cost" in s.reason
               for s in result.skipped)
    assert count_flops(model).flops == count_flops(base).flops
    model, result = _apply(path, {"pattern": "sliding_window", "window": 64})
    assert len(result.rewritten) == 4 and count_flops(model).flops > count_flops(base).flops
