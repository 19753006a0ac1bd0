"""Pass ``channel_prune``: structured pruning of channels, attention heads and hidden units on the ONNX graph.

Steps: dependency groups (``analysis.channels``) → importance (``analysis.importance``) → kept classes per
group (``_channel_plan``: ratio of channels, FLOPs or params; local or global; ``round_to``) → plan → surgery
(``_channel_surgery``: slice initializers, rewrite Reshape/Split/Slice/Gather constants, head counts and conv
groups, re-run shape inference). With ``plan_in`` the analysis is skipped and the plan is applied as written.

Preserved: graph inputs and outputs (a group that reaches a graph output is unprunable), batch/dynamic axes,
initializer names of tensors that are not shared. ``ratio: 0`` changes nothing.
Not pruned, with the reason in ``skipped``: groups the analysis cannot prove (see ``analysis.channels``), the
input stem (``ignore_stem``), groups named in ``ignore``, and groups too small for ``round_to``.

YAML::

    passes:
      - name: channel_prune
        ratio: 0.3          # fraction removed: of channels (target: channels), FLOPs or params
        target: channels    # channels | flops | params
        importance: l2      # l1 | l2 | bn | activation
        round_to: 8         # kept channel counts are multiples of this
        global: false       # one ranking over all groups instead of the same ratio in each
        ignore: []          # node or initializer names whose groups are left alone
        reconstruct: false  # refit the layers reading pruned channels by least squares (calibration inputs)
        plan_out: plan.json # write the prune plan (structure only; refitted weights are not in it)
        plan_in: null       # apply a plan written before (no analysis)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import onnx_ir as ir
import pydantic

from graphprune.analysis.channels import analyze_channels
from graphprune.analysis.importance import compute_importance
from graphprune.errors import ConfigError
from graphprune.passes import register
from graphprune.passes._channel_plan import build_plan, predicted, select
from graphprune.passes._channel_surgery import apply_plan
from graphprune.passes.base import GraphPass, GraphResult, PassConfig


class ChannelPruneConfig(PassConfig):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    ratio: float = pydantic.Field(0.3, ge=0.0, lt=1.0, description="fraction to remove")
    target: Literal["channels", "flops", "params"] = "channels"
    importance: Literal["l1", "l2", "bn", "activation"] = "l2"
    round_to: int = pydantic.Field(8, ge=1)
    global_: bool = pydantic.Field(False, alias="global")
    max_group_ratio: float = pydantic.Field(0.9, gt=0.0, le=1.0, description="global: most a group may lose")
    ignore: list[str] = pydantic.Field(default_factory=list)
    ignore_stem: bool = True
    reconstruct: bool = False
    plan_out: str | None = None
    plan_in: str | None = None


def _read_plan(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"plan_in: file {path!r} does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"plan_in: cannot read {path!r}: {e}") from e


def _calibration(model: ir.Model, ctx) -> list[dict]:
    if ctx.calibration:
        return list(ctx.calibration)
    from graphprune.analysis.inputs import example_inputs

    return [example_inputs(model, batch=4, seed=s) for s in range(2)]


def _ensure_names(model: ir.Model) -> None:
    """The plan addresses nodes and values by name: give unnamed or clashing ones unique names (deterministic,
    so a plan written for a model replays on the same model)."""
    names = [n.name for n in model.graph]
    if all(names) and len(set(names)) == len(names) and all(o.name for n in model.graph for o in n.outputs):
        return
    from onnx_ir.passes.common import NameFixPass

    NameFixPass()(model)


def _write_plan(cfg: ChannelPruneConfig, plan: dict, info: dict) -> None:
    if not cfg.plan_out:
        return
    try:
        Path(cfg.plan_out).write_text(json.dumps(plan))
    except OSError as e:
        raise ConfigError(f"plan_out: cannot write {cfg.plan_out!r}: {e}") from e
    info["plan_out"] = cfg.plan_out


def _per_node_flops(model: ir.Model) -> dict[str, int] | None:
    from graphprune.analysis.flops import count_flops

    try:
        report = count_flops(model)
    except Exception:  # noqa: BLE001 - FLOPs model falls back to the analysis' own compute terms
        return None
    return None if report.unknown else dict(report.per_node)


@register
class ChannelPrunePass(GraphPass):
    name = "channel_prune"
    Config = ChannelPruneConfig
    summary = "remove whole channels, heads and hidden units (dependency groups, importance, weight surgery)"

    def call(self, model: ir.Model) -> GraphResult:
        cfg: ChannelPruneConfig = self.config
        _ensure_names(model)
        if cfg.plan_in:
            plan = _read_plan(cfg.plan_in)
            stats = apply_plan(model, plan)
            rewritten = [{"group": g["id"], "kind": g["kind"], "size": g["size"], "kept": g["kept"]} for g in plan["groups"]]
            return GraphResult(model, bool(plan["slices"]), rewritten=rewritten, info={"plan_in": cfg.plan_in, **stats})
        if cfg.importance == "activation" or cfg.reconstruct:
            calib = _calibration(model, self.context)
        else:
            calib = None
        with self.context.task("channel analysis", 3) as step:
            analysis = analyze_channels(model, cfg.ignore, cfg.ignore_stem)
            step(1)
            imp = compute_importance(model, analysis, cfg.importance, calib)
            step(1)
            per_node = _per_node_flops(model) if cfg.target == "flops" else None
            kept, used_ratio = select(analysis, imp, cfg.ratio, cfg.target, cfg.round_to, cfg.global_,
                                      cfg.max_group_ratio, per_node)
            pred = predicted(analysis, kept, per_node)
            step(1)
        info = {"importance": cfg.importance, "target": cfg.target, "channel_ratio": round(used_ratio, 4),
                "predicted_flops_ratio": round(pred["flops_ratio"], 4),
                "predicted_params_ratio": round(pred["params_ratio"], 4),
                "groups": len(analysis.groups), "prunable_groups": sum(g.prunable for g in analysis.groups)}
        if imp.fallback:
            info["bn_fallback_groups"] = imp.fallback
        plan = build_plan(analysis, kept, dict(info))
        skipped = [{"where": f"group {g.id} ({', '.join(g.describe()['members'][:2])})", "reason": g.reason}
                   for g in analysis.groups if not g.prunable]
        for gid in imp.fallback:
            skipped.append({"where": f"group {gid}", "reason": "no BatchNormalization: scored with l2 instead of bn"})
        rewritten = [{"group": g["id"], "kind": g["kind"], "size": g["size"], "kept": g["kept"],
                      "members": g["members"][:4]} for g in plan["groups"]]
        if not plan["slices"]:
            _write_plan(cfg, plan, info)
            return GraphResult(model, False, rewritten=[], skipped=skipped, info=info)
        if cfg.reconstruct:
            from graphprune.passes._channel_reconstruct import reconstruct

            with self.context.task("least-squares reconstruction", 1) as step:
                refit, refit_skipped = reconstruct(model, analysis, kept, calib)
                step(1)
            rewritten += [{"refit": r["node"], **r} for r in refit]
            skipped += refit_skipped
            info["reconstructed_layers"] = len(refit)
            if not self.context.calibration:
                info["reconstruct_note"] = "no calibration inputs: refitted on random example inputs"
            plan["info"]["reconstructed"] = [r["node"] for r in refit]
        _write_plan(cfg, plan, info)
        info.update(apply_plan(model, plan))
        return GraphResult(model, True, rewritten=rewritten, skipped=skipped, info=info)


__all__ = ["ChannelPruneConfig", "ChannelPrunePass"]
