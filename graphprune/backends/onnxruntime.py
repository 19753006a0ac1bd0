"""ONNX Runtime backend: sessions, runs and an interleaved latency benchmark.

Sessions run on CPU by default. ``providers`` may name ``cuda`` or ``tensorrt`` (requires onnxruntime-gpu,
installed by the ``gpu`` extra in place of onnxruntime); asking for one that is not installed is a user error.
Intra-op spinning is off so that two live sessions (original and optimized) do not steal each other's cores.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphprune.errors import GraphpruneError

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}

ModelLike = ir.Model | str | os.PathLike


def _providers(names: Sequence[str] | None) -> list[str]:
    names = list(names or ["cpu"])
    available = ort.get_available_providers()
    out = []
    for n in names:
        full = _PROVIDERS.get(n.lower(), n)
        if full not in available:
            raise GraphpruneError(
                f"execution provider {n!r} is not available in this onnxruntime (available: {', '.join(available)});"
                " install onnxruntime-gpu (graphprune[gpu]) for cuda/tensorrt"
            )
        out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def _session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def make_session(model: ModelLike, threads: int | None = None, providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An ORT session for a path or an in-memory ``ir.Model`` (saved to a temporary folder when it holds
    external weights, since ORT cannot take >2 GB or external data from bytes)."""
    so, provs = _session_options(threads), _providers(providers)
    if not isinstance(model, ir.Model):
        return ort.InferenceSession(str(model), so, providers=provs)
    has_external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    big = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None) > 1 << 30
    if not has_external and not big:
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=provs)
    with tempfile.TemporaryDirectory(prefix="graphprune-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), so, providers=provs)


def run(model: ModelLike | ort.InferenceSession, feeds: Mapping[str, np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """Outputs of one run, in graph output order."""
    sess = model if isinstance(model, ort.InferenceSession) else make_session(model, threads)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median_ms": statistics.median(s) * 1e3,
        "p90_ms": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))] * 1e3,
        "min_ms": s[0] * 1e3,
        "runs": len(s),
    }


def benchmark(
    models: Mapping[str, ModelLike | ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    warmup: int = 3,
    runs: int = 20,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Latency of each model: warm-up, then ``runs`` rounds that run every model once, interleaved.

    Interleaving puts every model under the same machine load; compare ratios from one call, not across calls.
    """
    sessions = {k: (m if isinstance(m, ort.InferenceSession) else make_session(m, threads)) for k, m in models.items()}
    prepared = {}
    for k, s in sessions.items():
        names = {i.name for i in s.get_inputs()}
        prepared[k] = {n: v for n, v in feeds.items() if n in names}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, prepared[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for i in range(runs):
        for k in order if i % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            sessions[k].run(None, prepared[k])
            times[k].append(time.perf_counter() - t0)
        if progress is not None:
            progress(i + 1, runs)
    return {k: _stats(v) for k, v in times.items()}
