"""SparseAttention vs dense attention on ONNX Runtime CPU (B=1, H=8, D=64, fp32).

Variants: the dense MatMul→Softmax→MatMul chain (opset 18, the baseline), the standard ``Attention`` op (opset 23),
``sliding_window`` w=256 and ``block_topk`` b=64 k=8, for N in {1024, 4096, 16384}.

Per N, every variant's session lives in one process and runs are interleaved (variant order rotated each
repetition); the table shows the median. ``pred`` is the FLOPs-predicted speedup (dense attention FLOPs /
FLOPs the sparse body executes, ``graphprune.ops.sparse_attention.attention_flops``); ``eff`` = measured speedup /
predicted. Peak memory is the process's VmHWM in a fresh subprocess per (N, variant) that builds the model, runs it
twice and exits (it includes the Python + ORT baseline, about 150 MB). Intra-op spinning is off; the ORT CPU
arena is on (with it off, every dense 16k run page-faults 17 GB afresh and takes 3x longer). At N = 16384 the
dense chain and the Attention op are timed in two groups one after the other (see ``time_group``).

Run: ``flock /tmp/gp_bench.lock flock /tmp/gp_bigmem.lock python benchmarks/bench_sparse_attention.py``
(the 16k dense variants need about 17 GB; ``--ns 1024 4096`` skips them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphprune.ops import add_function
from graphprune.ops import sparse_attention as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file or with -m

from benchmarks.results import Table, add_result_option  # noqa: E402

B, H, D = 1, 8, 64
VARIANTS = {
    "dense_chain": None,
    "attention_op": None,
    "sliding_w256": {"pattern": "sliding_window", "window": 256},
    "topk_b64_k8": {"pattern": "block_topk", "block_size": 64, "topk": 8},
}


def _value(name: str, n: int) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape([B, H, n, D]), type=ir.TensorType(ir.DataType.FLOAT))


def build(variant: str, n: int) -> bytes:
    q, k, v = _value("q", n), _value("k", n), _value("v", n)
    scale = 1.0 / np.sqrt(D)
    opset = 18
    if variant == "dense_chain":
        kt = ir.node("Transpose", [k], {"perm": [0, 1, 3, 2]})
        qk = ir.node("MatMul", [q, kt.outputs[0]])
        c = ir.node("Constant", [], {"value": ir.tensor(np.float32(scale))})
        sc = ir.node("Mul", [qk.outputs[0], c.outputs[0]])
        sm = ir.node("Softmax", [sc.outputs[0]], {"axis": -1})
        out = ir.node("MatMul", [sm.outputs[0], v])
        nodes = [kt, qk, c, sc, sm, out]
    elif variant == "attention_op":
        out = ir.node("Attention", [q, k, v], {"scale": float(scale)})
        nodes, opset = [out], 23
    else:
        attrs = sa.normalize(seq_len=n, scale=scale, **VARIANTS[variant])
        out, fn = sa.make_node(q, k, v, attrs)
        nodes = [out]
    out.outputs[0].name = "y"
    graph = ir.Graph([q, k, v], [out.outputs[0]], nodes=nodes, opset_imports={"": opset})
    model = ir.Model(graph, ir_version=10)
    if variant not in ("dense_chain", "attention_op"):
        add_function(model, fn)
    return ir.serde.serialize_model(model).SerializeToString()


def session(variant: str, n: int, arena: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = arena
    so.log_severity_level = 3
    return ort.InferenceSession(build(variant, n), so, providers=["CPUExecutionProvider"])


def feeds(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((B, H, n, D)).astype(np.float32) for name in "qkv"}


def predicted(variant: str, n: int) -> float:
    if variant in ("dense_chain", "attention_op"):
        return 1.0
    attrs = sa.normalize(seq_len=n, scale=1.0, **VARIANTS[variant])
    executed, dense = sa.attention_flops(attrs, B, H, D, D)
    return dense / executed


def peak_mb(variant: str, n: int) -> float:
    """VmHWM of a fresh process that builds and runs one variant twice."""
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from benchmarks.bench_sparse_attention import session, feeds;"
        f"s = session({variant!r}, {n}); f = feeds({n}); s.run(None, f); s.run(None, f);"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def _interleave(names: list[str], n: int, reps: int, warmup: int) -> dict[str, list[float]]:
    sessions = {name: session(name, n) for name in names}
    f = feeds(n)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, f)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            sessions[name].run(None, f)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def time_group(n: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timings of every variant at length n (one process).

    At N >= 16384 the two dense sessions cannot both keep their arena (17 + 8.6 GB on a 24 GB machine), so two
    interleaved groups run one after the other: [dense chain, sparse...] then [Attention op, sparse...]; the
    sparse timings in the table come from the first group, next to the dense chain they are compared with.
    """
    names = list(VARIANTS)
    if n < 16384:
        return _interleave(names, n, reps, warmup)
    sparse = [x for x in names if VARIANTS[x] is not None]
    times = _interleave(["dense_chain", *sparse], n, reps, warmup)
    times["attention_op"] = _interleave(["attention_op", *sparse], n, reps, warmup)["attention_op"]
    return {name: times[name] for name in names}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", type=int, nargs="*", default=[1024, 4096, 16384])
    p.add_argument("--reps", type=int, default=10, help="timed runs per variant (16384: at most 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    p.add_argument("--json", help="also write the rows as JSON here")
    add_result_option(p)
    a = p.parse_args(argv)
    rows = []
    print(f"ORT {ort.__version__}, B={B} H={H} D={D}, fp32")
    table = Table("| N | variant | median ms | speedup vs dense chain | predicted (FLOPs) | efficiency | peak MB |")
    for n in a.ns:
        big = n >= 16384
        times = time_group(n, reps=min(a.reps, 3) if big else a.reps, warmup=1 if big else 3)
        base = statistics.median(times["dense_chain"])
        for name, ts in times.items():
            med = statistics.median(ts)
            speed, pred = base / med, predicted(name, n)
            mem = float("nan") if a.no_memory else peak_mb(name, n)
            rows.append({"n": n, "variant": name, "median_ms": med, "speedup": speed, "predicted": pred,
                         "efficiency": speed / pred, "peak_mb": mem, "runs": len(ts)})
            table.add(f"| {n} | {name} | {med:.1f} | {speed:.2f}x | {pred:.2f}x | {speed / pred:.2f} | {mem:.0f} |")
    table.save(a.result, description=f"B={B}, H={H}, D={D}, fp32; medians of {a.reps} interleaved runs (3 at N ≥ 16384).")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
