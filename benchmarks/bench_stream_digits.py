"""Pruning a ViT's embedding width (the residual stream) or not, at the same FLOPs, on the trained digits ViT.

Torch-Pruning's "30 %" on a DeiT-S also prunes the embedding width, every block's input and output, and so cuts
2.14× MACs where heads and MLPs alone (``ignore_stem: true``, graphprune's default until 2026-12-07) cut 1.45×
(docs/benchmarks.md, timm-style ViT). This measures what pruning it costs in accuracy on a trained model, at equal
FLOPs: ``channel_prune`` with ``target: flops`` (the ratio is the share of FLOPs removed), ``ignore_stem`` true and
auto (the default, which prunes a ViT's embedding width), calibrated on the
PNG folder of ``bench_fidelity_digits`` (the data-aware defaults: activation importance, sensitivity allocation,
least-squares refit). Each output is scored on the 360 held-out test images; nothing is timed.

Run:  python -m benchmarks.bench_stream_digits [--flops-cuts 0.3,0.5] [--result benchmarks/results/stream_digits.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune  # noqa: E402
from benchmarks import digits  # noqa: E402
from benchmarks.bench_fidelity_digits import CALIBRATION, PNG_DIR, VERIFY, write_pngs  # noqa: E402
from benchmarks.results import Table, add_result_option  # noqa: E402
from graphprune.pipeline import DataConfig  # noqa: E402


def kept_widths(report: dict) -> str:
    """Kept / size per kind, summed over the groups that lost units (``channels 616/3072, heads 3/4``)."""
    sums: dict[str, list[int]] = {}
    for r in report["passes"][0].get("rewritten", []):
        if "kind" in r and "size" in r:
            s = sums.setdefault(r["kind"], [0, 0])
            s[0] += int(r["kept"])
            s[1] += int(r["size"])
    return ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(sums.items())) or "none"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flops-cuts", default="0.3,0.5", help="comma-separated shares of FLOPs removed")
    p.add_argument("--images", type=int, default=400, help="training images written as the PNG folder")
    add_result_option(p)
    a = p.parse_args(argv)
    cuts = [float(c) for c in a.flops_cuts.split(",") if c]
    if not cuts or not all(0.0 < c < 1.0 for c in cuts):
        p.error("--flops-cuts: shares in (0, 1)")
    t_start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits.load_split()
    model = Path(digits.get_vit())
    write_pngs(x_tr, y_tr, PNG_DIR, a.images)
    base = digits.evaluate(model, x_te, y_te)
    data = DataConfig(calibration_samples=CALIBRATION, verify_samples=VERIFY, normalize=False)
    table = Table(["FLOPs removed (target)", "embedding width", "FLOPs", "groups that lost units: kept / size, summed by kind",
                   "test top-1 (original → pruned)", "points lost", "verify"])
    with tempfile.TemporaryDirectory(prefix="gp_stream_") as tmp:
        for cut in cuts:
            for stem in (True, "auto"):
                out = Path(tmp) / f"vit_{cut}_{stem}.onnx"
                pipe = graphprune.Pipeline(data=data).add("channel_prune", ratio=cut, target="flops",
                                                          ignore_stem=stem)
                report = graphprune.optimize(model, out, pipe, data=PNG_DIR, force=True)
                top1 = digits.evaluate(out, x_te, y_te)
                table.add([f"{cut:.0%}", "kept (`ignore_stem: true`)" if stem is True else "pruned (default)", f"×{report['flops']['ratio']:.3f}",
                           kept_widths(report), f"{base:.2%} → {top1:.2%}", f"{100 * (base - top1):.1f}",
                           "passed" if report["verify"]["passed"] else "failed"])
    print(f"total {time.perf_counter() - t_start:.0f} s")
    table.save(a.result, description=(
        f"benchmarks/bench_stream_digits.py: the trained digits ViT (benchmarks/digits.py: dim 128, 6 blocks, 4 "
        f"heads, 65 tokens), `channel_prune` with `target: flops` at each FLOPs cut, the embedding width kept "
        f"(`ignore_stem: true`) or pruned too (the default `ignore_stem: auto`, on a ViT), calibrated on {a.images} "
        f"training images as PNGs ({CALIBRATION} calibration, {VERIFY} verification samples; data-aware defaults); "
        f"top-1 on the {len(y_te)} held-out test images. Nothing timed: the speed of each choice on a DeiT-S is the timm "
        f"table's."))


if __name__ == "__main__":
    main()
