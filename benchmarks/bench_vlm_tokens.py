"""Image-token pruning on the VLM trained here (``benchmarks.vlm``): each method and stage at 50%, 25%, 11% and 5%
of the 64 image tokens kept.

Settings (``token_drop`` with ``scope: image``, then ``cleanup``, training-free):
  * ``FasterVLM``: ``stage: projector``, ``method: cls_attention`` (the vision tower's [CLS] attention);
  * ``received attention``: the same with ``query: mean``: the attention each patch receives in that layer, mean
    over every query row and head (the score LLaVA-style models without a [CLS] token get);
  * ``DivPrune``: ``stage: projector``, ``method: diversity`` (max-min diversity of the projected features);
  * ``HiPrune``: ``stage: projector``, ``method: hiprune``: anchors by the attention received in the middle live
    vision layer (10% of the budget), their 4 grid neighbours, the rest by the last live layer's;
  * ``FastV``: ``stage: decoder``, ``layers: [1]`` (after the second of the 4 decoder layers; FastV's K = 2 of 32
    on LLaVA-1.5 leaves less of the decoder unpruned), the last token's attention;
  * ``PyramidDrop``: ``stage: decoder``, ``layers: [0, 1, 2]``, each stage keeping the cube root of the share, so
    that the last layer sees the share the row names.

Reported: answer accuracy on the 1,200 held-out scenes (overall and by question type) and as a share of the
unpruned model's; FLOPs of the graph (batch 1; shapes static inference misses are measured in one ORT run)
against the original; prefill speedup on ORT CPU
(batch ``--batch``, the original and the pruned graph interleaved in one process, medians of ``--runs`` runs over
``--repeats`` feeds, the median of the ratios); decode: one step of the language model's decode graph
(``position_ids`` input, a past length per layer) after the pruned prefill graph with its KV cache
(``vlm.get_pair``), ms per token at batch ``--batch`` and the cache length (shortest–longest after a decoder-stage
drop, which leaves the first layers' caches whole), interleaved with the step after the unpruned prefill.

    python -m benchmarks.vlm                          # once: train the VLM (about 30 min)
    python -m benchmarks.bench_vlm_tokens [--result benchmarks/results/vlm_tokens.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks import vlm
from benchmarks.results import add_result_option, markdown_table, write_result

SETTINGS = [("FasterVLM", dict(stage="projector", method="cls_attention")),
            ("received attention", dict(stage="projector", method="cls_attention", query="mean")),
            ("DivPrune", dict(stage="projector", method="diversity")),
            ("HiPrune", dict(stage="projector", method="hiprune")),
            ("FastV (K=1)", dict(stage="decoder", method="cls_attention", layers=[1])),
            ("PyramidDrop (K=0,1,2)", dict(stage="decoder", method="cls_attention", layers=[0, 1, 2]))]
RATIOS = (0.5, 0.25, 0.11, 0.05)


def prune(src: Path, out: Path, keep: float, **cfg) -> dict:
    """``token_drop`` (``scope: image``) then ``cleanup`` on ``src``, saved to ``out``; the pass record."""
    from graphprune.passes.cleanup import CleanupPass
    from graphprune.passes.token_drop import TokenDropPass

    model = ir.load(str(src))
    result = TokenDropPass(dict(scope="image", keep_ratio=keep, **cfg))(model)
    if not result.modified or result.skipped:
        raise RuntimeError("; ".join(f"{s.where}: {s.reason}" for s in result.skipped) or "nothing changed")
    CleanupPass()(model)
    ir.save(model, out, external_data=out.name + ".data")
    return result.info


def _speedup(a: Path, b: Path, feeds, runs: int) -> float:
    from graphprune.backends.onnxruntime import benchmark

    ratios = []
    for f in feeds:
        lat = benchmark({"before": str(a), "after": str(b)}, f, runs=runs)
        ratios.append(lat["before"]["median_ms"] / lat["after"]["median_ms"])
    return float(np.median(ratios))


def _caches(prefill: Path, feed: dict) -> tuple[dict, str]:
    """The decode step's feed after ``prefill`` ran on ``feed``: the cache, the next token, its position; and the
    cache length (``shortest–longest`` when the layers' differ: a decoder-stage drop)."""
    from graphprune.backends.onnxruntime import make_session

    sess = make_session(str(prefill))
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feed)))
    logits = out.pop("logits")
    nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    step = {"input_ids": nxt, "position_ids": np.full_like(nxt, logits.shape[1])}
    step.update({k.replace("present", "past_key_values", 1): v for k, v in out.items()})
    lengths = sorted({v.shape[2] for v in out.values()})
    return step, "–".join(str(n) for n in (lengths[0], lengths[-1]) if n) if len(lengths) > 1 else str(lengths[0])


