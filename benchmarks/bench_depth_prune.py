"""Depth pruning (``depth_prune``) on the real pretrained encoder: all-MiniLM-L6-v2 on the ``body`` retrieval task.

For each setting (unit, importance, blocks or branches removed), training-free: importance measured on the
calibration texts (``calibration.txt``, disjoint modules from the evaluation pairs), the units removed, then
``cleanup``. Reported: recall@1 and MRR of summary line → docstring body over the 300 evaluation pairs (the query is
not contained in its document), as a share of the unpruned model's; FLOPs cut (static count at batch 8, sequence
128); speedup at batch 8 on ORT CPU (the original and the pruned model interleaved in one process, medians over
``--repeats`` feeds of real text).

    python -m benchmarks.minilm prepare           # once: the model, tokenizer and texts
    python -m benchmarks.bench_depth_prune [--repeats 3] [--runs 20] [--result benchmarks/results/depth_minilm.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks import minilm
from benchmarks.results import add_result_option, markdown_table, write_result

SETTINGS = [  # (unit, importance, ratio): ratio of the 6 blocks (or of the 12 branches)
    ("block", "angular", 1 / 6), ("block", "output", 1 / 6),
    ("block", "angular", 2 / 6), ("block", "output", 2 / 6),
    ("sublayer", "angular", 2 / 12), ("sublayer", "output", 2 / 12),
    ("sublayer", "output", 3 / 12), ("sublayer", "output", 4 / 12),
]


def _feeds(tok: Path, texts: list[str], batch: int, max_length: int) -> list[dict[str, np.ndarray]]:
    return [minilm.tokenize(tok, texts[i:i + batch], max_length) for i in range(0, len(texts) - batch + 1, batch)]


def _retrieval(model, tok: Path, pairs) -> dict[str, float]:
    from graphprune.search.metrics import retrieval

    q = minilm.encode(model, tok, [p[0] for p in pairs])
    d = minilm.encode(model, tok, [p[1] for p in pairs])
    return {k: float(v.mean()) for k, v in retrieval(q, d).items()}


def _prune(src: Path, dst: Path, calib, unit: str, importance: str, ratio: float) -> tuple[dict, float]:
    from graphprune.analysis.flops import count_flops
    from graphprune.passes import get_pass
    from graphprune.passes.base import PassContext

    model = ir.load(src)
    t = time.perf_counter()
    ctx = PassContext(calibration=calib, data_source="user")
    res = get_pass("depth_prune")({"ratio": ratio, "unit": unit, "importance": importance}, ctx)(model)
    get_pass("cleanup")(None, ctx)(model)
    secs = time.perf_counter() - t
    ir.save(model, dst, external_data=dst.name + ".data")
    shape = model.graph.inputs[0].shape
    dims = {str(shape[0]): 8, str(shape[1]): 128}
    flops = count_flops(ir.load(src), batch=8, dims=dims).flops / count_flops(ir.load(dst), batch=8, dims=dims).flops
    return {"removed": res.info["removed"], "flops_cut": flops}, secs


def _speedup(a: Path, b: Path, feeds, runs: int) -> float:
    from graphprune.backends.onnxruntime import benchmark

    ratios = []
    for f in feeds:
        lat = benchmark({"before": a, "after": b}, f, runs=runs)
        ratios.append(lat["before"]["median_ms"] / lat["after"]["median_ms"])
    return float(np.median(ratios))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed feeds (medians over them)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model and feed")
    p.add_argument("--calibration", type=int, default=64, help="calibration texts")
    p.add_argument("--out", type=Path, default=minilm.DEFAULT_OUT.parent / "depth")
    add_result_option(p)
    a = p.parse_args(argv)
    prep = minilm.DEFAULT_OUT
    src, tok = prep / "minilm.onnx", prep / "tokenizer.json"
    if not src.exists():
        raise SystemExit("run `python -m benchmarks.minilm prepare` first")
    pairs = minilm.load_eval_pairs(prep / "eval_pairs.jsonl", task="body")
    texts = [t for t in (prep / "calibration.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    calib = _feeds(tok, texts[:a.calibration], 8, 128)
    timed = _feeds(tok, [d for _, d in pairs[:8 * a.repeats]], 8, 128)  # documents: most reach 128 tokens
    base = _retrieval(src, tok, pairs)
    print(f"baseline: recall@1 {base['recall@1']:.4f}, MRR {base['mrr']:.4f} on {len(pairs)} pairs", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for unit, importance, ratio in SETTINGS:
        dst = a.out / f"{unit}_{importance}_{round(ratio * 100)}.onnx"
        info, secs = _prune(src, dst, calib, unit, importance, ratio)
        r = _retrieval(dst, tok, pairs)
        sp = _speedup(src, dst, timed, a.runs)
        row = [unit, importance, f"{ratio:.3f}", ", ".join(info["removed"]),
               f"{100 * r['recall@1'] / base['recall@1']:.1f}%", f"{100 * r['mrr'] / base['mrr']:.1f}%",
               f"{info['flops_cut']:.2f}×", f"{sp:.2f}×", f"{secs:.1f}"]
        print(" | ".join(row), flush=True)
        rows.append(row)
    cols = ["unit", "importance", "ratio", "removed", "recall@1 kept", "MRR kept", "FLOPs cut", "speedup (b8)",
            "prune s"]
    print(markdown_table(cols, rows))
    if a.result:
        write_result(a.result, cols, rows, description=(
            f"all-MiniLM-L6-v2, body task ({len(pairs)} pairs; baseline recall@1 {base['recall@1']:.4f}, MRR "
            f"{base['mrr']:.4f}), training-free depth pruning with importance from {len(calib) * 8} calibration "
            f"texts, then cleanup. Speedup: batch 8, sequence 128, ORT CPU, interleaved, median of {a.repeats} "
            f"feeds x {a.runs} runs."))


if __name__ == "__main__":
    main()
