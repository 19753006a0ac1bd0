"""Speed of ``channel_prune`` on the ResNet-50-shaped and DeiT-S-shaped examples, ORT CPU.

For each model, ratio (fraction of channels removed in every prunable group, L2 importance) and ``round_to``:
FLOPs ratio (``count_flops``, base / pruned), measured ORT latency ratio (base / pruned, interleaved runs,
spinning off, median of ``--runs``), and speedup efficiency = measured speedup / FLOPs-predicted speedup.

DeiT-S rows: "heads+mlp" keeps the residual stream width (the default: the patch embedding is the input stem);
"+stream" also prunes the embedding dimension (``ignore_stem: false``), as Torch-Pruning does.

Run (one process, under the shared benchmark lock):
    flock /tmp/gp_bench.lock python benchmarks/bench_channel_prune.py --batch 1 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx_ir as ir

from graphprune.analysis.inputs import example_inputs
from graphprune.backends.onnxruntime import benchmark, count_flops, make_session
from graphprune.passes import get_pass

ROOT = Path(__file__).resolve().parents[1]


def _models():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples import models

    return models


def _export(name: str, folder: Path) -> Path:
    models = _models()
    model, args = models.build(name)
    return models.export_model(model, args, folder / f"{name}.onnx")


def _prune(path: Path, **cfg) -> tuple[ir.Model, float]:
    model = ir.load(path)
    t = time.perf_counter()
    get_pass("channel_prune")(cfg)(model)
    return model, time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["resnet50", "vit"])
    p.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.5])
    p.add_argument("--round-to", nargs="*", type=int, default=[8, 1])
    p.add_argument("--batch", nargs="*", type=int, default=[1])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="benchmark calls per row; the median ratio is kept")
    p.add_argument("--out", default=None, help="folder for the exported models (default: a temporary folder)")
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory() if a.out is None else None
    folder = Path(a.out or tmp.name)
    print("| model | variant | ratio | round_to | batch | FLOPs cut | speedup | efficiency | base ms | pruned ms | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        path = _export(name, folder)
        base = ir.load(path)
        f0 = count_flops(base).flops
        variants = [("heads+mlp", True), ("+stream", False)] if name == "vit" else [("all", True)]
        for variant, stem in variants:
            for ratio in a.ratios:
                for rt in a.round_to:
                    pruned, secs = _prune(path, ratio=ratio, round_to=rt, ignore_stem=stem)
                    cut = f0 / count_flops(pruned).flops
                    for batch in a.batch:
                        feeds = example_inputs(base, batch=batch)
                        s0, s1 = make_session(base), make_session(pruned)
                        speed, ms = [], None
                        for _ in range(a.repeats):
                            r = benchmark({"base": s0, "pruned": s1}, feeds, warmup=3, runs=a.runs)
                            speed.append(r["base"]["median_ms"] / r["pruned"]["median_ms"])
                            ms = (r["base"]["median_ms"], r["pruned"]["median_ms"])
                        sp = sorted(speed)[len(speed) // 2]
                        print(f"| {name} | {variant} | {ratio:.0%} | {rt} | {batch} | {cut:.2f}× | {sp:.2f}× | "
                              f"{sp / cut:.2f} | {ms[0]:.1f} | {ms[1]:.1f} | {secs:.1f} |", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
