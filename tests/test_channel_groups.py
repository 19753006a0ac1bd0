"""Channel dependency groups: couplings found, couplings refused (with reasons), shared initializers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _channel_zoo as zoo  # noqa: E402

from graphprune.analysis.channels import analyze_channels, find_channel_groups  # noqa: E402
from graphprune.analysis.inputs import example_inputs  # noqa: E402
from graphprune.passes import get_pass  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("channel_groups")


def _export(module: nn.Module, args: tuple, folder: Path, name: str) -> ir.Model:
    return ir.load(zoo.models.export_model(module.eval(), args, folder / f"{name}.onnx"))


def _group_with(groups, name: str):
    hits = [g for g in groups if name in g.describe()["members"]]
    assert hits, f"no group has member {name}"
    return hits


def test_residual_couples_and_stem_is_ignored(channel_zoo_export):
    model = ir.load(channel_zoo_export("resnet"))
    groups = find_channel_groups(model)
    stream = _group_with(groups, "stem.0.weight")[0]
    members = stream.describe()["members"]
    # the stem, both bottleneck outputs (residual adds) and the classifier input are one group
    assert {"body.0.c.0.weight", "body.1.c.0.weight", "fc.weight"} <= set(members)
    assert not stream.prunable and "stem" in stream.reason
    inner = [g for g in groups if g.prunable]
    assert len(inner) == 4 and all(g.size == 16 for g in inner)  # a/b outputs of two bottlenecks
    again = analyze_channels(model, ignore_stem=False).groups
    assert _group_with(again, "stem.0.weight")[0].prunable


def test_broadcast_one_channel_mask_does_not_couple(folder, channel_zoo_export):
    path = channel_zoo_export("gate")
    model = ir.load(path)
    groups = find_channel_groups(model)
    body = [g for g in groups if "body.body.0.weight" in g.describe()["members"] and g.size == 32 and g.prunable]
    gate_out = [g for g in groups if g.size == 1]
    assert len(body) == 1 and body[0].prunable and body[0].size == 32
    assert gate_out and not gate_out[0].prunable  # the 1-channel gate itself stays whole
    # and the coupled-free pruning really runs and keeps the output shape
    pruned = ir.load(path)
    get_pass("channel_prune")({"ratio": 0.5})(pruned)
    feeds = example_inputs(pruned, batch=2)
    out = zoo.run(pruned, feeds, folder, "gate")[0]
    assert out.shape == (2, 10)
    w = [n for n in pruned.graph if n.op_type == "Conv" and n.inputs[1].shape[0] == 1]
    assert w and w[0].inputs[1].shape[1] == 16  # the gate conv lost the pruned input channels


def test_grouped_and_depthwise_conv_groups(channel_zoo_export):
    groups = find_channel_groups(ir.load(channel_zoo_export("resnext")))
    g = [x for x in groups if x.kind == "groups" and x.prunable]
    assert len(g) == 2 and all(x.size == 16 and int(x.widths.min()) == 4 for x in g)  # 16 conv groups of 4
    mobile = find_channel_groups(ir.load(channel_zoo_export("mobilenet")))
    hidden = [x for x in mobile if x.prunable]
    assert len(hidden) == 2 and all(x.size == 96 for x in hidden)  # expand + depthwise + project input


def test_vit_heads_and_mlp_groups_describe(channel_zoo_export):
    groups = find_channel_groups(ir.load(channel_zoo_export("vit")))
    heads = [g for g in groups if g.kind == "heads"]
    mlp = [g for g in groups if g.prunable and g.kind == "channels" and g.size == 256]
    assert len(heads) == 4 and all(g.size == 4 and g.prunable for g in heads)
    assert len(mlp) == 4
    # the embedding width (the patch-embedding stem's group, read by every block) is prunable by default
    stream = [g for g in groups if g.kind == "channels" and g.size == 64]
    assert len(stream) == 1 and stream[0].prunable and {"blocks.3.mlp.fc2.bias", "head.weight"} <= set(stream[0].describe()["members"])
    kept = [g for g in analyze_channels(ir.load(channel_zoo_export("vit")), ignore_stem=True).groups if g.size == 64]
    assert len(kept) == 1 and not kept[0].prunable and "input stem" in kept[0].reason
    d = json.loads(json.dumps(heads[0].describe()))
    assert set(d) >= {"id", "size", "members", "prunable", "reason"}
    assert "blocks.0.attn.qkv.bias" in d["members"] and "blocks.0.attn.proj.bias" not in d["members"]


class ChannelMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = zoo.cbr(3, 16), zoo.cbr(16, 16)

    def forward(self, x):
        y = self.a(x)
        return self.b(y - y.mean(1, keepdim=True)).mean((2, 3))


def test_unprovable_coupling_is_unprunable_with_reason(folder):
    model = _export(ChannelMean(), (torch.randn(1, 3, 8, 8),), folder, "chmean")
    groups = find_channel_groups(model)
    a = _group_with(groups, "a.0.weight")[0]
    assert not a.prunable and "reduces over the channel axis" in a.reason
    b = _group_with(groups, "b.0.weight")
    assert any("graph output" in (g.reason or "") for g in b)


def test_shared_layernorm_weight_is_unshared(folder):
    torch.manual_seed(0)
    module = zoo.TwinNorm().eval()
    x = torch.randn(1, 16)
    model = _export(module, (x,), folder, "twin")
    lns = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert lns[0].inputs[1] is lns[1].inputs[1], "precondition: the exporter shares the LN weight"
    plan_path = folder / "twin_plan.json"
    get_pass("channel_prune")({"ratio": 0.5, "importance": "l1", "round_to": 1, "ignore_stem": False,
                               "plan_out": str(plan_path)})(model)
    plan = json.loads(plan_path.read_text())
    keep = {e["initializer"]: e["keep"] for e in plan["slices"] if e["initializer"] in ("a1.bias", "b1.bias")}
    ka, kb = keep["a1.bias"], keep["b1.bias"]
    assert ka != kb and len(ka) == len(kb) == 16
    lns = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert lns[0].inputs[1] is not lns[1].inputs[1]
    # reference: the torch module pruned by hand with the plan's indices
    with torch.no_grad():
        def branch(l1, norm, l2, k):
            h = F.linear(x, l1.weight[k], l1.bias[k])
            h = F.relu(F.layer_norm(h, (len(k),), norm.weight[k], norm.bias[k], norm.eps))
            return F.linear(h, l2.weight[:, k], l2.bias)
        ref = branch(module.a1, module.na, module.a2, ka) + branch(module.b1, module.nb, module.b2, kb)
    out = zoo.run(model, {"x": x.numpy()}, folder, "twin")[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_ignore_by_name(channel_zoo_export):
    model = ir.load(channel_zoo_export("vit"))
    groups = analyze_channels(model, ignore=["blocks.1.attn.qkv.bias"]).groups
    g = _group_with(groups, "blocks.1.attn.qkv.bias")[0]
    assert not g.prunable and "ignored by config" in g.reason


class GQA(nn.Module):
    """8 query heads over 2 key/value heads (head dim 8), k/v repeated (opset 18) or SDPA enable_gqa (opset 23)."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(32, 64), nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(64, 32)
        self.sdpa = sdpa

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, 8, 8).transpose(1, 2)
        k = self.k(x).reshape(b, n, 2, 8).transpose(1, 2)
        v = self.v(x).reshape(b, n, 2, 8).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
            y = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(-1) @ v
        return x + self.o(y.transpose(1, 2).reshape(b, n, 64))


