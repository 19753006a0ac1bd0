"""Dynamic sparse prefill of the decoder trained here: ``vertical_slash`` against an A-shape (sliding window with
sink tokens) and block top-k, at the same budget of keys per query, for N = 2k, 4k and 8k tokens.

The decoder (``benchmarks.llm``: 8 layers, 8 query heads of 32 over 2 KV heads, trained on windows of up to 1,024
tokens) is exported with a dynamic sequence; the ``sparse_attention`` pass rewrites all 8 attention blocks, once per
pattern, and the same graphs run at every N. Budget ``K`` keys per query (default 512):

* ``vertical_slash``: ``K/2`` columns and ``K/2`` keys of block diagonals (``K/128`` blocks of 64, the local one
  included), estimated from the last 64 queries at run time; the causal mask is dropped (the pattern is causal);
* ``a_shape``: ``sliding_window`` causal, ``window = K - 4``, ``num_global = 4`` sink tokens;
* ``block_topk``: blocks of 64, ``topk = K/64`` (the first and the diagonal block among them), over the model's
  causal mask (kept as the node's bias); ``block_topk causal``: the same with ``causal: true``, which routes over
  the blocks up to the query's own and masks later keys itself, so the plain causal mask is dropped;
* ``auto``: per head, the best of the three by recall of the dense attention mass on 4 training windows of 1,024
  tokens (MInference's offline choice; ``pattern: auto``).

Reported per N, on ``--windows`` held-out windows of N tokens (whole held-out modules, never trained on): next-token
accuracy as a share of the dense model's at the same N, perplexity, and top-1 agreement with dense; the whole
prefill's speedup (batch 1, ORT CPU, every model interleaved in one call, median of ``--runs``); and the attention
core's speedup: one block's core alone at ``[1, 8, N, 32]``, the exported dense chain (MatMul, scale, causal-mask
Add, Softmax, MatMul) against the pattern's SparseAttention node as the pass built it, interleaved, median (not for
``auto``, whose blocks hold one node per chosen pattern). Each pattern is timed against dense in fresh processes
(its models in one, its cores in another), so ORT's memory arenas do not pile up: the dense 8k prefill alone needs
about 12 GB; the dense row gives the median over those runs.
``--passkey`` measures instead the share of pass keys retrieved (``benchmarks.llm.passkey_accuracy``: keys at
evenly spread depths in held-out code, all 5 digits right) by the dense model and every pattern at each N, with
``--samples`` keys per N; nothing is timed.

    python -m benchmarks.llm                      # once: train the decoder (about 30 min)
    python -m benchmarks.bench_llm_sparse [--ns 2048 4096 8192] [--budget 512] [--result ...]
    python -m benchmarks.bench_llm_sparse --passkey --ns 1024 2048 [--samples 100] [--result ...]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks import llm
from benchmarks.results import add_result_option, markdown_table, write_result

HEADS, HEAD_DIM = 8, 32
#: training windows of 1,024 tokens the ``auto`` choice is calibrated on
CALIBRATION = 4


def patterns(budget: int) -> dict[str, dict]:
    """The pass configurations at ``budget`` keys per query."""
    return {
        "vertical_slash": {"pattern": "vertical_slash", "vertical": budget // 2, "slash": max(1, budget // 128),
                           "block_size": 64, "last_q": 64},
        "a_shape": {"pattern": "sliding_window", "causal": True, "window": budget - 4, "num_global": 4},
        "block_topk": {"pattern": "block_topk", "block_size": 64, "topk": budget // 64},
        "block_topk_causal": {"pattern": "block_topk", "block_size": 64, "topk": budget // 64, "causal": True},
        "auto": {"pattern": "auto", "budget": budget},
    }


def rewrite(path, config: dict) -> ir.Model:
    from graphprune.io import load_model
    from graphprune.passes import PassContext
    from graphprune.passes.sparse_attention import SparseAttentionPass

    model = load_model(path)
    context = PassContext(calibration=[{"input_ids": w[None]} for w in llm.calibration_windows(CALIBRATION, 1024)],
                          data_source="user") if config["pattern"] == "auto" else None
    result = SparseAttentionPass(config, context)(model)
    if not result.modified or result.skipped:
        raise RuntimeError(f"{config['pattern']}: not every block was rewritten: {result.skipped}")
    label = config["pattern"] if config["pattern"] != "sliding_window" else "a_shape"
    if config.get("causal") and config["pattern"] == "block_topk":
        label = "block_topk causal"
    if config["pattern"] == "auto":
        counts: dict[str, int] = {}
        for heads in result.info["head_patterns"].values():
            for h in heads.values():
                counts[h["pattern"]] = counts.get(h["pattern"], 0) + 1
        label = "auto (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + " heads)"
    return model, label


def core_model(node_attrs: dict | None, with_mask: bool) -> ir.Model:
    """One attention core at a dynamic N: the dense chain (``node_attrs`` None) or a SparseAttention node."""
    from graphprune.ops import add_function
    from graphprune.ops import sparse_attention as sa

    def val(name, shape):
        return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))

    q, k, v = (val(x, [1, HEADS, "N", HEAD_DIM]) for x in "qkv")
    mask = val("mask", [1, 1, "N", "N"])
    inputs = [q, k, v] + ([mask] if with_mask else [])
    fn = None
    if node_attrs is None:
        kt = ir.node("Transpose", [k], {"perm": [0, 1, 3, 2]})
        qk = ir.node("MatMul", [q, kt.outputs[0]])
        c = ir.node("Constant", [], {"value": ir.tensor(np.float32(1 / math.sqrt(HEAD_DIM)))})
        sc = ir.node("Mul", [qk.outputs[0], c.outputs[0]])
        add = ir.node("Add", [sc.outputs[0], mask])
        sm = ir.node("Softmax", [add.outputs[0]], {"axis": -1})
        out = ir.node("MatMul", [sm.outputs[0], v])
        nodes = [kt, qk, c, sc, add, sm, out]
    else:
        out, fn = sa.make_node(q, k, v, node_attrs, bias=mask if with_mask else None)
        nodes = [out]
    out.outputs[0].name = "y"
    model = ir.Model(ir.Graph(inputs, [out.outputs[0]], nodes=nodes, opset_imports={"": 18}), ir_version=10)
    if fn is not None:
        add_function(model, fn)
    return model


def node_of(model: ir.Model) -> tuple[dict, bool]:
    """The first SparseAttention node's attributes and whether it has a bias input."""
    from graphprune.ops import sparse_attention as sa

    node = next(n for n in model.graph if n.op_type == "SparseAttention")
    return sa.attrs_of(node), len(node.inputs) > 3 and node.inputs[3] is not None


