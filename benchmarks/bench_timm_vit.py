"""``--prune-channels 0.3`` on a DeiT-S-shaped ViT written in the timm style, exported by ``torch.onnx.export``.

The attention is timm's: ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``, then q, k and v unpacked as a
tuple (``--unpack unbind``: ``qkv.unbind(0)``), ``q_norm``/``k_norm`` identities, and ``F.scaled_dot_product_attention``
(``--attn sdpa``, timm's ``fused_attn``) or the explicit ``q·kᵀ → softmax → ·v`` (``--attn eager``). Exported with
``torch.onnx.export(dynamo=True)`` at opset 18 with a dynamic batch (not through ``graphprune.torch``), pruned by
``channel_prune`` with the defaults ``graphprune optimize --prune-channels 0.3`` uses without data (L2 magnitude).

Two rows: the model ``graphprune optimize MODEL -o OUT --prune-channels 0.3`` writes (run as a subprocess; the
default ``ignore_stem: auto`` prunes a ViT's embedding width), and the pass with the embedding width kept
(``ignore_stem: true``). Per row: the widths that shrank, FLOPs cut (``measure_flops``, base / pruned), and the ORT
CPU latency ratio at ``--batch`` (both variants and the original interleaved in one benchmark, spinning off, median
of ``--repeats`` calls), with the load average before and after. Torch-Pruning 1.6.1 reaches 1.85× on this model
shape at 30% (MEASURED.md).

Run (one process, under the shared lock):
    flock /tmp/gp-heavy.lock python -m benchmarks.bench_timm_vit --batch 2 --runs 20 --repeats 5 \
        --result benchmarks/results/channel_speed_timm_dynamo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

from benchmarks.results import Table, add_result_option, this_machine
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


DESCRIPTION = (
    "A timm-style DeiT-S (dim 384, 6 heads, 12 blocks, 197 tokens): `qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, "
    "1, 4)`, then q, k, v unpacked as a tuple, SDPA (timm's `fused_attn`); exported with "
    "`torch.onnx.export(dynamo=True)` at opset 18 with a dynamic batch, fp32, timed at batch 2 ({runs} runs x "
    "{repeats} interleaved calls, every variant and the original in one process, medians; the range is over the "
    "calls). The first row is the command line itself, `graphprune optimize MODEL -o OUT --prune-channels 0.3 "
    "--force` (no data: L2 magnitude; the default `ignore_stem: auto` prunes the embedding width of a ViT, as "
    "Torch-Pruning does; `--force` because the weights are random: the check on synthetic inputs said {check}); the second keeps the embedding width (`ignore_stem: true`, the default until 2026-12-07). Torch-Pruning "
    "1.6.1 on the same shape (30%, attention rewritten first): 2.14x MACs, 1.85x (MEASURED.md).")


def _cli(src: Path, out: Path, ratio: float) -> str:
    """``graphprune optimize SRC -o OUT --prune-channels RATIO --force``, the command a user types (``--force``:
    the weights are random, so the check on synthetic inputs says nothing about fidelity; its outcome is returned
    and printed)."""
    exe = Path(sys.executable).with_name("graphprune")  # the console script of this environment
    report = out.with_suffix(".report.json")
    cmd = [str(exe) if exe.exists() else "graphprune", "optimize", str(src), "-o", str(out),
           "--prune-channels", str(ratio), "--force", "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    v = json.loads(report.read_text())["verify"]
    return "passed" if v["passed"] else "failed: " + "; ".join(v.get("failures", []))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--unpack", choices=["tuple", "unbind"], default="tuple")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for the export (default: a temporary folder)")
    add_result_option(p)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.out or tmp)
        path = folder / f"timm_vit_{a.attn}_{a.unpack}.onnx"
        if not path.exists():
            export(path, attn=a.attn, unpack=a.unpack)
        cli_out = folder / f"timm_vit_{a.attn}_{a.unpack}_cli.onnx"
        check = _cli(path, cli_out, a.ratio)
        base, kept = ir.load(path), ir.load(path)
        res = get_pass("channel_prune")({"ratio": a.ratio, "ignore_stem": True})(kept)
        variants = {f"`--prune-channels {a.ratio:g}`": ir.load(cli_out), "embedding width kept (`ignore_stem: true`)": kept}
        f0 = measure_flops(base).flops
        feeds = example_inputs(base, batch=a.batch)
        sessions = {"base": make_session(base), **{k: make_session(m) for k, m in variants.items()}}
        load0 = os.getloadavg()
        ratios: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(a.repeats):
            r = benchmark(sessions, feeds, warmup=3, runs=a.runs)
            for k in variants:
                ratios[k].append(r["base"]["median_ms"] / r[k]["median_ms"])
        load1 = os.getloadavg()
        print(f"timm-style DeiT-S ({a.attn}, {a.unpack}), channel_prune {a.ratio:.0%}, batch {a.batch}, ORT CPU; "
              f"load average before {load0[0]:.1f}, after {load1[0]:.1f}")
        print(f"embedding width kept: not prunable: {[f'{x.where}: {x.reason}' for x in res.skipped]}")
        print(f"the command's verification on synthetic inputs (random weights): {check}")
        table = Table(["variant", "groups pruned", "FLOPs cut", "speedup", "range", "efficiency"])
        for k, m in variants.items():
            g = _groups(base, m)
            cut = f0 / measure_flops(m).flops
            sp = sorted(ratios[k])[len(ratios[k]) // 2]
            table.add([k, g, f"{cut:.2f}×", f"{sp:.2f}×", f"{min(ratios[k]):.2f}–{max(ratios[k]):.2f}×",
                       f"{sp / cut:.2f}"])
        table.save(a.result, description=DESCRIPTION.format(runs=a.runs, repeats=a.repeats, check=check),
                   machine=f"{this_machine()}; load average {load0[0]:.1f} before, {load1[0]:.1f} after")


def _groups(base: ir.Model, pruned: ir.Model) -> str:
    """Which widths shrank, read off the weights: heads (qkv rows), MLP hidden units (fc1 rows), embedding width
    (the patch embedding's output channels)."""
    def shapes(m: ir.Model) -> dict[str, tuple]:
        return {v.name: tuple(v.const_value.shape) for v in m.graph.initializers.values() if v.const_value is not None}

    b, q = shapes(base), shapes(pruned)
    heads = sum(1 for n, sh in b.items() if n.endswith("attn.qkv.bias") and q.get(n, sh) != sh)
    mlp = sum(1 for n, sh in b.items() if n.endswith("fc1.bias") and q.get(n, sh) != sh)
    parts = [f"{heads} head", f"{mlp} MLP"]
    if q.get("patch_embed.bias", b["patch_embed.bias"]) != b["patch_embed.bias"]:
        parts.append(f"embedding {b['patch_embed.bias'][0]} → {q['patch_embed.bias'][0]}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
