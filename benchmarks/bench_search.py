"""``graphprune search`` on real models: MiniLM retrieval (task pairs, and texts only) and the digits ViT and CNN.

Rows (each one search, batch 8, ORT CPU, bounded by ``--time-budget``):
  * ``minilm-pairs``: all-MiniLM-L6-v2 (``benchmarks/minilm.py prepare``) on the ``body`` task (the query is NOT
    inside its document) over every standard-library module's pairs (``search_pairs``: 1,100+), given as ``.jsonl``
    ``text``/``text_pair``; split 64 calibration / 200 selection / 400 test pairs; constraint mode ``--max-loss
    0.01`` (recall@1 retained; ``search``'s ``decide`` default). Reported: the chosen model's test recall@1 and MRR
    retained, and its speedup re-measured here (original vs chosen, interleaved, medians, 8 test batches).
    Also how predictive each agreement metric is of the task: Spearman and Pearson correlation, across the
    completed trials, between the metric and the selection recall@1 retained (``predictive``).
  * ``minilm-texts``: texts only (the queries and documents of pairs disjoint from the test pairs, as a .txt; no
    task metric): constraint mode on the agreement metric (k-NN overlap@10) with ``--max-loss`` from
    ``--texts-max-loss`` (the task-pairs run measured ~98% of recall@1 near overlap 0.78: try 0.22); the chosen model's recall@1 / MRR is then measured on 400 held-out test pairs the search
    never saw.
  * ``digits-vit`` / ``digits-cnn``: the trained digits models (``benchmarks/digits.py``) on their 360 test images
    with ``--labels``; split 40 / 120 / 200; constraint mode ``--max-loss 0.005`` (accuracy).
  * ``vlm``: the VLM trained here (``benchmarks/vlm.py``) on 5,064 held-out scenes with the answer ids as
    ``--labels`` (accuracy of the last position's argmax, as ``vlm.accuracy``); split 64 / 2,000 / 3,000; constraint
    mode within 1 point of accuracy. Not in the default rows: ``python -m benchmarks.bench_search vlm``.

Usage::

    python -m benchmarks.minilm prepare
    flock /tmp/gp-heavy.lock python -m benchmarks.bench_search [ROW ...] [--time-budget 1500] [--trials 80]
        [--json benchmarks/out/search/results.json]

Nothing here is a test: docs/search.md keeps the latest table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import minilm

OUT = minilm.DEFAULT_OUT.parent / "search"


def search_pairs() -> list[minilm.Pair]:
    """(query, body) pairs from every module of ``minilm.STDLIB_MODULES`` (evaluation and calibration lists),
    round-robin across modules; deterministic for a Python version."""
    seen: set[str] = set()
    return minilm.body_pairs(minilm._round_robin(minilm._module_pairs(m, seen) for m in minilm.STDLIB_MODULES))


def _write_jsonl(path: Path, pairs) -> None:
    path.write_text("".join(json.dumps({"text": q, "text_pair": d}) + "\n" for q, d in pairs), encoding="utf-8")


def _speedup(original: Path, chosen: Path, feeds: list[dict], runs: int = 30) -> float:
    from graphprune.backends.onnxruntime import benchmark

    ratios = []
    for f in feeds:
        lat = benchmark({"before": original, "after": chosen}, f, runs=runs)
        ratios.append(lat["before"]["median_ms"] / lat["after"]["median_ms"])
    return float(np.median(ratios))


def _retrieval(model: Path, tok: Path, pairs) -> dict[str, float]:
    from graphprune.search.metrics import retrieval

    q = minilm.encode(model, tok, [p[0] for p in pairs])
    d = minilm.encode(model, tok, [p[1] for p in pairs])
    r = retrieval(q, d)
    return {k: float(v.mean()) for k, v in r.items()}


def predictive(trials: list[dict]) -> dict[str, dict[str, float]]:
    """Correlation across completed trials of each agreement metric with the task figure retained (selection)."""
    done = [t for t in trials if t.get("status") == "complete" and t.get("task")]
    if len(done) < 4:
        return {}
    task = next(iter(done[0]["task"]))
    y = np.array([t["task"][task]["retained"] for t in done])
    out = {}
    for m in done[0]["agreement"]:
        x = np.array([t["agreement"][m]["mean"] for t in done])
        if np.std(x) == 0 or np.std(y) == 0:
            continue
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        out[m] = {"pearson": float(np.corrcoef(x, y)[0, 1]), "spearman": float(np.corrcoef(rx, ry)[0, 1]),
                  "trials": len(done)}
    return out


def trial_cost(model: Path, folder: Path, trials: list[dict]) -> dict:
    """Median seconds of a completed trial (rewrite + score + timing) against one plain ``optimize`` run of the
    chosen pipeline (no cache: load, calibrate, passes, verify, commit)."""
    from graphprune.pipeline import Pipeline, optimize

    t0 = time.perf_counter()
    optimize(model, folder / "plain-optimize.onnx", Pipeline.from_yaml(folder / "best.yaml"))
    plain = time.perf_counter() - t0
    secs = [sum(t["seconds"].values()) for t in trials if t.get("status") == "complete"]
    return {"optimize_seconds": round(plain, 1), "trial_median_seconds": round(float(np.median(secs)), 1),
            "ratio": round(float(np.median(secs)) / plain, 3)}


def _row(name: str, res, seconds: float, extra: dict) -> dict:
    c = res.chosen
    return {"row": name, "trials": len(res.trials), "completed": sum(t.get("status") == "complete" for t in res.trials),
            "seconds": round(seconds), "chosen": c["pipeline"] if c else None,
            "search_speedup": c["latency"]["speedup"] if c else None, "flops_ratio": c["flops"]["ratio"] if c else None,
            "selection_quality": c["quality"] if c else None, "selection_ci": c["quality_ci"] if c else None,
            "test": c.get("test") if c else None,
            "front": [{"trial": r["number"], "pipeline": r["pipeline"], "speedup": r["latency"]["speedup"],
                       "flops": r["flops"]["ratio"], "quality": r["quality"],
                       "test_quality": (r.get("test") or {}).get("quality")} for r in res.front],
            "cache": res.info.get("cache"), "why": res.why, "report": res.files.get("report"), **extra}


def _save(row: dict) -> None:
    """Print the row and write it to ``OUT/NAME.json`` at once (a later row failing keeps the earlier ones)."""
    print(json.dumps(row, indent=1, default=str), flush=True)
    (OUT / f"{row['row']}.json").write_text(json.dumps(row, indent=1, default=str))


def _search(name: str, model: Path, data: Path, **kw):
    from graphprune import GraphpruneError, search

    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("study.db",):
        (folder / f).unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        res = search(model, folder / "best.onnx", data, report_dir=folder, batch=8,
                     progress=lambda ev: print(f"  [{name}] trial {ev['done']}/{ev['total']} "
                                               f"{ev['elapsed']:.0f}s", flush=True), **kw)
    except GraphpruneError as e:
        res = getattr(e, "result", None)
        if res is None:
            raise
        print(f"  [{name}] {e}")
    return res, time.perf_counter() - t0, folder


def minilm_rows(rows: list[str], budget: float, texts_budget: float, trials: int,
                texts_max_loss: float) -> list[dict]:
    prep = minilm.prepare()
    onnx, tok = Path(prep["onnx"]), Path(prep["tokenizer"])
    pairs = search_pairs()
    OUT.mkdir(parents=True, exist_ok=True)
    out = []
    if "minilm-pairs" in rows:
        _write_jsonl(OUT / "pairs.jsonl", pairs)
        res, secs, folder = _search("minilm-pairs", onnx, OUT / "pairs.jsonl", tokenizer=tok, max_length=256,
                                    calibration_samples=64, selection_samples=200, test_samples=400,
                                    max_loss=0.01, trials=trials, time_budget=budget, runs=10)
        extra = {"predictive": predictive(res.trials), "test_original": res.info.get("test_original")}
        if res.chosen is not None:
            test_texts = (folder / "data" / "test-texts.txt").read_text().splitlines()
            from graphprune.data import load_data
            from graphprune.io import load_model

            ds = load_data(folder / "data" / "test-texts.txt", load_model(onnx), tokenizer=tok, max_length=256)
            extra["speedup_remeasured"] = _speedup(onnx, folder / "best.onnx", ds.batches(8)[:8])
            extra["test_pairs"] = len(test_texts) // 2
            extra["trial_vs_optimize"] = trial_cost(onnx, folder, res.trials)
        out.append(_row("minilm-pairs", res, secs, extra))
        _save(out[-1])
    if "minilm-texts" in rows:
        test_pairs = pairs[-400:]
        texts = [t for p in pairs[:-400] for t in p]
        (OUT / "texts.txt").write_text("".join(" ".join(t.split()) + "\n" for t in texts), encoding="utf-8")
        res, secs, folder = _search("minilm-texts", onnx, OUT / "texts.txt", tokenizer=tok, max_length=256,
                                    calibration_samples=128, selection_samples=400, test_samples=200,
                                    max_loss=texts_max_loss, trials=trials, time_budget=texts_budget, runs=10)
        extra = {"texts_max_loss": texts_max_loss}
        if res.chosen is not None:
            base = _retrieval(onnx, tok, test_pairs)
            mine = _retrieval(folder / "best.onnx", tok, test_pairs)
            extra["test_pairs"] = len(test_pairs)
            extra["retrieval_original"] = base
            extra["retrieval_chosen"] = mine
            extra["retained"] = {k: mine[k] / base[k] for k in base}
            from graphprune.data import load_data
            from graphprune.io import load_model

            (OUT / "test-docs.txt").write_text("".join(d + "\n" for _, d in test_pairs), encoding="utf-8")
            ds = load_data(OUT / "test-docs.txt", load_model(onnx), tokenizer=tok, max_length=256)
            extra["speedup_remeasured"] = _speedup(onnx, folder / "best.onnx", ds.batches(8)[:8])
        out.append(_row("minilm-texts", res, secs, extra))
        _save(out[-1])
    return out


def digits_rows(rows: list[str], budget: float, trials: int) -> list[dict]:
    from benchmarks import digits

    _, _, x_te, y_te = digits.load_split()
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / "digits-test.npz", **{digits.INPUT_NAME: x_te})
    np.save(OUT / "digits-labels.npy", y_te)
    out = []
    for name, get in (("digits-vit", digits.get_vit), ("digits-cnn", digits.get_cnn)):
        if name not in rows:
            continue
        model = Path(get())
        res, secs, folder = _search(name, model, OUT / "digits-test.npz", labels=OUT / "digits-labels.npy",
                                    calibration_samples=40, selection_samples=120, test_samples=200,
                                    normalize=False, max_loss=0.005, trials=trials, time_budget=budget, runs=10)
        extra = {"test_original": res.info.get("test_original")}
        if res.chosen is not None:
            feeds = [{digits.INPUT_NAME: x_te[i:i + 8]} for i in range(0, 64, 8)]
            extra["speedup_remeasured"] = _speedup(model, folder / "best.onnx", feeds)
        out.append(_row(name, res, secs, extra))
        _save(out[-1])
    return out


#: calibration / selection / test scenes of the VLM search: a 1-point loss of a 53% accuracy needs thousands of
#: samples to be seen (400 selection scenes: a bootstrap interval of ±6% of the accuracy)
VLM_SPLIT = (64, 2000, 3000)


def vlm_rows(rows: list[str], budget: float, trials: int) -> list[dict]:
    """The VLM trained here (``benchmarks/vlm.py``) on 5,064 held-out scenes (seed 7, as its table's), labels the
    answer ids; split :data:`VLM_SPLIT`; constraint mode at 1 point of accuracy (``max_loss`` = 0.01 / the original's
    accuracy on the selection split)."""
    from benchmarks import vlm

    if "vlm" not in rows:
        return []
    model = vlm.get_vlm(vlm.DEFAULT_OUT)
    d = vlm.scenes(VLM_SPLIT[0] + VLM_SPLIT[1] + VLM_SPLIT[2], seed=7)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / "vlm-scenes.npz", pixel_values=d["pixel_values"], input_ids=d["input_ids"])
    np.save(OUT / "vlm-labels.npy", d["answer"])
    base = vlm.accuracy(model)["all"]
    res, secs, folder = _search("vlm", model, OUT / "vlm-scenes.npz", labels=OUT / "vlm-labels.npy",
                                calibration_samples=VLM_SPLIT[0], selection_samples=VLM_SPLIT[1],
                                test_samples=VLM_SPLIT[2],
                                max_loss=round(0.01 / base, 4), trials=trials, time_budget=budget, runs=10)
    extra = {"test_original": res.info.get("test_original"), "max_loss": round(0.01 / base, 4)}
    if res.chosen is not None:
        feeds = [{"pixel_values": d["pixel_values"][i:i + 8], "input_ids": d["input_ids"][i:i + 8]}
                 for i in range(0, 64, 8)]
        extra["speedup_remeasured"] = _speedup(model, folder / "best.onnx", feeds)
    row = _row("vlm", res, secs, extra)
    _save(row)
    return [row]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_search", description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="*", default=["digits-vit", "digits-cnn", "minilm-pairs", "minilm-texts"])
    p.add_argument("--time-budget", type=float, default=1500.0, help="seconds per search (default 1500)")
    p.add_argument("--texts-budget", type=float, default=900.0, help="seconds for the texts-only search")
    p.add_argument("--digits-budget", type=float, default=300.0, help="seconds per digits search (default 300)")
    p.add_argument("--vlm-budget", type=float, default=900.0, help="seconds for the VLM search (default 900)")
    p.add_argument("--trials", type=int, default=80)
    p.add_argument("--texts-max-loss", type=float, default=0.3, help="texts-only: 1 - the k-NN overlap kept")
    p.add_argument("--json", type=Path, default=OUT / "results.json")
    a = p.parse_args(argv)
    results = minilm_rows(a.rows, a.time_budget, a.texts_budget, a.trials, a.texts_max_loss)
    results += digits_rows(a.rows, a.digits_budget, a.trials)
    results += vlm_rows(a.rows, a.vlm_budget, a.trials)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()


def table(rows: list[dict]) -> str:
    """The docs table (markdown) of the rows measured."""
    out = ["| row | trials (completed) | time | chosen pipeline | speedup (search / re-measured) | FLOPs | "
           "selection quality [80% CI] | test figures |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pipe = "; ".join(", ".join([p["name"]] + [f"{k}={v}" for k, v in p.items() if k != "name"])
                         for p in r["chosen"] or []) or "none qualified"
        test = r.get("test") or {}
        if r.get("retained"):
            tfig = ", ".join(f"{k} {v:.3f}" for k, v in r["retained"].items()) + f" retained ({r['test_pairs']} pairs)"
        elif test.get("task"):
            tfig = ", ".join(f"{k} {v['retained']:.3f} retained ({v['value']:.3f} vs {v['base']:.3f})"
                             for k, v in test["task"].items())
        else:
            tfig = ""
        sp = (f"{r['search_speedup']:.2f}x / {r.get('speedup_remeasured', float('nan')):.2f}x"
              if r["search_speedup"] else "")
        q = (f"{r['selection_quality']:.3f} [{r['selection_ci'][0]:.3f}, {r['selection_ci'][1]:.3f}]"
             if r["selection_quality"] is not None else "")
        out.append(f"| {r['row']} | {r['trials']} ({r['completed']}) | {r['seconds']} s | {pipe} | {sp} | "
                   f"{(r['flops_ratio'] or float('nan')):.3f} | {q} | {tfig} |")
    return "\n".join(out)
