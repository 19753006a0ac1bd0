"""Hand-written torch modules for the windowed-attention and layer-scale tests (no timm/torchvision; small dims).

* :class:`SwinStyle`: Swin-v1 layout. Stream ``[B, H·W, C]``; each block does ``norm1 → view(B, H, W, C) →
  roll(-s) (odd blocks) → window partition → attention with a relative-position bias (+ the shift mask) → window
  reverse → roll(+s) → view(B, H·W, C)`` and the residual Add; patch merging between stages. A stage whose
  resolution is not larger than the window uses one window and no shift (as Swin does).
* :class:`MaxViTStyle`: MaxViT layout, channels-last stream ``[B, H, W, C]``; each stage runs block attention
  (windows) then grid attention (dilated groups), each with a relative-position bias and its reverse. The
  attention is timm's ``AttentionCl`` spelling; ``sdpa=True`` calls ``scaled_dot_product_attention`` with the bias
  as ``attn_mask``.
* :class:`LayerScaleViT`: DINOv2/CaiT-style pre-norm ViT with layer scale: ``x + γ₁·attn(norm1(x))``,
  ``x + γ₂·mlp(norm2(x))`` (γ a learned ``[C]`` vector), CLS token, class head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, ws: tuple[int, int]) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws[0] * ws[1], c)


def window_reverse(windows: torch.Tensor, ws: tuple[int, int], h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws[0], w // ws[1], ws[0], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def grid_partition(x: torch.Tensor, gs: tuple[int, int]) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, gs[0], h // gs[0], gs[1], w // gs[1], c)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, gs[0], gs[1], c)


def grid_reverse(windows: torch.Tensor, gs: tuple[int, int], h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // gs[0], w // gs[1], gs[0], gs[1], c)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, h, w, c)


class RelPosBias(nn.Module):
    """Swin's relative-position bias: a ``[(2wh-1)(2ww-1), heads]`` table indexed per (query, key) pair."""

    def __init__(self, ws: tuple[int, int], heads: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += ws[0] - 1
        rel[:, :, 1] += ws[1] - 1
        self.register_buffer("index", rel[:, :, 0] * (2 * ws[1] - 1) + rel[:, :, 1], persistent=False)
        self.n = ws[0] * ws[1]

    def forward(self) -> torch.Tensor:  # [1, heads, N, N]
        return self.table[self.index.reshape(-1)].view(self.n, self.n, -1).permute(2, 0, 1).unsqueeze(0)


class WindowAttention(nn.Module):
    """Swin ``WindowAttention``: q scaled, q·kᵀ + relative bias (+ the shift mask over a 5-D view), softmax, ·v."""

    def __init__(self, dim: int, ws: tuple[int, int], heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = RelPosBias(ws, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.bias()
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _shift_mask(h: int, w: int, ws: int, s: int) -> torch.Tensor:
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, (ws, ws)).squeeze(-1)  # [nW, ws*ws]
    m = win[:, None, :] - win[:, :, None]
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, res: tuple[int, int], heads: int, ws: int, shift: bool) -> None:
        super().__init__()
        self.res = res
        if min(res) <= ws:  # as Swin: one window over the whole map, no shift
            ws, shift = min(res), False
        self.ws, self.shift = ws, ws // 2 if shift else 0
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, (ws, ws), heads)
        self.mlp = Mlp(dim, 2 * dim)
        self.register_buffer("mask", _shift_mask(*res, ws, self.shift) if self.shift else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.res
        b, n, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, (self.ws, self.ws)), self.mask)
        y = window_reverse(y, (self.ws, self.ws), h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, res: tuple[int, int]) -> None:
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.res
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStyle(nn.Module):
    """Stages of (window, shifted window) blocks; defaults: 64×128 image, patch 4, window 4: stages at 16×32
    tokens (32 windows), 8×16 (8 windows) and 4×8 (2 windows of 4×4, no shift: the map is not larger than one)."""

    def __init__(self, img: tuple[int, int] = (64, 128), patch: int = 4, dim: int = 16, depths=(2, 2, 2),
                 heads=(2, 2, 4), ws: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        res = (img[0] // patch, img[1] // patch)
        self.stages = nn.ModuleList()
        for i, (d, h) in enumerate(zip(depths, heads)):
            blocks: list[nn.Module] = [SwinBlock(dim, res, h, ws, shift=j % 2 == 1) for j in range(d)]
            if i < len(depths) - 1:
                blocks.append(PatchMerging(dim, res))
                res, dim = (res[0] // 2, res[1] // 2), dim * 2
            self.stages.append(nn.Sequential(*blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.norm(x).mean(1))


class AttentionCl(nn.Module):
    """timm MaxViT ``AttentionCl``: channels-last input ``[B', h, w, C]``, bias ``[1, heads, N, N]``."""

    def __init__(self, dim: int, heads: int, ws: tuple[int, int], sdpa: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = RelPosBias(ws, heads)
        self.sdpa = sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        restore = x.shape[:-1]
        q, k, v = self.qkv(x).view(b, -1, self.heads, self.head_dim * 3).transpose(1, 2).chunk(3, dim=3)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos())
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + self.rel_pos()
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(restore + (-1,)))


class PartitionAttention(nn.Module):
    """``x + attn(partition(norm(x)))`` reversed back to ``[B, H, W, C]``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, size: tuple[int, int], res: tuple[int, int], kind: str, sdpa: bool) -> None:
        super().__init__()
        self.size, self.res, self.kind = size, res, kind
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = AttentionCl(dim, heads, size, sdpa)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.res
        part, rev = (window_partition, window_reverse) if self.kind == "window" else (grid_partition, grid_reverse)
        y = part(self.norm1(x), self.size).view(-1, *self.size, x.shape[-1])
        y = rev(self.attn(y).reshape(-1, self.size[0] * self.size[1], x.shape[-1]), self.size, h, w)
        x = x + y
        return x + self.mlp(self.norm2(x))


class MaxViTStyle(nn.Module):
    """Stem conv to channels-last, then per stage a depthwise conv (MBConv stand-in), block and grid attention;
    defaults: 32×64 image, patch 4 → 8×16 tokens; stage 2 after a stride-2 conv at 4×8; partition size 4×4
    in stage 1 and 2×4 in stage 2 (windows and grid groups of the same size)."""

    def __init__(self, img: tuple[int, int] = (32, 64), patch: int = 4, dims=(16, 32), heads=(2, 4),
                 sizes=((4, 4), (2, 4)), depth: int = 1, sdpa: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], patch, patch)
        res = (img[0] // patch, img[1] // patch)
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, (dim, h, size) in enumerate(zip(dims, heads, sizes)):
            if i > 0:
                self.downs.append(nn.Conv2d(dims[i - 1], dim, 2, 2))
                res = (res[0] // 2, res[1] // 2)
            blocks = []
            for _ in range(depth):
                blocks += [PartitionAttention(dim, h, size, res, "window", sdpa),
                           PartitionAttention(dim, h, size, res, "grid", sdpa)]
            self.stages.append(nn.ModuleList([nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), *blocks]))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downs[i - 1](x)
            x = (x + stage[0](x)).permute(0, 2, 3, 1)  # NCHW conv, then channels-last attention
            for blk in stage[1:]:
                x = blk(x)
            x = x.permute(0, 3, 1, 2)
        return self.head(self.norm(x.mean((2, 3))))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))  # not DINOv2's 1e-5 init: the branch must matter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScaleBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5).softmax(-1)
        return self.proj((probs @ v).transpose(1, 2).reshape(b, n, c)), probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x))[0])
        return x + self.ls2(self.mlp(self.norm2(x)))


class LayerScaleViT(nn.Module):
    """DINOv2-style: patch embed, CLS token, learned positions, layer-scaled pre-norm blocks, CLS head."""

    def __init__(self, img: int = 32, patch: int = 8, dim: int = 64, depth: int = 4, heads: int = 4,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([LayerScaleBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def build(name: str, **kw) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(module in eval mode, example input) for ``swin``, ``maxvit`` or ``layerscale_vit``."""
    torch.manual_seed(0)
    cls = {"swin": SwinStyle, "maxvit": MaxViTStyle, "maxvit_tv": MaxViTTV, "swin_tv": SwinTV,
           "layerscale_vit": LayerScaleViT}[name]
    m = cls(**kw).eval()
    size = {"swin": (64, 128), "maxvit": (32, 64), "maxvit_tv": (32, 64), "swin_tv": (48, 64),
            "layerscale_vit": (32, 32)}[name]
    size = kw.get("img", size) if name != "layerscale_vit" else (kw.get("img", 32),) * 2
    return m, (torch.randn(2, 3, *size),)


class RelPosMHA5D(nn.Module):
    """torchvision MaxViT ``RelativePositionalMultiHeadAttention``: ``[B, G, P, C]`` input, 5-D heads, einsum."""

    def __init__(self, dim: int, heads: int, p: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.merge = nn.Linear(dim, dim)
        self.rel_pos = RelPosBias((p, p), heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, d = x.shape
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(b, g, p, self.heads, self.head_dim).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        k = k * self.scale
        dot = F.softmax(torch.einsum("BGHID,BGHJD->BGHIJ", q, k) + self.rel_pos(), dim=-1)
        out = torch.einsum("BGHIJ,BGHJD->BGHID", dot, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, d))


class PartitionLayerTV(nn.Module):
    """torchvision ``PartitionAttentionLayer``: the NCHW stream is partitioned to ``[B, G, P², C]`` (grid: axes -2/-3
    swapped), attention and MLP residuals run in that layout, then it is departitioned."""

    def __init__(self, dim: int, heads: int, p: int, res: tuple[int, int], kind: str) -> None:
        super().__init__()
        self.p, self.res, self.kind = p, res, kind
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = RelPosMHA5D(dim, heads, p)
        self.mlp = Mlp(dim, 2 * dim)

    def patch(self, h: int, w: int) -> tuple[int, int]:
        return (self.p, self.p) if self.kind == "window" else (h // self.p, w // self.p)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW → [B, G, T, C]; window: P × P patches; grid: (H/P) × (W/P) patches, then patches and positions
        swapped (each of the (H/P)·(W/P) groups holds P × P tokens, one per patch)."""
        b, c, h, w = x.shape
        ph, pw = self.patch(h, w)
        x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, ph * pw, c)
        return x.swapaxes(-2, -3) if self.kind == "grid" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch(h, w)
        x = self.partition(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        if self.kind == "grid":
            x = x.swapaxes(-2, -3)
        return x.reshape(b, h // ph, w // pw, ph, pw, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class MaxViTTV(nn.Module):
    """torchvision-style MaxViT: NCHW stream, one stage of (depthwise conv, window layer, grid layer) per dim."""

    def __init__(self, img: tuple[int, int] = (32, 64), patch: int = 4, dim: int = 16, heads: int = 2, p: int = 4,
                 depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, patch, patch)
        res = (img[0] // patch, img[1] // patch)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), PartitionLayerTV(dim, heads, p, res, "window"),
                       PartitionLayerTV(dim, heads, p, res, "grid")]
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def shifted_window_attention_tv(x: torch.Tensor, attn: WindowAttention, ws: int, shift: int) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` spelling on a channels-last ``[B, H, W, C]`` map: pad to a multiple
    of the window, roll, partition, attention with the relative bias and a shift mask built here in the forward,
    reverse, roll back, crop."""
    b, h, w, c = x.shape
    pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    nw = (ph // ws) * (pw // ws)
    x = x.view(b, ph // ws, ws, pw // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, ws * ws, c)
    heads, hd = attn.heads, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b * nw, ws * ws, 3, heads, hd).permute(2, 0, 3, 1, 4)
    scores = (q * hd**-0.5).matmul(k.transpose(-2, -1)) + attn.bias()
    if shift:
        mask = x.new_zeros((ph, pw))
        slices = ((0, -ws), (-ws, -shift), (-shift, None))
        cnt = 0
        for hs in slices:
            for wsl in slices:
                mask[hs[0]:hs[1], wsl[0]:wsl[1]] = cnt
                cnt += 1
        mask = mask.view(ph // ws, ws, pw // ws, ws).permute(0, 2, 1, 3).reshape(nw, ws * ws)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        scores = scores.view(b, nw, heads, ws * ws, ws * ws) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, heads, ws * ws, ws * ws)
    out = (F.softmax(scores, dim=-1).matmul(v)).transpose(1, 2).reshape(b * nw, ws * ws, c)
    out = F.linear(out, attn.proj.weight, attn.proj.bias)
    out = out.view(b, ph // ws, pw // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


class SwinBlockTV(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, shift: int) -> None:
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, (ws, ws), heads)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + shifted_window_attention_tv(self.norm1(x), self.attn, self.ws, self.shift)
        return x + self.mlp(self.norm2(x))


class SwinTV(nn.Module):
    """torchvision-style Swin: channels-last ``[B, H, W, C]`` stream; one stage of (window, shifted window) blocks on
    a 12×16 map with window 4 (no padding), then one on a map the window does not divide (10×14: padded)."""

    def __init__(self, dim: int = 16, heads: int = 2, ws: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList([SwinBlockTV(dim, heads, ws, 0), SwinBlockTV(dim, heads, ws, ws // 2)])
        self.crop = nn.Conv2d(dim, dim, 3)  # 12×16 → 10×14
        self.blocks2 = nn.ModuleList([SwinBlockTV(dim, heads, ws, 0), SwinBlockTV(dim, heads, ws, ws // 2)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.crop(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        for blk in self.blocks2:
            x = blk(x)
        return self.head(x.mean((1, 2)))
