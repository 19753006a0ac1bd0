"""The Optuna loop: ask a trial, sample its pipeline from the space, run it (here or on Ray), tell the result.

The study is the single source of truth: two objectives (quality, speedup; both maximised), a constraint per mode
in ``user_attrs["constraints"]`` (≤ 0 is feasible) that the sampler reads, and each trial's full result in
``user_attrs["result"]``. Trials run in rounds of ``workers`` (asked together, run, then told in trial order), so a
local run and a Ray run with the same ``workers`` and seed ask the same trials. ``trials`` counts the distinct
pipelines evaluated (resumed ones included): a pipeline the sampler proposes again is told its first result and run
no more, and does not count, nor does a trial that picked no pass. The loop stops at ``trials`` distinct pipelines,
at ``time_budget`` seconds, on Ctrl-C (the round in flight is told as failed; the study keeps every finished
trial), or when the space looks exhausted: ``STALE_ROUNDS`` rounds in a row proposed nothing new (``exhausted``).

Modes and the decision (:func:`choose`), on selection figures, among the trials measured faster than the original;
``quality_ci`` is the paired-bootstrap interval:
  * constraint (``max_loss`` L): feasible when the retained quality ≥ 1 − L (``decide="point"``, default: the point
    estimate; ``"lower"``: the interval's lower end, which needs large selection sets: with 200 retrieval queries
    the 80% interval of recall@1 retained is about ±3%); the fastest feasible trial wins;
  * target (``target_speedup`` S): feasible when the speedup ≥ S; the best quality (then the fastest) wins;
  * default: the Pareto front of (quality, speedup) is reported; the fastest trial that passes verification's gate
    wins (it is on the front of the trials that pass).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from graphprune.errors import ConfigError


def _q(result: dict[str, Any], decide: str) -> float:
    """The quality a decision reads: the point estimate, or the lower end of its interval."""
    return result["quality_ci"][0] if decide == "lower" else result["quality"]


def constraints(result: dict[str, Any], max_loss: float | None, target: float | None,
                decide: str = "point") -> list[float]:
    if max_loss is not None:
        return [(1.0 - max_loss) - _q(result, decide)]
    if target is not None:
        return [target - result["latency"]["speedup"]]
    return [0.0 if result["verify"]["passed"] else 1.0]


def pipeline_key(pipeline: list[dict]) -> str:
    """One pipeline's identity across trials: a re-sampled pipeline has the same key."""
    return json.dumps(pipeline, sort_keys=True)


def pareto(results: list[dict]) -> list[dict]:
    """The trials no other trial beats on both quality and speedup (ties kept), fastest first. A pipeline the sampler
    proposed again is one point: its first trial stands for it (the repeats share its result), so the front, and
    the test split scored on it, hold distinct models."""
    first: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: r.get("number", 0)):
        first.setdefault(pipeline_key(r["pipeline"]), r)
    results = list(first.values())
    front = []
    for r in results:
        q, s = r["quality"], r["latency"]["speedup"]
        if not any(o["quality"] >= q and o["latency"]["speedup"] >= s and
                   (o["quality"] > q or o["latency"]["speedup"] > s) for o in results):
            front.append(r)
    return sorted(front, key=lambda r: -r["latency"]["speedup"])


def choose(results: list[dict], max_loss: float | None, target: float | None,
           decide: str = "point") -> tuple[dict | None, str]:
    """The chosen trial and why (or None and why not)."""
    if not results:
        return None, "no trial completed"
    faster = [r for r in results if r["latency"]["speedup"] > 1.0]
    if not faster:
        return None, "no trial measured faster than the original"
    results = faster
    if max_loss is not None:
        what = "the interval's lower end" if decide == "lower" else "the point estimate"
        ok = [r for r in results if _q(r, decide) >= 1.0 - max_loss]
        if not ok:
            best = max(results, key=lambda r: _q(r, decide))
            return None, (f"no trial kept ≥ {1 - max_loss:.4g} of the quality at {what} (best "
                          f"{_q(best, decide):.4f}, trial {best['number']})")
        best = max(ok, key=lambda r: (r["latency"]["speedup"], r["quality"]))
        return best, f"fastest trial whose quality stays above {1 - max_loss:.4g} at {what}"
    if target is not None:
        ok = [r for r in results if r["latency"]["speedup"] >= target]
        if not ok:
            fastest = max(results, key=lambda r: r["latency"]["speedup"])
            return None, (f"no trial reached {target:g}x (fastest {fastest['latency']['speedup']:.2f}x, trial "
                          f"{fastest['number']})")
        return max(ok, key=lambda r: (r["quality"], r["latency"]["speedup"])), f"best quality at ≥ {target:g}x"
    ok = [r for r in results if r["verify"]["passed"]]
    if not ok:
        return None, "no trial passes verification: " + "; ".join(pareto(results)[0]["verify"]["failures"])
    best = max(ok, key=lambda r: (r["latency"]["speedup"], r["quality"]))
    return best, "fastest model that passes verification (on the front of the trials that pass)"


#: Rounds in a row that propose no new pipeline before the loop calls the space exhausted (a small discrete space,
#: or a sampler that has settled).
STALE_ROUNDS = 25


