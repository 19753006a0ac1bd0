"""The pass contract, built on ``onnx_ir.passes``.

A graphprune pass is an :class:`onnx_ir.passes.InPlacePass` with:
  * ``name``: its registry name (the ``name:`` key in pipeline YAML);
  * ``Config``: a pydantic model whose fields are the YAML keys (unknown keys are errors);
  * ``call(model) -> GraphResult``: the rewrite. The result says whether anything changed, what was rewritten
    (one :class:`Rewrite` record per layer/block/group) and what was skipped and why (one :class:`Skipped` per
    site). Never skip silently.

A site that cannot be rewritten correctly raises :class:`Skip` *before* it is edited; the pass catches it per
site, and :class:`GraphPass` turns a ``Skip`` that leaves ``call`` into an unchanged result that reports it. A skip
is never a user error (``Skip`` is not a :class:`~graphprune.errors.GraphpruneError`): a run that skips succeeds.

Passes are stateless between calls: per-run state (calibration data, target backend, progress) lives in the
:class:`PassContext` handed to the constructor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import onnx_ir as ir
import pydantic

from graphprune.analysis.inputs import example_inputs

if TYPE_CHECKING:
    from graphprune.analysis.flops import FlopsReport


class PassConfig(pydantic.BaseModel):
    """Base for pass configs: unknown keys are errors; configs are immutable."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class NoConfig(PassConfig):
    """A pass without options."""


