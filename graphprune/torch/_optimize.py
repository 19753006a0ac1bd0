"""``graphprune.torch.optimize``: export an ``nn.Module``, run a pipeline on the ONNX graph, verify against the module.

Steps
  1. export with :func:`graphprune.torch.export` (dynamo; parameter names kept) to ``<out stem>.source.onnx``;
  2. a ``channel_prune`` step gets ``folded_biases: false`` (a constant per-head bias folded by the exporter has no
     module parameter to slice), ``ignore_stem: true`` unless the step sets it (a ViT's embedding width is often
     carried by exporter-made constants, such as CLIP's position table looked up by constant ids, that map to no
     parameter; ``ignore_stem: auto`` prunes it where they do, as in timm-style ViTs) and, without ``plan_out``,
     ``<out stem>.plan.json``, so the plan comes back;
  3. :func:`graphprune.optimize` runs the passes, verifies the optimized graph against the export on held-out
     samples (``data``, else synthetic), and writes ``out``;
  4. the module itself runs on the same verification samples: its outputs are compared with the export's
     (``report["torch"]["export"]``) and with the optimized graph's (``report["torch"]["optimized"]``). An export
     that does not reproduce the module (``max_abs_err`` above ``export_atol`` + 1e-3 · max |output|) is a
     :class:`VerificationError`: nothing the ONNX verification said would hold for the module then.
A ``depth_prune`` step adds the plan's ``depth`` entries (the modules that computed the removed units, and what
they return: :mod:`._depth`); a pipeline with depth_prune and no channel_prune gets a plan with no slices.
The plan gets ``info.torch`` (the export's dynamic axes and opset, which :func:`apply_plan` reads for its FX path,
and the example inputs' shapes and dtypes, on which it checks an eager copy when it is given no inputs).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import ConfigError, GraphpruneError, VerificationError
from graphprune.torch._depth import record_units
from graphprune.torch._export import export
from graphprune.torch._tensors import flat_tensors

CHANNEL_PLAN = "graphprune.channel_plan/1"


@dataclasses.dataclass
class TorchResult:
    """What :func:`optimize` returns."""

    onnx_path: Path
    """The optimized ONNX model (``out``)."""
    report: dict
    """:func:`graphprune.optimize`'s report plus ``torch`` (module vs export, module vs optimized)."""
    plan: dict | None
    """The prune plan (``graphprune.channel_plan/1``: channel slices, and ``depth`` for removed blocks), or ``None``
    when neither ``channel_prune`` nor ``depth_prune`` changed the model."""
    source_path: Path
    """The unoptimized export of the module."""


def _pipeline(pipeline: Any):
    from graphprune.pipeline import Pipeline

    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, (str, Path)):
        return Pipeline.from_yaml(pipeline)
    if isinstance(pipeline, Mapping):
        return Pipeline.from_dict(pipeline)
    if isinstance(pipeline, list):
        return Pipeline.from_dict({"passes": pipeline})
    raise ConfigError(f"pipeline: expected a Pipeline, a mapping, a list of pass entries or a YAML path, got "
                      f"{type(pipeline).__name__}")


def _with_plan_out(pipeline, plan_path: Path):
    """A copy of ``pipeline`` whose channel_prune step writes its plan (at most one such step)."""
    from graphprune.pipeline import Pipeline, Step

    steps, plan_files = [], []
    for step in pipeline.steps:
        if step.name == "channel_prune":
            cfg = step.config
            if cfg.plan_out is None:
                cfg = cfg.model_copy(update={"plan_out": str(plan_path)})
            # a folded per-head bias (Swin's relative-position bias) has no module parameter to slice
            cfg = cfg.model_copy(update={"folded_biases": False})
            if "ignore_stem" not in step.config.model_fields_set:
                # the embedding width stays whole unless asked for: its tensors may be exporter-made constants
                # (a position table looked up by constant ids, deduplicated zero biases) that map to no parameter
                cfg = cfg.model_copy(update={"ignore_stem": True})
            plan_files.append(Path(cfg.plan_out))
            step = Step(step.cls, cfg)
        steps.append(step)
    if len(plan_files) > 1:
        raise ConfigError("pipeline: graphprune.torch.optimize supports one channel_prune pass (its plan maps back to "
                          "the module); run a second one on the pruned module")
    return Pipeline(steps, pipeline.verify, pipeline.data), (plan_files[0] if plan_files else None)


