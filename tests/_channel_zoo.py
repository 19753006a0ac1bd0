"""Torch models for the channel-pruning tests (small widths) and helpers shared by the two test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from examples import models


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int = 32, w: int = 16, groups: int = 1) -> None:
        super().__init__()
        self.a, self.b = cbr(c, w, 1), cbr(w, w, 3, 1, groups)
        self.c = nn.Sequential(nn.Conv2d(w, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.c(self.b(self.a(x))))


class InvertedResidual(nn.Module):
    def __init__(self, c: int = 24, t: int = 4) -> None:
        super().__init__()
        h = c * t
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.body(x)


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(F.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 16) -> None:
        super().__init__()
        self.conv = cbr(cin, growth)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)


class Net(nn.Module):
    """stem conv → body → (pool → Linear) or (Flatten → Linear)."""

    def __init__(self, body: nn.Module, c: int, cout: int, flatten: int = 0, stem: int = 3) -> None:
        super().__init__()
        self.stem = cbr(stem, c)
        self.body = body
        self.flatten = flatten
        self.fc = nn.Linear(cout * (flatten * flatten if flatten else 1), 10)

    def forward(self, x):
        y = self.body(self.stem(x))
        y = torch.flatten(F.adaptive_avg_pool2d(y, self.flatten), 1) if self.flatten else y.mean((2, 3))
        return self.fc(y)


class SpatialGate(nn.Module):
    """x * sigmoid(conv(x) → 1 channel): a broadcast 1-channel mask."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = cbr(c, c)
        self.gate = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x):
        y = self.body(x)
        return y * torch.sigmoid(self.gate(y))


class TwinNorm(nn.Module):
    """Two hidden layers of the same width, each LayerNorm'd: the exporter shares one weight of ones (dedup)."""

    def __init__(self, c: int = 16, h: int = 32) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(c, h), nn.Linear(h, c)
        self.b1, self.b2 = nn.Linear(c, h), nn.Linear(h, c)
        self.na, self.nb = nn.LayerNorm(h), nn.LayerNorm(h)

    def forward(self, x):
        return self.a2(F.relu(self.na(self.a1(x)))) + self.b2(F.relu(self.nb(self.b1(x))))


def zoo_model(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    if name == "resnet":
        m = Net(nn.Sequential(Bottleneck(32, 16), Bottleneck(32, 16)), 32, 32)
    elif name == "mobilenet":
        m = Net(nn.Sequential(InvertedResidual(24), InvertedResidual(24)), 24, 24)
    elif name == "se":
        m = Net(nn.Sequential(cbr(32, 32), SE(32), cbr(32, 32)), 32, 32)
    elif name == "convnext":
        m = Net(nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32)), 32, 32)
    elif name == "densenet":
        m = Net(nn.Sequential(DenseLayer(32), DenseLayer(48), cbr(64, 32, 1)), 32, 32)
    elif name == "resnext":
        m = Net(nn.Sequential(Bottleneck(32, 64, groups=16), Bottleneck(32, 64, groups=16)), 32, 32)
    elif name == "flatten":
        m = Net(nn.Sequential(cbr(32, 32), cbr(32, 24)), 32, 24, flatten=2)
    elif name == "gate":
        m = Net(SpatialGate(32), 32, 32)
    elif name == "twin":
        m, x = TwinNorm(), torch.randn(1, 16)
    elif name == "vit":
        return models.build("vit_tiny")
    elif name == "vit23":
        return models.build("vit_tiny", sdpa=True)
    elif name == "bert":
        return hf_bert()
    else:
        raise ValueError(name)
    for mod in m.modules():  # non-trivial BatchNorm statistics, so folding is not an identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval(), (x,)


def hf_bert() -> tuple[nn.Module, tuple]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                     intermediate_size=256, max_position_embeddings=32)
    torch.manual_seed(0)
    m = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.int64)
    mask[:, 12:] = 0

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = m

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Wrap().eval(), (ids, mask)


def export(name: str, folder: Path) -> Path:
    m, args = zoo_model(name)
    opset = 23 if name == "vit23" else 18
    return models.export_model(m, args, folder / f"{name}.onnx", opset=opset)


def run(model: ir.Model, feeds: dict, folder: Path, tag: str = "m") -> list[np.ndarray]:
    path = folder / f"_{tag}.onnx"
    ir.save(model, path, external_data=f"_{tag}.onnx.data")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def masked_copy(model: ir.Model, plan: dict) -> ir.Model:
    """The original model with every pruned channel's producer rows, biases and per-channel params set to 0.

    For ReLU/GELU/ReLU6 networks without a norm over the pruned channels this is numerically the pruned model:
    a zero channel contributes nothing downstream. Uses only the plan and numpy, not the surgery code.
    """
    graph = model.graph
    nodes = {n.name: n for n in graph}
    for k, e in enumerate(plan["slices"]):
        if e["role"] not in ("out", "param", "bn"):
            continue
        node = nodes[e["node"]]
        v = node.inputs[e["input"]]
        arr = np.array(v.const_value.numpy())
        drop = np.setdiff1d(np.arange(arr.shape[e["axis"]]), e["keep"])
        idx = [slice(None)] * arr.ndim
        idx[e["axis"]] = drop
        arr[tuple(idx)] = 0
        nv = ir.Value(name=f"masked{k}", shape=ir.Shape(arr.shape), type=v.type, const_value=ir.tensor(arr, name=f"masked{k}"))
        graph.register_initializer(nv)
        node.replace_input_with(e["input"], nv)
    return model


def compute_flops(model: ir.Model) -> int:
    """2·MACs of MatMul/Gemm/Conv from the model's stored value shapes (symbolic dims as 1). Independent of the
    channel analysis; used where ``count_flops``' own shape inference leaves nodes unknown (HF mask logic)."""
    total = 0
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        out, x, w = node.outputs[0], node.inputs[0], node.inputs[1]
        dims = [d if isinstance(d, int) else 1 for d in out.shape]
        n = int(np.prod(dims))
        if node.op_type == "Conv":
            k = int(np.prod(list(w.shape)[1:]))
        elif node.op_type == "Gemm":
            k = x.shape[0] if node.attributes.get_int("transA", 0) else x.shape[-1]
        else:
            k = x.shape[-1]
        total += 2 * n * k
    return total
