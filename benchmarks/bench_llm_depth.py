"""Depth pruning of the decoder trained here (``benchmarks.llm``), training-free, on its prefill + decode-step pair.

For each setting (unit, importance, units removed): ``graphprune.decoder.depth_prune_pair`` measures importance on
the prefill graph over ``--calibration`` windows of 512 training tokens and removes the same units, with their KV
cache, from both graphs. Reported, on the held-out modules (49k tokens): next-token accuracy as a share of the
unpruned model's, perplexity, passkey accuracy at 1,024 tokens (the training length; 100 keys at evenly spread
depths; only when the unpruned model retrieves any); FLOPs cut of the prefill graph (static count, batch 1, sequence 1,024); prefill speedup (batch 1, 1,024
tokens) and decode-step speedup (batch 1, one token after a 1,024-token cache) on ORT CPU, the original and the
pruned graph interleaved in one process, medians over ``--repeats`` feeds. A generation of 16 tokens from the
pruned pair checks that the cache one graph writes fits the other.

    python -m benchmarks.llm                  # once: train the decoder (about 30 min)
    python -m benchmarks.bench_llm_depth --depth-only [--repeats 3] [--runs 10] [--result benchmarks/results/depth_llm.json]
    python -m benchmarks.bench_llm_depth --width-only --result benchmarks/results/width_llm.json

Width rows: ``graphprune.decoder.channel_prune_pair`` removes 10-40% of the channels of every group the data-aware
allocation picks (the MLPs' hidden units and the attention heads in whole KV groups; activation importance,
measured sensitivity, least-squares refit, from the same calibration windows) from both graphs, the KV cache with
the heads, alone and followed by one block (FinerCut's output criterion).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks import llm
from benchmarks.results import add_result_option, markdown_table, write_result

SETTINGS = [  # (unit, importance, ratio): ratio of the 8 blocks (or of the 16 branches)
    ("block", "angular", 1 / 8), ("block", "angular", 2 / 8), ("block", "angular", 3 / 8),
    ("block", "output", 1 / 8), ("block", "output", 2 / 8), ("block", "output", 3 / 8),
    ("sublayer", "output", 2 / 16), ("sublayer", "output", 4 / 16), ("sublayer", "output", 6 / 16),
]
#: width pruning of the pair (``channel_prune_pair``: MLP units and KV head groups, data-aware), alone and then with one
#: block removed (FinerCut's output criterion)
WIDTH = [0.1, 0.2, 0.3, 0.4]
COMBINED = [(0.2, 1 / 8), (0.3, 1 / 8)]
SEQ = 1024


def _speedup(a, b, feeds, runs: int) -> float:
    from graphprune.backends.onnxruntime import benchmark

    ratios = []
    for f in feeds:
        lat = benchmark({"before": a, "after": b}, f, runs=runs)
        ratios.append(lat["before"]["median_ms"] / lat["after"]["median_ms"])
    return float(np.median(ratios))


def _decode_feeds(prefill: Path, windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One decode step after each window: the next token and the cache the prefill graph wrote for the window."""
    from graphprune.backends.onnxruntime import make_session

    sess = make_session(str(prefill))
    names = [o.name for o in sess.get_outputs()]
    feeds = []
    for w in windows:
        out = dict(zip(names, sess.run(None, {"input_ids": w[None, :-1]})))
        feed = {"input_ids": w[None, -1:]}
        feed.update({n.replace("present", "past_key_values", 1): v for n, v in out.items() if n != "logits"})
        feeds.append(feed)
    return feeds


