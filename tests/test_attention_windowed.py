"""Window / grid attention (Swin, MaxViT) and layer-scale residuals (DINOv2) in ``find_attention_blocks``, and what
``token_drop`` / ``sparse_attention`` / ``inspect`` do with them. The models are the torch modules of
``tests/_window_models.py``, exported with the dynamo exporter; expectations are the modules' own settings."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graphprune.analysis import count_flops, find_attention_blocks
from graphprune.backends.onnxruntime import run
from graphprune.io import load_model
from graphprune.ops import token_select
from graphprune.passes import get_pass
from tests import _window_models as wm


@pytest.fixture(scope="module")
def wexport(model_cache):
    """``wexport(name, opset=18, **kw) -> (module, args, path)``: a ``_window_models`` module, its example input and
    its export (in the session's ``model_cache``)."""

    def _export(name: str, opset: int = 18, **kw):
        def make(folder):
            from graphprune.torch import export

            module, args = wm.build(name, **kw)
            tag = "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
            return module, args, export(module, args, folder / f"{name}_op{opset}_{tag}.onnx", opset=opset)

        return model_cache.get(("windowed", name, opset, tuple(sorted(kw.items()))), make)

    return _export


def _feeds(args) -> dict:
    return {"x": args[0].numpy()}


def _proto_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


# -- Swin -------------------------------------------------------------------------------------------------------------

SWIN = dict(  # from SwinStyle's defaults: stages 16×32 (dim 16, 2 heads), 8×16 (32, 2), 4×8 (64, 4); window 4
    windows=[32, 32, 8, 8, 2, 2], shifted=[False, True, False, True, False, False],
    spatial=[(16, 32)] * 2 + [(8, 16)] * 2 + [(4, 8)] * 2, heads=[2, 2, 2, 2, 4, 4], head_dim=[8, 8, 16, 16, 16, 16])


@pytest.mark.slow
def test_swin_blocks_found_exactly(wexport):
    module, _, path = wexport("swin")
    blocks = find_attention_blocks(load_model(path))
    assert len(blocks) == 6  # before: the 2 shifted blocks were missed, and no block had a residual Add
    assert [b.partition for b in blocks] == ["window"] * 6
    assert [b.window for b in blocks] == [(4, 4)] * 6
    assert [b.tokens_per_window for b in blocks] == [16] * 6 == [b.tokens for b in blocks]
    assert [b.windows for b in blocks] == SWIN["windows"]
    assert [b.shifted for b in blocks] == SWIN["shifted"]
    assert [b.shift for b in blocks] == [(2, 2) if s else (0, 0) for s in SWIN["shifted"]]
    assert [b.spatial for b in blocks] == SWIN["spatial"]
    assert [b.dilation for b in blocks] == [(1, 1)] * 6
    assert [b.heads for b in blocks] == SWIN["heads"] and [b.head_dim for b in blocks] == SWIN["head_dim"]
    assert all(b.rel_pos_bias for b in blocks)
    assert [b.window_mask is not None for b in blocks] == SWIN["shifted"]
    for b, blk_mod in zip(blocks, [m for s in module.stages for m in s if isinstance(m, wm.SwinBlock)]):
        # the shift mask is the module's buffer, broadcast over batch and heads
        if b.shifted:
            mask = b.window_mask.const_value.numpy()
            np.testing.assert_array_equal(mask.reshape(blk_mod.mask.shape), blk_mod.mask.numpy())
        # the residual Add reads the stream (LayerNorm input of the partition) and the window reverse's last output
        assert b.residual_add is not None and b.out_proj is not None
        ln = b.partition_input.producer()
        assert ln.op_type == "LayerNormalization" and ln.inputs[0] is b.residual_in
        assert b.reverse_nodes[-1].outputs[0] in b.residual_add.inputs
        assert b.partition_nodes[-1].outputs[0] is b.attn_input
        roll = ["Slice", "Slice", "Concat"] * 2  # torch.roll over two axes
        window = ["Reshape", "Transpose", "Reshape"]
        ops = [n.op_type for n in b.partition_nodes]
        assert ops == (["Reshape", *roll, *window] if b.shifted else window)
        assert [n.op_type for n in b.reverse_nodes] == (window + roll + ["Reshape"] if b.shifted else window)


@pytest.mark.slow
def test_torchvision_swin_padded_and_mask_built_in_forward(wexport):
    """torchvision's ``shifted_window_attention`` spelling: channels-last stream, a Pad to a multiple of the window
    (zero pads at 12×16, real ones at 10×14), the shift mask computed in the forward, the reverse cropping back."""
    _, args, path = wexport("swin_tv")
    model = load_model(path)
    blocks = find_attention_blocks(model)
    assert len(blocks) == 4
    assert [(b.partition, b.window, b.windows, b.shifted, b.spatial, b.padded) for b in blocks] == [
        ("window", (4, 4), 12, False, (12, 16), False), ("window", (4, 4), 12, True, (12, 16), False),
        ("window", (4, 4), 12, False, (12, 16), True), ("window", (4, 4), 12, True, (12, 16), True)]
    assert [b.window_mask is not None for b in blocks] == [False, True, False, True]
    for b in blocks:
        assert b.partition_nodes[0].op_type == "Pad" and b.residual_add is not None
        assert b.partition_input.producer().op_type == "LayerNormalization"
        assert b.partition_input.producer().inputs[0] is b.residual_in
    base = run(load_model(path), _feeds(args))[0]
    result = get_pass("sparse_attention")({"pattern": "sliding_window", "window": 64})(model)
    assert sorted(r.block for r in result.rewritten) == [0, 2] and [s.where for s in result.skipped] == ["block 1", "block 3"]
    np.testing.assert_allclose(run(model, _feeds(args))[0], base, atol=2e-5, rtol=1e-5)


def test_one_window_over_the_map_is_a_window_partition(wexport):
    """A stage whose map one window covers (Swin's rule: window = min side, no shift): the graph still splits the
    token axis into H × W factors, so the block is a window partition with one window, never plain attention."""
    _, _, path = wexport("swin", img=(16, 16), depths=(2,), heads=(2,))
    blocks = find_attention_blocks(load_model(path))
    assert len(blocks) == 2
    assert [(b.partition, b.window, b.windows, b.shifted, b.spatial) for b in blocks] == [
        ("window", (4, 4), 1, False, (4, 4))] * 2
    assert all(b.residual_add is not None for b in blocks)


def _torch_token_map(part, reverse, shape, size):
    """[windows, T] stream token of each (window, position): the module's own partition applied to an index map."""
    h, w = shape
    idx = torch.arange(h * w, dtype=torch.float64).reshape(1, h, w, 1)
    return part(idx, size).reshape(-1, size[0] * size[1]).long().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("opset, sdpa", [(18, False), (18, True), (23, True)])
def test_maxvit_block_and_grid_attention_found_exactly(wexport, opset, sdpa):
    _, _, path = wexport("maxvit", opset, sdpa=sdpa)
    blocks = find_attention_blocks(load_model(path))
    assert len(blocks) == 4
    assert {b.kind for b in blocks} == {"attention_op" if opset >= 23 else "matmul_softmax"}
    assert [b.partition for b in blocks] == ["window", "grid", "window", "grid"]
    assert [b.window for b in blocks] == [(4, 4), (4, 4), (2, 4), (2, 4)]
    assert [b.tokens_per_window for b in blocks] == [16, 16, 8, 8]
    assert [b.windows for b in blocks] == [8, 8, 4, 4]
    assert [b.dilation for b in blocks] == [(1, 1), (2, 4), (1, 1), (2, 2)]
    assert [b.spatial for b in blocks] == [(8, 16), (8, 16), (4, 8), (4, 8)]
    assert not any(b.shifted for b in blocks) and all(b.rel_pos_bias for b in blocks)
    assert all(b.residual_add is not None and b.residual_in is b.partition_input.producer().inputs[0] for b in blocks)


def test_partition_matches_the_modules_token_map(wexport):
    """The finder's per-window token lists, recomputed with the module's own partition functions."""
    from graphprune.analysis import _windows

    _, _, path = wexport("maxvit")
    blocks = find_attention_blocks(load_model(path))
    funcs = {"window": (wm.window_partition, wm.window_reverse), "grid": (wm.grid_partition, wm.grid_reverse)}
    for b in blocks:
        part = _windows.describe(b.attn_input, b.tokens)
        ref = _torch_token_map(*funcs[b.partition], b.spatial, b.window)
        np.testing.assert_array_equal(part.tokmap, ref)


@pytest.mark.slow
def test_torchvision_maxvit_einsum_and_partitioned_stream(wexport):
    """torchvision's spelling: the NCHW stream itself is partitioned to [B, G, T, C] (grid: from the window layout
    of the layer before, axes swapped), residuals run in that layout, q·kᵀ and ·v are 5-D ``Einsum`` ops."""
    module, args, path = wexport("maxvit_tv")
    model = load_model(path)
    blocks = find_attention_blocks(model)
    assert len(blocks) == 4  # before: 0 (the Einsum core was not matched)
    assert all(any(n.op_type == "Einsum" for n in b.nodes) for b in blocks)
    assert [b.partition for b in blocks] == ["window", "grid", "window", "grid"]
    assert [b.window for b in blocks] == [(4, 4)] * 4 and [b.tokens_per_window for b in blocks] == [16] * 4
    assert [b.windows for b in blocks] == [8] * 4 and [b.spatial for b in blocks] == [(8, 16)] * 4
    assert [b.dilation for b in blocks] == [(1, 1), (2, 4)] * 2
    assert all(b.heads == 2 and b.head_dim == 8 and b.rel_pos_bias for b in blocks)
    for b in blocks:  # the residual runs on the partitioned stream, which the LayerNorm before the qkv reads
        assert b.residual_add is not None and b.residual_in is b.partition_nodes[-1].outputs[0]
    layers = [m for m in module.layers if isinstance(m, wm.PartitionLayerTV)]
    from graphprune.analysis import _windows

    known: dict = {}
    for b, layer in zip(blocks, layers):  # token maps against the module's own partition of an index image
        h, w = layer.res
        ref = layer.partition(torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w))
        src = b.residual_in
        part = _windows.describe(src, b.tokens, known)
        known[id(src)] = (part.tokmap.reshape(-1), part.spatial)
        np.testing.assert_array_equal(part.tokmap, ref.reshape(-1, b.tokens).long().numpy())
    result = get_pass("token_drop")({"keep_ratio": 0.5, "layers": [1, 2]})(model)
    assert not result.modified and [s.reason for s in result.skipped] == [
        "block 1: grid attention (4×4 groups, dilation 2×4); token dropping across windows is not supported",
        "block 2: windowed attention (4×4 windows); token dropping across windows is not supported"]
    result = get_pass("sparse_attention")({"pattern": "sliding_window", "window": 64})(model)
    assert not result.modified and len(result.skipped) == 4 and all("not 4-D" in s.reason for s in result.skipped)
    base = run(load_model(path), _feeds(args))[0]
    np.testing.assert_allclose(run(model, _feeds(args))[0], base, atol=1e-6)


