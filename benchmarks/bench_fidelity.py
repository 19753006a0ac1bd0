"""Fidelity on a real pretrained model: all-MiniLM-L6-v2, retrieval over Python standard-library docstrings.

Each row runs ``graphprune.optimize`` on the exported sentence encoder (``benchmarks/minilm.py prepare``) with one
pipeline, either with the real calibration texts (``--data calibration.txt``: disjoint from the evaluation pairs,
split by graphprune into calibration and held-out verification samples) or with no data (synthetic inputs), and
always with ``force`` so a row is measured even when verification fails. Then, outside graphprune:

  * ``recall@1 retained``: query → document recall@1 of the optimized model ÷ the original's, on two tasks over
    the same 300 evaluation pairs: ``docstring`` (the summary line finds its full docstring; the task of the
    issue) and ``body`` (it finds the docstring without the summary line: harder, baseline about 0.37);
  * ``MRR``: mean reciprocal rank on the body task, optimized ÷ original (less noisy than recall@1);
  * ``cos``: mean cosine between the optimized and original embeddings of all 600 evaluation texts;
  * ``nbr agree``: the nearest-neighbour agreement graphprune's verification measured (64 held-out samples; the
    synthetic rows measure it on synthetic inputs, where it is reported, not checked);
  * ``speedup``: ORT CPU, original vs optimized in one process, interleaved, medians, on the first 1 or 8
    evaluation documents (up to 256 tokens);
  * ``verify``: what graphprune's verification said.

Usage::

    python -m benchmarks.minilm prepare
    python -m benchmarks.bench_fidelity [--rows NAME ...] [--runs 15] [--json OUT.json]

The ``tokens`` rows run ``token_drop`` on the same dynamic-sequence export (the kept count follows the runtime N;
MiniLM has no prepended CLS token, so the scores are the column-mean attention; ToMe is refused on this padded
model, see docs/benchmarks.md). Nothing here is a test: docs/benchmarks.md keeps the latest table (``--result``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import minilm
from benchmarks.results import add_result_option, save_markdown

ROWS: dict[str, tuple[dict, bool] | tuple[str, dict, bool]] = {
    # name: (channel_prune options, real data?) or (pass, options, real data?)
    "channels 20%, synthetic": ({"ratio": 0.2}, False),
    "channels 20%, real": ({"ratio": 0.2}, True),
    "channels 30%, synthetic": ({"ratio": 0.3}, False),
    "channels 30%, real": ({"ratio": 0.3}, True),
    "channels 40%, synthetic": ({"ratio": 0.4}, False),
    "channels 40%, real": ({"ratio": 0.4}, True),
    "channels 30%, synthetic, activation+refit": ({"ratio": 0.3, "importance": "activation", "global": True,
                                                   "reconstruct": True}, False),
    "channels 30%, real, l2 (no data use)": ({"ratio": 0.3, "importance": "l2", "global": False,
                                             "reconstruct": False}, True),
    "channels 30%, real, score-ranked (no sensitivity)": ({"ratio": 0.3, "allocate": "score"}, True),
    "channels 30%, real, obs": ({"ratio": 0.3, "importance": "obs"}, True),
    "channels 30%, real, obs, score-ranked": ({"ratio": 0.3, "importance": "obs", "allocate": "score"}, True),
    "channels 30%, real, sequential refit": ({"ratio": 0.3, "refit": "sequential"}, True),
    # token_drop on the dynamic-sequence export (k from the runtime N; no CLS token: column-mean attention scores)
    "tokens 0.7, synthetic": ("token_drop", {"keep_ratio": 0.7}, False),
    "tokens 0.7, real": ("token_drop", {"keep_ratio": 0.7}, True),
    "tokens 0.5, real": ("token_drop", {"keep_ratio": 0.5}, True),
}


def mrr(model, tok, pairs) -> float:
    """Mean reciprocal rank of each query's own document among all documents (cosine)."""
    q = minilm.encode(model, tok, [a for a, _ in pairs])
    d = minilm.encode(model, tok, [b for _, b in pairs])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    s = q @ d.T
    rank = (s > np.diag(s)[:, None]).sum(axis=1)
    return float(np.mean(1.0 / (1.0 + rank)))


