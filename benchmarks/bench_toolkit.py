"""The toolkit's own cost: wall time and peak memory of ``graphprune optimize`` against one ORT session + one run.

    python -m benchmarks.bench_toolkit                        # ViT-B/16 (weights inside the .onnx) and the 1 GB decoder
    python -m benchmarks.bench_toolkit --models vitb_ext dec8 --json out.json

Models (written under ``--work``, default ``/tmp/graphprune-bench-toolkit``, reused when present):
  * ``vitb``: a ViT-B/16-shaped classifier defined in code (``examples.models.ViT``: 86.6M params, patch 16, 224²,
    12 layers, dim 768, MLP 3072), exported with the dynamo exporter, then re-saved with the weights inside the
    ``.onnx`` (347 MB, as torchvision's file is); ``vitb_ext``: the same export with its ``.onnx.data``;
  * ``dec1`` / ``dec8``: Llama-shaped decoders from ``benchmarks.make_decoder`` (``--gb 1`` / ``--gb 8``; seq 128).

Each figure comes from its own child process, so that its peak RSS (``ru_maxrss`` from ``os.wait4``) is its own:
  * ``ort``: load the original in one ONNX Runtime session and run it once (batch 1, generated inputs): the unit;
  * ``cleanup``, ``prune 0.3`` (``--prune-channels 0.3``), ``token 0.7`` (``--token-keep 0.7``): ``graphprune
    optimize`` with verification (8 synthetic samples, its default; 2 for cleanup alone) and ``--force``, so that a run whose
    verification fails is still timed to the end and written; the table says whether verification passed, and
    a refusal (an error exit) is reported with its message;
  * ``cleanup, verify 2`` and ``prune 0.3, verify 2`` (asked for by name in ``--pipelines``): the same with
    ``--verify-samples 2``, which separates the toolkit's own cost from the model's 2 × 8 verification runs;
    ``cleanup, verify 8``: cleanup verified on all 8 samples (a cleanup-only run verifies on 2 by default,
    ``pipeline.cleanup_verify_samples``; this row is the cost before that).
``--reps N`` (default 3) runs N rounds, each the unit then every pipeline; a row gives the medians: wall time, the
ratio to the unit run of the same round, peak RSS. Reported: wall time and its ratio to ``ort``; peak RSS and its
ratio to the model's weight bytes; the time of each stage from the report (``timings``: load, passes, save, verify, commit). Interpreter start and imports are in
every wall time, the unit's included. The machine is shared: say so when quoting figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import add_result_option, save_markdown

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"cleanup": [], "prune 0.3": ["--prune-channels", "0.3"], "token 0.7": ["--token-keep", "0.7"],
             # the same with 2 verification samples: what the toolkit costs beyond the model's own runs
             "cleanup, verify 2": ["--verify-samples", "2"],
             # cleanup on all 8 generated samples: what a cleanup-only run verified before cleanup_verify_samples
             "cleanup, verify 8": ["--verify-samples", "8"],
             "prune 0.3, verify 2": ["--prune-channels", "0.3", "--verify-samples", "2"]}
#: What runs when ``--pipelines`` is not given (the ``verify 2`` rows are asked for by name).
DEFAULT_PIPELINES = ["cleanup", "prune 0.3", "token 0.7"]

_ORT_CHILD = """
import sys, time
import numpy as np
import onnxruntime as ort
from graphprune.analysis.inputs import example_inputs
from graphprune.io import load_model
feeds = example_inputs(load_model(sys.argv[1]), batch=1, seed=0)
so = ort.SessionOptions()
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
"""


def _child(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, peak RSS (MiB), exit code and the last line of its stderr."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "message": next((ln for ln in reversed(lines) if ln.startswith(("error", "graphprune:"))), lines[-1] if lines else "")}


def weight_bytes(path: Path) -> int:
    import onnx_ir as ir

    from graphprune.io import initializer_bytes, load_model

    model = load_model(path)
    n = initializer_bytes(model)
    del model, ir
    return n


def make_vitb(work: Path) -> tuple[Path, Path]:
    """ViT-B/16 exported with external data (``vitb_ext.onnx``) and re-saved with the weights inside (``vitb.onnx``)."""
    inline, ext = work / "vitb.onnx", work / "vitb_ext.onnx"
    if inline.exists() and ext.exists():
        return inline, ext
    code = f"""
import torch, onnx
from examples.models import ViT
import graphprune.torch as gt
torch.manual_seed(0)
m = ViT(dim=768, depth=12, heads=12).eval()
gt.export(m, (torch.randn(1, 3, 224, 224),), {str(ext)!r})
onnx.save(onnx.load({str(ext)!r}), {str(inline)!r})
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    return inline, ext