@pytest.mark.parametrize("sdpa", [False, True])
def test_grouped_query_attention_keeps_kv_groups(folder, sdpa):
    torch.manual_seed(0)
    module = GQA(sdpa).eval()
    x = torch.randn(1, 10, 32)
    path = zoo.models.export_model(module, (x,), folder / f"gqa{int(sdpa)}.onnx", opset=23 if sdpa else 18)
    model = ir.load(path)
    heads = [g for g in analyze_channels(model, ignore_stem=False).groups if g.kind == "heads"]
    if not heads or not heads[0].prunable:
        pytest.fail(f"GQA heads not found/prunable: {[g.describe() for g in analyze_channels(model).groups]}")
    assert heads[0].size == 2  # one class per kv group: 4 query heads + 1 k head + 1 v head
    get_pass("channel_prune")({"ratio": 0.5, "ignore_stem": False, "round_to": 1})(model)
    q_w = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert sorted(n.inputs[1].shape[1] for n in q_w)[:3] == [8, 8, 32]  # k, v: 1 kv head; q: 4 heads
    out = zoo.run(model, {"x": np.random.default_rng(0).standard_normal((3, 10, 32)).astype(np.float32)}, folder, "gqa")
    assert out[0].shape == (3, 10, 32)


class GluSlice(nn.Module):
    """conv → chunk (Split) → GLU (couples channel i with i+32) → conv; and a channel Slice into a side conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = zoo.cbr(3, 16), nn.Conv2d(16, 64, 1), nn.Conv2d(32, 16, 1)
        self.side, self.fc = nn.Conv2d(8, 16, 1), nn.Linear(16, 10)

    def forward(self, x):
        h = self.stem(x)
        u, g = self.a(h).chunk(2, dim=1)
        y = self.b(u * torch.sigmoid(g))
        return self.fc((y + self.side(y[:, 4:12])).mean((2, 3)))


def test_split_and_slice_offsets(folder):
    torch.manual_seed(0)
    model = _export(GluSlice(), (torch.randn(1, 3, 8, 8),), folder, "glu")
    assert any(n.op_type == "Split" for n in model.graph) and any(n.op_type == "Slice" for n in model.graph)
    groups = analyze_channels(model).groups
    glu = _group_with(groups, "a.weight")
    glu = [g for g in glu if g.prunable]
    assert glu and glu[0].size == 32  # 64 channels, coupled in pairs by the gate
    plan_path = folder / "glu_plan.json"
    get_pass("channel_prune")({"ratio": 0.5, "round_to": 1, "plan_out": str(plan_path)})(model)
    split = [n for n in model.graph if n.op_type == "Split"][0]
    assert list(split.inputs[1].const_value.numpy()) == [16, 16]
    plan = json.loads(plan_path.read_text())
    assert any(e["node"].startswith("node_slice") for e in plan["shape_edits"])  # slice bounds rewritten
    ref = zoo.masked_copy(ir.load(folder / "glu.onnx"), json.loads(plan_path.read_text()))
    feeds = example_inputs(model, batch=2)
    np.testing.assert_allclose(zoo.run(model, feeds, folder, "g1")[0], zoo.run(ref, feeds, folder, "g2")[0], atol=1e-4)


class NormZoo(nn.Module):
    """GroupNorm (exported as Reshape → InstanceNorm → Reshape → Mul → Add), ConvTranspose, InstanceNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32)
        self.up, self.inn = nn.ConvTranspose2d(32, 16, 2, 2), nn.InstanceNorm2d(16, affine=True)
        self.c2, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.gn(self.c1(x)))
        y = F.relu(self.inn(self.up(y)))
        return self.fc(self.c2(y).mean((2, 3)))


