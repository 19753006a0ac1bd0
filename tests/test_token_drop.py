"""Pass ``token_drop``: identity at keep 1.0 / r = 0, agreement with a torch re-implementation of the pruned
forward (EViT / Zero-TPrune / ToMe semantics built on the ops' numpy references), dynamic batch, masks,
budgets and refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pydantic
import pytest
import torch

from graphprune.backends.onnxruntime import run
from graphprune.errors import ConfigError, GraphpruneError
from graphprune.ops import diversity_select, token_merge, token_select
from graphprune.passes import get_pass

TokenDrop = get_pass("token_drop")


def _apply(path, cfg):
    model = ir.load(str(path))
    result = TokenDrop(cfg)(model)
    return model, result


def _images(batch: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _select(x, sc, n_keep_ratio, protect, keep_order, fuse_rest):
    k = token_select.kept_count(x.shape[1], protect, keep_ratio=n_keep_ratio)
    y, idx = token_select.reference(x.numpy(), sc.numpy(), k=k, protect=protect, keep_order=keep_order, fuse_rest=fuse_rest)
    return torch.from_numpy(y), torch.from_numpy(idx)


@torch.no_grad()
def torch_reference(vit, images: np.ndarray, cfg: dict) -> np.ndarray:
    """The example ViT's forward with token reduction applied as the pass documents it (mlp placement)."""
    method = cfg.get("method", "cls_attention")
    layers, ratio, protect = cfg["layers"], cfg.get("keep_ratio", 1.0), 1
    x = vit.patch_embed(torch.from_numpy(images)).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
    size = None
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        h = blk.norm1(x)
        b, n, c = h.shape
        q, k, v = a.qkv(h).reshape(b, n, 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * a.scale
        if size is not None:
            logits = logits + size[:, :, 0].log()[:, None, None, :]
        probs = logits.softmax(-1)
        x = x + a.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        if i in layers:
            if method == "tome":
                y, s, _ = token_merge.reference(x.numpy(), k.mean(1).numpy(), None if size is None else size.numpy(),
                                                r=cfg["r"], protect=protect)
                x, size = torch.from_numpy(y), torch.from_numpy(s)
            elif method == "diversity":
                kk = token_select.kept_count(x.shape[1], protect, keep_ratio=ratio)
                x = torch.from_numpy(diversity_select.reference(x.numpy(), k=kk, protect=protect, keep_order=cfg.get("keep_order", True))[0])
            else:
                if method == "cls_attention":
                    q0, q1 = {"cls": (0, 1), "last": (n - 1, n)}.get(cfg.get("query", "cls"), cfg.get("query"))
                    sc = probs[:, :, q0:q1, :].mean((1, 2))
                else:
                    am = probs.mean(1)
                    s = am.mean(1, keepdim=True)
                    for _ in range(cfg.get("iterations", 3) - 1):
                        s = s @ am
                    sc = s[:, 0]
                x, _ = _select(x, sc, ratio, protect, cfg.get("keep_order", True), cfg.get("fuse_rest", False))
        x = x + blk.mlp(blk.norm2(x))
    x = vit.norm(x)
    x = x[:, 0] if vit.pool == "cls" else x[:, 1:].mean(dim=1)
    return vit.head(x).numpy()


@pytest.fixture(scope="module")
def vit18(export):
    return export("vit_tiny", 18)


@pytest.fixture(scope="module")
def vit23(export):
    return export("vit_tiny", 23, sdpa=True)


IDENTITY = [{"keep_ratio": 1.0}, {"keep_ratio": 1.0, "layers": [0, 1, 2, 3]}, {"method": "attention_graph", "keep_ratio": 1.0},
            {"method": "diversity", "keep_ratio": 1.0},
            {"method": "tome", "r": 0}, {"keep_ratio": 1.0, "placement": "block"}]


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("cfg", IDENTITY, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_identity_at_keep_one(request, opset, cfg):
    path = request.getfixturevalue(f"vit{opset}")
    x = _images(4)
    base = run(ir.load(str(path)), {"x": x})
    model, result = _apply(path, cfg)
    assert result.modified and result.rewritten
    assert any(n.domain == "ai.graphprune" for n in model.graph)
    out = run(model, {"x": x})
    np.testing.assert_allclose(out[0], base[0], atol=1e-6, rtol=0)


def test_identity_hf_vit(hf_export):
    path = hf_export("vit", 18, layers=3)
    x = _images(2)
    base = run(ir.load(str(path)), {"pixel_values": x})
    # last_hidden_state is per-token: selection restores it by default; ToMe (no unmerge) carries merged tokens
    for cfg in ({"keep_ratio": 1.0, "layers": [0, 1, 2]}, {"method": "tome", "r": 0, "restore": False}):
        model, result = _apply(path, cfg)
        assert len(result.rewritten) == 3 and not result.skipped, result.skipped
        out = run(model, {"pixel_values": x})
        for o, b in zip(out, base):
            np.testing.assert_allclose(o, b, atol=1e-6, rtol=0)


AGREE = [
    {"keep_ratio": 0.5, "layers": [1, 2, 3]},
    {"keep_ratio": 0.7, "layers": [1, 3]},
    {"keep_ratio": 0.6, "layers": [1, 2], "keep_order": False},
    {"keep_ratio": 0.6, "layers": [1, 2, 3], "fuse_rest": True},
    {"method": "attention_graph", "keep_ratio": 0.5, "layers": [1, 2]},
    {"keep_ratio": 0.5, "layers": [1, 2], "query": "last"},
    {"keep_ratio": 0.5, "layers": [2], "query": (3, 9)},
    {"method": "diversity", "keep_ratio": 0.5, "layers": [1, 2]},
    {"method": "tome", "r": 3, "layers": [0, 1, 2, 3]},
    {"method": "tome", "r": 5, "layers": [1, 2]},
]


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("cfg", AGREE, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_torch_reference(request, examples, opset, cfg):
    path = request.getfixturevalue(f"vit{opset}")
    vit, _ = examples.build("vit_tiny", **({"sdpa": True} if opset == 23 else {}))
    x = _images(4, seed=1)
    model, result = _apply(path, cfg)
    assert [r.layer for r in result.rewritten] == cfg["layers"], result.skipped
    ref = torch_reference(vit, x, cfg)
    out = run(model, {"x": x})[0]
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
    assert np.abs(ref - run(ir.load(str(path)), {"x": x})[0]).max() > 1e-3  # the reduction really changed numbers


def test_mean_pool_and_dynamic_batch(examples, export):
    path = export("vit_tiny", 18, pool="mean")
    vit, _ = examples.build("vit_tiny", pool="mean")
    cfg = {"keep_ratio": 0.5, "layers": [1, 2]}
    model, _ = _apply(path, cfg)
    x4 = _images(4, seed=2)
    out4 = run(model, {"x": x4})[0]
    np.testing.assert_allclose(out4, torch_reference(vit, x4, cfg), atol=2e-4, rtol=1e-4)
    out1 = run(model, {"x": x4[2:3]})[0]  # same model, batch 1: each sample selects its own tokens
    np.testing.assert_allclose(out1, out4[2:3], atol=1e-5)


def test_report_lists_token_counts(vit18):
    model, result = _apply(vit18, {"keep_ratio": 0.5, "layers": [1, 3]})
    assert [(r.layer, r.tokens_before, r.tokens_after) for r in result.rewritten] == [(1, 17, 9), (3, 9, 5)]
    assert result.info["protect"] == 1  # detected CLS prefix
    tokens = [v.shape[1] for n in model.graph if n.domain == "ai.graphprune" for v in n.outputs[:1]]
    assert tokens == [9, 5]


def test_fused_attention_notes_recompute(vit23):
    _, result = _apply(vit23, {"keep_ratio": 0.5, "layers": [1]})
    assert "recomputed from Q,K" in result.rewritten[0].note


def test_bert_post_norm_padding_mask_gathered(examples, tmp_path):
    """BERT-style (post-norm, key-padding bias in every block): selection after LayerNorm, masks gathered."""
    bert, (ids, mask) = examples.build("bert")
    ids, mask = ids[:, :40].repeat(3, 1), mask[:, :40].repeat(3, 1)  # 40 tokens: 64 would equal head_dim
    mask[1, 30:] = 0
    path = examples.export_model(bert, (ids, mask), tmp_path / "bert40.onnx")
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    base = run(ir.load(str(path)), feeds)[0]
    model, result = _apply(path, {"keep_ratio": 1.0, "layers": [0, 1, 2], "protect": 1})
    assert len(result.rewritten) == 3
    np.testing.assert_allclose(run(model, feeds)[0], base, atol=1e-5)
    cfg = {"keep_ratio": 0.5, "layers": [1], "protect": 1, "restore": False}  # the reduced per-token output
    model, result = _apply(path, cfg)
    out = run(model, feeds)[0]
    with torch.no_grad():  # reference: block 1 keeps the CLS-attention top half, later masks follow the tokens
        x = bert.ln(bert.tok(ids) + bert.pos(torch.arange(ids.shape[1]))[None])
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4
        for i, blk in enumerate(bert.blocks):
            a = blk.attn
            b, n, c = x.shape
            q, k, v = a.qkv(x).reshape(b, n, 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
            probs = ((q @ k.transpose(-2, -1)) * a.scale + bias).softmax(-1)
            x = blk.ln1(x + a.proj((probs @ v).transpose(1, 2).reshape(b, n, c)))
            if i == 1:
                x, idx = _select(x, probs[:, :, 0, :].mean(1), 0.5, 1, True, False)
                bias = torch.gather(bias.expand(b, 1, 1, n), 3, idx[:, None, None, :])
            x = blk.ln2(x + blk.mlp(x))
    assert out.shape == tuple(x.shape)
    np.testing.assert_allclose(out, x.numpy(), atol=2e-4, rtol=1e-4)


def test_hf_vit_mask_gathered_at_keep_half(hf_export):
    """HF ViT carries a [B,1,N,N] mask into every block; it is gathered along with the tokens. With CLS pooling,
    dropping before block 1's MLP (mask gathered for block 2) or at block 1's end must give the same pooled output."""
    path = hf_export("vit", 18, layers=3)
    x = _images(2, seed=3)
    m1, r1 = _apply(path, {"keep_ratio": 0.5, "layers": [1]})
    m2, r2 = _apply(path, {"keep_ratio": 0.5, "layers": [1], "placement": "block"})
    assert not r1.skipped and not r2.skipped
    assert any(n.op_type == "GatherElements" for n in m1.graph)  # the mask gather
    pooled1, pooled2 = run(m1, {"pixel_values": x})[1], run(m2, {"pixel_values": x})[1]
    np.testing.assert_allclose(pooled1, pooled2, atol=1e-5)
    base = run(ir.load(str(path)), {"pixel_values": x})[1]
    assert np.abs(pooled1 - base).max() > 1e-4


def test_budget_schedule_meets_predicted_flops(vit18):
    from graphprune.analysis.flops import count_flops

    base = count_flops(ir.load(str(vit18))).flops
    model, result = _apply(vit18, {"schedule": {"flops": 0.8}, "layers": [1, 2]})
    info = result.info
    assert info["predicted_flops"] <= 0.8 * info["original_flops"] + 1
    assert 0.0 < info["solved_keep_ratio"] < 1.0
    assert info["original_flops"] == base
    got = count_flops(model).flops
    assert abs(got - info["predicted_flops"]) / base < 0.05, (got, info)


def test_pyramid_and_list_schedules(vit18):
    _, result = _apply(vit18, {"schedule": "pyramid", "stages": 2, "keep_ratio": 0.5})
    assert [r.layer for r in result.rewritten] == [1]
    _, result = _apply(vit18, {"schedule": [0.8, 0.5], "layers": [1, 2]})
    assert [r.tokens_after for r in result.rewritten] == [1 + 13, 1 + 7]


def test_cnn_is_left_unchanged_with_reason(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("GlobalAveragePool", ["r"], ["y"])], "cnn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 1, 1])], [w])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    before = ir.to_proto(model).SerializeToString()
    result = TokenDrop({"keep_ratio": 0.5})(model)
    assert not result.modified
    assert "no attention" in result.skipped[0].reason
    assert ir.to_proto(model).SerializeToString() == before
    assert onnx  # imported for helper


@pytest.mark.parametrize("bad", [{"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"keep_ratio": -0.2}])
def test_bad_keep_ratio_names_key(bad):
    with pytest.raises((ConfigError, pydantic.ValidationError)) as err:
        TokenDrop(bad)
    assert "keep_ratio" in str(err.value)


def test_token_count_equal_to_model_dim_is_refused(examples, tmp_path):
    """The example BERT has 64 tokens and head_dim 64: reshape constants are ambiguous, so the layer is skipped."""
    bert, args = examples.build("bert")
    path = examples.export_model(bert, args, tmp_path / "bert64.onnx")
    model, result = _apply(path, {"keep_ratio": 0.5, "layers": [1]})
    assert not result.modified and "model dimension" in result.skipped[0].reason


def test_missing_layer_is_config_error(vit18):
    with pytest.raises(ConfigError, match="layers"):
        _apply(vit18, {"layers": [2, 7]})
    with pytest.raises(GraphpruneError, match="schedule"):
        _apply(vit18, {"schedule": [0.5], "layers": [1, 2]})


def test_pipeline_yaml_error_names_key():
    from graphprune.pipeline import Pipeline

    with pytest.raises(ConfigError, match="keep_ratio"):
        Pipeline.from_dict({"passes": [{"name": "token_drop", "keep_ratio": 2}]})


def test_output_shapes_survive_token_count_equal_to_classes(vit18):
    """17→13→10→8 tokens with 10 classes: shapes are re-inferred, never patched by value."""
    model, result = _apply(vit18, {"keep_ratio": 0.7})
    assert [r.tokens_after for r in result.rewritten] == [13, 10, 8]
    assert list(model.graph.outputs[0].shape)[1] == 10
    out = run(model, {"x": _images(3)})[0]
    assert out.shape == (3, 10)


def test_split_of_the_token_axis_is_refused():
    """A downstream ``Split`` into [1, N-1] (CLS / patches) holds the token count: refused, not left wrong."""
    from onnx import TensorProto, helper

    from graphprune.passes import Skip
    from graphprune.passes.token_drop import rewire

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Split", ["h", "sizes"], ["cls", "patches"], axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 17, 8])],
        [helper.make_tensor_value_info("cls", TensorProto.FLOAT, ["B", 1, 8]),
         helper.make_tensor_value_info("patches", TensorProto.FLOAT, ["B", 16, 8])],
        [helper.make_tensor("sizes", TensorProto.INT64, [2], [1, 16])])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    with pytest.raises(Skip, match="Split"):
        rewire.plan_retarget(model.graph, model.graph.inputs[0], 17, 9)


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("cfg", [{"keep_ratio": 0.5}, {"method": "tome", "r": 3}, {"method": "diversity"},
                                 {"method": "attention_graph", "fuse_rest": True}], ids=str)
def test_result_passes_onnx_checker(request, opset, cfg):
    import onnx

    model, _ = _apply(request.getfixturevalue(f"vit{opset}"), cfg)
    proto = ir.to_proto(model)
    g = proto.graph
    for init in g.initializer:  # check structure and shapes without reading external weight files
        g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del g.initializer[:]
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("cfg", [{"keep_ratio": 0.5, "layers": [0, 1]}, {"method": "tome", "r": 3, "restore": False},
                                 {"method": "attention_graph", "keep_ratio": 0.6, "layers": [1]},
                                 {"method": "diversity", "keep_ratio": 0.5, "layers": [0]}], ids=str)
def test_hf_vit_opset23_matches_opset18(hf_export, cfg):
    """Same HF weights exported twice: opset 18 (MatMul/Softmax, float mask) and opset 23 (fused ``Attention``
    with a boolean mask: scores recomputed from Q,K, bool mask gathered / turned additive for ToMe)."""
    x = _images(2, seed=4)
    outs = []
    for opset in (18, 23):
        model, result = _apply(hf_export("vit", opset, layers=3), cfg)
        assert result.rewritten and not result.skipped, result.skipped
        outs.append(run(model, {"pixel_values": x}))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_default_layers_stay_inside_the_model():
    from graphprune.passes.token_drop.plan import default_layers

    assert default_layers(12) == [3, 6, 9]
    assert default_layers(2) == [1] and default_layers(1) == []  # a one-block model: nothing to place, no IndexError
    for depth in range(1, 40):
        assert all(0 < i < depth for i in default_layers(depth))


# -- a static Llama-shaped decoder: constant RoPE tables and causal mask -----------------------------------------------

def _decoder_reference(cfg, w: dict, ids: np.ndarray, drops: dict[int, np.ndarray]) -> np.ndarray:
    """Llama forward in float64 numpy with tokens dropped after block ``i``'s attention (``drops[i]``: kept
    positions ``[K]`` among the current tokens, batch 1): later blocks see the kept tokens at their own positions
    (RoPE angle and causal order), dropped tokens skip the rest and are put back before the final norm."""
    d, nh, nkv = cfg.head_dim, cfg.heads, cfg.kv_heads
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)

    def norm(x, g):
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.eps)

    x = w["model.embed_tokens.weight"][ids]
    pos = np.arange(ids.shape[1])
    final = np.zeros_like(x)
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        ang = np.outer(pos, inv)
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

        def rope(t, cos=cos, sin=sin):
            return t * cos + np.concatenate([-t[..., d // 2:], t[..., : d // 2]], -1) * sin

        def heads(t, n, m=len(pos)):
            return t.reshape(1, m, n, d).transpose(0, 2, 1, 3)

        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope(heads(h @ w[p + "self_attn.q_proj.weight"], nh))
        k = np.repeat(rope(heads(h @ w[p + "self_attn.k_proj.weight"], nkv)), nh // nkv, axis=1)
        v = np.repeat(heads(h @ w[p + "self_attn.v_proj.weight"], nkv), nh // nkv, axis=1)
        a = np.where(pos[None, :] > pos[:, None], -np.inf, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d))
        a = np.exp(a - a.max(-1, keepdims=True))
        o = ((a / a.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + o @ w[p + "self_attn.o_proj.weight"]
        if i in drops:
            gone = np.setdiff1d(np.arange(len(pos)), drops[i])
            final[:, pos[gone]] = x[:, gone]
            x, pos = x[:, drops[i]], pos[drops[i]]
        hh = norm(x, w[p + "post_attention_layernorm.weight"])
        g = hh @ w[p + "mlp.gate_proj.weight"]
        x = x + (g / (1 + np.exp(-g)) * (hh @ w[p + "mlp.up_proj.weight"])) @ w[p + "mlp.down_proj.weight"]
    final[:, pos] = x
    return norm(final, w["model.norm.weight"]) @ w["lm_head.weight"]


def test_static_decoder_gathers_its_rope_tables_and_causal_mask(tmp_path):
    """A Llama-shaped decoder with a static sequence (``benchmarks.make_decoder``: cos/sin tables ``[1, 1, N, D]``
    and the causal mask as constants): later blocks' rotary tables are gathered to the kept positions with the
    mask, and the restored logits equal a numpy forward that drops the same tokens (indices read from the model)."""
    from benchmarks import make_decoder
    from graphprune.backends.onnxruntime import probe

    cfg = make_decoder.DecoderConfig(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96, vocab=50, seq=24)
    src = make_decoder.write_decoder(cfg, tmp_path / "dec" / "decoder.onnx")
    model, result = _apply(src, {"keep_ratio": 0.7})
    assert result.modified and result.info["layers"] == [1, 2], (result.info, result.skipped)
    selects = [n for n in model.graph if n.op_type == "TokenSelect" and n.domain == "ai.graphprune"]
    assert len(selects) == 2
    tables = {v.name for n in model.graph for v in n.inputs if v is not None and (v.name or "").startswith(
        ("val_cos", "val_sin"))}
    assert {"val_cos", "val_sin", "val_cos_kept", "val_sin_kept"} <= tables, tables  # blocks 2 and 3 read gathers
    ids = np.random.default_rng(1).integers(0, cfg.vocab, (1, cfg.seq))
    logits, *idx = next(probe(model, [model.graph.outputs[0]] + [n.outputs[1] for n in selects],
                              [{"input_ids": ids}]))
    assert [i.shape for i in idx] == [(1, 17), (1, 12)]  # ceil(0.7 · 24), ceil(0.7 · 17)
    w = {v.name: v.const_value.numpy().astype(np.float64) for v in ir.load(str(src)).graph.initializers.values()
         if v.name in dict(cfg.tensors())}
    want = _decoder_reference(cfg, w, ids, {1: idx[0][0], 2: idx[1][0]})
    assert logits.shape == (1, cfg.seq, cfg.vocab)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    base = run(ir.load(str(src)), {"input_ids": ids})[0]
    assert np.abs(logits - base).max() > 1e-3  # the drop changed the kept tokens' context


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.slow
def test_parallel_blocks_never_get_a_reduction_that_only_adds_cost(layers, tmp_path):
    """Phi's blocks run attention and MLP in parallel on the block input, so a reduction after the last block's
    attention reaches nothing before the logits are restored: it is refused with the reason (it used to be written,
    FLOPs ×1.002). With more blocks the reduction lands earlier and the FLOPs drop."""
    transformers = pytest.importorskip("transformers")
    from graphprune.backends.onnxruntime import measure_flops as count_flops
    from graphprune.torch import export

    torch.manual_seed(0)
    cfg = transformers.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, max_position_embeddings=64)
    lm = transformers.PhiForCausalLM(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    src = export(Logits().eval(), (torch.randint(0, 64, (2, 24)),), tmp_path / "phi.onnx",
                 dynamic_axes={0: "batch", 1: "seq"}, input_names=["input_ids"], output_names=["logits"])
    model, result = _apply(src, {"keep_ratio": 0.7})
    f0, f1 = count_flops(ir.load(str(src)), dims={"seq": 24}).flops, count_flops(model, dims={"seq": 24}).flops
    if layers == 2:
        assert not result.modified and f1 == f0
        assert "would only add cost" in result.skipped[0].reason, result.skipped
    else:
        assert result.modified and f1 < 0.97 * f0, (result.info, result.skipped, f1 / f0)
        ids = np.random.default_rng(0).integers(0, 64, (2, 19))
        assert run(model, {"input_ids": ids})[0].shape == (2, 19, 64)
