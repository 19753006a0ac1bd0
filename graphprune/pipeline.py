"""Pipeline: run registered passes in order, from Python or YAML, and collect a per-pass report.

YAML schema (unknown keys are errors; the error names the key)::

    passes:                     # run in this order
      - name: token_drop        # a registry name (``graphprune passes`` lists them)
        keep_ratio: 0.7         # that pass's config fields, as sibling keys
    data:                       # real samples for calibration and verification (see graphprune.data)
      path: texts.txt           # .npz | image folder | .txt / .jsonl (relative to this file)
      tokenizer: tokenizer.json # text only
      max_length: 256
      calibration_samples: 128  # disjoint from the verification samples
      verify_samples: 64
    verify:                     # thresholds (see graphprune.verify); a left-out one takes its kind's default
      cosine_mean_min: 0.99
      neighbor_agreement_min: 0.95
      outputs: {sentence_embedding: {kind: embedding}}

After each pass the pipeline counts nodes, FLOPs and params, runs the ONNX checker and records the time; an
exception inside a pass (a bug) is re-raised as ``InternalError`` (CLI exit 1) naming the pass and the passes that
ran before it; a ``GraphpruneError`` of the pass (the user's doing) passes through (exit 2).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pydantic
import yaml

from graphprune._dtype import BF16_NOTE, has_bfloat16
from graphprune.backends.onnxruntime import OnnxRuntime, measure_flops
from graphprune.errors import ConfigError, GraphpruneError, InternalError
from graphprune.passes import get_pass
from graphprune.passes.base import GraphPass, PassConfig, PassContext, set_default_runtime
from graphprune.verify import VerifyThresholds

# The composition root: passes run models only through their context's runtime, which is ONNX Runtime's.
set_default_runtime(OnnxRuntime())

#: Sample counts when the user gives no data: generated inputs say nothing about fidelity, so few are used.
SYNTHETIC_SAMPLES = 8


class DataConfig(pydantic.BaseModel):
    """The ``data:`` mapping of a pipeline config (the ``--data`` family of CLI options overrides it)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    path: str | None = pydantic.Field(None, description=".npz, a folder of images, or .txt/.jsonl texts")
    tokenizer: str | None = pydantic.Field(None, description="tokenizer.json for text data")
    max_length: int = pydantic.Field(128, ge=1, description="text: tokens per sample (truncated)")
    mean: list[float] | None = pydantic.Field(None, description="images: per-channel mean (default ImageNet)")
    std: list[float] | None = pydantic.Field(None, description="images: per-channel std (default ImageNet)")
    normalize: bool = pydantic.Field(True, description="images: apply mean/std after scaling to [0, 1]")
    calibration_samples: int | None = pydantic.Field(None, ge=1, description="default 128 (8 when synthetic)")
    verify_samples: int | None = pydantic.Field(None, ge=1, description="default 64 (8 when synthetic)")
    allow_overlap: bool = pydantic.Field(False, description="let calibration and verification share samples")
    seed: int = pydantic.Field(0, description="seed of the calibration/verification split")
    batch_size: int = pydantic.Field(8, ge=1, description="samples per ORT run (calibration and verification)")