def quality(logits_of, windows: np.ndarray) -> dict[str, np.ndarray]:
    """Per window: the argmax predictions and the log-likelihood of each next token."""
    preds, nll = [], []
    for w in windows:
        lg = logits_of(w[None])[0, :-1].astype(np.float64)
        lg -= lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        preds.append(lp.argmax(-1))
        nll.append(-lp[np.arange(len(lp)), w[1:]])
    return {"pred": np.stack(preds), "nll": np.stack(nll)}


def measure_core(n: int, name: str, budget: int, core_runs: int) -> dict[str, float]:
    """Median ms of the dense attention core and of ``name``'s (the node as the pass built it), interleaved."""
    from graphprune.backends.onnxruntime import benchmark, make_session

    cores = {"dense": core_model(None, True),
             name: core_model(*node_of(rewrite(llm.get_decoder(), patterns(budget)[name])[0]))}
    sessions = {k: make_session(m, threads=2) for k, m in cores.items()}
    rng = np.random.default_rng(n)
    feeds = {x: rng.standard_normal((1, HEADS, n, HEAD_DIM)).astype(np.float32) for x in "qkv"}
    feeds["mask"] = np.where(np.tril(np.ones((n, n), dtype=bool)), 0, np.finfo(np.float32).min
                             ).astype(np.float32)[None, None]
    lat = benchmark(sessions, feeds, warmup=2, runs=core_runs)
    return {k: v["median_ms"] for k, v in lat.items()}


