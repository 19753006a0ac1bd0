"""Example models, defined in code (no downloads): DeiT-S-shaped ViT, ResNet-50-shaped CNN, small BERT.

Each builder returns an ``nn.Module`` with random (seeded) weights. ``export_model`` writes an ONNX file
with ``torch.onnx.export(dynamo=True)``, which always produces a separate ``.onnx.data`` weights file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.sdpa = sdpa

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            if mask is not None:
                logits = logits + mask
            out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, sdpa: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT classifier with a CLS token. Defaults are DeiT-S: dim 384, 12 layers, 6 heads, 224², patch 16."""

    def __init__(
        self,
        img_size: int = 224,
        patch: int = 16,
        in_chans: int = 3,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        num_classes: int = 1000,
        sdpa: bool = False,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, sdpa=sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.pool == "tokens":  # per-token features (a dense-prediction backbone's output)
            return x
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + idt)


class ResNet(nn.Module):
    """ResNet-50-shaped CNN (layers 3-4-6-3, bottlenecks, width 64)."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], width
        for i, n in enumerate(layers):
            w = width * 2**i
            for j in range(n):
                blocks.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


class Bert(nn.Module):
    """Small BERT-shaped encoder: token+position embeddings, post-norm blocks, padding mask."""

    def __init__(self, vocab: int = 1000, dim: int = 256, depth: int = 4, heads: int = 4, max_len: int = 128, sdpa: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.ln = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([PostNormBlock(dim, heads, sdpa) for _ in range(depth)])
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        x = self.ln(self.tok(input_ids) + self.pos(torch.arange(n, device=input_ids.device))[None])
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for blk in self.blocks:
            x = blk(x, bias)
        return x


class PostNormBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, sdpa)
        self.ln1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, bias))
        return self.ln2(x + self.mlp(x))


def build(name: str, **kw) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Return (module in eval mode, example inputs) for ``vit``, ``vit_tiny``, ``resnet50``, ``bert``."""
    torch.manual_seed(0)
    if name == "vit":
        m, args = ViT(**kw), (torch.randn(1, 3, kw.get("img_size", 224), kw.get("img_size", 224)),)
    elif name == "vit_tiny":
        cfg = dict(img_size=32, patch=8, dim=64, depth=4, heads=4, num_classes=10) | kw
        m, args = ViT(**cfg), (torch.randn(1, 3, cfg["img_size"], cfg["img_size"]),)
    elif name == "resnet50":
        m, args = ResNet(**kw), (torch.randn(1, 3, 224, 224),)
    elif name == "bert":
        m = Bert(**kw)
        ids = torch.randint(0, 1000, (1, 64))
        mask = torch.ones(1, 64, dtype=torch.int64)
        mask[:, 48:] = 0
        args = (ids, mask)
    else:
        raise ValueError(f"unknown example model {name!r}")
    return m.eval(), args


def export_model(model: nn.Module, args: tuple, path: str | Path, opset: int = 18, dynamic_batch: bool = True) -> Path:
    """Export with the dynamo exporter (``graphprune.torch.export``); the batch axis is dynamic by default."""
    from graphprune.torch import export

    return export(model, args, path, opset=opset, dynamic_batch=dynamic_batch)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build and export the example models to ONNX (dynamo exporter).")
    p.add_argument("models", nargs="*", default=["vit", "resnet50", "bert"], help="vit, vit_tiny, resnet50, bert")
    p.add_argument("--out", default="examples/out", help="output folder (default: examples/out)")
    p.add_argument("--opset", type=int, default=18, help="18: MatMul/Softmax attention; 23: the standard Attention op")
    a = p.parse_args(argv)
    for name in a.models:
        model, args = build(name, **({"sdpa": True} if a.opset >= 23 and name != "resnet50" else {}))
        suffix = "" if a.opset == 18 else f"_op{a.opset}"
        out = export_model(model, args, Path(a.out) / f"{name}{suffix}.onnx", opset=a.opset)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