def _to_numpy_feeds(data: Any, names: list[str]) -> Any:
    """Tensors or tuples of tensors (one batch each) become feed dicts; everything else passes through."""
    if isinstance(data, torch.Tensor):
        data = [(data,)]
    if isinstance(data, tuple) and data and all(isinstance(x, torch.Tensor) for x in data):
        data = [data]
    if isinstance(data, list) and data and all(isinstance(b, (tuple, torch.Tensor)) for b in data):
        feeds = []
        for b in data:
            b = (b,) if isinstance(b, torch.Tensor) else b
            if len(b) != len(names):
                raise GraphpruneError(f"data: a batch has {len(b)} tensors, the module takes {len(names)} ({names})")
            feeds.append({n: t.detach().cpu().numpy() for n, t in zip(names, b)})
        return feeds
    return data


def _flat(out) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in flat_tensors(out)]


def _compare(module: nn.Module, names: list[str], feeds: list[dict], other) -> dict:
    """Module outputs vs ``other`` (an ONNX model) on ``feeds``: max abs error, worst max |output|, min cosine."""
    from graphprune.backends.onnxruntime import make_session, run

    session = make_session(other)
    err, scale, cos = 0.0, 0.0, 1.0
    for feed in feeds:
        with torch.no_grad():
            ref = _flat(module(*[torch.from_numpy(np.asarray(feed[n])) for n in names]))
        outs = run(session, feed)
        if len(outs) != len(ref):
            raise VerificationError(f"the module returns {len(ref)} tensors, the ONNX model {len(outs)}")
        for a, b in zip(ref, outs):
            a, b = a.astype(np.float64), np.asarray(b).astype(np.float64)
            if a.shape != b.shape:
                return {"max_abs_err": float("inf"), "max_abs_output": float(np.abs(a).max()), "cosine_min": 0.0,
                        "note": f"shape {list(a.shape)} vs {list(b.shape)}"}
            err = max(err, float(np.abs(a - b).max()) if a.size else 0.0)
            scale = max(scale, float(np.abs(a).max()) if a.size else 0.0)
            fa, fb = a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1), b.reshape(len(b), -1) if b.ndim else b.reshape(1, 1)
            na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
            c = np.where((na == 0) & (nb == 0), 1.0, (fa * fb).sum(1) / np.maximum(na * nb, 1e-300))
            cos = min(cos, float(c.min()) if c.size else 1.0)
    return {"max_abs_err": err, "max_abs_output": scale, "cosine_min": cos}