def measure_model(n: int, name: str, budget: int, windows: int, runs: int, dense_file: str) -> dict:
    """``name``'s quality and the prefill ms of it and of dense (interleaved); the dense quality is computed once
    per N and kept in ``dense_file`` (.npz) for the other patterns' processes."""
    from graphprune.backends.onnxruntime import benchmark, make_session
    from graphprune.io import load_model

    path = llm.get_decoder()
    model, label = rewrite(path, patterns(budget)[name])
    sessions = {"dense": make_session(load_model(path), threads=2), name: make_session(model, threads=2)}
    ids = llm.eval_windows(windows, n)
    q = {}
    if Path(dense_file).exists():
        with np.load(dense_file) as f:
            q["dense"] = {"pred": f["pred"], "nll": f["nll"]}
    for k, sess in sessions.items():
        if k not in q:
            t0 = time.perf_counter()
            q[k] = quality(lambda x, s=sess: s.run(None, {"input_ids": x})[0], ids)
            print(f"N={n} {k}: quality in {time.perf_counter() - t0:.0f} s", flush=True)
    if not Path(dense_file).exists():
        np.savez(dense_file, **q["dense"])
    lat = benchmark(sessions, {"input_ids": ids[:1]}, warmup=1, runs=runs)
    out = {"label": label, "dense_ms": lat["dense"]["median_ms"], "ms": lat[name]["median_ms"]}
    for k in ("dense", name):
        out[k] = {"acc": float((q[k]["pred"] == ids[:, 1:]).mean()),
                  "agree": float((q[k]["pred"] == q["dense"]["pred"]).mean()),
                  "ppl": math.exp(float(q[k]["nll"].mean()))}
    return out


def rows_for(n: int, models: dict[str, dict], cores: dict[str, dict]) -> list[list[str]]:
    """The table rows of one N from the pair measurements (each pattern against dense in its own process)."""
    first = next(iter(models.values()))
    dense = first["dense"]
    dense_ms = float(np.median([m["dense_ms"] for m in models.values()]))
    dense_core = float(np.median([c["dense"] for c in cores.values()])) if cores else None
    rows = [[str(n), "dense", f"{100 * dense['acc']:.2f}%", "100.0%", f"{dense['ppl']:.1f}", "100.0%",
             f"{dense_ms / 1e3:.2f}", "1.00x", f"{dense_core:.1f}" if dense_core else "—", "1.00x"]]
    for name, m in models.items():
        r = m[name]
        core = cores.get(name)
        rows.append([str(n), m["label"], f"{100 * r['acc']:.2f}%", f"{100 * r['acc'] / dense['acc']:.1f}%",
                     f"{r['ppl']:.1f}", f"{100 * r['agree']:.1f}%", f"{m['ms'] / 1e3:.2f}",
                     f"{m['dense_ms'] / m['ms']:.2f}x", f"{core[name]:.1f}" if core else "—",
                     f"{core['dense'] / core[name]:.2f}x" if core else "—"])
    return rows


