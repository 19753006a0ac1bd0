"""Original vs optimized models served side by side by Triton under load: throughput ratio against FLOPs cut.

Pairs: the DeiT-S-shaped example ViT with ``--token-keep 0.7`` and the ResNet-50-shaped example CNN with
``--prune-channels 0.3`` (both random-init, exported by ``examples/models.py``; verified on synthetic inputs).
The four models are deployed with the python backend (model.py running ONNX Runtime, max_batch_size 8, dynamic
batching with a 500 µs queue delay, one instance, ORT's default threads) into one repository and served by one
tritonserver; then, per pair, ``load_test(optimized, compare=original)`` times them in interleaved windows (A B,
B A, ...) at each concurrency level, with batch-1 requests over HTTP.

Throughput ratio = req/s optimized / req/s original; efficiency = throughput ratio / FLOPs cut, where FLOPs cut
= FLOPs original / FLOPs optimized (``measure_flops`` at batch 1, from the optimize report).

This is what the CLI does step by step (docs/deploy.md): ``graphprune optimize`` → ``graphprune deploy
--backend python`` → ``graphprune serve`` → ``graphprune loadtest --compare``.

Run (one process, under the shared benchmark lock):
    flock /tmp/gp_bench.lock python benchmarks/bench_deploy.py --duration 6 --windows 3 --concurrency 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file or with -m

from benchmarks.results import Table, add_result_option  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {
    "deit": ("vit", ["--token-keep", "0.7"], "token_drop keep 0.7"),
    "resnet50": ("resnet50", ["--prune-channels", "0.3"], "channel_prune 0.3 (magnitude)"),
}


def _prepare(name: str, folder: Path) -> tuple[Path, Path, Path]:
    """Export (once) and optimize; returns (original, optimized, report)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples import models
    from graphprune.cli import main

    example, flags, _ = PAIRS[name]
    src = folder / f"{name}.onnx"
    if not src.exists():
        module, args = models.build(example)
        models.export_model(module, args, src)
    opt, report = folder / f"{name}_opt.onnx", folder / f"{name}_opt.report.json"
    if not opt.exists() or not report.exists():
        try:
            main(["optimize", str(src), "-o", str(opt), *flags, "--report", str(report), "--force"])
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    return src, opt, report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per model and level")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "deploy"))
    add_result_option(p)
    a = p.parse_args(argv)

    from graphprune.deploy import TritonServer, deploy, free_port, load_test, parse_levels

    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    repo = folder / "repository"
    prepared = {}
    for name in a.pairs:
        src, opt, report = _prepare(name, folder)
        prepared[name] = (src, opt, json.loads(report.read_text()))
        for model_name, path in ((name, src), (f"{name}_opt", opt)):
            deploy(path, repo, name=model_name, version=1, backend="python", force=True)
    levels = parse_levels(a.concurrency)
    results = {}
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as srv:
        srv.wait_ready(timeout=600, on_state=lambda n, v, s, r: print(f"  {n}: {s}", file=sys.stderr))
        for name in a.pairs:
            results[name] = load_test(srv.http_url, f"{name}_opt", compare=name, concurrency=levels,
                                      duration=a.duration, windows=a.windows,
                                      progress=lambda m: print(f"  {m}", file=sys.stderr))
    (folder / "bench_deploy.json").write_text(json.dumps(results, indent=2))
    table = Table("| model | pipeline | FLOPs cut | verify (synthetic) | concurrency | original req/s | optimized req/s "
                  "| throughput ratio | efficiency | p50 ms original → optimized | errors |")
    for name in a.pairs:
        _, _, rep = prepared[name]
        cut = rep["flops"]["before"] / rep["flops"]["after"]
        verdict = f"{'passed' if rep['verify']['passed'] else 'failed'}, min cosine {rep['verify']['cosine_min']:.3f}"
        for level in results[name]["levels"]:
            o, b = level["models"][f"{name}_opt"], level["models"][name]
            ratio = level["ratio"]
            table.add(f"| {name} | {PAIRS[name][2]} | {cut:.2f}× | {verdict} | {level['concurrency']} | {b['rps']:.1f} | "
                  f"{o['rps']:.1f} | {ratio:.2f}× | {ratio / cut:.2f} | {b['p50_ms']:.1f} → {o['p50_ms']:.1f} | "
                  f"{o['errors'] + b['errors']} |")
    table.save(a.result, description="Batch-1 HTTP requests, interleaved windows; throughput ratio = req/s optimized ÷ req/s original; efficiency = throughput ratio ÷ FLOPs cut.")


if __name__ == "__main__":
    main()