def make_dec(work: Path, gb: int) -> Path:
    out = work / f"dec{gb}" / "decoder.onnx"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "benchmarks.make_decoder", "--gb", str(gb), "--out", str(out)],
                       cwd=ROOT, check=True)
    return out


def _optimize_row(name: str, path: Path, label: str, work: Path) -> dict:
    out = work / "out" / f"{name}-{label.replace(' ', '_').replace(',', '')}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    rep = out.with_suffix(".json")
    rep.unlink(missing_ok=True)
    r = _child([sys.executable, "-m", "graphprune.cli", "optimize", str(path), "-o", str(out), "--report", str(rep),
                "--force", *PIPELINES[label]])
    if r["rc"] == 0 and rep.exists():
        report = json.loads(rep.read_text())
        r["timings"] = report.get("timings", {}) | {"passes_each": {p["name"]: p["seconds"] for p in report["passes"]}}
        r["verify_passed"] = report["verify"]["passed"]
        r["params_ratio"] = report["params"]["ratio"]
        r["message"] = "; ".join(report.get("warnings", [])[:1])[:120]
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    return r


def _median_row(runs: list[dict], units: list[dict]) -> dict:
    """One row from ``reps`` interleaved runs: medians of wall time, peak RSS and the per-repetition ratio to the
    unit run just before it; stage timings of the median run."""
    walls = [r["wall_s"] for r in runs]
    mid = sorted(range(len(runs)), key=lambda i: walls[i])[len(runs) // 2]
    row = dict(runs[mid])
    row["wall_s"] = statistics.median(walls)
    row["rss_mb"] = statistics.median(r["rss_mb"] for r in runs)
    row["x_ort"] = statistics.median(r["wall_s"] / u["wall_s"] for r, u in zip(runs, units, strict=True))
    row["walls_s"], row["rss_all_mb"] = walls, [r["rss_mb"] for r in runs]
    return row


def bench_model(name: str, path: Path, pipelines: list[str], work: Path, reps: int = 1) -> list[dict]:
    """``reps`` rounds, each the unit then every pipeline (interleaved, so a slow stretch of the machine hits
    both sides of a ratio); one row per pipeline with the medians."""
    nbytes = weight_bytes(path)
    units: list[dict] = []
    runs: dict[str, list[dict]] = {label: [] for label in pipelines}
    for _ in range(reps):
        units.append(_child([sys.executable, "-c", _ORT_CHILD, str(path)]))
        for label in pipelines:
            runs[label].append(_optimize_row(name, path, label, work))
    unit = _median_row(units, units)
    rows = [{"model": name, "pipeline": "ort session + 1 run", "weights_mb": nbytes / 2**20, **unit,
             "x_ort": 1.0, "x_bytes": unit["rss_mb"] * 2**20 / nbytes, "reps": reps}]
    for label in pipelines:
        row = _median_row(runs[label], units)
        rows.append({"model": name, "pipeline": label, "weights_mb": nbytes / 2**20, **row,
                     "x_bytes": row["rss_mb"] * 2**20 / nbytes, "reps": reps})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | weights | pipeline | wall | × ORT | peak RSS | ÷ weights | load / passes / save / verify s | "
            "verify | params | note |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        t = r.get("timings") or {}
        stages = " / ".join(f"{t[k]:.1f}" for k in ("load", "passes", "save", "verify") if k in t) or "—"
        ver = {True: "passed", False: "failed"}.get(r.get("verify_passed"), "—" if r["rc"] == 0 else f"exit {r['rc']}")
        params = f"×{r['params_ratio']:.2f}" if "params_ratio" in r else "—"
        note = r["message"] if r["rc"] != 0 else ""
        out.append(f"| {r['model']} | {r['weights_mb']:.0f} MiB | {r['pipeline']} | {r['wall_s']:.1f} s | "
                   f"{r['x_ort']:.1f}× | {r['rss_mb']:.0f} MiB | {r['x_bytes']:.2f}× | {stages} | {ver} | {params} | "
                   f"{note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vitb", "dec1"], choices=["vitb", "vitb_ext", "dec1", "dec8"])
    p.add_argument("--pipelines", nargs="+", default=DEFAULT_PIPELINES, choices=list(PIPELINES))
    p.add_argument("--work", default="/tmp/graphprune-bench-toolkit", help="where models and outputs are written")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds per model; rows are medians (default 3)")
    add_result_option(p)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in a.models:
        if name.startswith("vitb"):
            inline, ext = make_vitb(work)
            path = inline if name == "vitb" else ext
        else:
            path = make_dec(work, int(name[3:]))
        rows += bench_model(name, path, a.pipelines, work, a.reps)
        print(table(rows[-1 - len(a.pipelines):]), flush=True)
    print()
    print(table(rows))
    save_markdown(a.result, table(rows), description=f"Medians of {a.reps} interleaved repetitions per row.")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
