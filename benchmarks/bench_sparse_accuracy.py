"""Accuracy effect of sparse attention, training-free, on the trained digits ViT (64 patch tokens on 8×8 + CLS).

For each setting, every attention block of the model is replaced (``sparse_attention`` pass) and the
360 test images are run in ORT. Reported per setting: top-1, its change from dense (points), top-1 agreement with
the dense model, the cosine between dense and sparse logits (mean and min over images), and the attention-FLOPs
ratio (dense / executed, from the pass report). N = 65 is far too short for sparse attention to be faster;
this table is about what the patterns cost in accuracy, the speed table is ``bench_sparse_attention.py``.

Run: ``python benchmarks/bench_sparse_accuracy.py`` (uses the cached model from ``benchmarks.digits``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import digits  # noqa: E402
from benchmarks.results import Table, add_result_option  # noqa: E402
from graphprune.io import load_model  # noqa: E402
from graphprune.passes.sparse_attention import SparseAttentionPass  # noqa: E402

SETTINGS = {
    "neighborhood_2d k=5": {"pattern": "neighborhood_2d", "kernel": 5},
    "neighborhood_2d k=3": {"pattern": "neighborhood_2d", "kernel": 3},
    "neighborhood_2d k=3 d=2": {"pattern": "neighborhood_2d", "kernel": 3, "dilation": 2},
    "block_topk b=8 k=4": {"pattern": "block_topk", "block_size": 8, "topk": 4},
    "block_topk b=8 k=2": {"pattern": "block_topk", "block_size": 8, "topk": 2},
    "sliding_window w=16": {"pattern": "sliding_window", "window": 16},
}


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1) + 1e-30)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--opset", type=int, default=18, choices=(18, 23))
    p.add_argument("--json", help="also write the rows as JSON here")
    add_result_option(p)
    a = p.parse_args(argv)
    path = digits.get_vit(opset=a.opset)
    _, _, x, y = digits.load_split()
    dense = digits.predict(str(path), x)
    base_top1 = float((dense.argmax(-1) == y).mean())
    rows = [{"setting": "dense", "top1": base_top1, "delta_points": 0.0, "agreement": 1.0, "cos_mean": 1.0,
             "cos_min": 1.0, "attn_flops_ratio": 1.0}]
    for name, cfg in SETTINGS.items():
        model = load_model(path)
        res = SparseAttentionPass(cfg)(model)
        if res.skipped:
            raise SystemExit(f"{name}: blocks skipped: {res.skipped}")
        out = digits.predict(model, x)
        cos = _cosine_rows(dense, out)
        top1 = float((out.argmax(-1) == y).mean())
        rows.append({"setting": name, "top1": top1, "delta_points": 100 * (top1 - base_top1),
                     "agreement": float((out.argmax(-1) == dense.argmax(-1)).mean()),
                     "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "attn_flops_ratio": res.info["attention_flops_ratio"]})
    print(f"digits ViT (opset {a.opset}), {len(y)} test images, all 6 blocks replaced")
    table = Table("| setting | top-1 | Δ top-1 (points) | top-1 agreement | logit cosine mean / min | attention FLOPs ratio |")
    for r in rows:
        table.add(f"| {r['setting']} | {100 * r['top1']:.2f}% | {r['delta_points']:+.2f} | {100 * r['agreement']:.1f}% | "
              f"{r['cos_mean']:.4f} / {r['cos_min']:.4f} | {r['attn_flops_ratio']:.2f}x |")
    table.save(a.result, description=f"digits ViT (opset {a.opset}), {len(y)} test images, all 6 blocks replaced.")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
