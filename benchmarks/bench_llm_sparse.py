"""Dynamic sparse prefill of the decoder trained here: ``vertical_slash`` against an A-shape (sliding window with
sink tokens) and block top-k, at the same budget of keys per query, for N = 2k, 4k and 8k tokens.

The decoder (``benchmarks.llm``: 8 layers, 8 query heads of 32 over 2 KV heads, trained on windows of up to 1,024
tokens) is exported with a dynamic sequence; the ``sparse_attention`` pass rewrites all 8 attention blocks, once per
pattern, and the same graphs run at every N. Budget ``K`` keys per query (default 512):

* ``vertical_slash``: ``K/2`` columns and ``K/2`` keys of block diagonals (``K/128`` blocks of 64, the local one
  included), estimated from the last 64 queries at run time; the causal mask is dropped (the pattern is causal);
* ``a_shape``: ``sliding_window`` causal, ``window = K - 4``, ``num_global = 4`` sink tokens;
* ``block_topk``: blocks of 64, ``topk = K/64`` (the first and the diagonal block among them), over the model's
  causal mask (kept as the node's bias).

Reported per N, on ``--windows`` held-out windows of N tokens (whole held-out modules, never trained on): next-token
accuracy as a share of the dense model's at the same N, perplexity, and top-1 agreement with dense; the whole
prefill's speedup (batch 1, ORT CPU, every model interleaved in one call, median of ``--runs``); and the attention
core's speedup: one block's core alone at ``[1, 8, N, 32]``, the exported dense chain (MatMul, scale, causal-mask
Add, Softmax, MatMul) against the pattern's SparseAttention node as the pass built it, interleaved, median.
Passkey accuracy is not reported: the trained decoder retrieves no pass key even dense (docs/llm.md).

    python -m benchmarks.llm                      # once: train the decoder (about 30 min)
    python -m benchmarks.bench_llm_sparse [--ns 2048 4096 8192] [--budget 512] [--result ...]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import onnx_ir as ir

from benchmarks import llm
from benchmarks.results import add_result_option, markdown_table, write_result

HEADS, HEAD_DIM = 8, 32


def patterns(budget: int) -> dict[str, dict]:
    """The pass configurations at ``budget`` keys per query."""
    return {
        "vertical_slash": {"pattern": "vertical_slash", "vertical": budget // 2, "slash": max(1, budget // 128),
                           "block_size": 64, "last_q": 64},
        "a_shape": {"pattern": "sliding_window", "causal": True, "window": budget - 4, "num_global": 4},
        "block_topk": {"pattern": "block_topk", "block_size": 64, "topk": budget // 64},
    }


def rewrite(path, config: dict) -> ir.Model:
    from graphprune.io import load_model
    from graphprune.passes.sparse_attention import SparseAttentionPass

    model = load_model(path)
    result = SparseAttentionPass(config)(model)
    if not result.modified or result.skipped:
        raise RuntimeError(f"{config['pattern']}: not every block was rewritten: {result.skipped}")
    return model


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--budget", type=int, default=512, help="keys per query (default 512)")
    p.add_argument("--windows", type=int, default=2, help="held-out windows per N (default 2)")
    p.add_argument("--runs", type=int, default=3, help="interleaved prefill runs per N (default 3)")
    p.add_argument("--core-runs", type=int, default=10, help="interleaved attention-core runs per N (default 10)")
    add_result_option(p)
    a = p.parse_args(argv)
    from graphprune.backends.onnxruntime import benchmark, make_session

    t_start = time.perf_counter()
    from graphprune.io import load_model

    path = llm.get_decoder()
    configs = patterns(a.budget)
    models = {"dense": load_model(path)} | {name: rewrite(path, cfg) for name, cfg in configs.items()}
    sessions = {name: make_session(m, threads=2) for name, m in models.items()}
    cores = {"dense": core_model(None, True)}
    for name in configs:
        attrs, with_mask = node_of(models[name])
        cores[name] = core_model(attrs, with_mask)
    core_sessions = {name: make_session(m, threads=2) for name, m in cores.items()}
    rows = []
    for n in a.ns:
        windows = llm.eval_windows(a.windows, n)
        q = {}
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            q[name] = quality(lambda ids, s=sess: s.run(None, {"input_ids": ids})[0], windows)
            print(f"N={n} {name}: quality in {time.perf_counter() - t0:.0f} s", flush=True)
        lat = benchmark(sessions, {"input_ids": windows[:1]}, warmup=1, runs=a.runs)
        rng = np.random.default_rng(n)
        feeds = {x: rng.standard_normal((1, HEADS, n, HEAD_DIM)).astype(np.float32) for x in "qkv"}
        feeds["mask"] = np.where(np.tril(np.ones((n, n), dtype=bool)), 0, np.finfo(np.float32).min
                                 ).astype(np.float32)[None, None]
        core = benchmark(core_sessions, feeds, warmup=2, runs=a.core_runs)
        dense_acc = float((q["dense"]["pred"] == windows[:, 1:]).mean())
        for name in models:
            acc = float((q[name]["pred"] == windows[:, 1:]).mean())
            agree = float((q[name]["pred"] == q["dense"]["pred"]).mean())
            ppl = math.exp(float(q[name]["nll"].mean()))
            pre = lat["dense"]["median_ms"] / lat[name]["median_ms"]
            att = core["dense"]["median_ms"] / core[name]["median_ms"]
            rows.append([str(n), name, f"{100 * acc:.2f}%", f"{100 * acc / dense_acc:.1f}%", f"{ppl:.1f}",
                         f"{100 * agree:.1f}%", f"{lat[name]['median_ms'] / 1e3:.2f}", f"{pre:.2f}x",
                         f"{core[name]['median_ms']:.1f}", f"{att:.2f}x"])
            print(" | ".join(rows[-1]), flush=True)
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
            f"block_topk (blocks of 64, top {a.budget // 64}, over the causal mask). Quality on {a.windows} held-out "
            f"windows of N tokens per N (acc kept: share of dense next-token accuracy at the same N). Prefill: batch "
            f"1, ORT CPU, 2 threads, all models interleaved, median of {a.runs}. Core: one attention core "
            f"[1, 8, N, 32] alone (dense chain with the causal mask vs the SparseAttention node), interleaved, median "
            f"of {a.core_runs}."))


if __name__ == "__main__":
    main()
