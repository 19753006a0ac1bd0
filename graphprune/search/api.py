"""``graphprune.search(...)``: find the fastest model that keeps the quality you need, and write it verified.

Stages: check the inputs (nothing is written before they pass) → load the model once (``pipeline.load``) → split
the data three ways (``search.data``) → derive or read the space (``search.space``) → open the Optuna study →
run trials (``search.engine.Loop``, locally or on Ray) → choose (``engine.choose``) → score the Pareto front and
the chosen trial on the test split → write ``best.yaml`` and commit ``output`` through ``pipeline.optimize`` (its
staged, verified, atomic path, with the search's calibration cache) → ``trials.jsonl`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from graphprune.errors import ConfigError, GraphpruneError

#: ``--metric`` values: what the search maximises (``auto``: the task metric when the data has one, else the
#: agreement metric for the output's kind)
AGREEMENT_NAMES = ("agreement", "knn_overlap", "rank_corr", "neighbor_agreement", "cosine", "top1")
METRIC_NAMES = ("auto", "accuracy", "recall@1", "mrr", *AGREEMENT_NAMES)


@dataclasses.dataclass
class SearchResult:
    """What a search found: ``chosen`` (its trial result, with ``test`` figures), the scored ``front``, every
    trial, the optimize report of the written model, and the files written."""

    chosen: dict | None
    why: str
    front: list[dict]
    trials: list[dict]
    optimize_report: dict | None
    files: dict[str, str]
    info: dict


def _require(ray: bool) -> None:
    missing = []
    for mod in ("optuna", "matplotlib") + (("ray",) if ray else ()):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        extra = "search,ray" if "ray" in missing else "search"
        raise ConfigError(f"search needs {', '.join(missing)}: pip install 'graphprune[{extra}]'")


def best_config(entries: list[dict], data_config: dict, verify: dict | None) -> dict:
    """The pipeline config of a trial: its passes then cleanup, the data that reproduces the search's split."""
    cfg: dict[str, Any] = {"passes": [*entries, {"name": "cleanup"}], "data": dict(data_config)}
    if verify:
        cfg["verify"] = verify
    return cfg