class Loop:
    """Runs the study: ``evaluate(list of pipelines) -> list of results`` does the work (local or Ray)."""

    def __init__(self, study: Any, space: Any, evaluate: Callable[[list[list[dict]]], list[dict]], *,
                 trials: int, time_budget: float | None, workers: int, max_loss: float | None,
                 target: float | None, progress: Callable[[dict], None] | None = None, decide: str = "point") -> None:
        self.study, self.space, self.evaluate = study, space, evaluate
        self.trials, self.time_budget, self.workers = trials, time_budget, max(1, workers)
        self.max_loss, self.target, self.progress, self.decide = max_loss, target, progress, decide
        self.seen: dict[str, dict] = {}  # pipeline (JSON) -> result: a pipeline sampled again is not re-run
        self.interrupted = False
        self.exhausted = False
        self.repeats = 0  # trials told an earlier trial's result (or that picked no pass): run nothing, count nothing

    def run(self) -> None:
        import optuna

        t_start = time.monotonic()
        for r in complete_results(self.study):  # resumed: trials already run are not run again
            self.seen.setdefault(pipeline_key(r["pipeline"]), r)
        done0, stale = len(self.seen), 0
        while len(self.seen) < self.trials:
            elapsed = time.monotonic() - t_start
            if self.time_budget is not None and elapsed >= self.time_budget:
                break
            if stale >= STALE_ROUNDS:
                self.exhausted = True
                break
            n = min(self.workers, self.trials - len(self.seen))
            asked = [self.study.ask() for _ in range(n)]
            try:
                pipes = [self.space.sample(t) for t in asked]
                todo = [(t, p) for t, p in zip(asked, pipes) if p]
                for t, p in zip(asked, pipes):
                    if not p:
                        t.set_user_attr("result", {"status": "pruned", "reason": "the trial picked no pass",
                                                   "pipeline": []})
                        self.study.tell(t, state=optuna.trial.TrialState.PRUNED)
                keys = [pipeline_key(p) for _, p in todo]
                fresh = list({k: p for (_, p), k in zip(todo, keys) if k not in self.seen}.values())
                self.repeats += n - len(fresh)
                stale = 0 if fresh else stale + 1
                ran = iter(self.evaluate(fresh) if fresh else [])
                results = []
                for k in keys:  # a repeated pipeline reuses its result (quality, FLOPs, the latency measured then)
                    if k not in self.seen:
                        self.seen[k] = next(ran)
                    results.append(dict(self.seen[k]))
            except KeyboardInterrupt:
                for t in asked:
                    if self.study._storage.get_trial(t._trial_id).state == optuna.trial.TrialState.RUNNING:
                        self.study.tell(t, state=optuna.trial.TrialState.FAIL)
                self.interrupted = True
                break
            for (t, _), r in zip(todo, results):
                r["number"] = t.number
                t.set_user_attr("result", r)
                if r["status"] == "complete":
                    cons = constraints(r, self.max_loss, self.target, self.decide)
                    t.set_user_attr("constraints", cons)
                    if hasattr(t, "set_constraint"):  # optuna >= 5 reads constraints from the trial
                        for i, c in enumerate(cons):
                            t.set_constraint(f"c{i}", c)
                    self.study.tell(t, [r["quality"], r["latency"]["speedup"]])
                else:
                    self.study.tell(t, state=optuna.trial.TrialState.PRUNED if r["status"] == "pruned"
                                    else optuna.trial.TrialState.FAIL)
            if self.progress is not None:
                elapsed = time.monotonic() - t_start
                done = len(self.seen)
                per = elapsed / max(1, done - done0)
                left = (self.trials - done) * per
                if self.time_budget is not None:
                    left = min(left, max(0.0, self.time_budget - elapsed))
                best, why = choose(complete_results(self.study), self.max_loss, self.target, self.decide)
                self.progress({"done": done, "total": self.trials, "elapsed": elapsed, "left": left,
                               "best": best, "why": why, "last": results[-1] if results else None})


def complete_results(study: Any) -> list[dict]:
    import optuna

    return [t.user_attrs["result"] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "result" in t.user_attrs]


def all_results(study: Any) -> list[dict]:
    out = []
    for t in study.get_trials(deepcopy=False):
        r = {"number": t.number} | dict(t.user_attrs.get("result") or {"status": t.state.name.lower(),
                                                                         "pipeline": []})
        if t.state.name == "FAIL" and r.get("status") == "complete":
            r["status"] = "failed"
        out.append(r)
    return out


def open_study(storage: str, name: str, resume: bool, seed: int, sampler: str, fingerprint: str) -> Any:
    """Create (or, with ``resume``, load) the study; a storage that cannot be opened is a ``ConfigError``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        rdb = optuna.storages.RDBStorage(storage)
    except Exception as e:  # noqa: BLE001 - any driver error: the URL cannot be opened
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage {storage!r} cannot be opened: {msg[:200]}") from None

    def cons(t):
        return t.user_attrs.get("constraints", [1.0])

    # optuna >= 5 takes constraints from Trial.set_constraint; older versions through constraints_func
    kw = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": cons}
    s = (optuna.samplers.NSGAIISampler(seed=seed, **kw) if sampler == "nsga2" else
         optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, **kw))
    names = optuna.get_all_study_names(rdb)
    if name in names and not resume:
        raise ConfigError(f"study {name!r} already exists in {storage}; pass --resume to continue it, or --study NEW")
    if name not in names and resume:
        raise ConfigError(f"--resume: no study {name!r} in {storage}")
    study = optuna.create_study(storage=rdb, study_name=name, directions=["maximize", "maximize"], sampler=s,
                                load_if_exists=resume)
    if resume:
        if study.user_attrs.get("fingerprint") not in (None, fingerprint):
            raise ConfigError(f"--resume: study {name!r} was run on another model or other data")
    else:
        study.set_user_attr("fingerprint", fingerprint)
    return study