def _quality(prefill, windows: np.ndarray, passkey: bool) -> dict[str, float]:
    q = llm.next_token_metrics(prefill, windows)
    q["passkey"] = llm.passkey_accuracy(prefill, SEQ) if passkey else None
    return q


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def main(argv: list[str] | None = None) -> None:
    from graphprune.analysis.flops import count_flops
    from graphprune.decoder import channel_prune_pair, depth_prune_pair, generate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed feeds (medians over them)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per model and feed")
    p.add_argument("--calibration", type=int, default=8, help="calibration windows of 512 training tokens")
    p.add_argument("--width-only", action="store_true", help="only the width (and width + depth) rows")
    p.add_argument("--depth-only", action="store_true", help="only the depth rows")
    add_result_option(p)
    a = p.parse_args(argv)
    pre, dec = llm.get_pair()
    windows = llm.eval_windows()
    calib = [{"input_ids": w[None]} for w in llm.calibration_windows(a.calibration)]
    timed = [{"input_ids": w[None]} for w in windows[:a.repeats]]
    step_feeds = _decode_feeds(pre, np.concatenate([windows[:a.repeats], windows[1:a.repeats + 1, :1]], axis=1))
    base = _quality(pre, windows, passkey=True)
    passkey = base["passkey"] > 0  # a model that never retrieves the key: the column would say nothing
    dims = {"batch": 1, "seq": SEQ}
    flops0 = count_flops(ir.load(pre), batch=1, dims=dims).flops
    print(f"unpruned: next-token accuracy {base['next_token_accuracy']:.4f}, perplexity {base['perplexity']:.2f}, "
          f"passkey@{SEQ} {base['passkey']:.2f}" + ("" if passkey else " (not measured after pruning)"), flush=True)
    rows = [["—", "—", "0", "—", "100.0%", f"{base['perplexity']:.2f}", _pct(base["passkey"]),
             "1.00×", "1.00×", "1.00×", "—"]]
    prompt = windows[-1:, :64]
    runs = [("depth", s_) for s_ in (SETTINGS if not a.width_only else [])]
    if not a.depth_only:
        runs += [("width", w) for w in WIDTH] + [("both", c) for c in COMBINED]
    for kind, setting in runs:
        t = time.perf_counter()
        if kind == "depth":
            unit, importance, ratio = setting
            p2, d2, info = depth_prune_pair(pre, dec, {"ratio": ratio, "unit": unit, "importance": importance}, calib)
            removed = ", ".join(info["removed"])
        else:
            width, depth = (setting, None) if kind == "width" else setting
            p2, d2, cinfo = channel_prune_pair(pre, dec, {"ratio": width}, calib)
            unit, importance, ratio = f"channels {100 * width:.0f}%", "data-aware", f"{width:.2f}"
            removed = f"{cinfo['pair_groups']} groups pruned"
            if depth is not None:
                p2, d2, info = depth_prune_pair(p2, d2, {"ratio": depth, "unit": "block", "importance": "output"},
                                                calib)
                unit, ratio = f"{unit} + block", f"{width:.2f} + {depth:.3f}"
                removed += "; " + ", ".join(info["removed"])
        secs = time.perf_counter() - t
        generate(p2, d2, prompt, 16)  # raises when a cache does not fit
        q = _quality(p2, windows, passkey)
        flops = flops0 / count_flops(p2, batch=1, dims=dims).flops
        sp = _speedup(pre, p2, timed, a.runs)
        sd = _speedup(dec, d2, step_feeds, 5 * a.runs)
        row = [unit, importance, ratio if isinstance(ratio, str) else f"{ratio:.3f}", removed,
               f"{100 * q['next_token_accuracy'] / base['next_token_accuracy']:.1f}%", f"{q['perplexity']:.2f}",
               _pct(q["passkey"]), f"{flops:.2f}×", f"{sp:.2f}×", f"{sd:.2f}×", f"{secs:.1f}"]
        print(" | ".join(row), flush=True)
        rows.append(row)
    cols = ["unit", "importance", "ratio", "removed", "next-token acc kept", "perplexity", f"passkey@{SEQ}",
            "FLOPs cut", f"prefill speedup (N={SEQ})", "decode-step speedup", "prune s"]
    print(markdown_table(cols, rows))
    if a.result:
        m = llm.meta()
        write_result(a.result, cols, rows, description=(
            f"The decoder trained here (benchmarks/llm.py: Llama-style, 8 layers, width 256, GQA 8/2, "
            f"{m['train_seconds'] / 60:.0f} min on 2 CPU cores) as a prefill + decode-step pair; held-out stdlib "
            f"modules ({windows.size} tokens; unpruned next-token accuracy {base['next_token_accuracy']:.4f}, "
            f"perplexity {base['perplexity']:.2f}). Training-free depth (and width: MLP units and KV head groups, data-aware, refitted) pruning of both graphs with importance from "
            f"{len(calib)} windows of 512 training tokens. Speedups: batch 1, ORT CPU, interleaved, median of "
            f"{a.repeats} feeds x {a.runs} runs (decode step: {5 * a.runs} runs, one token after a {SEQ}-token "
            f"cache)."))


if __name__ == "__main__":
    main()