def test_plain_vit_has_no_partition(export):
    for b in find_attention_blocks(load_model(export("vit_tiny", 18))):
        assert b.partition is None and b.window is None and not b.shifted and not b.rel_pos_bias
        assert b.partition_nodes == [] and b.layer_scale is None


@pytest.mark.slow  # a torch export of its own (the fast tier leaves those to CI)
def test_describe_and_inspect_show_windows(wexport, capsys):
    from graphprune.cli import main

    _, _, path = wexport("swin")
    d = find_attention_blocks(load_model(path))[1].describe()
    assert (d["partition"], d["window"], d["windows"], d["tokens_per_window"], d["shifted"], d["rel_pos_bias"]) == (
        "window", [4, 4], 32, 16, True, True)
    try:
        main(["inspect", str(path)])
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert "window" in out and "4×4/32s" in out and "4×4/8 " in out and "4×4/2 " in out
    _, _, mpath = wexport("maxvit")
    try:
        main(["inspect", str(mpath)])
    except SystemExit as e:
        assert not e.code
    assert "g4×4/8" in capsys.readouterr().out


# -- passes on windowed blocks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["swin", "maxvit"])
@pytest.mark.parametrize("cfg", [{"keep_ratio": 0.7}, {"keep_ratio": 0.5, "layers": [0, 1, 2, 3]},
                                 {"method": "tome", "r": 2}, {"schedule": {"flops": 0.8}}], ids=str)
