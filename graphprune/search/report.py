"""The search's files: ``trials.jsonl`` (one JSON object per trial) and ``report.html``, one self-contained page.

The page holds two plots (matplotlib, embedded as base64 PNG): quality against measured speedup and quality against
the FLOPs kept, every completed trial a grey dot, the Pareto front a line, the chosen trial a red star; the front
with its selection and test figures side by side; the per-trial table; the winning pipeline's YAML; the data and its
split; the machine. Nothing is fetched from elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import yaml


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ort_version = version("onnxruntime")
    except PackageNotFoundError:
        ort_version = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort_version}


def _plot(done: list[dict], front: list[dict], chosen: dict | None, x_of, xlabel: str, ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.scatter([x_of(r) for r in done], [r["quality"] for r in done], s=18, c="#9a9a9a", label="trials")
    if front:
        pts = sorted((x_of(r), r["quality"]) for r in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", c="#1f5fbf", ms=5, label="Pareto front")
    if chosen is not None:
        ax.scatter([x_of(chosen)], [chosen["quality"]], marker="*", s=260, c="#d62020", zorder=5, label="chosen")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return html.escape(str(x))


def _passes(r: dict) -> str:
    return "; ".join(", ".join([p["name"]] + [f"{k}={v}" for k, v in p.items() if k != "name"])
                     for p in r.get("pipeline", [])) or "—"


def _ci(r: dict | None, key: str = "quality") -> str:
    if not r or r.get(key) is None:
        return ""
    lo, hi = r.get(f"{key}_ci") or (None, None)
    return f"{r[key]:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None else f"{r[key]:.4f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(trials: list[dict], front: list[dict], chosen: dict | None, info: dict, opt_report: dict | None) -> str:
    done = [r for r in trials if r.get("status") == "complete"]
    qlabel = "quality on selection (" + ("retained " + info["data"]["metric"] if info["data"]["task"] != "agreement"
                                         else "agreement with the original") + ")"
    plots = ""
    if done:
        a = _plot(done, front, chosen, lambda r: r["latency"]["speedup"], "speedup (ORT CPU, interleaved medians)", qlabel)
        b = _plot(done, front, chosen, lambda r: r["flops"]["ratio"], "FLOPs kept (ratio to the original)", qlabel)
        plots = (f'<div class="plots"><img id="plot-speedup" alt="quality vs speedup" src="data:image/png;base64,{a}">'
                 f'<img id="plot-flops" alt="quality vs FLOPs" src="data:image/png;base64,{b}"></div>')
    ci = f"{round(info['confidence'] * 100)}% paired-bootstrap interval"
    front_rows = [[str(r["number"]) + (" ★" if chosen is not None and r["number"] == chosen["number"] else ""),
                   _passes(r), f"{r['latency']['speedup']:.2f}×", _fmt(r["flops"]["ratio"], 3),
                   _fmt(r["params"]["ratio"], 3), _ci(r), _ci(r.get("test")),
                   "yes" if r["verify"]["passed"] else "no: " + html.escape("; ".join(r["verify"]["failures"]))]
                  for r in front]
    trial_rows = []
    for r in sorted(trials, key=lambda r: r.get("number", 0)):
        ok = r.get("status") == "complete"
        trial_rows.append([str(r.get("number")), r.get("status", ""), _passes(r),
                           f"{r['latency']['speedup']:.2f}×" if ok else "", _fmt(r["flops"]["ratio"], 3) if ok else "",
                           _ci(r) if ok else "", html.escape(r.get("reason", "")) if not ok else
                           ("" if r["verify"]["passed"] else html.escape("; ".join(r["verify"]["failures"])))])
    best_yaml = info.get("best_yaml", "") if chosen is not None else ""
    d = info["data"]
    data_rows = [[html.escape(str(k)), html.escape(str(v))] for k, v in d.items()]
    m = machine()
    mach = [[k, html.escape(str(v))] for k, v in m.items()]
    summary = (f"<p><b>Mode:</b> {info['mode']}; <b>decision:</b> {html.escape(info['why'])}. Figures are "
               f"<i>selection</i> figures with their {ci}; <i>test</i> figures (never seen by the search) are "
               f"given only for the front and the chosen model. Original on selection: "
               f"{html.escape(json.dumps(info.get('selection_original')))}, on test: "
               f"{html.escape(json.dumps(info.get('test_original')))}.</p>")
    if chosen is not None:
        summary += (f"<p><b>Chosen:</b> trial {chosen['number']}, {chosen['latency']['speedup']:.2f}× at batch "
                    f"{info['batch']}, FLOPs ×{chosen['flops']['ratio']:.3f}, quality {_ci(chosen)} (selection), "
                    f"{_ci(chosen.get('test'))} (test).</p>")
    secs = ", ".join(f"{k} {v} s" for k, v in info["seconds"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>graphprune search: {html.escape(Path(info['model']).name)}</title>
<style>
body{{font-family:sans-serif;margin:24px;color:#222;background:#fff}} table{{border-collapse:collapse;margin:8px 0;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}} th{{background:#f0f0f0}}
.plots{{display:flex;gap:16px;flex-wrap:wrap}} .plots img{{width:640px;height:420px;border:1px solid #ddd}}
pre{{background:#f6f6f6;padding:8px;border:1px solid #ddd}}
</style></head><body>
<h1>graphprune search: {html.escape(Path(info['model']).name)}</h1>
{summary}
{plots}
<h2>Pareto front (selection, then test)</h2>
{_table(["trial", "pipeline", "speedup", "FLOPs", "params", "quality (selection)", "quality (test)", "verification"], front_rows)}
<h2>Winning pipeline</h2>
<pre>{html.escape(best_yaml) or "none"}</pre>
<h2>Trials ({len(trials)}; {len(done)} completed; {secs})</h2>
{_table(["trial", "status", "pipeline", "speedup", "FLOPs", "quality", "note"], trial_rows)}
<h2>Data and split</h2>
{_table(["", ""], data_rows)}
<h2>Search space</h2>
<pre>{html.escape(yaml.safe_dump(info['space'], sort_keys=False))}</pre>
<p>{html.escape("; ".join(info.get("space_excluded") or []))}</p>
<h2>Machine</h2>
{_table(["", ""], mach)}
</body></html>
"""


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def dump_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def write(folder: Path, trials: list[dict], front: list[dict], chosen: dict | None, info: dict,
          opt_report: dict | None) -> None:
    dump_jsonl(folder / "trials.jsonl", trials)
    write_text(folder / "report.html", render(trials, front, chosen, info, opt_report))