def optimize(module: nn.Module, example_inputs: tuple, pipeline: Any, data: Any = None, out: str | Path | None = None,
             *, opset: int = 18, dynamic_axes: Mapping[int, str] | None = None, input_names: list[str] | None = None,
             output_names: list[str] | None = None, export_atol: float = 1e-4, **kwargs) -> TorchResult:
    """Export ``module``, optimize the export with ``pipeline``, verify, and return the result.

    Args:
        module: the module (exported in eval mode; its train/eval mode is restored afterwards).
        example_inputs: positional example inputs (a tensor or a tuple of tensors).
        pipeline: a :class:`graphprune.Pipeline`, a ``{passes: [...]}`` mapping, a list of pass entries, or a
            YAML path.
        data: real samples for calibration and verification: what :func:`graphprune.optimize` takes (a path, a
            ``Dataset``, feed dicts), or torch tensors (one batch) / a list of tuples of tensors (batches).
        out: the optimized ``.onnx`` to write; the export goes beside it as ``<stem>.source.onnx``.
        opset: passed to :func:`graphprune.torch.export`.
        dynamic_axes: passed to :func:`graphprune.torch.export` (default ``{0: "batch"}``).
        input_names: passed to :func:`graphprune.torch.export`.
        output_names: passed to :func:`graphprune.torch.export`.
        export_atol: absolute part of the module-vs-export tolerance (see module docstring).
        **kwargs: passed to :func:`graphprune.optimize` (``force``, ``bench``, ``threads``, ``context``, ...).

    Raises:
        VerificationError: the optimized graph fails verification (from :func:`graphprune.optimize`), or the export
            does not reproduce the module.
    """
    from graphprune.io import load_model
    from graphprune.pipeline import optimize as optimize_onnx
    from graphprune.pipeline import resolve_data
    if out is None:
        raise GraphpruneError("optimize: out= (the optimized .onnx path) is required")
    out = Path(out)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    pipe, plan_path = _with_plan_out(_pipeline(pipeline), out.with_name(out.stem + ".plan.json"))
    source = out.with_name(out.stem + ".source.onnx")
    was_training = module.training
    axes = dict(dynamic_axes) if dynamic_axes is not None else {0: "batch"}
    try:
        export(module, args, source, opset=opset, input_names=input_names, dynamic_axes=axes,
               output_names=output_names)
        names = [v.name for v in load_model(source).graph.inputs]
        if len(names) != len(args):
            raise GraphpruneError(f"optimize: the export has {len(names)} inputs for {len(args)} example inputs "
                                  "(non-tensor or unused inputs are not supported)")
        data = _to_numpy_feeds(data, names)
        if plan_path is not None and plan_path.exists():
            plan_path.unlink()  # a stale plan must not be mistaken for this run's
        report = optimize_onnx(source, out, pipe, data=data, **kwargs)
        _, ver = resolve_data(load_model(source), data, pipe.data)
        feeds = ver.batches(pipe.data.batch_size)
        exported = _compare(module, names, feeds, source)
        optimized = _compare(module, names, feeds, out)
    finally:
        module.train(was_training)
    tol = export_atol + 1e-3 * exported["max_abs_output"]
    report["torch"] = {"export": exported | {"tolerance": tol}, "optimized": optimized, "samples": len(ver)}
    if not exported["max_abs_err"] <= tol:
        raise VerificationError(f"the ONNX export does not reproduce the module: max abs error "
                                f"{exported['max_abs_err']:.3g} > {tol:.3g} on {len(ver)} samples")
    plan = None
    try:
        module.eval()
        depth = record_units(module, args, report.get("passes", []))
    finally:
        module.train(was_training)
    if plan_path is not None or depth:
        plan = json.loads(plan_path.read_text()) if plan_path is not None and plan_path.exists() else {
            "format": CHANNEL_PLAN, "info": {}, "groups": [], "slices": [], "shape_edits": [], "gather_edits": [],
            "value_shapes": []}
        if depth:
            plan["depth"] = depth
            for e in depth:
                if not e["module"]:
                    report["warnings"].append(f"depth_prune removed {e['unit']}, which apply_plan cannot remove "
                                              f"from the module: {e['why']}")
        if plan_path is None:
            plan_path = out.with_name(out.stem + ".plan.json")
        plan.setdefault("info", {})["torch"] = {
            "dynamic_axes": {str(k): v for k, v in axes.items()}, "opset": opset,
            "inputs": [[list(a.shape), str(a.dtype).removeprefix("torch.")] for a in args]}  # apply_plan's check
        tmp = plan_path.with_name(f".{plan_path.name}.tmp")
        tmp.write_text(json.dumps(plan))
        tmp.replace(plan_path)
        if plan["info"].get("reconstructed"):
            report["warnings"].append(
                "channel_prune refitted layers (reconstruct): apply_plan slices the original weights, so the pruned "
                "module starts from them, not from the refit in the ONNX model")
    return TorchResult(out, report, plan, source)