def decode_ms(decode: Path, feeds: list[dict], runs: int) -> list[float]:
    """Median ms of one decode step for each feed, the feeds interleaved in one session."""
    import time

    from graphprune.backends.onnxruntime import make_session

    sess = make_session(str(decode))
    for f in feeds:
        sess.run(None, f)
    times: list[list[float]] = [[] for _ in feeds]
    for _ in range(runs):
        for i, f in enumerate(feeds):
            t0 = time.perf_counter()
            sess.run(None, f)
            times[i].append(1e3 * (time.perf_counter() - t0))
    return [float(np.median(t)) for t in times]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=vlm.DEFAULT_OUT)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    p.add_argument("--steps", type=int, default=None, help="the VLM's training steps (a smoke run with --out)")
    add_result_option(p)
    a = p.parse_args(argv)
    from graphprune.backends.onnxruntime import measure_flops

    cfg = dict(vlm.CONFIG, steps=a.steps) if a.steps else None
    src = vlm.get_vlm(a.out, cfg)
    work = a.out / "bench"
    work.mkdir(exist_ok=True)
    base = vlm.accuracy(src)
    f0 = measure_flops(ir.load(str(src))).flops
    d = vlm.scenes(a.batch * a.repeats, seed=11)
    feeds = [{"pixel_values": d["pixel_values"][i * a.batch:(i + 1) * a.batch],
              "input_ids": d["input_ids"][i * a.batch:(i + 1) * a.batch]} for i in range(a.repeats)]
    pre, dec = vlm.get_pair(a.out, cfg)
    full_step, full_len = _caches(pre, feeds[0])
    cols = ["method", "stage", "image tokens kept", "accuracy", "kept", *vlm.TYPES, "FLOPs", "prefill speedup",
            "decode ms/token (cache)"]
    rows = [["unpruned", "-", "64 (100%)", f"{100 * base['all']:.1f}%", "100%",
             *(f"{100 * base[t]:.1f}%" for t in vlm.TYPES), "1.00×", "1.00×",
             f"{decode_ms(dec, [full_step], a.runs * 2)[0]:.2f} ({full_len})"]]
    print(markdown_table(cols, rows))
    for keep in a.ratios:
        for label, cfg in SETTINGS:
            out = work / f"{label.split()[0].lower()}_{keep:g}.onnx"
            stage_keep = keep ** (1 / len(cfg["layers"])) if len(cfg.get("layers", [])) > 1 else keep
            try:
                info = prune(src, out, stage_keep, **cfg)
            except RuntimeError as e:  # a refused stage (a token count equal to a model dimension): said so
                rows.append([label, cfg["stage"], f"({100 * keep:g}%)", f"refused: {e}", *["-"] * (len(cols) - 4)])
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
                continue
            acc = vlm.accuracy(out)
            flops = measure_flops(ir.load(str(out))).flops
            speed = _speedup(src, out, feeds, a.runs)
            pre_k = work / f"prefill_{out.name}"
            try:
                prune(pre, pre_k, stage_keep, **cfg)
                step, length = _caches(pre_k, feeds[0])
                full, kept = decode_ms(dec, [full_step, step], a.runs * 2)
                dcell = f"{kept:.2f} ({length}), {full / kept:.2f}×"
            except RuntimeError as e:  # the prefill graph's own refusal
                dcell = f"refused: {e}"
            row = [label, cfg["stage"], f"{info['image_tokens_after']} ({100 * keep:g}%)", f"{100 * acc['all']:.1f}%",
                   f"{100 * acc['all'] / base['all']:.1f}%", *(f"{100 * acc[t]:.1f}%" for t in vlm.TYPES),
                   f"{flops / f0:.2f}×", f"{speed:.2f}×", dcell]
            rows.append(row)
            print("| " + " | ".join(row) + " |", flush=True)
    if a.result:
        m = json.loads((a.out / "vlm.json").read_text())
        write_result(a.result, cols, rows, description=(
            f"benchmarks/bench_vlm_tokens.py: token_drop with scope: image on the VLM of benchmarks/vlm.py (trained "
            f"here: {m['config']['steps']} steps, {m['train_seconds'] / 60:.0f} min), training-free. Accuracy: "
            f"answers right on {vlm.EVAL_SAMPLES} held-out scenes; kept: as a share of the unpruned model's. FLOPs: "
            f"batch 1, against the original. Prefill: ORT CPU, batch {a.batch}, 72 tokens "
            f"(64 image + 8 text), interleaved, median of {a.repeats} feeds × {a.runs} runs. Decode: ms of one decode "
            f"step after the pruned prefill (cache length in brackets) and its speedup over the step after the full "
            f"72-token cache, interleaved in one session (after a decoder-stage drop the layers up to K keep all 72: "
            f"shortest–longest)."))


if __name__ == "__main__":
    main()
