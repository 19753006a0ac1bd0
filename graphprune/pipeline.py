"""Pipeline: run registered passes in order, from Python or YAML, and collect a per-pass report.

YAML schema (unknown keys are errors; the error names the key)::

    passes:                     # run in this order
      - name: token_drop        # a registry name (``graphprune passes`` lists them)
        keep_ratio: 0.7         # that pass's config fields, as sibling keys
    verify:                     # thresholds; a missing one is not checked
      max_abs_err: 1.0e-4
      cosine_min: 0.99
      top1_min: 0.99

After each pass the pipeline counts nodes, FLOPs and params, runs the ONNX checker and records the time; an
exception inside a pass is re-raised naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import pydantic
import yaml

from graphprune.analysis.flops import count_flops
from graphprune.errors import ConfigError, GraphpruneError
from graphprune.passes import get_pass
from graphprune.passes.base import GraphPass, PassConfig, PassContext
from graphprune.verify import VerifyThresholds


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

    def __init__(self, steps: Sequence[Step] = (), verify: VerifyThresholds | None = None) -> None:
        self.steps = list(steps)
        self.verify = verify or VerifyThresholds()

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
        unknown = sorted(set(data) - {"passes", "verify"})
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (allowed: passes, verify)")
        entries = data.get("passes") or []
        if not isinstance(entries, list):
            raise ConfigError(f"{source}: passes: expected a list of pass entries")
        steps = [cls.step(e, f"passes[{i}]") for i, e in enumerate(entries)]
        try:
            verify = VerifyThresholds.model_validate(data.get("verify") or {})
        except pydantic.ValidationError as e:
            raise ConfigError(f"{source}: " + _fmt_validation(e, "verify")) from None
        return cls(steps, verify)

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
            return cls.from_dict(data, str(path))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None

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
                raise GraphpruneError(
                    f"pass {step.name!r} failed after {ran or 'no passes'}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                ) from e
            seconds = time.perf_counter() - t0
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
                    "rewritten": result.rewritten,
                    "skipped": result.skipped,
                    **({"info": result.info} if result.info else {}),
                }
            )
            before = after
        return records


def _stats(model: ir.Model) -> dict[str, int]:
    fr = count_flops(model)
    return {"nodes": sum(1 for _ in model.graph), "flops": fr.flops, "params": fr.params}


def _check(model: ir.Model, pass_name: str) -> None:
    """ONNX checker on the graph structure; initializers become typed inputs so no weight bytes are read."""
    try:
        proto = ir.to_proto(model)
        g = proto.graph
        inputs = {i.name for i in g.input}
        for init in g.initializer:
            if init.name not in inputs:
                g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        del g.initializer[:]
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise GraphpruneError(f"pass {pass_name!r} produced an invalid model: {str(e).splitlines()[0]}") from e


def optimize(
    model_path: str | Path,
    output: str | Path,
    pipeline: Pipeline,
    *,
    feeds: list[dict] | None = None,
    bench: bool = False,
    bench_batch: int = 1,
    bench_runs: int = 20,
    threads: int | None = None,
    force: bool = False,
    context: PassContext | None = None,
) -> dict:
    """Load, run ``pipeline``, verify against the original, optionally benchmark, then save atomically.

    Returns the report dict (keys ``passes``, ``flops``, ``params``, ``verify``, and ``latency_ms`` when
    ``bench``). Nothing is written when verification fails, unless ``force``.
    """
    from graphprune.analysis.inputs import example_inputs
    from graphprune.backends.onnxruntime import benchmark
    from graphprune.errors import VerificationError
    from graphprune.io import check_output_path, load_model, save_model
    from graphprune.verify import compare

    model_path = Path(model_path)
    original = load_model(model_path)
    check_output_path(output, original, inputs=(model_path,))
    model = load_model(model_path)
    context = context or PassContext()
    context.source_path = str(model_path)
    if feeds is None:
        feeds = [example_inputs(original, batch=2, seed=0)]
    if context.calibration is None:
        context.calibration = feeds
    records = pipeline.run(model, context)
    _progress(context, "verify", 0, 1)
    report_verify = compare(model_path, model, feeds, pipeline.verify)
    _progress(context, "verify", 1, 1)
    if records:  # the pipeline already counted the model before its first and after its last pass
        f0, f1 = records[0]["flops"]["before"], records[-1]["flops"]["after"]
        p0, p1 = records[0]["params"]["before"], records[-1]["params"]["after"]
    else:
        r = count_flops(model)
        f0 = f1 = r.flops
        p0 = p1 = r.params
    report: dict[str, Any] = {
        "model": str(model_path),
        "output": str(output),
        "passes": records,
        "flops": {"before": f0, "after": f1, "ratio": f1 / max(f0, 1)},
        "params": {"before": p0, "after": p1, "ratio": p1 / max(p0, 1)},
        "verify": report_verify.to_dict(),
    }
    if not report_verify.passed and not force:
        err = VerificationError(
            "verification failed (" + "; ".join(report_verify.failures) + "); nothing written (use --force to write anyway)"
        )
        err.report = report  # type: ignore[attr-defined]
        raise err
    if bench:
        bench_feeds = example_inputs(original, batch=bench_batch, seed=1) if bench_batch != 2 else feeds[0]
        lat = benchmark(
            {"before": model_path, "after": model},
            bench_feeds,
            runs=bench_runs,
            threads=threads,
            progress=(lambda d, t: _progress(context, "benchmark", d, t)),
        )
        report["latency_ms"] = {
            "before": lat["before"]["median_ms"],
            "after": lat["after"]["median_ms"],
            "speedup": lat["before"]["median_ms"] / lat["after"]["median_ms"],
            "p90_before": lat["before"]["p90_ms"],
            "p90_after": lat["after"]["p90_ms"],
            "batch": bench_batch,
            "runs": bench_runs,
        }
    save_model(model, output, inputs=(model_path,))
    return report


def _progress(context: PassContext, task: str, done: int, total: int) -> None:
    if context.progress is not None:
        context.progress(task, done, total)