def search(
    model: str | Path,
    output: str | Path,
    data: str | Path,
    *,
    tokenizer: str | Path | None = None,
    max_length: int = 128,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    normalize: bool = True,
    calibration_samples: int | None = None,
    selection_samples: int | None = None,
    test_samples: int | None = None,
    labels: str | Path | None = None,
    metric: Callable | str | None = None,
    max_loss: float | None = None,
    target_speedup: float | None = None,
    trials: int = 40,
    time_budget: float | None = None,
    space: str | Path | dict | None = None,
    storage: str | None = None,
    study: str | None = None,
    resume: bool = False,
    ray: bool | str | None = None,
    report_dir: str | Path | None = None,
    batch: int = 8,
    seed: int = 0,
    runs: int = 20,
    threads: int | None = None,
    confidence: float = 0.8,
    sampler: str = "tpe",
    decide: str = "point",
    workers: int | None = None,
    verify: dict | None = None,
    progress: Callable[[dict], None] | None = None,
) -> SearchResult:
    """Search pass configurations of ``model`` on ``data`` and write the chosen model to ``output``.

    Modes: ``max_loss`` L (the fastest trial whose retained quality stays ≥ 1 − L: its point estimate, or with
    ``decide="lower"`` the lower end of its bootstrap interval), ``target_speedup``
    S (the best quality at ≥ S×), neither (the fastest model of the Pareto front that passes verification).
    ``metric``: ``None``/``"auto"`` (from the data: labels, text pairs, else agreement with the original), a name
    from :data:`METRIC_NAMES` (``mrr`` instead of recall@1; an agreement metric even when the data has a task), or
    a callable ``metric(outputs, batch) -> float``. ``ray``: ``True`` for a local Ray runtime, an address for a cluster.
    ``workers``: trials per round (default 1 locally; the cluster's CPUs on Ray). ``verify``: thresholds for
    ``best.yaml``'s verification (default: verification's own in front mode; in constraint and target modes the
    chosen trial's measured agreement less a margin, :func:`measured_gate`). Writes ``output`` (unless no trial
    qualifies: then a ``GraphpruneError`` after the report is written) and, in ``report_dir`` (default
    ``OUTPUT-search/`` beside the output), ``study.db`` (unless ``storage``), ``best.yaml``, ``trials.jsonl``,
    ``report.html``, ``cache/`` and ``data/``.
    """
    from graphprune.io import check_output_path
    from graphprune.passes.base import PassContext
    from graphprune.pipeline import DataConfig, Pipeline, load, optimize
    from graphprune.search import engine, report, trial
    from graphprune.search.data import load_search_data
    from graphprune.search.space import default_space, from_dict, load_space
    from graphprune.verify import VerifyThresholds

    # -- checks: nothing is written before these pass -----------------------------------------------------------
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1 (got {trials})")
    if time_budget is not None and time_budget <= 0:
        raise ConfigError(f"--time-budget must be positive seconds (got {time_budget:g})")
    if max_loss is not None and not 0 <= max_loss < 1:
        raise ConfigError(f"--max-loss is a fraction of the quality in [0, 1) (got {max_loss:g})")
    if target_speedup is not None and target_speedup <= 0:
        raise ConfigError(f"--target-speedup must be positive (got {target_speedup:g})")
    if decide not in ("point", "lower"):
        raise ConfigError(f"--decide {decide!r}: expected point or lower")
    if max_loss is not None and target_speedup is not None:
        raise ConfigError("give --max-loss or --target-speedup, not both")
    if isinstance(metric, str) and metric not in METRIC_NAMES:
        raise ConfigError(f"--metric {metric!r}: expected one of {', '.join(METRIC_NAMES)} (task metrics come from "
                          "--labels or text pairs; a callable from the Python API)")
    _require(bool(ray))
    if isinstance(ray, str):
        from graphprune.search._ray import reachable

        reachable(ray)
    t_start = time.perf_counter()
    model = Path(model)
    output = Path(output)
    loaded = load(model)
    check_output_path(output, loaded.model, inputs=(model,))
    thresholds = VerifyThresholds.model_validate(verify or {})
    if isinstance(space, dict):
        space_obj = from_dict(space)
    elif space is not None:
        space_obj = load_space(space)
    else:
        space_obj = None
    report_dir = Path(report_dir) if report_dir else output.with_name(output.stem + "-search")
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"--report-dir {report_dir} is a file")
    if not report_dir.parent.is_dir():
        raise ConfigError(f"--report-dir: folder {report_dir.parent} does not exist")
    cfg = DataConfig(tokenizer=str(tokenizer) if tokenizer else None, max_length=max_length, mean=mean, std=std,
                     normalize=normalize, seed=seed, batch_size=batch)
    with tempfile.TemporaryDirectory(prefix="graphprune-search-") as tmp:  # texts land here until checks pass
        sd = load_search_data(loaded.model, data, cfg, labels=labels,
                              metric=metric if callable(metric) else None, calibration=calibration_samples,
                              selection=selection_samples, test=test_samples, data_dir=Path(tmp))
        primary = metric if isinstance(metric, str) and metric not in ("auto", "agreement") else None
        if metric in AGREEMENT_NAMES:
            sd.task = sd.info["task"] = "agreement"
            sd.info["metric"] = primary or "agreement"
        elif primary is not None:
            task_of = {"accuracy": "labels", "recall@1": "retrieval", "mrr": "retrieval"}[primary]
            if sd.task != task_of:
                raise ConfigError(f"--metric {primary}: needs {'--labels' if task_of == 'labels' else 'text pairs'}")
            sd.info["metric"] = primary
        max_tokens = None
        if sd.calibration.samples and all(v.ndim == 1 for v in sd.calibration.samples[0].values()):
            max_tokens = max(len(next(iter(s.values()))) for s in sd.calibration.samples)
        space_obj = space_obj or default_space(loaded.model, max_tokens)
        storage_url = storage or f"sqlite:///{(report_dir / 'study.db').resolve()}"
        if storage is not None:  # a user URL must open before anything is written
            _probe_storage(storage)
        report_dir.mkdir(exist_ok=True)
        data_dir = report_dir / "data"
        if sd.task == "retrieval":  # move the texts into the report folder; best.yaml points there
            data_dir.mkdir(exist_ok=True)
            for name in ("search-texts.txt", "test-texts.txt"):
                os.replace(Path(tmp) / name, data_dir / name)
            sd.data_config["path"] = str((data_dir / "search-texts.txt").resolve())
    cal_feeds = sd.calibration.batches(batch)
    fingerprint = trial.file_digest(model) + ":" + trial.feeds_digest(cal_feeds)
    study_name = study or f"graphprune-{model.stem}"
    st = engine.open_study(storage_url, study_name, resume, seed, sampler, fingerprint)
    st.set_user_attr("space", space_obj.to_dict())
    model_bytes = None
    pool = None
    if ray:
        import onnx

        try:  # weights inline: workers on other machines have no access to the external-data files
            model_bytes = onnx.load(str(model)).SerializeToString()
        except ValueError as e:  # protobuf's 2 GB limit
            raise ConfigError(f"--ray: the model cannot travel as one ONNX message ({e}); search locally") from None
    setup = trial.Setup(str(model), model_bytes, cal_feeds, sd.selection, sd.task, batch, fingerprint,
                        metric if callable(metric) else None, confidence, seed, runs,
                        threads if threads is not None else (1 if ray else None), str(report_dir / "cache"),
                        thresholds, primary, run_id=uuid.uuid4().hex)
    if ray:
        from graphprune.search._ray import RayPool

        pool = RayPool(setup, None if ray is True else str(ray), num_cpus=workers)
        evaluate = pool.map
        n_workers = workers or pool.workers
    else:
        local = trial.runner_for(setup)
        evaluate = lambda pipes: [local.run(p) for p in pipes]  # noqa: E731
        n_workers = workers or 1
    t_setup = time.perf_counter() - t_start
    loop = engine.Loop(st, space_obj, evaluate, trials=trials, time_budget=time_budget, workers=n_workers,
                       max_loss=max_loss, target=target_speedup, progress=progress, decide=decide)
    try:
        loop.run()
    finally:
        if pool is not None:
            pool.close()
    t_loop = time.perf_counter() - t_start - t_setup
    done = engine.complete_results(st)
    chosen, why = engine.choose(done, max_loss, target_speedup, decide)
    front = engine.pareto(done) if done else []
    # -- test split: only the front and the chosen trial ---------------------------------------------------------
    runner = trial.runner_for(dataclasses.replace(setup, model_bytes=None)) if not ray else trial.Runner(
        dataclasses.replace(setup, model_bytes=None))
    scored = {r["number"]: r for r in front[:12]}
    if chosen is not None:
        scored[chosen["number"]] = chosen
    for r in scored.values():
        t = runner.run(r["pipeline"], sd.test, timed=False)
        r["test"] = {k: t.get(k) for k in ("quality", "quality_ci", "task", "agreement", "verify")}
    test_base = runner.evaluator(sd.test).original()
    info = {"model": str(model), "data": sd.info, "mode": _mode(max_loss, target_speedup), "max_loss": max_loss,
            "target_speedup": target_speedup, "batch": batch, "seed": seed, "confidence": confidence,
            "sampler": sampler, "decide": decide, "workers": n_workers, "ray": (str(ray) if ray else None), "study": study_name,
            "storage": storage_url, "space": space_obj.to_dict(), "space_excluded": list(space_obj.excluded),
            "interrupted": loop.interrupted, "exhausted": loop.exhausted, "repeats": loop.repeats,
            "trials_asked": len(st.trials), "seconds": {"setup": round(t_setup, 1), "trials": round(t_loop, 1)},
            "selection_original": runner.selection.original(), "test_original": test_base,
            "cache": {"hits": runner.cache.hits, "misses": runner.cache.misses}}
    files = {"report_dir": str(report_dir), "trials": str(report_dir / "trials.jsonl"),
             "report": str(report_dir / "report.html")}
    all_trials = engine.all_results(st)
    opt_report = None
    if chosen is not None:
        gate = verify if verify is not None or _mode(max_loss, target_speedup) == "front" else measured_gate(chosen)
        cfg_dict = best_config(chosen["pipeline"], sd.data_config, gate)
        best_yaml = report_dir / "best.yaml"
        info["best_yaml"] = yaml.safe_dump(cfg_dict, sort_keys=False)
        report.write_text(best_yaml, info["best_yaml"])
        files["best_yaml"] = str(best_yaml)
        t0 = time.perf_counter()
        ctx = PassContext(calibration=list(cal_feeds), data_source="user", cache=runner.cache, fingerprint=fingerprint)
        try:
            opt_report = optimize(model, output, Pipeline.from_yaml(best_yaml), context=ctx)
        except GraphpruneError as e:
            why = f"{why}; optimize refused it: {e}"
            chosen = None
        info["seconds"]["commit"] = round(time.perf_counter() - t0, 1)
        if chosen is not None:
            files["output"] = str(output)
    info["why"] = why
    report.write(report_dir, all_trials, front, chosen, info, opt_report)
    result = SearchResult(chosen, why, front, all_trials, opt_report, files, info)
    if chosen is None:
        err = GraphpruneError(f"search: {why}; nothing written to {output} (report: {files['report']})")
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


#: margins under the chosen trial's measured agreement (verification recomputes them on the same samples, batched
#: in file order instead of by length, so padding moves them a little)
GATE_MARGINS = {"cosine": ("cosine_mean_min", 0.005), "neighbor_agreement": ("neighbor_agreement_min", 0.03),
                "top1": ("top1_min", 0.02)}


def measured_gate(chosen: dict) -> dict:
    """Verification thresholds for best.yaml in constraint and target modes: the search decided on the task metric
    (with its interval), so verification checks that the written model agrees with the original as well as the
    trial the search measured did, less a margin — not a fixed threshold that does not track the task."""
    gate = {}
    for fig, (name, margin) in GATE_MARGINS.items():
        if fig in chosen["agreement"]:
            gate[name] = max(0.0, math.floor((chosen["agreement"][fig]["mean"] - margin) * 1000) / 1000)
    return gate


def _mode(max_loss: float | None, target: float | None) -> str:
    return "constraint" if max_loss is not None else "target" if target is not None else "front"


def _probe_storage(url: str) -> None:
    import optuna

    try:
        optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - any driver error: the URL cannot be opened
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage {url!r} cannot be opened: {msg[:200]}") from None