def test_token_drop_refuses_windowed_blocks(wexport, name, cfg):
    _, _, path = wexport(name)
    model = load_model(path)
    before = _proto_bytes(model)
    result = get_pass("token_drop")(cfg)(model)
    assert not result.modified and not result.rewritten
    assert result.skipped
    blocks = find_attention_blocks(model)
    for s in result.skipped:
        assert s.reason.endswith("; token dropping across windows is not supported")
        if s.reason.startswith("block "):
            i = int(s.reason.split()[1].rstrip(":"))
            assert s.reason.startswith(f"block {i}: {blocks[i].partition_summary()};")
    assert _proto_bytes(model) == before


def test_token_drop_reason_names_the_window(wexport):
    _, _, path = wexport("swin")
    result = get_pass("token_drop")({"keep_ratio": 0.5, "layers": [1, 2]})(load_model(path))
    assert [s.reason for s in result.skipped] == [
        "block 1: shifted windowed attention (4×4 windows); token dropping across windows is not supported",
        "block 2: windowed attention (4×4 windows); token dropping across windows is not supported"]
    _, _, path = wexport("maxvit")
    result = get_pass("token_drop")({"keep_ratio": 0.5, "layers": [1]})(load_model(path))
    assert result.skipped[0].reason == ("block 1: grid attention (4×4 groups, dilation 2×4); token dropping across "
                                        "windows is not supported")


