"""Score a candidate against the original on one :class:`~graphprune.search.data.EvalSet`, and time it.

The original runs once per evaluation set (its outputs are kept); a candidate then costs one pass over the set.
The scored output is the model's first output (its kind as ``verify.classify_output`` finds it). Figures:
``task`` (the task metric's mean for candidate and original, and the retained share with its paired-bootstrap
interval), ``agreement`` (each agreement metric's mean and interval, :mod:`graphprune.search.metrics`),
``quality`` (what the search maximises: the retained task share, else the primary agreement metric — k-NN overlap
for embeddings, top-1 agreement for logits, cosine otherwise) with ``quality_ci``, and ``verify`` (verification's
thresholds for this output's kind checked on the same figures verification computes: the gate
``graphprune optimize`` applies when it writes the model).

A callable metric ``metric(outputs, batch) -> float`` is called once per batch (``outputs``: the model's outputs,
``batch``: the feed dict, plus ``labels`` when given); a sample's score is its batch's, so intervals resample
batches' scores.

Latency (:class:`Timer`): the original's session stays alive; a candidate and the original run interleaved
(``backends.onnxruntime.benchmark``) on one batch of selection samples; the speedup is the ratio of medians.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from graphprune.search import metrics as M
from graphprune.search.data import EvalSet

PRIMARY = {"embedding": "knn_overlap", "logits": "top1"}
_VERIFY_FIGURES = {"cosine_mean_min": "cosine", "neighbor_agreement_min": "neighbor_agreement", "top1_min": "top1"}


def _outputs(session: Any, feeds: list[dict]) -> tuple[str, list[np.ndarray]]:
    name = session.get_outputs()[0].name
    inputs = {i.name for i in session.get_inputs()}
    outs = [session.run([name], {k: v for k, v in f.items() if k in inputs})[0] for f in feeds]
    return name, outs


def _stack(outs: list[np.ndarray], order: np.ndarray | None = None) -> np.ndarray:
    flat = [o.reshape(o.shape[0], -1) if o.ndim else o.reshape(1, 1) for o in outs]
    if len({f.shape[1] for f in flat}) > 1:  # ragged (per-token outputs of padded batches): pad with zeros
        width = max(f.shape[1] for f in flat)
        flat = [np.pad(f, ((0, 0), (0, width - f.shape[1]))) for f in flat]
    x = np.concatenate(flat).astype(np.float64)
    if order is not None:  # rows in batch order -> rows in the set's order
        back = np.empty_like(x)
        back[order] = x
        x = back
    return x


class Evaluator:
    """Scores candidates on ``evalset`` against the original (``reference``: its session)."""

    def __init__(self, reference: Any, evalset: EvalSet, batch: int, task: str, metric: Callable | None = None,
                 confidence: float = 0.8, seed: int = 0, thresholds: Any = None, primary: str | None = None) -> None:
        from graphprune.verify import VerifyThresholds, classify_output

        self.evalset, self.task, self.metric, self.primary = evalset, task, metric, primary
        self.confidence, self.seed = confidence, seed
        # Samples are batched in order of length (less padding: texts of mixed lengths run 2-3x faster) and the
        # outputs put back in the set's order.
        ds = evalset.dataset
        sizes = [sum(np.asarray(v).size for v in s.values()) for s in ds.samples]
        self.order = np.argsort(sizes, kind="stable")
        self.feeds = ds.subset(self.order).batches(batch)
        self.name, outs = _outputs(reference, self.feeds)
        self.kind = classify_output(self.name, outs)
        self.ref_outs = outs
        self.ref = _stack(outs, self.order)
        self.base = self._task(outs)
        self.limits = (thresholds or VerifyThresholds()).for_output(self.kind)

    def _task(self, outs: list[np.ndarray]) -> dict[str, np.ndarray] | None:
        es = self.evalset
        if self.task == "labels":  # per-token logits [B, T, V]: the prediction after the prompt, at its last position
            return {"accuracy": M.accuracy(_stack([o[:, -1] if o.ndim == 3 else o for o in outs], self.order),
                                           es.labels)}
        if self.task == "retrieval":
            x = _stack(outs, self.order)
            return M.retrieval(x[: es.queries], x[es.queries: 2 * es.queries])
        if self.task == "callable":
            scores, start = [], 0
            for f, o in zip(self.feeds, outs):
                n = len(next(iter(f.values())))
                batch = dict(f)
                if es.labels is not None:
                    batch["labels"] = es.labels[self.order[start:start + n]]
                scores += [float(self.metric([o], batch))] * n
                start += n
            back = np.empty(len(scores))
            back[self.order] = scores
            return {"metric": back}
        return None

    def score(self, session: Any, skip_tokens: Any = None) -> dict[str, Any]:
        """The candidate's figures; ``skip_tokens`` (output name → ``verify.SkipTokens``, from the trial's pass
        records) leaves those token positions out of the agreement figures, in both models (``token_drop`` with
        ``scope: image`` restores image rows that carry no prediction)."""
        _, outs = _outputs(session, self.feeds)
        x, ref = _stack(outs, self.order), self.ref
        skip = (skip_tokens or {}).get(self.name)
        if skip is not None:
            keeps = [skip.keep(f, o.shape) for f, o in zip(self.feeds, outs)]
            x = _stack([np.where(k.reshape(*k.shape, *[1] * (o.ndim - 2)), o, 0) for k, o in zip(keeps, outs)],
                       self.order)
            ref = _stack([np.where(k.reshape(*k.shape, *[1] * (o.ndim - 2)), o, 0)
                          for k, o in zip(keeps, self.ref_outs)], self.order)
        agree = M.agreement(ref, x, self.kind)
        fig = {k: {"mean": float(v.mean()), "ci": M.bootstrap(v, None, self.confidence, seed=self.seed)}
               for k, v in agree.items()}
        out: dict[str, Any] = {"agreement": fig, "kind": self.kind}
        mine = self._task(outs)
        if mine is not None:
            task = {}
            for k, v in mine.items():
                base = self.base[k]
                retained = float(v.mean() / base.mean()) if base.mean() > 0 else 1.0
                task[k] = {"value": float(v.mean()), "base": float(base.mean()), "retained": retained,
                           "ci": M.bootstrap(v, base, self.confidence, seed=self.seed)}
            first = self.primary if self.primary in task else next(iter(task))
            out["task"] = task
            out["quality_metric"] = first
            out["quality"], out["quality_ci"] = task[first]["retained"], task[first]["ci"]
        else:
            primary = self.primary or PRIMARY.get(self.kind, "cosine")
            if primary not in fig:
                from graphprune.errors import ConfigError

                if self.primary is not None:
                    raise ConfigError(f"--metric {self.primary}: not measured on a {self.kind} output "
                                      f"(measured: {', '.join(fig)})")
                primary = "cosine"
            out["quality"], out["quality_ci"] = fig[primary]["mean"], fig[primary]["ci"]
            out["quality_metric"] = primary
        failures = [f"{_VERIFY_FIGURES[k]} {fig[_VERIFY_FIGURES[k]]['mean']:.3f} < {v}"
                    for k, v in self.limits.items()
                    if k in _VERIFY_FIGURES and _VERIFY_FIGURES[k] in fig and fig[_VERIFY_FIGURES[k]]["mean"] < v]
        out["verify"] = {"passed": not failures, "failures": failures}
        return out

    def original(self) -> dict[str, float] | None:
        """The original's task figures on this set."""
        return None if self.base is None else {k: float(v.mean()) for k, v in self.base.items()}


class Timer:
    """Latency of candidates against the original, interleaved in one process (medians)."""

    def __init__(self, reference: Any, feed: dict[str, np.ndarray], runs: int = 10, threads: int | None = None):
        self.reference, self.feed, self.runs, self.threads = reference, feed, runs, threads

    def speedup(self, session: Any) -> dict[str, float]:
        from graphprune.backends.onnxruntime import benchmark

        lat = benchmark({"before": self.reference, "after": session}, self.feed, warmup=3, runs=self.runs)
        before, after = lat["before"]["median_ms"], lat["after"]["median_ms"]
        return {"before_ms": before, "after_ms": after, "speedup": before / after}
