"""Accuracy of ``token_drop`` on a ViT trained on scikit-learn's digits (64 patch tokens + CLS, 6 blocks, dim 128).

For each method and level: top-1 on the fixed 360-image test split, FLOPs ratio, and measured latency ratio at
batch 64 and batch 1 (base and optimized interleaved, spinning off; median over repetitions).
Training-free: the pass only rewrites the exported graph. The model is trained once by ``benchmarks.digits``.

    flock /tmp/gp_bench.lock python -m benchmarks.bench_token_accuracy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks import digits
from benchmarks.bench_token_drop import measure
from benchmarks.results import Table, add_result_option
from graphprune.backends.onnxruntime import make_session, measure_flops
from graphprune.passes import get_pass

OUT = Path(__file__).resolve().parent / "out"

CONFIGS = [
    ("cls_attention", {"method": "cls_attention"}, "keep_ratio", [0.9, 0.7, 0.5, 0.3]),
    ("cls_attention+fuse", {"method": "cls_attention", "fuse_rest": True}, "keep_ratio", [0.7, 0.5]),
    ("attention_graph", {"method": "attention_graph"}, "keep_ratio", [0.9, 0.7, 0.5]),
    ("diversity", {"method": "diversity"}, "keep_ratio", [0.7, 0.5]),
    ("tome (every block)", {"method": "tome"}, "r", [4, 8, 12, 16]),
    ("tome (blocks 1,3)", {"method": "tome", "layers": [1, 3]}, "r", [16, 24]),
    ("cls_attention budget", {"method": "cls_attention", "layers": [1, 2, 3]}, "schedule", [{"flops": 0.7}, {"flops": 0.55}]),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--no-latency", action="store_true", help="accuracy and FLOPs only (no timing, no lock needed)")
    p.add_argument("--methods", default="", help="comma-separated method names to run (default: all)")
    add_result_option(p)
    a = p.parse_args(argv)
    path = digits.get_vit()
    _, _, x_test, y_test = digits.load_split()
    base = ir.load(str(path))
    base_acc = digits.evaluate(base, x_test, y_test)
    base_flops = measure_flops(base, batch=1).flops
    base_sess = make_session(path)
    rng = np.random.default_rng(0)
    feeds = {b: {"x": x_test[rng.choice(len(x_test), b, replace=False)]} for b in (64, 1)}
    print(f"digits ViT: base top-1 {100 * base_acc:.2f}% ({len(y_test)} test images)", flush=True)
    rows = []
    configs = [c for c in CONFIGS if not a.methods or c[1]["method"] in a.methods.split(",")]
    for name, cfg, key, levels in configs:
        for level in levels:
            model = ir.load(str(path))
            result = get_pass("token_drop")(dict(cfg, **{key: level}))(model)
            acc = digits.evaluate(model, x_test, y_test)
            fr = measure_flops(model, batch=1).flops / base_flops
            lat = {b: float("nan") if a.no_latency else
                   measure(base_sess, model, feeds[b], a.reps, a.runs if b == 64 else 3 * a.runs)[0] for b in feeds}
            after = [str(r.tokens_after) for r in result.rewritten]
            tokens = "→".join(after) if len(after) <= 4 else f"{after[0]}→…→{after[-1]} ({len(after)} layers)"
            label = f"flops≤{level['flops']}" if isinstance(level, dict) else f"{key}={level}"
            row = {"method": name, "level": label, "layers": [r.layer for r in result.rewritten], "tokens": tokens,
                   "top1": acc, "delta_pts": 100 * (acc - base_acc), "flops_ratio": fr,
                   "speedup_b64": 1 / lat[64], "speedup_b1": 1 / lat[1], "eff_b64": fr / lat[64], "eff_b1": fr / lat[1]}
            rows.append(row)
            print(f"{name:22s} {label:14s} top1 {100 * acc:6.2f}% ({row['delta_pts']:+.2f}) FLOPs {fr:.3f} "
                  f"speedup b64 {row['speedup_b64']:.2f}x b1 {row['speedup_b1']:.2f}x tokens {tokens}", flush=True)
    print()
    print(f"Digits ViT (64 patches + CLS, 6 blocks, dim 128), base top-1 {100 * base_acc:.2f}%; ORT CPU; "
          f"latency reps {a.reps}")
    table = Table("| method | level | layers | top-1 | Δ pts | FLOPs ratio | speedup b64 | eff b64 | speedup b1 | eff b1 |")
    for r in rows:
        layers = ",".join(map(str, r["layers"])) if len(r["layers"]) < 6 else "all"
        table.add(f"| {r['method']} | {r['level']} | {layers} | {100 * r['top1']:.2f}% | {r['delta_pts']:+.2f} | "
              f"{r['flops_ratio']:.3f} | {r['speedup_b64']:.2f}x | {r['eff_b64']:.2f} | {r['speedup_b1']:.2f}x | {r['eff_b1']:.2f} |")
    table.save(a.result, description=f"Digits ViT, base top-1 {100 * base_acc:.2f}%; latency reps {a.reps}.")
    ok = [r for r in rows if r["delta_pts"] >= -1.0 and r["speedup_b64"] >= 1.3]
    best = max(ok, key=lambda r: r["speedup_b64"]) if ok else None
    print()
    print("target (≤1 pt loss at ≥1.3x, batch 64): " +
          (f"met by {best['method']} {best['level']}: {best['delta_pts']:+.2f} pts at {best['speedup_b64']:.2f}x" if best else "NOT met"))
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_token_accuracy.json").write_text(json.dumps({"base_top1": base_acc, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
