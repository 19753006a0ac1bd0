"""ONNX Runtime backend: the one session factory, probes of intermediate values, runs and an interleaved benchmark.

Everything in graphprune that runs a model comes through here; ``analysis`` never does. onnxruntime itself is
imported on first use, so ``import graphprune`` does not load it.

Sessions run on CPU by default. ``providers`` may name ``cuda`` or ``tensorrt`` (requires onnxruntime-gpu,
installed by the ``gpu`` extra in place of onnxruntime); asking for one that is not installed is a user error.
Intra-op spinning is off so that two live sessions (original and optimized) do not steal each other's cores.

Probes (:class:`Probe`, :func:`probe`) read intermediate values: they run a *clone* of the model
(``ir.Model.clone``: new nodes and values, the weight tensors shared) with the values as extra graph outputs, so
the caller's model is never changed, not even for a moment, and later changes to it do not reach the probe.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from graphprune._dtype import upcast_bfloat16
from graphprune.analysis import flops
from graphprune.analysis.inputs import example_inputs
from graphprune.errors import GraphpruneError

if TYPE_CHECKING:
    import onnxruntime

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}

ModelLike = ir.Model | str | os.PathLike


def _ort():
    """The onnxruntime module, imported on first use."""
    import onnxruntime

    return onnxruntime


def _providers(names: Sequence[str] | None) -> list[str]:
    names = list(names or ["cpu"])
    available = _ort().get_available_providers()
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


def _session_options(threads: int | None, optimize: bool, arena: bool = True,
                     prepack: bool = True) -> onnxruntime.SessionOptions:
    ort = _ort()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def external_folder(model: ir.Model) -> str | None:
    """The one folder every external weight of ``model`` lives in (``None`` when there are none, or several
    folders): ORT can then take the model as bytes that carry only references, and read the weights from there."""
    folders = {str(v.const_value.base_dir) for g in (model.graph, *(f.graph for f in model.functions.values()))
               for v in g.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    return folders.pop() if len(folders) == 1 else None


def _inline_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))


def make_session(model: ModelLike, threads: int | None = None, providers: Sequence[str] | None = None,
                 optimize: bool = True, arena: bool = True, prepack: bool = True) -> onnxruntime.InferenceSession:
    """An ORT session for a path or an in-memory ``ir.Model``.

    An ``ir.Model`` is handed to ORT as bytes: external weights stay references, read by ORT from their folder
    (``session.model_external_initializers_file_folder_path``), so they are neither copied nor written again; only
    weights held in memory (new or changed by a pass) are serialised. When the external weights live in several
    folders, or the in-memory ones pass 1 GiB, the model is saved to a temporary folder first. ``optimize=False``
    turns ORT's graph optimizations off (probes: the session is built for a few runs, and every value stays as
    written). ``arena=False`` turns ORT's CPU memory arena off, so activation buffers are freed after each run
    instead of held (verification: a few runs, where peak memory matters more than allocation speed; on ViT-B it
    lowered the peak by ~150 MB at batch 8). ``prepack=False`` keeps ORT from packing MatMul/Gemm weights into a
    second, kernel-ready copy at load (verification and probes: a few runs; on ViT-B the session holds 108 MiB
    less and batch-8 runs take the same time, outputs equal within 2e-6). Benchmarks keep both on, as a deployed
    session has them."""
    ort = _ort()
    so, provs = _session_options(threads, optimize, arena, prepack), _providers(providers)
    if not isinstance(model, ir.Model):
        return ort.InferenceSession(str(model), so, providers=provs)
    has_external = any(isinstance(t, ir.ExternalTensor) for t in (v.const_value for v in model.graph.initializers.values()))
    folder = external_folder(model)
    if _inline_bytes(model) <= 1 << 30 and (folder is not None or not has_external):
        if folder is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=provs)
    with tempfile.TemporaryDirectory(prefix="graphprune-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), so, providers=provs)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
#: Blocks from this size up get their own mapping, unmapped when freed (see ``return_freed_memory``).
MMAP_THRESHOLD = 1 << 20


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory(collect: bool = True) -> None:
    """Hand memory freed by a dropped session back to the system, and keep later large blocks from piling up in
    the heap (glibc: ``malloc_trim``, and ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``; a no-op elsewhere).

    glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), so later activation buffers are
    served from the heap, and freeing them leaves the process's resident size where it was: without this, the
    original's session would still count while the optimized one runs, and every run's buffers would add to the
    peak. A fixed threshold makes each buffer of 1 MiB or more its own mapping, returned when ORT frees it (ViT-B,
    8 samples at batch 8: verification's peak 663 → 626 MiB, same time). The setting is process-wide and stays.

    ``collect``: run a full garbage collection first (frees the IR graphs, which hold reference cycles). It costs
    ~0.3 s in a process with many live objects, so callers skip it for small models."""
    import gc

    if collect:
        gc.collect()
    libc = _libc()
    if libc is None:
        return
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def _is_session(obj: Any) -> bool:
    return isinstance(obj, _ort().InferenceSession)


def run(model: ModelLike | onnxruntime.InferenceSession, feeds: Mapping[str, np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """Outputs of one run, in graph output order."""
    sess = model if _is_session(model) else make_session(model, threads)
    types = {i.name: i.type for i in sess.get_inputs()}
    return sess.run(None, {k: _as_input(v, types[k]) for k, v in feeds.items() if k in types})


def _as_input(value: np.ndarray, ort_type: str) -> np.ndarray:
    """A bfloat16 feed for the float32 twin of a bfloat16 model (``graphprune._dtype``): upcast, exactly."""
    arr = np.asarray(value)
    if ort_type == "tensor(float)" and arr.dtype.name == "bfloat16":
        return arr.astype(np.float32)
    return arr


def _main_graph_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the main graph in a fixed order: inputs, initializers, node outputs (graph order)."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


class Probe:
    """A session that reads ``values`` (values of ``model``'s main graph) as it is now: ``probe(feed)`` returns
    one array per value, in order, as ORT computes them.

    It runs a clone of the model with the values as extra outputs; ``model`` is left exactly as it was, and
    changes made to it afterwards do not reach the probe (so a pass can compare a model with its own edits).
    """

    def __init__(self, model: ir.Model, values: Sequence[ir.Value], threads: int | None = None) -> None:
        self.names: list[str] = []
        self._session = None
        if not values:
            return
        clone = model.clone()
        twin = dict(zip(map(id, _main_graph_values(model.graph)), _main_graph_values(clone.graph), strict=True))
        missing = [v.name for v in values if id(v) not in twin]
        if missing:
            raise ValueError(f"probe: values {missing} are not in the model's main graph")
        targets = [twin[id(v)] for v in values]
        outputs = set(clone.graph.outputs)
        clone.graph.outputs.extend(dict.fromkeys(v for v in targets if v not in outputs))
        self.names = [v.name for v in targets]
        upcast_bfloat16(clone)  # a bfloat16 model runs as its exact float32 twin (no CPU kernels): float32 arrays
        self._session = make_session(clone, threads, optimize=False, prepack=False)
        self._inputs = {i.name: i.type for i in self._session.get_inputs()}

    def __call__(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._session is None:  # nothing asked: ORT would read an empty list as "every output"
            return []
        return self._session.run(self.names, {k: _as_input(a, self._inputs[k]) for k, a in feed.items()
                                              if k in self._inputs})

    def runs(self, feeds: Iterable[Mapping[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        """The arrays of every feed, one list per feed, computed as the iterator is consumed."""
        for feed in feeds:
            yield self(feed)


def probe(model: ir.Model, values: Sequence[ir.Value], feeds: Iterable[Mapping[str, np.ndarray]],
          threads: int | None = None) -> Iterator[list[np.ndarray]]:
    """The arrays ``values`` take on each feed: one list (one array per value) per feed, in feed order.

    The session is built now, over the model as it is now (see :class:`Probe`); the feeds run as the iterator is
    consumed, so a caller can fold activations feed by feed without holding them all.
    """
    return Probe(model, values, threads).runs(feeds)


class OnnxRuntime:
    """The model runtime passes get from their ``PassContext`` (``graphprune.passes.base.Runtime``): probes and
    measured FLOPs in ONNX Runtime. ``threads``: ORT's intra-op threads for the probe sessions (None: ORT's own)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def probe(self, model: ir.Model, values: Sequence[ir.Value],
              feeds: Iterable[Mapping[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        return probe(model, values, feeds, self.threads)

    def prober(self, model: ir.Model, values: Sequence[ir.Value]) -> Probe:
        return Probe(model, values, self.threads)

    def measure_flops(self, model: ir.Model, batch: int = 1, dims: dict[str, int] | None = None) -> flops.FlopsReport:
        return measure_flops(model, batch, dims)


def runtime_shapes(model: ir.Model, values: Sequence[ir.Value], feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shapes ``values`` have in one run on ``feeds``, by value name."""
    arrays = next(probe(model, values, [feeds]))
    return {v.name: tuple(a.shape) for v, a in zip(values, arrays, strict=True)}


def measure_flops(model: ir.Model, batch: int = 1, dims: dict[str, int] | None = None) -> flops.FlopsReport:
    """:func:`graphprune.analysis.flops.count_flops`, with the shapes static inference leaves unknown read from one
    ORT run on generated inputs (e.g. behind data-dependent mask logic). Nodes still unresolved, or every node whose
    shapes were unknown when the model cannot run, are listed in ``unknown``."""
    shapes = flops.static_shapes(model, batch, dims)
    report = flops.count_flops(model, batch, dims, shapes=shapes)
    if not report.unknown:
        return report
    wanted = flops.unresolved_values(model, shapes)
    try:
        measured = runtime_shapes(model, wanted, example_inputs(model, batch=batch, dims=dims))
    except Exception:  # noqa: BLE001 - a fallback: unresolved shapes stay unknown and are reported as such
        return report
    return flops.count_flops(model, batch, dims, shapes={**shapes, **measured})


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median_ms": statistics.median(s) * 1e3,
        "p90_ms": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))] * 1e3,
        "min_ms": s[0] * 1e3,
        "runs": len(s),
    }


def benchmark(
    models: Mapping[str, ModelLike | onnxruntime.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    warmup: int = 3,
    runs: int = 20,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Latency of each model: warm-up, then ``runs`` rounds that run every model once, interleaved.

    Interleaving puts every model under the same machine load; compare ratios from one call, not across calls.
    """
    sessions = {k: (m if _is_session(m) else make_session(m, threads)) for k, m in models.items()}
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


def float16_proto(proto):
    """``proto`` (an ``onnx.ModelProto``) with float32 tensors, inputs and outputs in float16: ONNX Runtime's own
    converter (``onnxruntime.transformers.float16``); used for TensorRT's strongly typed ``--fp16`` builds."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=False)