class Skip(Exception):
    """Raised inside a pass when a site cannot be rewritten correctly, before anything there is changed.

    ``reason`` says why (it is what users read); ``where`` names the site when the raiser knows it (the catcher
    usually does: ``record(where)``).
    """

    def __init__(self, reason: str, where: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where

    def record(self, where: str | None = None) -> Skipped:
        """The report record: ``where`` (else the site given when raised, else ``model``) and the reason."""
        return Skipped(where or self.where or "model", self.reason)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A site a pass left unchanged, and why."""

    where: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """A site a pass rewrote. Each pass subclasses it with its own figures (a block's tokens, a group's kept
    channels, ...); the fields are the keys of the record in the JSON report, fields left ``None`` omitted."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


@dataclasses.dataclass
class GraphResult(ir.passes.PassResult):
    """:class:`onnx_ir.passes.PassResult` plus what was rewritten and what was skipped (with reasons)."""

    rewritten: list[Rewrite] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Things the user should know although the pass succeeded (e.g. activations taken from synthetic inputs).
    warnings: list[str] = dataclasses.field(default_factory=list)


Progress = Callable[[str, int, int], None]


class Runtime(Protocol):
    """What a pass may ask of a model runtime. Passes never import a backend: they use ``PassContext.runtime``,
    which ``graphprune.backends.onnxruntime`` provides (``OnnxRuntime``; the default of every context)."""

    def probe(self, model: ir.Model, values: Sequence[ir.Value],
              feeds: Iterable[Mapping[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        """The arrays ``values`` take on each feed (one list per feed), over the model as it is now."""
        ...

    def prober(self, model: ir.Model, values: Sequence[ir.Value]) -> Callable[[Mapping[str, np.ndarray]],
                                                                              list[np.ndarray]]:
        """A reusable ``feed -> arrays`` reader of ``values``, built over the model as it is now (later edits to
        ``model`` do not reach it)."""
        ...

    def measure_flops(self, model: ir.Model, batch: int = 1, dims: dict[str, int] | None = None) -> FlopsReport:
        """FLOPs, with the shapes static inference misses measured in a run."""
        ...


_default_runtime: Runtime | None = None


def set_default_runtime(runtime: Runtime) -> None:
    """The runtime a :class:`PassContext` gets when it is given none (``graphprune.pipeline`` sets ONNX Runtime's)."""
    global _default_runtime
    _default_runtime = runtime


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass
class PassContext:
    """Per-run state shared by the passes of one pipeline run.

    Attributes:
        calibration: input feeds (name -> array) for passes that look at activations; ``None`` means
            the pass generates them from the model's input specs (``analysis.inputs.example_inputs``).
        data_source: where ``calibration`` came from: ``"user"`` (real samples), ``"synthetic"`` (generated
            from the input specs) or ``None`` (not said). Passes that fit to activations warn unless ``"user"``,
            and data-aware defaults (``channel_prune``) switch on only for ``"user"``.
        target: the backend the result is meant for: ``onnxruntime`` (default) or ``tensorrt``.
        progress: ``progress(task, done, total)`` for long steps; the CLI shows it as a progress bar.
        source_path: the path the model was loaded from (for messages), if any.
        cache: a store of results computed from (model, calibration data) — ``get(key)`` returning ``None`` when
            absent, and ``put(key, value)`` — shared by the runs of one search; ``None`` (default) caches nothing.
        fingerprint: content hash of the model as the next pass sees it plus the calibration data; the pipeline
            extends it after every pass with the pass's name and config, so a key stays valid only for the same
            model state. Set by whoever sets ``cache`` (``graphprune.search``).
        runtime: runs models for passes that need activations, probes or measured FLOPs (:class:`Runtime`);
            default: the one ``set_default_runtime`` registered (ONNX Runtime).
    """

    calibration: list[dict[str, np.ndarray]] | None = None
    data_source: str | None = None
    target: str = "onnxruntime"
    progress: Progress | None = None
    source_path: str | None = None
    cache: Any = None
    fingerprint: str | None = None
    runtime: Runtime | None = None

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = _default_runtime

    def memo(self, name: str, params: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """``compute()``, or its earlier result for the same model state, calibration data, ``name`` and
        ``params`` (JSON-able) when a cache is set. Only results that are pure functions of those may go here."""
        if self.cache is None or self.fingerprint is None:
            return compute()
        key = _digest(self.fingerprint, name, params)
        value = self.cache.get(key)
        if value is None:
            value = compute()
            self.cache.put(key, value)
        return value

    def advance(self, name: str, config: dict[str, Any]) -> None:
        """Extend ``fingerprint`` past one pass (called by the pipeline after each pass it runs)."""
        if self.fingerprint is not None:
            self.fingerprint = _digest(self.fingerprint, name, config)

    def feeds(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        """The calibration feeds, or two batches of 4 generated from the model's input specs when there are none."""
        if self.calibration:
            return list(self.calibration)
        return [example_inputs(model, batch=4, seed=s) for s in range(2)]

    @property
    def real_data(self) -> bool:
        """True when the calibration feeds are the user's real samples."""
        return self.data_source == "user" and bool(self.calibration)

    def notify(self, name: str, done: int, total: int) -> None:
        """Report progress of a step the caller counts itself (no-op without a progress callback)."""
        if self.progress is not None:
            self.progress(name, done, total)

    @contextmanager
    def task(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """Report progress of a step with ``total`` units: ``with ctx.task("rank", n) as step: step(1)``."""
        done = 0

        def step(n: int = 1) -> None:
            nonlocal done
            done += n
            if self.progress is not None:
                self.progress(name, done, total)

        if self.progress is not None:
            self.progress(name, 0, total)
        yield step


class GraphPass(ir.passes.InPlacePass):
    """Base class of every registered graphprune pass."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = NoConfig
    #: One line for ``graphprune passes``.
    summary: ClassVar[str] = ""

    def __init__(self, config: PassConfig | dict | None = None, context: PassContext | None = None) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config.model_validate(config)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, not {type(config).__name__}")
        self.config = config
        self.context = context or PassContext()

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> GraphResult:
        """Run the pass; a :class:`Skip` that leaves ``call`` (raised before any edit) becomes an unchanged
        result that reports it, never an exception."""
        model = model_or_result.model if isinstance(model_or_result, ir.passes.PassResult) else model_or_result
        try:
            return super().__call__(model)
        except Skip as e:
            return GraphResult(model, False, skipped=[e.record()])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