def run_row(name: str, options: dict, real: bool, folder: Path, out_dir: Path, baseline: dict, runs: int,
            pass_name: str = "channel_prune") -> dict:
    import graphprune as gp
    from graphprune.backends.onnxruntime import benchmark
    from graphprune.pipeline import DataConfig

    src, tok = folder / "minilm.onnx", folder / "tokenizer.json"
    data = DataConfig(path=str(folder / "calibration.txt"), tokenizer=str(tok), max_length=256) if real else None
    pipe = gp.Pipeline(data=data).add(pass_name, **options).add("cleanup")
    out = out_dir / (name.replace(" ", "_").replace(",", "").replace("%", "").replace("+", "_").replace("(", "")
                     .replace(")", "") + ".onnx")
    t0 = time.perf_counter()
    rep = gp.optimize(src, out, pipe, force=True)
    seconds = time.perf_counter() - t0
    pairs = minilm.load_eval_pairs(folder / "eval_pairs.jsonl")
    tasks = {"docstring": pairs, "body": minilm.body_pairs(pairs)}
    recall = {t: minilm.recall_at_1(out, tok, p) for t, p in tasks.items()}
    texts = [q for q, _ in pairs] + [d for _, d in pairs]
    emb, ref = minilm.encode(out, tok, texts), minilm.encode(src, tok, texts)
    cos_eval = float(((emb * ref).sum(1) / np.maximum(np.linalg.norm(emb, axis=1), 1e-12)).mean())
    docs = [d for _, d in pairs]
    speed = {}
    for b in (1, 8):
        feeds = minilm.tokenize(tok, docs[:b], 256)
        lat = benchmark({"before": src, "after": out}, feeds, warmup=3, runs=runs)
        speed[b] = lat["before"]["median_ms"] / lat["after"]["median_ms"]
    metrics = rep["verify"]["outputs"][0]["metrics"]
    pass_info = rep["passes"][0]["info"]
    return {
        "row": name, "options": options, "data": rep["data"], "method": pass_info.get("method"),
        "flops_ratio": rep["flops"]["ratio"], "optimize_s": round(seconds, 1),
        "recall": recall, "retained": {t: recall[t] / baseline[t] for t in recall},
        "mrr_body": mrr(out, tok, tasks["body"]) / baseline["mrr_body"], "cosine_eval": cos_eval,
        "neighbor_agreement": metrics.get("neighbor_agreement"), "cosine_mean_verify": metrics["cosine"]["mean"],
        "speedup_b1": speed[1], "speedup_b8": speed[8],
        "verify": ("passed" if rep["verify"]["passed"] else "FAILED") + f" ({rep['data']['source']})",
        "verify_summary": rep["verify"]["summary"],
    }


def table(results: list[dict], baseline: dict) -> str:
    head = ("| pipeline | data | FLOPs | recall@1 retained (docstring / body) | MRR (body) | cos | nbr agree | "
            "speedup b1 | speedup b8 | verify said |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['data']['source']} ({r['data']['calibration_samples']}+{r['data']['verify_samples']})"
            f" | ×{r['flops_ratio']:.3f} | {r['retained']['docstring']:.1%} / {r['retained']['body']:.1%}"
            f" | {r['mrr_body']:.1%} | {r['cosine_eval']:.3f} | {r['neighbor_agreement']:.3f}"
            f" | {r['speedup_b1']:.2f}× | {r['speedup_b8']:.2f}×"
            f" | {r['verify']} |")
    lines.append(f"\nBaseline recall@1: docstring {baseline['docstring']:.3f}, body {baseline['body']:.3f} (300 pairs).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=minilm.DEFAULT_OUT, help="folder written by `benchmarks.minilm prepare`")
    ap.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model and batch size")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    add_result_option(ap)
    args = ap.parse_args(argv)
    folder = args.out
    if not (folder / "minilm.onnx").is_file():
        minilm.prepare(folder)
    out_dir = folder / "fidelity"
    out_dir.mkdir(exist_ok=True)
    pairs = minilm.load_eval_pairs(folder / "eval_pairs.jsonl")
    src, tok = folder / "minilm.onnx", folder / "tokenizer.json"
    baseline = {"docstring": minilm.recall_at_1(src, tok, pairs), "body": minilm.recall_at_1(src, tok, minilm.body_pairs(pairs)),
                "mrr_body": mrr(src, tok, minilm.body_pairs(pairs))}
    names = args.rows or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    results = []
    for name in names:
        pass_name, options, real = ROWS[name] if len(ROWS[name]) == 3 else ("channel_prune", *ROWS[name])
        results.append(run_row(name, options, real, folder, out_dir, baseline, args.runs, pass_name))
        r = results[-1]
        print(f"{name}: retained {r['retained']['docstring']:.3f}/{r['retained']['body']:.3f} b8 {r['speedup_b8']:.2f}x "
              f"verify {r['verify']} ({r['optimize_s']} s)", file=sys.stderr, flush=True)
    text = table(results, baseline)
    print(text)
    save_markdown(args.result, text, notes=text.split("\n\n", 1)[1])
    if args.json:
        args.json.write_text(json.dumps({"baseline": baseline, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
