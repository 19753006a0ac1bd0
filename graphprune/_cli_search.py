"""The ``search`` command (attached to the ``graphprune`` app by :func:`register`): progress with rich, the front
as a rich table at the end. Errors follow ``graphprune.cli``: a ``GraphpruneError`` is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _passes(r: dict) -> str:
    return "; ".join(", ".join([p["name"]] + [f"{k}={v}" for k, v in p.items() if k != "name"])
                     for p in r.get("pipeline", [])) or "-"


def _ci(r: dict | None) -> str:
    if not r or r.get("quality") is None:
        return ""
    lo, hi = r["quality_ci"]
    return f"{r['quality']:.4f} [{lo:.3f}, {hi:.3f}]"


def front_table(front: list[dict], chosen: dict | None) -> Table:
    t = Table(box=box.SIMPLE, title="Pareto front (selection; test for these only)")
    for col in ("trial", "pipeline", "speedup", "FLOPs", "quality (selection)", "quality (test)", "verify"):
        t.add_column(col, overflow="fold")
    for r in front:
        star = " *" if chosen is not None and r["number"] == chosen["number"] else ""
        t.add_row(f"{r['number']}{star}", _passes(r), f"{r['latency']['speedup']:.2f}x", f"{r['flops']['ratio']:.3f}",
                  _ci(r), _ci(r.get("test")), "pass" if r["verify"]["passed"] else "fail")
    return t


def _floats(text: str | None) -> list[float] | None:
    from graphprune.errors import ConfigError

    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def ray_flag(args: list[str]) -> list[str]:
    """``--ray`` with no value (last, or followed by another option) means a local runtime: ``--ray local``."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "local")
            break
    return out