def _child(args: list[str], n: int):
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_llm_sparse", *args], capture_output=True, text=True,
                         check=False)
    found = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
    if res.returncode != 0 or not found:
        raise RuntimeError(f"N={n} failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    for ln in res.stdout.splitlines():
        if not ln.startswith("ROWS "):
            print(ln, flush=True)
    return json.loads(found[0][5:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--budget", type=int, default=512, help="keys per query (default 512)")
    p.add_argument("--windows", type=int, default=2, help="held-out windows per N (default 2)")
    p.add_argument("--runs", type=int, default=3, help="interleaved prefill runs per N (default 3)")
    p.add_argument("--core-runs", type=int, default=10, help="interleaved attention-core runs per N (default 10)")
    p.add_argument("--patterns", nargs="+", default=None, help="only these (default: every pattern)")
    p.add_argument("--passkey", action="store_true", help="pass key retrieval by pattern and N (nothing timed)")
    p.add_argument("--samples", type=int, nargs="+", default=[100],
                   help="--passkey: keys per N (default 100; one value, or one per --ns)")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # (model|core, N, pattern): JSON out
    p.add_argument("--dense-file", default=None, help=argparse.SUPPRESS)
    add_result_option(p)
    a = p.parse_args(argv)
    if a.child is not None:
        part, n, name = a.child[0], int(a.child[1]), a.child[2]
        out = measure_core(n, name, a.budget, a.core_runs) if part == "core" else \
            measure_model(n, name, a.budget, a.windows, a.runs, a.dense_file)
        print("ROWS " + json.dumps(out), flush=True)
        return
    if a.passkey and len(a.samples) not in (1, len(a.ns)):
        p.error("--samples: one value, or one per --ns")
    t_start = time.perf_counter()
    llm.get_decoder()
    if a.passkey:
        return passkey_table(a, t_start)
    rows = []
    common = ["--budget", str(a.budget), "--windows", str(a.windows), "--runs", str(a.runs),
              "--core-runs", str(a.core_runs)]
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.ns:  # each pattern against dense in its own processes: ORT's arenas of several N x N models do
            dense_file = str(Path(tmp) / f"dense_{n}.npz")  # not pile up (8k: dense prefill ~12 GB, core ~8 GB)
            models, cores = {}, {}
            for name, cfg in patterns(a.budget).items():
                if a.patterns and name not in a.patterns:
                    continue
                models[name] = _child(["--child", "model", str(n), name, "--dense-file", dense_file, *common], n)
                if cfg["pattern"] != "auto":  # auto: several nodes per block (timed in the whole prefill only)
                    cores[name] = _child(["--child", "core", str(n), name, *common], n)
            rows += rows_for(n, models, cores)
            for r in rows[-len(models) - 1:]:
                print(" | ".join(r), flush=True)
    cols = ["N", "attention", "next-token acc", "acc kept", "perplexity", "top-1 = dense", "prefill s",
            "prefill speedup", "core ms", "core speedup"]
    print(markdown_table(cols, rows))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.result:
        write_result(a.result, cols, rows, description=(
            f"benchmarks/bench_llm_sparse.py: the decoder trained here (benchmarks/llm.py; trained on windows of up to "
            f"1,024 tokens), every attention block rewritten by the sparse_attention pass at a budget of {a.budget} "
            f"keys per query: vertical_slash (vertical {a.budget // 2}, slash {max(1, a.budget // 128)} blocks of 64, "
            f"estimated from the last 64 queries), a_shape (causal window {a.budget - 4} + 4 sink tokens), "
            f"block_topk (blocks of 64, top {a.budget // 64}, over the causal mask; 'causal': causal: true, the mask "
            f"dropped), and auto (each head's best of "
            f"the three by recall of the dense attention mass on {CALIBRATION} training windows of 1,024 tokens; "
            f"its core is several nodes per block, timed in the prefill only). Quality on {a.windows} held-out "
            f"windows of N tokens per N (acc kept: share of dense next-token accuracy at the same N). Prefill: batch "
            f"1, ORT CPU, 2 threads, all models interleaved, median of {a.runs}. Core: one attention core "
            f"[1, 8, N, 32] alone (dense chain with the causal mask vs the SparseAttention node), interleaved, median "
            f"of {a.core_runs}. Each pattern is measured against dense in its own processes (dense figures: the "
            f"median over them)."))


def passkey_table(a, t_start: float) -> None:
    """``--passkey``: one row per N, the share of keys each model retrieves."""
    path = llm.get_decoder()
    models = {"dense": str(path)}
    for name, cfg in patterns(a.budget).items():
        if not a.patterns or name in a.patterns:
            model, label = rewrite(path, cfg)
            models[label] = model
    samples = dict(zip(a.ns, a.samples * len(a.ns) if len(a.samples) == 1 else a.samples))
    rows = []
    for n in a.ns:
        row = [f"{n:,}", str(samples[n])]
        for label, model in models.items():
            acc = llm.passkey_accuracy(model, n, n=samples[n], batch=1)  # one session at a time (8k arenas)
            row.append(f"{100 * acc:.0f}%")
            print(f"N={n} {label}: {100 * acc:.0f}%", flush=True)
        rows.append(row)
    cols = ["N", "keys", *models]
    print(markdown_table(cols, rows))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.result:
        write_result(a.result, cols, rows, description=(
            f"benchmarks/bench_llm_sparse.py --passkey: share of the pass keys (the 'keys' column; 5 digits, all right, at evenly "
            f"spread depths in held-out code) the decoder trained here retrieves at N tokens, dense and with every "
            f"attention block rewritten by the sparse_attention pass at {a.budget} keys per query (the patterns of "
            f"the speed table). The model was trained on windows of up to 1,024 tokens."))


if __name__ == "__main__":
    main()