def test_group_norm_conv_transpose_instance_norm(folder):
    torch.manual_seed(0)
    module = NormZoo().eval()
    with torch.no_grad():
        module.gn.weight.uniform_(0.5, 1.5)
        module.gn.bias.uniform_(-0.5, 0.5)
    model = _export(module, (torch.randn(1, 3, 8, 8),), folder, "norms")
    groups = analyze_channels(model, ignore_stem=False).groups
    gn = _group_with(groups, "c1.weight")[0]
    assert gn.prunable and gn.size == 8 and int(gn.widths.min()) == 4  # whole norm groups of 4 channels
    plan_path = folder / "norms_plan.json"
    get_pass("channel_prune")({"ratio": 0.5, "ignore_stem": False, "plan_out": str(plan_path)})(model)
    inorm = [n for n in model.graph if n.op_type == "InstanceNormalization"]
    assert inorm[0].inputs[1].shape[0] == 4  # GroupNorm: 8 → 4 groups
    ref = zoo.masked_copy(ir.load(folder / "norms.onnx"), json.loads(plan_path.read_text()))
    feeds = example_inputs(model, batch=2)
    np.testing.assert_allclose(zoo.run(model, feeds, folder, "n1")[0], zoo.run(ref, feeds, folder, "n2")[0], atol=1e-4)