@pytest.mark.parametrize("name, kw", [("swin", {}), ("maxvit", {}), ("maxvit", {"sdpa": True})], ids=str)
def test_sparse_attention_dense_window_keeps_outputs_and_skips_shift_masks(wexport, name, kw):
    """A window covering every key is dense attention: the rewritten model must give the original outputs. Shifted
    windows (their mask added over a 5-D view of the scores) are refused with the reason."""
    _, args, path = wexport(name, **kw)
    base = run(load_model(path), _feeds(args))[0]
    model = load_model(path)
    blocks = find_attention_blocks(model)
    result = get_pass("sparse_attention")({"pattern": "sliding_window", "window": 64})(model)
    shifted = [b.index for b in blocks if b.shifted]
    assert sorted(r.block for r in result.rewritten) == [b.index for b in blocks if not b.shifted]
    assert [s.where for s in result.skipped] == [f"block {i}" for i in shifted]
    assert all("shift mask" in s.reason and "shifted windowed attention (4×4 windows)" in s.reason
               for s in result.skipped)
    assert sum(n.op_type == "SparseAttention" for n in model.graph) == len(blocks) - len(shifted)
    np.testing.assert_allclose(run(model, _feeds(args))[0], base, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["swin", "maxvit"])
@pytest.mark.parametrize("cfg", [{"topk": 2}, {"block_size": 8}, {"block_size": 4, "topk": 3}], ids=str)
def test_block_topk_on_short_windows_never_adds_flops(wexport, name, cfg):
    """On 4×4 windows (16 tokens) block routing and whole-block padding can cost more than the scores they skip: such
    a block is a skip with that reason, so the written model never has more FLOPs than the original; a block that
    does save (4-token blocks, 3 of 4 kept) is still rewritten, with a predicted saving."""
    _, _, path = wexport(name)
    model = load_model(path)
    before, proto = count_flops(model).flops, _proto_bytes(model)
    result = get_pass("sparse_attention")({"pattern": "block_topk", **cfg})(model)
    after = count_flops(model).flops
    assert after <= before
    assert all(r.attention_flops_ratio > 1.0 for r in result.rewritten)
    costly = [s for s in result.skipped if "would only add cost" in s.reason]
    if cfg == {"block_size": 4, "topk": 3}:  # 16-token blocks save; maxvit's 8-token ones (0.93x before) do not
        assert result.rewritten and after < before
        assert [s.where for s in costly] == ([] if name == "swin" else ["block 2", "block 3"])
    else:  # no block saves (the default top-k keeps every 8-token block; 2 of 1 or 2 blocks): the model is untouched
        assert not result.rewritten and _proto_bytes(model) == proto
    if cfg == {"topk": 2}:  # before: swin's 4 unshifted blocks rewritten at 0.97x, the model's FLOPs up
        assert [s.where for s in costly] == [f"block {b.index}" for b in find_attention_blocks(load_model(path))
                                             if not b.shifted]
        assert all(s.reason.startswith("block_topk at 16 tokens would execute 1.0") for s in costly if name == "swin")


