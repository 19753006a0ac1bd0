"""``--prune-channels 0.3`` on a DeiT-S-shaped ViT written in the timm style, exported by ``torch.onnx.export``.

The attention is timm's: ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``, then q, k and v unpacked as a
tuple (``--unpack unbind``: ``qkv.unbind(0)``), ``q_norm``/``k_norm`` identities, and ``F.scaled_dot_product_attention``
(``--attn sdpa``, timm's ``fused_attn``) or the explicit ``q·kᵀ → softmax → ·v`` (``--attn eager``). Exported with
``torch.onnx.export(dynamo=True)`` at opset 18 with a dynamic batch (not through ``graphprune.torch``), pruned by
``channel_prune`` with the defaults ``graphprune optimize --prune-channels 0.3`` uses without data (L2 magnitude).

Prints: the groups pruned (heads / hidden units), FLOPs cut (``measure_flops``, base / pruned), and the ORT CPU latency
ratio at ``--batch`` (interleaved runs, spinning off, median of ``--repeats`` calls), with the load average before and
after, since the machine is shared. Torch-Pruning 1.6.1 reaches 1.85× on this model shape at 30% (MEASURED.md).

Run (one process, under the shared lock):
    flock /tmp/gp-heavy.lock python benchmarks/bench_timm_vit.py --batch 2 --runs 20 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

from graphprune.analysis.inputs import example_inputs
from graphprune.backends.onnxruntime import benchmark, make_session, measure_flops
from graphprune.passes import get_pass


def build(attn: str = "sdpa", unpack: str = "tuple", img: int = 224, dim: int = 384, depth: int = 12, heads: int = 6):
    """The timm-style ViT (DeiT-S shape by default), seeded, in eval mode, with a batch-2 example input."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.head_dim = heads, dim // heads
            self.scale = self.head_dim ** -0.5
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()

        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0) if unpack == "unbind" else qkv
            q, k = self.q_norm(q), self.k_norm(k)
            if attn == "sdpa":
                x = F.scaled_dot_product_attention(q, k, v)
            else:
                x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
            return self.proj(x.transpose(1, 2).reshape(B, N, C))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(), nn.LayerNorm(dim)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    class VisionTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, 16, 16)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, (img // 16) ** 2 + 1, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 1000)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    torch.manual_seed(0)
    return VisionTransformer().eval(), (torch.randn(2, 3, img, img),)


def export(path: Path, **kw) -> Path:
    """``torch.onnx.export(dynamo=True)``, opset 18, dynamic batch."""
    import torch

    model, args = build(**kw)
    torch.onnx.export(model, args, str(path), dynamo=True, opset_version=18,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--unpack", choices=["tuple", "unbind"], default="tuple")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--stream", action="store_true", help="also prune the embedding width (ignore_stem: false), as "
                   "Torch-Pruning does; the default keeps it, as --prune-channels does")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for the export (default: a temporary folder)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.out or tmp)
        path = folder / f"timm_vit_{a.attn}_{a.unpack}.onnx"
        if not path.exists():
            export(path, attn=a.attn, unpack=a.unpack)
        base, pruned = ir.load(path), ir.load(path)
        res = get_pass("channel_prune")({"ratio": a.ratio, "ignore_stem": not a.stream})(pruned)
        kinds: dict[str, int] = {}
        for g in res.rewritten:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
        f0, f1 = measure_flops(base).flops, measure_flops(pruned).flops
        feeds = example_inputs(base, batch=a.batch)
        s0, s1 = make_session(base), make_session(pruned)
        load0 = os.getloadavg()
        ratios, ms = [], None
        for _ in range(a.repeats):
            r = benchmark({"base": s0, "pruned": s1}, feeds, warmup=3, runs=a.runs)
            ratios.append(r["base"]["median_ms"] / r["pruned"]["median_ms"])
            ms = (r["base"]["median_ms"], r["pruned"]["median_ms"])
        load1 = os.getloadavg()
        sp = sorted(ratios)[len(ratios) // 2]
        print(f"timm-style DeiT-S ({a.attn}, {a.unpack}), channel_prune {a.ratio:.0%}"
              f"{' +stream' if a.stream else ''}, batch {a.batch}, ORT CPU")
        print(f"groups pruned: {kinds}; not prunable: {[f'{x.where}: {x.reason}' for x in res.skipped]}")
        print(f"FLOPs cut {f0 / f1:.2f}×; speedup {sp:.2f}× (calls: {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"efficiency {sp / (f0 / f1):.2f}; last call base {ms[0]:.1f} ms, pruned {ms[1]:.1f} ms")
        print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (2 cores, shared)")


if __name__ == "__main__":
    sys.exit(main())