def _three_d_attention_model(kind: str) -> ir.Model:
    """x [B, 6, 32] → q/k/v MatMuls (4 heads × 8) → 3-D attention (com.microsoft MultiHeadAttention or the
    standard Attention op with q_num_heads) → output MatMul → Gemm-free head MatMul [32 → 5]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in [("wq", (32, 32)), ("wk", (32, 32)), ("wv", (32, 32)), ("wo", (32, 32)), ("wh", (32, 5))]]
    nodes = [helper.make_node("MatMul", ["x", w], [w + "_y"], name=f"mm_{w}") for w in ("wq", "wk", "wv")]
    if kind == "ms":
        nodes.append(helper.make_node("MultiHeadAttention", ["wq_y", "wk_y", "wv_y"], ["att"], name="mha",
                                      domain="com.microsoft", num_heads=4))
        opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    else:
        nodes.append(helper.make_node("Attention", ["wq_y", "wk_y", "wv_y"], ["att"], name="att_op",
                                      q_num_heads=4, kv_num_heads=4))
        opsets = [helper.make_opsetid("", 23)]
    nodes += [helper.make_node("MatMul", ["att", "wo"], ["o"], name="mm_wo"),
              helper.make_node("Add", ["o", "x"], ["r"], name="res"),
              helper.make_node("MatMul", ["r", "wh"], ["y"], name="mm_wh")]
    graph = helper.make_graph(nodes, "att3d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, 5])], inits)
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    proto = onnx.shape_inference.infer_shapes(proto)
    if kind == "ms":  # ONNX shape inference does not know contrib ops: give the output its shape, as ORT would
        proto.graph.value_info.append(helper.make_tensor_value_info("att", TensorProto.FLOAT, ["b", 6, 32]))
        proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto)


@pytest.mark.parametrize("kind", ["ms", "std"])
def test_three_d_attention_head_attributes(folder, kind):
    model = _three_d_attention_model(kind)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 6, 32)).astype(np.float32)}
    heads = [g for g in analyze_channels(model, ignore_stem=False).groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == 4 and heads[0].prunable, [g.describe() for g in heads]
    plan_path = folder / f"att3d_{kind}.json"
    get_pass("channel_prune")({"ratio": 0.5, "ignore_stem": False, "plan_out": str(plan_path)})(model)
    att = [n for n in model.graph if n.name in ("mha", "att_op")][0]
    names = ("num_heads",) if kind == "ms" else ("q_num_heads", "kv_num_heads")
    assert all(att.attributes[a].value == 2 for a in names)
    ref = zoo.masked_copy(_three_d_attention_model(kind), json.loads(plan_path.read_text()))
    np.testing.assert_allclose(zoo.run(model, feeds, folder, "a3")[0], zoo.run(ref, feeds, folder, "a4")[0], atol=1e-4)


def _twin_token_model() -> ir.Model:
    """x [B, 4, 6] → MatMul w1 [6 → 8] (the stem); one token [1, 1, 8] expanded to [B, 1, 8] and read twice by the
    Concat (two zero-initialised class tokens the exporter deduplicated) → [B, 6, 8] → Relu → MatMul w2 [8 → 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (6, 8)), ("tok", (1, 1, 8)), ("w2", (8, 3))]]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="stem"),
             helper.make_node("Shape", ["x"], ["sx"], name="shape", start=0, end=1),
             helper.make_node("Concat", ["sx", "one_c"], ["tshape"], name="tshape", axis=0),
             helper.make_node("Expand", ["tok", "tshape"], ["t"], name="expand"),
             helper.make_node("Concat", ["t", "t", "h"], ["cat"], name="cat", axis=1),
             helper.make_node("Relu", ["cat"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")]
    inits.append(numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "one_c"))
    graph = helper.make_graph(nodes, "twin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, 3])], inits)
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                                                ir_version=10))
    return ir.from_proto(proto)


def test_one_token_read_twice_by_a_concat_is_sliced_once(folder):
    """HF DeiT's class and distillation tokens start as zeros, and the exporter makes them one Expand that the Concat
    reads twice: the stream stays prunable, the token is sliced once, and the pruned model equals numpy on the kept
    channels."""
    model = _twin_token_model()
    g = [g for g in analyze_channels(model, ignore_stem=False).groups if g.size == 8]
    assert len(g) == 1 and g[0].prunable, [x.describe() for x in g]
    plan_path = folder / "twin.json"
    get_pass("channel_prune")({"ratio": 0.5, "ignore_stem": False, "round_to": 1, "plan_out": str(plan_path)})(model)
    keep = json.loads(plan_path.read_text())["groups"][0]["keep"]
    assert len(keep) == 4
    x = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
    w = {k: v.const_value.numpy() for k, v in _twin_token_model().graph.initializers.items()}
    t = np.broadcast_to(w["tok"][..., keep], (2, 1, 4))
    want = np.maximum(np.concatenate([t, t, x @ w["w1"][:, keep]], axis=1), 0) @ w["w2"][keep]
    np.testing.assert_allclose(zoo.run(model, {"x": x}, folder, "twin")[0], want, rtol=1e-5, atol=1e-5)
