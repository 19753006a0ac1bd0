"""One trial: rewrite a clone of the loaded original with a pipeline, score it on the selection set, time it.

:class:`Setup` is everything a trial needs, picklable so Ray ships it to workers through the object store (the
model as ONNX bytes when it is not read from a shared path). :class:`Runner` is built from it once per process
(the original loaded, its session and reference outputs kept) and runs trials, each costing one rewrite (the
pipeline's passes, sharing the calibration cache) plus one pass over the selection set and one interleaved timing.

The calibration cache (:class:`Cache`) holds what a pass computes from the model and the calibration data alone
(``PassContext.memo``: channel importance and sensitivity), keyed by content hashes (the model file's bytes, the
calibration feeds, then each pass's name and config): in memory, and in ``cache_dir`` when given, so Ray workers on
one machine and a resumed search share it.

A trial's result is a dict: ``status`` (``complete`` | ``pruned`` | ``failed``), ``reason`` for the last two,
``pipeline`` (entries), ``quality``/``quality_ci``/``task``/``agreement``/``verify`` (``evaluate``), ``flops`` and
``params`` (before, after, ratio), ``latency`` (``speedup``, medians), ``seconds`` (rewrite, score, time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.search.data import EvalSet


def file_digest(path: str | Path) -> str:
    """sha256 of a model file and of its external-data files beside it."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] + sorted(p for p in path.parent.glob(path.name + "*.data"))
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def feeds_digest(feeds: list[dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for f in feeds:
        for k in sorted(f):
            h.update(k.encode())
            h.update(str(f[k].dtype).encode() + str(f[k].shape).encode())
            h.update(np.ascontiguousarray(f[k]).tobytes())
    return h.hexdigest()


class Cache:
    """``get``/``put`` by key: in memory, and as pickles in ``folder`` (written atomically) when given."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.mem: dict[str, Any] = {}
        self.hits = self.misses = 0

    def get(self, key: str) -> Any:
        if key in self.mem:
            self.hits += 1
            return self.mem[key]
        if self.folder is not None and (self.folder / f"{key}.pkl").is_file():
            with open(self.folder / f"{key}.pkl", "rb") as f:
                self.mem[key] = pickle.load(f)
            self.hits += 1
            return self.mem[key]
        self.misses += 1
        return None

    def put(self, key: str, value: Any) -> None:
        self.mem[key] = value
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.folder)
            with os.fdopen(fd, "wb") as f:
                pickle.dump(value, f)
            os.replace(tmp, self.folder / f"{key}.pkl")


@dataclasses.dataclass
class Setup:
    model_path: str
    model_bytes: bytes | None
    calibration: list[dict[str, np.ndarray]]
    selection: EvalSet
    task: str
    batch: int
    fingerprint: str
    metric: Callable | None = None
    confidence: float = 0.8
    seed: int = 0
    runs: int = 10
    threads: int | None = None
    cache_dir: str | None = None
    thresholds: Any = None
    primary: str | None = None
    #: One search call: its runners (one per process, Ray workers included) serve that search only. Two searches
    #: in one process with other thresholds, selection data, seed or confidence never share an evaluator.
    run_id: str = ""

    @property
    def key(self) -> str:
        return f"{self.run_id}:{self.fingerprint}:{self.task}:{self.primary}:{self.batch}:{self.runs}:{self.threads}"


class Runner:
    """Runs trials of one :class:`Setup` in this process."""

    def __init__(self, setup: Setup) -> None:
        from graphprune.backends.onnxruntime import make_session
        from graphprune.io import load_model
        from graphprune.search.evaluate import Evaluator, Timer

        self.setup = setup
        self._tmp = None
        path = Path(setup.model_path)
        if setup.model_bytes is not None:  # shipped through Ray's object store
            self._tmp = tempfile.TemporaryDirectory(prefix="graphprune-search-")
            path = Path(self._tmp.name) / "model.onnx"
            path.write_bytes(setup.model_bytes)
        self.model = load_model(path)
        self.session = make_session(self.model, setup.threads)
        self.cache = Cache(setup.cache_dir)
        self.selection = Evaluator(self.session, setup.selection, setup.batch, setup.task, setup.metric,
                                   setup.confidence, setup.seed, setup.thresholds, setup.primary)
        self.timer = Timer(self.session, self.selection.feeds[0], setup.runs, setup.threads)
        self._test: Any = None

    def evaluator(self, evalset: EvalSet | None):
        """The selection evaluator, or one for ``evalset`` (built once: the original runs on it once)."""
        from graphprune.search.evaluate import Evaluator

        if evalset is None:
            return self.selection
        if self._test is None:
            s = self.setup
            self._test = Evaluator(self.session, evalset, s.batch, s.task, s.metric, s.confidence, s.seed,
                                   s.thresholds, s.primary)
        return self._test

    def rewrite(self, entries: list[dict]) -> tuple[Any, Any]:
        """(the rewritten clone, the stage result); raises ``GraphpruneError`` for a refused config."""
        from graphprune.passes.base import PassContext
        from graphprune.pipeline import Pipeline, run_passes

        pipe = Pipeline.from_dict({"passes": [*entries, {"name": "cleanup"}]}, "trial")
        model = self.model.clone()
        ctx = PassContext(calibration=list(self.setup.calibration), data_source="user", cache=self.cache,
                          fingerprint=self.setup.fingerprint)
        return model, run_passes(model, pipe, ctx)

    def run(self, entries: list[dict], evalset: EvalSet | None = None, timed: bool = True) -> dict[str, Any]:
        from graphprune.backends.onnxruntime import make_session
        from graphprune.errors import GraphpruneError
        from graphprune.pipeline import HOUSEKEEPING_PASSES, skipped_tokens, unchanged_reason

        result: dict[str, Any] = {"pipeline": entries}
        t0 = time.perf_counter()
        try:
            model, rewritten = self.rewrite(entries)
        except GraphpruneError as e:
            return result | {"status": "pruned", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a pass bug on this combination: recorded, the search goes on
            return result | {"status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        seconds = {"rewrite": time.perf_counter() - t0}
        unchanged = [r for r in rewritten.records if not r["changed"] and r["name"] not in HOUSEKEEPING_PASSES]
        if unchanged:
            return result | {"status": "pruned", "reason": unchanged_reason(unchanged[0]), "seconds": seconds}
        recs = rewritten.records
        f0, f1 = recs[0]["flops"]["before"], recs[-1]["flops"]["after"]
        p0, p1 = recs[0]["params"]["before"], recs[-1]["params"]["after"]
        result["flops"] = {"before": f0, "after": f1, "ratio": f1 / f0 if f0 else 1.0}
        result["params"] = {"before": p0, "after": p1, "ratio": p1 / p0 if p0 else 1.0}
        keep = ("channel_ratio", "predicted_flops_ratio", "method")
        result["info"] = {r["name"]: {k: v for k, v in r.get("info", {}).items() if k in keep} for r in recs
                          if any(k in r.get("info", {}) for k in keep)}
        t0 = time.perf_counter()
        session = make_session(model, self.setup.threads)
        result.update(self.evaluator(evalset).score(session, skip_tokens=skipped_tokens(recs)))
        seconds["score"] = time.perf_counter() - t0
        if timed:
            t0 = time.perf_counter()
            result["latency"] = self.timer.speedup(session)
            seconds["time"] = time.perf_counter() - t0
        result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        result["status"] = "complete"
        return result


_RUNNERS: dict[str, Runner] = {}


def runner_for(setup: Setup) -> Runner:
    """This process's runner for ``setup`` (built on first use; Ray workers keep theirs between tasks)."""
    if setup.key not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[setup.key] = Runner(setup)
    return _RUNNERS[setup.key]
