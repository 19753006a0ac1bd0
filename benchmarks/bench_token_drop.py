"""Speed of ``token_drop`` on the DeiT-S-shaped example ViT (197 tokens, ORT CPU).

For each method at three levels: FLOPs ratio (``measure_flops``, optimized / original), measured latency ratio
(median over repetitions of the per-repetition median ratio, base and optimized runs interleaved in one
process, spinning off), and speedup efficiency = measured speedup / FLOPs-predicted speedup.

``--restore``: the cost of ``restore`` instead, on the same ViT returning its 197 per-token features: keep 0.7 at
the same layers with ``restore: true`` (output [B, 197, 384], dropped tokens put back) and ``restore: false``
(output [B, 128, 384]), each against the original.

Run under the shared benchmark lock:
    flock /tmp/gp_bench.lock python -m benchmarks.bench_token_drop
    flock /tmp/gp_bench.lock python -m benchmarks.bench_token_drop --restore
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks.results import Table, add_result_option
from graphprune.backends.onnxruntime import benchmark, make_session, measure_flops
from graphprune.passes import get_pass

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"

LAYERS = [4, 7, 10]
CONFIGS = [
    ("cls_attention", {"method": "cls_attention", "layers": LAYERS}, "keep_ratio", [0.9, 0.7, 0.5]),
    ("cls_attention+fuse", {"method": "cls_attention", "layers": LAYERS, "fuse_rest": True}, "keep_ratio", [0.7]),
    ("attention_graph", {"method": "attention_graph", "layers": LAYERS}, "keep_ratio", [0.9, 0.7, 0.5]),
    ("tome (every block)", {"method": "tome"}, "r", [4, 8, 12]),
    ("diversity", {"method": "diversity", "layers": LAYERS}, "keep_ratio", [0.7]),
]


def _examples():
    from examples import models

    return models


def export_deit(opset: int, pool: str = "cls") -> Path:
    path = OUT / f"deit_s_op{opset}{'' if pool == 'cls' else '_' + pool}.onnx"
    if not path.exists():
        ex = _examples()
        model, args = ex.build("vit", pool=pool, **({"sdpa": True} if opset >= 23 else {}))
        ex.export_model(model, args, path, opset=opset)
    return path


def restore_cost(result: str | None, feeds: dict, reps: int, runs: int) -> None:
    """Latency of keep 0.7 with and without ``restore`` on the per-token ViT, each against the original; with
    ``result`` (a path) the table is also written as a result file."""
    path = export_deit(18, pool="tokens")
    base = ir.load(str(path))
    base_flops = measure_flops(base, batch=feeds["x"].shape[0]).flops
    base_sess = make_session(path)
    rows = []
    for restore in (False, True):
        model = ir.load(str(path))
        get_pass("token_drop")({"keep_ratio": 0.7, "layers": LAYERS, "restore": restore})(model)
        fr = measure_flops(model, batch=feeds["x"].shape[0]).flops / base_flops
        lat, base_ms = measure(base_sess, model, feeds, reps, runs)
        shape = make_session(model).run(None, feeds)[0].shape
        rows.append((restore, shape, fr, lat, base_ms))
        print(f"restore {restore}: output {shape} FLOPs {fr:.3f} latency {lat:.3f} speedup {1 / lat:.2f}x", flush=True)
    print(f"\nDeiT-S-shaped ViT, per-token output, keep 0.7 at layers {LAYERS}, batch {feeds['x'].shape[0]}, ORT CPU; "
          f"reps {reps} x runs {runs}")
    table = Table("| restore | output | FLOPs ratio | latency ratio | speedup |")
    for restore, shape, fr, lat, _ in rows:
        table.add(f"| {str(restore).lower()} | {list(shape)} | {fr:.3f} | {lat:.3f} | {1 / lat:.2f}× |")
    table.save(result, description=f"Per-token output, keep 0.7 at layers {LAYERS}, batch {feeds['x'].shape[0]}; "
               f"reps {reps} x runs {runs}.")
    print(f"\nrestore costs {rows[1][3] / rows[0][3] - 1:+.1%} latency (restore / no restore)")


def measure(base_sess, opt_model: ir.Model, feeds: dict, reps: int, runs: int) -> tuple[float, float]:
    """(median over ``reps`` of optimized median / base median, the last base median in ms); interleaved runs."""
    opt_sess = make_session(opt_model)
    ratios = []
    for _ in range(reps):
        res = benchmark({"base": base_sess, "opt": opt_sess}, feeds, warmup=2, runs=runs)
        ratios.append(res["opt"]["median_ms"] / res["base"]["median_ms"])
    return statistics.median(ratios), res["base"]["median_ms"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--opsets", default="18,23", help="18: MatMul/Softmax attention; 23: fused Attention op")
    p.add_argument("--quick", action="store_true", help="only cls_attention keep 0.7 (the efficiency target)")
    p.add_argument("--methods", default="", help="comma-separated method names to run (default: all)")
    p.add_argument("--restore", action="store_true", help="measure what restore costs on a per-token output instead")
    add_result_option(p)
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((a.batch, 3, 224, 224)).astype(np.float32)}
    if a.restore:
        restore_cost(a.result, feeds, a.reps, a.runs)
        return
    rows = []
    for opset in [int(o) for o in a.opsets.split(",")]:
        path = export_deit(opset)
        base = ir.load(str(path))
        base_flops = measure_flops(base, batch=a.batch).flops
        base_sess = make_session(path)
        configs = [CONFIGS[0][:3] + ([0.7],)] if a.quick else CONFIGS
        if opset != 18 and not a.quick:  # the fused-op rows: the recompute paths only
            configs = [c for c in CONFIGS if c[0] in ("cls_attention", "attention_graph")]
            configs = [(n, c, k, [0.7]) for n, c, k, _ in configs] + [CONFIGS[3][:3] + ([8],)]
        if a.methods:
            configs = [c for c in configs if c[1]["method"] in a.methods.split(",")]
        for name, cfg, key, levels in configs:
            for level in levels:
                model = ir.load(str(path))
                t0 = time.perf_counter()
                result = get_pass("token_drop")(dict(cfg, **{key: level}))(model)
                t_pass = time.perf_counter() - t0
                fr = measure_flops(model, batch=a.batch).flops / base_flops
                lat, base_ms = measure(base_sess, model, feeds, a.reps, a.runs)
                eff = (1 / lat) / (1 / fr)
                after = [str(r.tokens_after) for r in result.rewritten]
                tokens = "→".join(after) if len(after) <= 4 else f"{after[0]}→…→{after[-1]} ({len(after)} layers)"
                rows.append({"opset": opset, "method": name, key: level, "tokens": tokens, "flops_ratio": fr,
                             "latency_ratio": lat, "speedup": 1 / lat, "efficiency": eff, "base_ms": base_ms,
                             "pass_s": t_pass, "level": f"{key}={level}"})
                print(f"op{opset} {name:20s} {key}={level:<4} tokens {tokens:28s} FLOPs {fr:.3f} latency {lat:.3f} "
                      f"speedup {1 / lat:.2f}x eff {eff:.2f} (base {base_ms:.0f} ms)", flush=True)
    print()
    print(f"DeiT-S-shaped ViT, 197 tokens, batch {a.batch}, ORT CPU; reps {a.reps} x runs {a.runs}")
    table = Table("| opset | method | level | tokens after each reduction | FLOPs ratio | latency ratio | speedup | efficiency |")
    for r in rows:
        table.add(f"| {r['opset']} | {r['method']} | {r['level']} | {r['tokens']} "
              f"| {r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} |")
    table.save(a.result, description=f"DeiT-S-shaped ViT, 197 tokens, batch {a.batch}; reps {a.reps} x runs {a.runs}.")
    (OUT / "bench_token_drop.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