# -- layer scale (DINOv2 / CaiT) --------------------------------------------------------------------------------------

def test_layer_scale_residual_found(wexport):
    module, _, path = wexport("layerscale_vit")
    model = load_model(path)
    blocks = find_attention_blocks(model)
    assert len(blocks) == 4 and all(b.partition is None for b in blocks)
    for b, mod in zip(blocks, module.blocks):
        ls = b.layer_scale
        assert ls is not None and ls.op_type == "Mul"
        gamma = next(v.const_value.numpy() for v in ls.inputs if v.const_value is not None)
        np.testing.assert_array_equal(gamma.reshape(-1), mod.ls1.gamma.detach().numpy())
        assert b.residual_add is not None and ls.outputs[0] in b.residual_add.inputs
        assert b.residual_add.inputs[1 - b.residual_add.inputs.index(ls.outputs[0])] is b.residual_in
        assert b.attn_input.producer().op_type == "LayerNormalization"
        assert b.attn_input.producer().inputs[0] is b.residual_in  # pre-norm: the LN reads the residual stream
    # block i+1's stream is block i's MLP residual Add (x + γ₂·mlp), whose Mul holds ls2's γ
    for prev, b, mod in zip(blocks, blocks[1:], module.blocks):
        add = b.residual_in.producer()
        muls = [v.producer() for v in add.inputs if v.producer() is not None and v.producer().op_type == "Mul"]
        assert add.op_type == "Add" and prev.residual_add.outputs[0] in add.inputs and len(muls) == 1
        g2 = next(v.const_value.numpy() for v in muls[0].inputs if v.const_value is not None)
        np.testing.assert_array_equal(g2.reshape(-1), mod.ls2.gamma.detach().numpy())


@torch.no_grad()
def _layerscale_reference(vit: wm.LayerScaleViT, images: np.ndarray, layers: list[int], ratio: float) -> np.ndarray:
    """The module's forward with cls_attention selection after the attention residual of ``layers`` (mlp placement):
    scores = head-mean CLS row of the block's probabilities, CLS protected, kept tokens in order."""
    x = vit.embed(torch.from_numpy(images))
    for i, blk in enumerate(vit.blocks):
        out, probs = blk.attn(blk.norm1(x))
        x = x + blk.ls1(out)
        if i in layers:
            k = token_select.kept_count(x.shape[1], 1, keep_ratio=ratio)
            y, _ = token_select.reference(x.numpy(), probs[:, :, 0, :].mean(1).numpy(), k=k, protect=1,
                                          keep_order=True, fuse_rest=False)
            x = torch.from_numpy(y)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return vit.head(vit.norm(x)[:, 0]).numpy()


def test_token_drop_through_layer_scale_matches_reference(wexport):
    """``--token-keep 0.7`` (keep_ratio 0.7, default layers): every default layer is rewritten, FLOPs drop, and the
    result equals the torch forward with the same selection."""
    module, _, path = wexport("layerscale_vit")
    model = load_model(path)
    flops0 = count_flops(model).flops
    result = get_pass("token_drop")({"keep_ratio": 0.7})(model)
    assert not result.skipped, result.skipped
    assert [(r.layer, r.tokens_before, r.tokens_after) for r in result.rewritten] == [(1, 17, 13), (2, 13, 10), (3, 10, 8)]
    assert count_flops(model).flops < 0.85 * flops0
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = run(model, {"x": x})[0]
    ref = _layerscale_reference(module, x, [1, 2, 3], 0.7)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
    base = run(load_model(path), {"x": x})[0]
    assert np.abs(base - ref).max() > 1e-3  # the selection really changed the numbers