def register(app: typer.Typer, out: Console, err: Console) -> None:
    """Add ``search`` to ``app``; the front goes to ``out``, progress and notes to ``err``."""

    @app.command()
    def search(
        model: Annotated[Path, typer.Argument(help="Input ONNX model (never modified).")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Where the chosen model is written (through optimize's verified, atomic path).")],
        data: Annotated[Path, typer.Option("--data", help="Real samples: .npz, a folder of images, .txt texts, or .jsonl (text + text_pair: a retrieval task).")],
        tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Hugging Face tokenizer.json for text data.")] = None,
        max_length: Annotated[int, typer.Option("--max-length", help="Text data: tokens per sample.")] = 128,
        mean: Annotated[str | None, typer.Option("--mean", help="Image data: per-channel mean (default: ImageNet).")] = None,
        std: Annotated[str | None, typer.Option("--std", help="Image data: per-channel std (default: ImageNet).")] = None,
        normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Image data: apply mean/std.")] = True,
        calibration_samples: Annotated[int | None, typer.Option("--calibration-samples", min=1, help="Calibration samples (pairs for a retrieval task; default 128, 64 pairs).")] = None,
        selection_samples: Annotated[int | None, typer.Option("--selection-samples", min=3, help="Samples the search scores trials on (default: half of the rest).")] = None,
        test_samples: Annotated[int | None, typer.Option("--test-samples", min=3, help="Held-out samples for the front and the chosen model (default: the rest).")] = None,
        max_loss: Annotated[float | None, typer.Option("--max-loss", help="Constraint mode: the fastest model keeping ≥ 1 - L of the quality (see --decide).")] = None,
        target_speedup: Annotated[float | None, typer.Option("--target-speedup", help="Target mode: the best quality at ≥ S x.")] = None,
        trials: Annotated[int, typer.Option("--trials", help="Distinct pipelines to evaluate (resumed ones count; a re-proposed pipeline is not run again and does not count).")] = 40,
        time_budget: Annotated[float | None, typer.Option("--time-budget", help="Stop starting trials after this many seconds.")] = None,
        space: Annotated[Path | None, typer.Option("--space", help="Search space YAML (default: derived from the model).")] = None,
        metric: Annotated[str, typer.Option("--metric", help="What the search maximises: auto (accuracy with --labels, recall@1 with text pairs, else agreement) | accuracy | recall@1 | mrr | agreement | knn_overlap | rank_corr | neighbor_agreement | cosine | top1.")] = "auto",
        labels: Annotated[Path | None, typer.Option("--labels", help="Class labels (.npy, one per sample, file order): accuracy.")] = None,
        storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL (default: sqlite in the report folder).")] = None,
        study: Annotated[str | None, typer.Option("--study", help="Study name (default: graphprune-MODEL).")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the study instead of starting one.")] = False,
        ray: Annotated[str | None, typer.Option("--ray", help="Run trials as Ray tasks: --ray alone (or 'local') starts a local runtime; --ray HOST:PORT joins a cluster.")] = None,
        report_dir: Annotated[Path | None, typer.Option("--report-dir", help="Folder for best.yaml, trials.jsonl, report.html (default: OUTPUT-search/).")] = None,
        batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size for scoring and timing.")] = 8,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the split and the sampler.")] = 0,
        runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per trial (interleaved with the original).")] = 20,
        threads: Annotated[int | None, typer.Option("--threads", help="ORT intra-op threads (default: all cores; 1 per Ray task).")] = None,
        sampler: Annotated[str, typer.Option("--sampler", help="tpe | nsga2 (multi-objective, constrained).")] = "tpe",
        decide: Annotated[str, typer.Option("--decide", help="--max-loss reads the quality's point estimate, or the lower end of its 80% bootstrap interval (needs large selection sets).")] = "point",
    ) -> None:
        """Search pass configurations of MODEL on real data; write the chosen model to OUTPUT.

        Modes: --max-loss L (the fastest model keeping >= 1 - L of the quality), --target-speedup S (the best
        quality at >= S x), neither (the Pareto front; the fastest model that passes verification is written). Only trials
        measured faster than the original are candidates.
        The data is split three ways (calibration, selection, test); trials are scored on selection, and only the
        front and the chosen model on test.
        """
        from graphprune.errors import ConfigError
        from graphprune.search import search as run_search

        if sampler not in ("tpe", "nsga2"):
            raise ConfigError(f"--sampler {sampler!r}: expected tpe or nsga2")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=err, transient=False,
                            disable=not err.is_terminal)

        with progress:
            task = progress.add_task("trials", total=trials, note="")

            def update(ev: dict) -> None:
                best = ev["best"]
                note = (f"best: trial {best['number']} {best['latency']['speedup']:.2f}x q={best['quality']:.4f}"
                        if best else "best: none yet") + f"; ~{ev['left'] / 60:.1f} min left"
                progress.update(task, completed=ev["done"], total=ev["total"], note=note)
                if not err.is_terminal:
                    err.print(f"trial {ev['done']}/{ev['total']}: {note}", highlight=False)

            res = run_search(
                model, output, data, tokenizer=tokenizer, max_length=max_length, mean=_floats(mean), std=_floats(std),
                normalize=normalize, calibration_samples=calibration_samples, selection_samples=selection_samples,
                test_samples=test_samples, labels=labels, metric=metric, max_loss=max_loss,
                target_speedup=target_speedup, trials=trials, time_budget=time_budget, space=space, storage=storage,
                study=study, resume=resume, ray=(True if ray == "local" else ray), report_dir=report_dir, batch=batch,
                seed=seed, runs=runs, threads=threads, sampler=sampler, decide=decide, progress=update)
        out.print(front_table(res.front, res.chosen))
        if res.info.get("exhausted"):
            from graphprune.search.engine import STALE_ROUNDS

            err.print(f"stopped early: {STALE_ROUNDS} rounds in a row proposed no new pipeline (the space looks "
                      f"exhausted; {res.info['trials_asked']} trials asked)")
        if res.info.get("interrupted"):
            err.print(f"interrupted: the study keeps its trials ({res.info['storage']}); --resume continues it")
        c = res.chosen
        out.print(f"chosen: trial {c['number']} ({res.why}): {c['latency']['speedup']:.2f}x, FLOPs x{c['flops']['ratio']:.3f}, "
                  f"quality {_ci(c)} on selection, {_ci(c.get('test'))} on test", highlight=False, soft_wrap=True)
        out.print(f"wrote {output}; {res.files['best_yaml']}, {res.files['trials']}, {res.files['report']}",
                  highlight=False, soft_wrap=True)
