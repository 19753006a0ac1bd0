"""The quality / speed frontier of channel pruning and token drop on all-MiniLM-L6-v2, on the ``body`` retrieval task.

Every row runs ``graphprune.optimize`` on the prepared export (``python -m benchmarks.minilm prepare``) with one
pipeline and the real calibration texts (``calibration.txt``: disjoint from the evaluation pairs; graphprune splits
them into calibration and verification samples), with ``force`` so a row is measured whatever verification says.

The 300 evaluation pairs of the ``body`` task (the query is *not* inside its document) are split, seeded, into a
**selection** split (``--selection`` pairs: what a setting may be chosen on) and a **test** split (the rest: only
reported). Each split is its own retrieval gallery. Per row and split: recall@1 and MRR of the optimized model ÷
the original's. Speed: ORT CPU, batch 8 (the first 8 test documents, up to 256 tokens), every model and the
original in one process, interleaved, medians (``backends.onnxruntime.benchmark``); FLOPs ratio from the report.

Usage::

    python -m benchmarks.minilm prepare
    flock /tmp/gp-heavy.lock python -m benchmarks.bench_frontier [--rows NAME ...] [--json OUT.json]

The table goes to stdout; ``--json`` also writes the rows with the command, date, machine and versions.
``--phase quality`` runs the optimizations and the retrieval scores only (they do not depend on machine load, so
they may run at low priority beside other work); ``--phase speed --json OUT.json`` then times every row that file
holds, in one interleaved benchmark, and writes the speedups back (run that part alone on the machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import minilm

CP = "channel_prune"
MASK = {"search": "mask", "target": "flops"}
#: name -> pipeline: (pass, options) in order (cleanup is appended)
ROWS: dict[str, list[tuple[str, dict]]] = {
    "channels 20% (defaults)": [(CP, {"ratio": 0.2})],
    "channels 30% (defaults)": [(CP, {"ratio": 0.3})],
    "channels 40% (defaults)": [(CP, {"ratio": 0.4})],
    "flops 30% (defaults)": [(CP, {"ratio": 0.3, "target": "flops"})],
    "flops 40% (defaults)": [(CP, {"ratio": 0.4, "target": "flops"})],
    "mask flops 30%": [(CP, {"ratio": 0.3, **MASK})],
    "mask flops 40%": [(CP, {"ratio": 0.4, **MASK})],
    "mask flops 30%, no rearrange": [(CP, {"ratio": 0.3, **MASK, "rearrange": 0})],
    "mask flops 30%, local scores": [(CP, {"ratio": 0.3, **MASK, "unit_score": "local"})],
    "mask flops 30%, no refit": [(CP, {"ratio": 0.3, **MASK, "reconstruct": False})],
    "tokens 0.9": [("token_drop", {"keep_ratio": 0.9})],
    "tokens 0.8": [("token_drop", {"keep_ratio": 0.8})],
    # token_drop first, as the CLI orders --token-keep before --prune-channels: after channel_prune the attention
    # analysis sees different symbolic lengths for queries and keys and token_drop skips every block
    "tokens 0.9 + mask flops 30%": [("token_drop", {"keep_ratio": 0.9}), (CP, {"ratio": 0.3, **MASK})],
    "tokens 0.9 + flops 30% (defaults)": [("token_drop", {"keep_ratio": 0.9}), (CP, {"ratio": 0.3, "target": "flops"})],
    "tokens 0.9 + channels 20% (defaults)": [("token_drop", {"keep_ratio": 0.9}), (CP, {"ratio": 0.2})],
    "tokens 0.9 + mask flops 20%": [("token_drop", {"keep_ratio": 0.9}), (CP, {"ratio": 0.2, **MASK})],
    "mask flops 20%": [(CP, {"ratio": 0.2, **MASK})],
    # the embedding width (the residual stream, which the default leaves whole as the input stem's group) pruned too
    "channels 30%, embedding too": [(CP, {"ratio": 0.3, "ignore_stem": False})],
    "channels 20%, embedding too": [(CP, {"ratio": 0.2, "ignore_stem": False})],
    "flops 30%, embedding too": [(CP, {"ratio": 0.3, "target": "flops", "ignore_stem": False})],
    "flops 40%, embedding too": [(CP, {"ratio": 0.4, "target": "flops", "ignore_stem": False})],
}


def split(n: int, n_selection: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint (selection, test) index arrays over ``n`` pairs."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_selection]), np.sort(perm[n_selection:])


def retrieval(q: np.ndarray, d: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    """recall@1 and MRR of queries ``idx`` against the documents ``idx`` (one gallery per split)."""
    qn = q[idx] / np.maximum(np.linalg.norm(q[idx], axis=1, keepdims=True), 1e-12)
    dn = d[idx] / np.maximum(np.linalg.norm(d[idx], axis=1, keepdims=True), 1e-12)
    s = qn @ dn.T
    rank = (s > np.diag(s)[:, None]).sum(axis=1)
    return {"recall@1": float(np.mean(rank == 0)), "mrr": float(np.mean(1.0 / (1.0 + rank)))}


def evaluate(model, tok, pairs, splits: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    q = minilm.encode(model, tok, [a for a, _ in pairs])
    d = minilm.encode(model, tok, [b for _, b in pairs])
    return {name: retrieval(q, d, idx) for name, idx in splits.items()}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_row(name: str, folder: Path, out_dir: Path, pairs, splits, baseline) -> dict:
    import graphprune as gp
    from graphprune.pipeline import DataConfig

    src, tok = folder / "minilm.onnx", folder / "tokenizer.json"
    data = DataConfig(path=str(folder / "calibration.txt"), tokenizer=str(tok), max_length=256)
    pipe = gp.Pipeline(data=data)
    for pass_name, options in ROWS[name]:
        pipe = pipe.add(pass_name, **options)
    pipe = pipe.add("cleanup")
    out = out_dir / f"{_slug(name)}.onnx"
    t0 = time.perf_counter()
    rep = gp.optimize(src, out, pipe, force=True)
    seconds = time.perf_counter() - t0
    res = evaluate(out, tok, pairs, splits)
    kept = {s: {k: v / baseline[s][k] for k, v in res[s].items()} for s in res}
    infos = {p["name"]: {k: v for k, v in (p.get("info") or {}).items()
                         if k in ("search", "predicted_flops_ratio", "method", "keep_ratio")} for p in rep["passes"]}
    return {"row": name, "pipeline": ROWS[name], "path": str(out), "optimize_s": round(seconds, 1),
            "flops_ratio": rep["flops"]["ratio"], "absolute": res, "retained": kept, "passes": infos,
            "verify": "passed" if rep["verify"]["passed"] else "FAILED"}


def speeds(src: Path, rows: list[dict], tok: Path, docs: list[str], runs: int) -> None:
    """Batch-8 speedup of every row against the original, all sessions in one interleaved benchmark."""
    from graphprune.backends.onnxruntime import benchmark

    feeds = minilm.tokenize(tok, docs[:8], 256)
    lat = benchmark({"original": src, **{r["row"]: r["path"] for r in rows}}, feeds, warmup=3, runs=runs)
    base = lat["original"]["median_ms"]
    for r in rows:
        r["speedup_b8"] = base / lat[r["row"]]["median_ms"]
        r["median_ms"] = lat[r["row"]]["median_ms"]
    rows.append({"row": "original", "median_ms": base})


def _speed_phase(args) -> int:
    if args.json is None or not args.json.is_file():
        print("error: --phase speed needs --json FILE written by --phase quality", file=sys.stderr)
        return 2
    doc = json.loads(args.json.read_text())
    names = {r["row"] for r in doc["rows"]}
    for extra in args.merge:  # quality runs made in parallel, same split (checked)
        other = json.loads(extra.read_text())
        if other.get("split", doc["split"]) != doc["split"]:
            print(f"error: {extra} was scored on another split", file=sys.stderr)
            return 2
        doc["rows"] += [r for r in other["rows"] if r["row"] not in names and "retained" in r]
        names = {r["row"] for r in doc["rows"]}
    folder = args.out
    pairs = minilm.load_eval_pairs(folder / "eval_pairs.jsonl", task="body")
    rows = [r for r in doc["rows"] if "retained" in r]
    speeds(folder / "minilm.onnx", rows, folder / "tokenizer.json", [pairs[i][1] for i in doc["split"]["test"]],
           args.runs)
    doc["rows"] = rows
    doc["speed"] = {"command": " ".join(["python", "-m", "benchmarks.bench_frontier", *sys.argv[1:]]),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": _machine()}
    doc["speed"]["machine"]["loadavg_end"] = os.getloadavg()
    args.json.write_text(json.dumps(doc, indent=2, default=str))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| pipeline | FLOPs | speedup b8 | recall@1 kept (sel / test) | MRR kept (sel / test) | verify |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "retained" not in r:
            continue
        k = r["retained"]
        speed = f"{r['speedup_b8']:.2f}×" if "speedup_b8" in r else "not timed"
        lines.append(f"| {r['row']} | ×{r['flops_ratio']:.3f} | {speed} "
                     f"| {k['selection']['recall@1']:.1%} / {k['test']['recall@1']:.1%} "
                     f"| {k['selection']['mrr']:.1%} / {k['test']['mrr']:.1%} | {r['verify']} |")
    return "\n".join(lines)


def _machine() -> dict:
    import onnxruntime

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "graphprune_commit": commit}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=minilm.DEFAULT_OUT, help="folder written by `benchmarks.minilm prepare`")
    ap.add_argument("--rows", nargs="*", default=None, help=f"row names (default: all): {list(ROWS)}")
    ap.add_argument("--selection", type=int, default=100, help="pairs in the selection split (the rest: test)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the selection/test split")
    ap.add_argument("--runs", type=int, default=20, help="timed interleaved rounds")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--phase", choices=("all", "quality", "speed"), default="all",
                    help="quality: optimize and score only; speed: time the rows of --json (see module docstring)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="speed: also take the rows of these --phase quality files (written into --json)")
    args = ap.parse_args(argv)
    if args.phase == "speed":
        return _speed_phase(args)
    names = args.rows or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    folder = args.out
    if not (folder / "minilm.onnx").is_file():
        minilm.prepare(folder)
    machine = _machine()
    out_dir = folder / "frontier"
    out_dir.mkdir(exist_ok=True)
    pairs = minilm.load_eval_pairs(folder / "eval_pairs.jsonl", task="body")
    sel, test = split(len(pairs), args.selection, args.seed)
    splits = {"selection": sel, "test": test}
    src, tok = folder / "minilm.onnx", folder / "tokenizer.json"
    baseline = evaluate(src, tok, pairs, splits)
    rows = []
    for name in names:
        rows.append(run_row(name, folder, out_dir, pairs, splits, baseline))
        r = rows[-1]
        if args.json:  # each row as soon as it is measured
            args.json.write_text(json.dumps({"rows": rows, "partial": True}, indent=2, default=str))
        print(f"{name}: FLOPs ×{r['flops_ratio']:.3f} recall kept {r['retained']['selection']['recall@1']:.3f} (sel) "
              f"{r['retained']['test']['recall@1']:.3f} (test) ({r['optimize_s']} s)", file=sys.stderr, flush=True)
    if args.phase == "all":
        speeds(src, rows, tok, [pairs[i][1] for i in test], args.runs)
    machine["loadavg_end"] = os.getloadavg()
    print(table(rows))
    print(f"\nBaseline (body task; selection {len(sel)} / test {len(test)} pairs, seed {args.seed}): "
          + ", ".join(f"{s} recall@1 {baseline[s]['recall@1']:.3f} MRR {baseline[s]['mrr']:.3f}" for s in baseline))
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_frontier", *(argv or sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
            "split": {"selection": sel.tolist(), "test": test.tolist(), "seed": args.seed},
            "baseline": baseline, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
