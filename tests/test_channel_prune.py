"""The channel_prune zoo: torch models exported with the dynamo exporter, pruned on ONNX, run in ORT.

Per model: 0% is an identity; 30% of FLOPs (target: flops, round_to 1) lands within a few percent; the pruned
model keeps its output shapes at batch 1 and 3 (dynamic batch) and equals the *masked* original (pruned channels
zeroed, computed from the plan with numpy only); the written plan replays to the same model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _channel_zoo as zoo  # noqa: E402

from graphprune.analysis.flops import count_flops  # noqa: E402
from graphprune.analysis.inputs import example_inputs  # noqa: E402
from graphprune.errors import ConfigError  # noqa: E402
from graphprune.passes import get_pass  # noqa: E402
from graphprune.passes._channel_reconstruct import LayerRefit  # noqa: E402

ZOO = ["resnet", "mobilenet", "se", "convnext", "densenet", "resnext", "flatten", "vit", "vit23", "bert"]


@pytest.fixture(scope="module")
def exported(channel_zoo_export):
    """``exported(name) -> Path``: the session's export of the ``_channel_zoo`` model (shared with
    ``test_channel_groups``)."""
    return channel_zoo_export


def _prune(path: Path, **cfg):
    model = ir.load(path)
    result = get_pass("channel_prune")(cfg)(model)
    return model, result


@pytest.mark.parametrize("name", ZOO)
def test_zoo_prunes_30_percent_flops(exported, name, tmp_path):
    path = exported(name)
    original = ir.load(path)
    plan_path = tmp_path / "plan.json"
    # the embedding width stays whole: a LayerNorm over fewer channels is not the masked model (the ViT's pruned
    # stream has its own reference, test_vit_stream_matches_the_narrower_network)
    model, result = _prune(path, ratio=0.3, target="flops", round_to=1, plan_out=str(plan_path), ignore_stem=True)
    assert result.modified, result.skipped
    r0, r1 = count_flops(original), count_flops(model)
    f0, f1 = (r0.flops, r1.flops) if not r0.unknown else (zoo.compute_flops(original), zoo.compute_flops(model))
    assert abs(f1 / f0 - 0.7) <= 0.05, (f1 / f0, result.info)
    plan = json.loads(plan_path.read_text())
    assert plan["groups"] and plan["slices"]
    for batch in (1, 3):
        feeds = example_inputs(original, batch=batch, seed=1)
        base = zoo.run(original, feeds, tmp_path, "base")
        out = zoo.run(model, feeds, tmp_path, "pruned")
        assert [o.shape for o in out] == [b.shape for b in base]
        ref = zoo.run(zoo.masked_copy(ir.load(path), plan), feeds, tmp_path, "masked")
        scale = max(1.0, float(np.abs(ref[0]).max()))
        assert float(np.abs(out[0] - ref[0]).max()) <= 1e-4 * scale, name
        assert float(np.abs(out[0] - base[0]).max()) > 0  # something really changed


@pytest.mark.parametrize("name", ["resnet", "vit", "bert", "densenet"])
def test_zero_ratio_is_identity(exported, name, tmp_path):
    path = exported(name)
    model, result = _prune(path, ratio=0.0)
    assert not result.modified
    feeds = example_inputs(model, batch=2, seed=2)
    a = zoo.run(ir.load(path), feeds, tmp_path, "a")[0]
    b = zoo.run(model, feeds, tmp_path, "b")[0]
    assert float(np.abs(a - b).max()) <= 1e-6


@pytest.mark.parametrize("name", ["resnext", "vit", "bert"])
def test_plan_round_trip(exported, name, tmp_path):
    path = exported(name)
    plan = tmp_path / "p.json"
    first, _ = _prune(path, ratio=0.4, importance="l1", plan_out=str(plan))
    again, result = _prune(path, plan_in=str(plan))
    assert result.modified
    init_a = {k: v.const_value.numpy() for k, v in first.graph.initializers.items()}
    init_b = {k: v.const_value.numpy() for k, v in again.graph.initializers.items()}
    assert init_a.keys() == init_b.keys()
    for k in init_a:
        np.testing.assert_array_equal(init_a[k], init_b[k])
    feeds = example_inputs(first, batch=2, seed=3)
    np.testing.assert_array_equal(zoo.run(first, feeds, tmp_path, "x")[0], zoo.run(again, feeds, tmp_path, "y")[0])


def test_plan_for_other_model_is_refused(exported, tmp_path):
    plan = tmp_path / "p.json"
    _prune(exported("resnet"), ratio=0.5, plan_out=str(plan))
    with pytest.raises(Exception, match="plan_in"):
        _prune(exported("se"), plan_in=str(plan))


def test_round_to_and_heads(exported):
    model, result = _prune(exported("resnet"), ratio=0.3, round_to=8)
    for node in model.graph:
        if node.op_type == "Conv" and node.name != "node_conv2d":
            assert node.inputs[1].shape[0] % 8 == 0, node.name
    vit, _ = _prune(exported("vit"), ratio=0.5)
    heads = [n for n in vit.graph if n.op_type == "Reshape" and len(n.outputs[0].shape) == 5]
    assert heads and all(n.outputs[0].shape[3] == 2 for n in heads)  # 4 heads → 2, target rewritten


@pytest.mark.parametrize("importance", ["l1", "l2", "activation"])
def test_importance_criteria_run(exported, importance, tmp_path):
    model, result = _prune(exported("se"), ratio=0.5, importance=importance, **{"global": True})
    assert result.modified and result.info["importance"] == importance
    feeds = example_inputs(model, batch=2)
    assert zoo.run(model, feeds, tmp_path)[0].shape == (2, 10)


def test_bn_importance_on_folded_model_names_the_key(exported):
    with pytest.raises(ConfigError, match="importance"):
        _prune(exported("resnet"), ratio=0.3, importance="bn")


def test_bad_config_names_the_key():
    cls = get_pass("channel_prune")
    with pytest.raises(Exception, match="ratio"):
        cls({"ratio": 1.5})
    with pytest.raises(Exception, match="target"):
        cls({"target": "latency"})


def test_bn_importance_reads_gamma(tmp_path):
    """With BatchNorm kept (unoptimized export + constant folding), ``bn`` ranks channels by |γ|."""
    import onnxscript.optimizer
    import torch

    module, args = zoo.zoo_model("resnet")
    with torch.no_grad():  # make γ decide: the first 8 channels of body.0.a get a tiny γ
        module.body[0].a[1].weight[:8] = 1e-3
    raw = tmp_path / "bn.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(module, args, str(raw), dynamo=True, opset_version=18, optimize=False, verbose=False,
                      dynamic_shapes=({0: batch},))
    model = ir.load(raw)
    onnxscript.optimizer.fold_constants(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    assert any(n.op_type == "BatchNormalization" for n in model.graph)
    plan_path = tmp_path / "plan.json"
    get_pass("channel_prune")({"ratio": 0.5, "importance": "bn", "plan_out": str(plan_path)})(model)
    plan = json.loads(plan_path.read_text())
    keep = [e["keep"] for e in plan["slices"] if e["initializer"] == "body.0.a.1.weight"]
    assert keep and sorted(keep[0]) == list(range(8, 16))
    feeds = example_inputs(model, batch=2)
    assert zoo.run(model, feeds, tmp_path)[0].shape == (2, 10)


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_reconstruct_lowers_output_error(exported, name, tmp_path):
    from graphprune.passes import PassContext

    path = exported(name)
    original = ir.load(path)
    calib = [example_inputs(original, batch=8, seed=s) for s in range(4)]
    held_out = example_inputs(original, batch=8, seed=99)
    ref = zoo.run(original, held_out, tmp_path, "ref")[0]
    errs = {}
    for refit in (False, True):
        model = ir.load(path)
        cfg = {"ratio": 0.5, "reconstruct": refit, "ignore_stem": True}  # the refit, not the LayerNorm statistics
        result = get_pass("channel_prune")(cfg, PassContext(calibration=calib))(model)
        out = zoo.run(model, held_out, tmp_path, f"r{refit}")[0]
        errs[refit] = float(np.mean((out - ref) ** 2))
        if refit:
            assert result.info["reconstructed_layers"] > 0
            assert all(r.rel_err_after < r.rel_err_before for r in result.rewritten if isinstance(r, LayerRefit))
    assert errs[True] < 0.8 * errs[False], errs


def test_unnamed_nodes_get_names(exported, tmp_path):
    model = ir.load(exported("resnet"))
    for node in model.graph:
        node.name = ""
    result = get_pass("channel_prune")({"ratio": 0.3})(model)
    assert result.modified
    feeds = example_inputs(model, batch=2)
    assert zoo.run(model, feeds, tmp_path)[0].shape == (2, 10)


@pytest.mark.parametrize("name", ["convnext", "vit", "resnet"])
def test_stream_pruning_with_stem(exported, name, tmp_path):
    """ignore_stem: false also prunes the residual stream: channels-last LayerNorm, depthwise conv, layer scale,
    CLS token / position embedding, the stem conv. LayerNorm statistics change, so only shapes and FLOPs are
    checked against the original here (the masked-equivalence test covers the rest)."""
    path = exported(name)
    model, result = _prune(path, ratio=0.5, ignore_stem=False)
    assert result.modified
    original = ir.load(path)
    assert count_flops(model).flops < 0.5 * count_flops(original).flops
    feeds = example_inputs(original, batch=3)
    out, base = zoo.run(model, feeds, tmp_path, "s")[0], zoo.run(original, feeds, tmp_path, "o")[0]
    assert out.shape == base.shape and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_params_target(exported, name):
    path = exported(name)
    model, result = _prune(path, ratio=0.3, target="params", round_to=1, **{"global": True})
    p0, p1 = count_flops(ir.load(path)).params, count_flops(model).params
    assert abs(p1 / p0 - 0.7) <= 0.05, (p1 / p0, result.info)


def _vit_on_channels(module, x, s):
    """``examples/models.py``'s ViT written out in torch on the stream channels ``s`` only: every LayerNorm
    normalizes over those channels, every layer reads and writes only them (independent of the surgery code)."""
    import torch
    import torch.nn.functional as F

    sd = {k: v.detach() for k, v in module.state_dict().items()}

    def ln(t, p):
        return F.layer_norm(t, (len(s),), sd[p + ".weight"][s], sd[p + ".bias"][s])

    with torch.no_grad():
        h = F.conv2d(x, sd["patch_embed.weight"][s], sd["patch_embed.bias"][s], stride=module.patch_embed.stride)
        h = h.flatten(2).transpose(1, 2)
        h = torch.cat([sd["cls_token"][..., s].expand(h.shape[0], -1, -1), h], 1) + sd["pos_embed"][..., s]
        for i, blk in enumerate(module.blocks):
            p = f"blocks.{i}."
            a = ln(h, p + "norm1")
            b, n, _ = a.shape
            qkv = F.linear(a, sd[p + "attn.qkv.weight"][:, s], sd[p + "attn.qkv.bias"])
            q, k, v = qkv.reshape(b, n, 3, blk.attn.heads, blk.attn.head_dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
            h = h + F.linear(o, sd[p + "attn.proj.weight"][s], sd[p + "attn.proj.bias"][s])
            m = F.gelu(F.linear(ln(h, p + "norm2"), sd[p + "mlp.fc1.weight"][:, s], sd[p + "mlp.fc1.bias"]))
            h = h + F.linear(m, sd[p + "mlp.fc2.weight"][s], sd[p + "mlp.fc2.bias"][s])
        return F.linear(ln(h, "norm")[:, 0], sd["head.weight"][:, s], sd["head.bias"]).numpy()


@pytest.mark.parametrize("name", ["vit", "vit23"])
def test_vit_stream_matches_the_narrower_network(exported, name, tmp_path):
    """The default (``ignore_stem: auto``) prunes a ViT's embedding width. With the heads and MLPs left whole
    (named in ``ignore``), the pruned model must equal the original network computed on the kept channels, LayerNorm
    statistics included; the masked-model reference of the zoo test does not hold there."""
    import torch

    path = exported(name)
    module, _ = zoo.zoo_model(name)
    ignore = [f"blocks.{i}.{p}" for i in range(4) for p in ("attn.qkv.bias", "mlp.fc1.bias")]
    plan_path = tmp_path / "plan.json"
    model, result = _prune(path, ratio=0.25, ignore=ignore, plan_out=str(plan_path))
    plan = json.loads(plan_path.read_text())
    assert [(g["size"], g["kept"]) for g in plan["groups"]] == [(64, 48)], result.skipped
    original = ir.load(path)
    assert count_flops(model).flops < 0.85 * count_flops(original).flops
    feeds = example_inputs(original, batch=3, seed=1)
    out = zoo.run(model, feeds, tmp_path, "stream")[0]
    ref = _vit_on_channels(module, torch.from_numpy(next(iter(feeds.values()))), torch.tensor(plan["groups"][0]["keep"]))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert float(np.abs(out - zoo.run(original, feeds, tmp_path, "base")[0]).max()) > 1e-3  # really narrower