def _fmt_validation(err: pydantic.ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{where}.{loc}: {first['msg']}" if loc else f"{where}: {first['msg']}"


@dataclasses.dataclass(frozen=True)
class Step:
    """One configured pass of a pipeline."""

    cls: type[GraphPass]
    config: PassConfig

    @property
    def name(self) -> str:
        return self.cls.name


class Pipeline:
    """An ordered list of configured passes plus verification thresholds."""

    def __init__(self, steps: Sequence[Step] = (), verify: VerifyThresholds | None = None,
                 data: DataConfig | None = None) -> None:
        self.steps = list(steps)
        self.verify = verify or VerifyThresholds()
        self.data = data or DataConfig()

    # -- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def step(entry: Mapping[str, Any], where: str = "passes[0]") -> Step:
        """Validate one ``{name: ..., <config keys>}`` entry into a :class:`Step`."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping with a 'name' key, got {type(entry).__name__}")
        if "name" not in entry:
            raise ConfigError(f"{where}.name: missing (the registry name of the pass)")
        cls = get_pass(str(entry["name"]))
        fields = {k: v for k, v in entry.items() if k != "name"}
        try:
            config = cls.Config.model_validate(fields)
        except pydantic.ValidationError as e:
            raise ConfigError(_fmt_validation(e, f"{where} ({cls.name})")) from None
        except ConfigError as e:
            raise ConfigError(f"{where} ({cls.name}): {e}") from None
        return Step(cls, config)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> Pipeline:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping with 'passes' (and optionally 'verify')")
        unknown = sorted(set(data) - {"passes", "verify", "data"})
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (allowed: passes, verify, data)")
        entries = data.get("passes") or []
        if not isinstance(entries, list):
            raise ConfigError(f"{source}: passes: expected a list of pass entries")
        steps = [cls.step(e, f"passes[{i}]") for i, e in enumerate(entries)]
        try:
            verify = VerifyThresholds.model_validate(data.get("verify") or {})
        except pydantic.ValidationError as e:
            raise ConfigError(f"{source}: " + _fmt_validation(e, "verify")) from None
        try:
            data_cfg = DataConfig.model_validate(data.get("data") or {})
        except pydantic.ValidationError as e:
            raise ConfigError(f"{source}: " + _fmt_validation(e, "data")) from None
        return cls(steps, verify, data_cfg)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Pipeline:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
        try:
            pipe = cls.from_dict(data, str(path))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
        rel = {k: str(path.parent / v) for k in ("path", "tokenizer") if (v := getattr(pipe.data, k)) and not Path(v).is_absolute()}
        if rel:  # data paths in a config are relative to the config file
            pipe.data = pipe.data.model_copy(update=rel)
        return pipe

    def add(self, name: str, **config: Any) -> Pipeline:
        """Append a pass by registry name (Python API); returns self for chaining."""
        self.steps.append(self.step({"name": name, **config}, f"passes[{len(self.steps)}]"))
        return self

    # -- running -------------------------------------------------------------------------------------------------
    def run(self, model: ir.Model, context: PassContext | None = None, check: bool = True) -> list[dict]:
        """Run every step in place on ``model``; return one report record per pass."""
        context = context or PassContext()
        records: list[dict] = []
        before = _stats(model)
        for i, step in enumerate(self.steps):
            t0 = time.perf_counter()
            try:
                result = step.cls(step.config, context)(model)
            except GraphpruneError:
                raise
            except Exception as e:  # a bug or unsupported graph: name the pass and what ran before
                ran = [s.name for s in self.steps[:i]]
                raise InternalError(
                    f"pass {step.name!r} failed after {ran or 'no passes'}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                ) from e
            seconds = time.perf_counter() - t0
            context.advance(step.name, step.config.model_dump(mode="json"))
            if check:
                _check(model, step.name)
            after = _stats(model)
            records.append(
                {
                    "name": step.name,
                    "config": step.config.model_dump(mode="json"),
                    "changed": bool(result.modified),
                    "seconds": round(seconds, 4),
                    "nodes": {"before": before["nodes"], "after": after["nodes"]},
                    "flops": {"before": before["flops"], "after": after["flops"]},
                    "params": {"before": before["params"], "after": after["params"]},
                    "rewritten": [r.to_dict() for r in result.rewritten],
                    "skipped": [s.to_dict() for s in result.skipped],
                    **({"info": result.info} if result.info else {}),
                    **({"warnings": list(result.warnings)} if getattr(result, "warnings", None) else {}),
                }
            )
            before = after
        return records


def _stats(model: ir.Model) -> dict[str, int]:
    fr = measure_flops(model)
    return {"nodes": sum(1 for _ in model.graph), "flops": fr.flops, "params": fr.params}


def _check(model: ir.Model, pass_name: str) -> None:
    """ONNX checker on the graph structure. The graph is serialised without its initializers (they become typed
    inputs), so no weight bytes are read or copied: mapped weights stay unread, lazy slices unevaluated."""
    graph = model.graph
    try:
        view = ir.GraphView(graph.inputs, graph.outputs, nodes=graph, opset_imports=graph.opset_imports,
                            name=graph.name)
        g = ir.to_proto(view)
        inputs = {v.name for v in graph.inputs}
        for v in graph.initializers.values():
            t = v.const_value
            if v.name not in inputs and t is not None:
                g.input.append(onnx.helper.make_tensor_value_info(v.name, int(t.dtype), list(t.shape.numpy())))
        proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                         for d, v in model.opset_imports.items()],
                                       ir_version=model.ir_version,
                                       functions=[ir.to_proto(f) for f in model.functions.values()])
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise InternalError(f"pass {pass_name!r} produced an invalid model: {str(e).splitlines()[0]}") from e


def resolve_data(
    model: ir.Model,
    data: Any = None,
    config: DataConfig | None = None,
) -> tuple[Any, Any]:
    """The (calibration, verification) :class:`graphprune.data.Dataset` pair for ``model``.

    ``data`` is a path, a ``Dataset`` or an iterable of feed dicts; ``None`` falls back to ``config.path`` and
    then to synthetic samples (``SYNTHETIC_SAMPLES`` each for calibration and verification, disjoint seeds,
    unless the config asks for other counts). Real data is split with ``Dataset.split`` (seeded, disjoint unless
    ``allow_overlap``). Bad data raises ``DataError`` before anything is run or written.
    """
    from graphprune.data import Dataset, load_data, synthetic_data

    cfg = config or DataConfig()
    if data is None and cfg.path is not None:
        data = cfg.path
    if data is None:
        n_cal = cfg.calibration_samples or SYNTHETIC_SAMPLES
        n_ver = cfg.verify_samples or SYNTHETIC_SAMPLES
        return synthetic_data(model, n_cal, seed=cfg.seed), synthetic_data(model, n_ver, seed=cfg.seed + 1)
    if not isinstance(data, Dataset):
        data = load_data(data, model, tokenizer=cfg.tokenizer, max_length=cfg.max_length, mean=cfg.mean, std=cfg.std,
                         normalize=cfg.normalize)
    return data.split(cfg.calibration_samples or 128, cfg.verify_samples or 64, seed=cfg.seed,
                      allow_overlap=cfg.allow_overlap)


#: Passes for which changing nothing is a normal outcome (the model was already clean). They are also exact:
#: they remove dead nodes and identities, fold constants and annotate shapes, without changing what any output
#: computes (see ``cleanup_verify_samples``).
HOUSEKEEPING_PASSES = frozenset({"cleanup", "dce", "identity_elimination", "constant_folding", "shape_inference"})
#: Verification samples for a pipeline of housekeeping passes only, unless ``data.verify_samples`` is set.
CLEANUP_VERIFY_SAMPLES = 2


def cleanup_verify_samples(pipeline: Pipeline, ver: Any, fixed_batch: int | None) -> tuple[Any, str | None]:
    """The verification samples for ``pipeline`` and, when they are fewer than ``ver``, why.

    A pipeline whose passes are all housekeeping (``HOUSEKEEPING_PASSES``) changes no value any output computes:
    a wrong rewrite there (a dropped node, a mis-folded constant) is wrong on every input, so on generated inputs
    the first ``CLEANUP_VERIFY_SAMPLES`` samples (one batch; a model with a fixed batch keeps one full batch)
    check it as well as all of them, and more would only repeat the model's runs. Any other pass, real data
    (the user asked for a check on it), or ``verify_samples`` set by the user keeps every sample.
    """
    keep = max(CLEANUP_VERIFY_SAMPLES, fixed_batch or 1)
    names = [s.name for s in pipeline.steps]
    if (any(n not in HOUSEKEEPING_PASSES for n in names) or ver.source == "user"
            or pipeline.data.verify_samples is not None or len(ver) <= keep):
        return ver, None
    why = (f"every pass is exact housekeeping ({', '.join(names) or 'no passes'}): verified on {keep} of {len(ver)} "
           "samples (set verify_samples / --verify-samples for more)")
    return ver.subset(range(keep)), why


@dataclasses.dataclass
class Loaded:
    """Stage 1 (:func:`load`): the model to rewrite, and what verification runs as the original."""

    path: Path
    model: ir.Model
    #: a clone of the model as loaded when its weights are mapped from the file, else the path
    original: ir.Model | Path
    #: the batch size the model fixes, or None when its batch axis is dynamic
    fixed_batch: int | None


@dataclasses.dataclass
class Calibrated:
    """Stage 2 (:func:`calibrate`): the calibration and verification samples, how they are batched, and what the
    report says about them."""

    calibration: Any  # graphprune.data.Dataset
    verification: Any
    batch: int
    exact: bool
    info: dict[str, Any]
    warnings: list[str]

    def verify_feeds(self) -> list[dict[str, np.ndarray]]:
        return self.verification.batches(self.batch, exact=self.exact)


@dataclasses.dataclass
class Rewritten:
    """Stage 3 (:func:`run_passes`): the per-pass records and the warnings they raise."""

    records: list[dict]
    warnings: list[str]
    seconds: float


def load(model_path: str | Path, bench: bool = False) -> Loaded:
    """Load ``model_path`` with its weights mapped; refuse what the later stages cannot do (``bench`` of bfloat16)."""
    from graphprune.analysis.inputs import static_batch
    from graphprune.io import load_model, mapped_from_file

    model_path = Path(model_path)
    model = load_model(model_path)
    if bench and has_bfloat16(model):
        raise ConfigError("cannot benchmark a bfloat16 model: ONNX Runtime's CPU provider has no bfloat16 kernels "
                          "(verification emulates bfloat16 in float32; time the engine on a GPU backend, or drop --bench)")
    # Weights inside a large .onnx were mapped from the file (io.load_model): verification runs a clone of the
    # model as loaded (its weights the same views into the file), not the file, which ORT would parse into memory.
    original = model.clone() if mapped_from_file(model, model_path) else model_path
    return Loaded(model_path, model, original, static_batch(model))


def calibrate(loaded: Loaded, pipeline: Pipeline, data: Any = None, feeds: list[dict] | None = None,
              context: PassContext | None = None) -> Calibrated:
    """Resolve the data (:func:`resolve_data`) and hand the calibration batches to ``context`` (unless it has some)."""
    data_cfg = pipeline.data
    if data is None and feeds is not None:  # the older form: its samples serve both roles, as they did
        data, data_cfg = feeds, data_cfg.model_copy(update={"allow_overlap": True})
    cal, ver = resolve_data(loaded.model, data, data_cfg)
    fixed = loaded.fixed_batch
    ver, fewer = cleanup_verify_samples(pipeline, ver, fixed)
    batch = fixed if fixed is not None else pipeline.data.batch_size
    if context is not None and context.calibration is None:
        context.calibration = cal.batches(batch, exact=fixed is not None)
        context.data_source = cal.source
    info = {"source": cal.source, "description": cal.description, "calibration_samples": len(cal),
            "verify_samples": len(ver)}
    if fewer is not None:
        info["verify_samples_reason"] = fewer
    if cal.source == "user":
        info["overlap_samples"] = _shared_samples(cal, ver)
    warnings: list[str] = []
    if ver.source != "user":
        warnings.append(f"verification used {len(ver)} synthetic inputs generated from the input specs; pass --data "
                        "with real samples to check fidelity")
    return Calibrated(cal, ver, batch, fixed is not None, info, warnings)


def run_passes(model: ir.Model, pipeline: Pipeline, context: PassContext) -> Rewritten:
    """Run ``pipeline`` on ``model`` in place; a pass that changed nothing (housekeeping aside) becomes a warning."""
    t0 = time.perf_counter()
    records = pipeline.run(model, context)
    seconds = time.perf_counter() - t0
    warnings: list[str] = []
    for r in records:
        warnings += [f"{r['name']}: {w}" for w in r.get("warnings", [])]
        if not r.get("changed") and r["name"] not in HOUSEKEEPING_PASSES:  # never a silent success
            warnings.append(unchanged_reason(r))
    return Rewritten(records, warnings, seconds)


def unchanged_reason(record: dict) -> str:
    """``"<pass> changed nothing; <first skip>"`` for the record of a pass that changed nothing."""
    skips = record.get("skipped") or []
    why = f"{skips[0]['where']}: {skips[0]['reason']}" if skips else "no site it rewrites was found"
    more = f" (and {len(skips) - 1} more skipped)" if len(skips) > 1 else ""
    return f"{record['name']} changed nothing; {why}{more}"


def optimize(
    model_path: str | Path,
    output: str | Path,
    pipeline: Pipeline,
    *,
    data: Any = None,
    feeds: list[dict] | None = None,
    bench: bool = False,
    bench_batch: int = 1,
    bench_runs: int = 20,
    threads: int | None = None,
    force: bool = False,
    context: PassContext | None = None,
) -> dict:
    """Load, run ``pipeline``, verify against the original on held-out samples, optionally benchmark, then save
    atomically: the stages :func:`load` → :func:`calibrate` → :func:`run_passes` → verify (and benchmark) → commit.

    ``data`` (a path understood by :func:`graphprune.data.load_data`, a ``Dataset`` or an iterable of feed
    dicts; default ``pipeline.data.path``) gives real samples: a seeded split feeds calibration (the passes'
    ``PassContext.calibration``) and, disjoint from it, verification. Without data both use generated inputs
    and the report says so (``data.source: "synthetic"``, a warning in ``warnings``). ``feeds`` is the older
    form of ``data`` (a list of feed dicts with a leading sample axis).

    Returns the report dict (keys ``data``, ``passes``, ``flops``, ``params``, ``verify``, ``warnings``, ``timings``
    (seconds per stage: load, passes, save, verify, benchmark, commit), and ``latency_ms`` when ``bench``). Nothing
    is written when verification fails, unless ``force``.

    Memory: the model is loaded with its weights mapped (``io.load_model``), saved once to the staged output, and
    its maps closed before verification runs the original and then the staged file, one session at a time.
    """
    from graphprune.io import check_output_path, release_weights, stage_model

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load(model_path, bench)
    model_path, model, original = loaded.path, loaded.model, loaded.original
    check_output_path(output, model, inputs=(model_path,))
    context = context or PassContext()
    context.source_path = str(model_path)
    cal = calibrate(loaded, pipeline, data, feeds, context)
    if loaded.fixed_batch is not None:  # the model fixes its batch: feed exactly that many samples per run
        bench_batch = loaded.fixed_batch
    _progress(context, "load", 1, 1)
    timings["load"] = time.perf_counter() - t0
    rewritten = run_passes(model, pipeline, context)
    timings["passes"] = rewritten.seconds
    records, warnings = rewritten.records, cal.warnings + rewritten.warnings
    verify_feeds = cal.verify_feeds()
    # Serialised once: verification and the benchmark run the staged file, which is then renamed into place.
    t0 = time.perf_counter()
    with stage_model(model, output, inputs=(model_path,)) as staged:
        timings["save"] = time.perf_counter() - t0
        # The pages passes read stop counting here before ORT maps the weights (they reopen if read again).
        release_weights(model)
        if isinstance(original, ir.Model):
            release_weights(original)
        report = _verify_bench_report(model_path, original, output, model, staged.path, records, pipeline,
                                      cal.verification, verify_feeds, cal.info, warnings, force, bench, bench_batch,
                                      bench_runs, threads, context, timings)
        t0 = time.perf_counter()
        staged.commit()
        timings["commit"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return report


def skipped_tokens(records: list[dict]) -> dict:
    """Output positions the passes ask verification to leave out (``info.verify_skip_tokens``: image tokens a
    ``token_drop`` with ``scope: image`` dropped, whose restored rows carry no prediction)."""
    from graphprune.verify import SkipTokens

    out = {}
    for rec in records:
        spec = (rec.get("info") or {}).get("verify_skip_tokens")
        if spec and rec.get("changed"):
            for name in spec["outputs"]:
                out[name] = SkipTokens(spec["why"], tuple(spec["span"]) if spec.get("span") else None,
                                       spec.get("input"), spec.get("value"))
    return out


def _verify_bench_report(model_path, original, output, model, staged_path, records, pipeline, ver, verify_feeds,
                         data_info, warnings, force, bench, bench_batch, bench_runs, threads, context, timings) -> dict:
    """Verify the staged output against the original, build the report, benchmark; raise when verification fails."""
    from graphprune.analysis.inputs import example_inputs
    from graphprune.backends.onnxruntime import benchmark
    from graphprune.errors import VerificationError
    from graphprune.verify import compare

    t0 = time.perf_counter()
    report_verify = compare(original, staged_path, verify_feeds, pipeline.verify, real_data=ver.source == "user",
                            progress=lambda d, t: _progress(context, "verify", d, t),
                            skip_tokens=skipped_tokens(records))
    timings["verify"] = time.perf_counter() - t0
    if report_verify.compute_dtype != "model":
        warnings.append(f"verification {BF16_NOTE}")
    if records:  # the pipeline already counted the model before its first and after its last pass
        f0, f1 = records[0]["flops"]["before"], records[-1]["flops"]["after"]
        p0, p1 = records[0]["params"]["before"], records[-1]["params"]["after"]
    else:
        r = measure_flops(model)
        f0 = f1 = r.flops
        p0 = p1 = r.params
    report: dict[str, Any] = {
        "model": str(model_path),
        "output": str(output),
        "data": data_info,
        "passes": records,
        "flops": {"before": f0, "after": f1, "ratio": f1 / f0 if f0 else 1.0},
        "params": {"before": p0, "after": p1, "ratio": p1 / p0 if p0 else 1.0},
        "verify": report_verify.to_dict() | {"data_source": ver.source, "summary": report_verify.summary()},
        "warnings": warnings,
    }
    if not report_verify.passed and not force:
        where = (f" on {len(ver)} held-out real samples" if ver.source == "user" else
                 f" on {len(ver)} synthetic inputs (pass --data with real samples to check fidelity)")
        err = VerificationError(
            f"verification failed{where}: " + "; ".join(report_verify.failures)
            + "; nothing written (use --force to write anyway)"
        )
        err.report = report  # type: ignore[attr-defined]
        raise err
    if bench:
        bench_feeds, bench_inputs = example_inputs(model, batch=bench_batch, seed=1), "synthetic"
        if ver.source == "user":  # real inputs (and their sequence length) when there are enough of them
            real = ver.batches(bench_batch)
            if real and len(next(iter(real[0].values()))) == bench_batch:
                bench_feeds, bench_inputs = real[0], "verification samples"
        t0 = time.perf_counter()
        lat = benchmark(
            {"before": original, "after": staged_path},
            bench_feeds,
            runs=bench_runs,
            threads=threads,
            progress=(lambda d, t: _progress(context, "benchmark", d, t)),
        )
        timings["benchmark"] = time.perf_counter() - t0
        report["latency_ms"] = {
            "before": lat["before"]["median_ms"],
            "after": lat["after"]["median_ms"],
            "speedup": lat["before"]["median_ms"] / lat["after"]["median_ms"],
            "p90_before": lat["before"]["p90_ms"],
            "p90_after": lat["after"]["p90_ms"],
            "batch": bench_batch,
            "runs": bench_runs,
            "inputs": bench_inputs,
        }
    return report


def _shared_samples(a: Any, b: Any) -> int:
    """How many verification samples equal a calibration sample (0 unless ``allow_overlap``)."""
    def key(s: dict) -> bytes:
        return b"".join(np.ascontiguousarray(s[k]).tobytes() for k in sorted(s))

    seen = {key(s) for s in a.samples}
    return sum(key(s) in seen for s in b.samples)


def _progress(context: PassContext, task: str, done: int, total: int) -> None:
    if context.progress is not None:
        context.progress(task, done, total)
