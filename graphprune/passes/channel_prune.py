"""Pass ``channel_prune``: structured pruning of channels, attention heads and hidden units on the ONNX graph.

Steps: dependency groups (``analysis.channels``) → importance (``analysis.importance``) → kept classes per
group (``_channel_plan``: ratio of channels, FLOPs or params; local or global; ``round_to``) → plan → surgery
(``_channel_surgery``: slice initializers, rewrite Reshape/Split/Slice/Gather constants, head counts and conv
groups, re-run shape inference). With ``plan_in`` the analysis is skipped and the plan is applied as written.

Preserved: graph inputs and outputs (a group that reaches a graph output is unprunable), batch/dynamic axes,
initializer names of tensors that are not shared. ``ratio: 0`` changes nothing.
Data-aware defaults: ``importance: auto``, ``global: null`` and ``reconstruct: null`` resolve to the method that
measured best on real data (see ``DATA_AWARE``) when the pipeline hands the pass the user's real calibration samples
(``PassContext.real_data``), and to magnitude (``l2``, local, no refit) otherwise; the report's ``info.method``
says which, and why. A method that fits to activations without real samples puts a warning in the report.
Not pruned, with the reason in ``skipped``: groups the analysis cannot prove (see ``analysis.channels``), the
input stem (``ignore_stem``), groups named in ``ignore``, and groups too small for ``round_to``.

YAML::

    passes:
      - name: channel_prune
        ratio: 0.3          # fraction removed: of channels (target: channels), FLOPs or params
        target: channels    # channels | flops | params
        importance: auto    # auto | l1 | l2 | bn | activation | obs
        round_to: 8         # kept channel counts are multiples of this
        global: null        # one ranking over all groups instead of the same ratio in each (null: auto)
        ignore: []          # node or initializer names whose groups are left alone
        ignore_stem: auto   # auto | true | false (auto: prunes a ViT's embedding width, not CNN stems or tokens)
        reconstruct: null   # refit the layers reading pruned channels by least squares (null: auto)
        allocate: auto      # auto | score | sensitivity: group ratios from each group's measured output change
        refit: independent  # independent: every refit reads the original's activations | sequential: the pruned
                            #   model's, layer after layer (3-5x slower; no better on MiniLM, docs/benchmarks.md)
        search: none        # none | mask: per-unit mask search under the budget, after Kwon et al. 2022
                            #   (scores from measured output change, knapsack, rearrangement; see _channel_masksearch)
        unit_score: measured  # search: measured (groups of <= measure_units classes, i.e. heads: leave-one-out
                            #   output change) | local (layer-output Hessian diagonal from activations)
        measure_units: 16   # search: groups up to this many classes are measured unit by unit
        rearrange: 64       # search: most measured evaluations spent on budget-neutral swaps (0: none)
        search_feeds: 4     # search: calibration feeds each evaluation runs
        plan_out: plan.json # write the prune plan (structure only; refitted weights are not in it)
        plan_in: null       # apply a plan written before (no analysis)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import onnx_ir as ir
import pydantic
from onnx_ir.passes.common import NameFixPass

from graphprune.analysis.channels import analyze_channels
from graphprune.analysis.importance import activation_values, compute_importance
from graphprune.errors import ConfigError
from graphprune.passes import register
from graphprune.passes._channel_masksearch import SearchSettings, mask_search
from graphprune.passes._channel_plan import build_plan, predicted, select
from graphprune.passes._channel_reconstruct import reconstruct
from graphprune.passes._channel_sensitivity import measure
from graphprune.passes._channel_surgery import apply_plan
from graphprune.passes.base import GraphPass, GraphResult, PassConfig, Rewrite, Skipped


@dataclasses.dataclass(frozen=True)
class GroupPruned(Rewrite):
    """A channel group that lost classes (channels, heads, conv groups): its size and how many it kept."""

    group: int
    kind: str
    size: int
    kept: int
    members: list[str] | None = None  # the first few member tensors / nodes


class ChannelPruneConfig(PassConfig):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    ratio: float = pydantic.Field(0.3, ge=0.0, lt=1.0, description="fraction to remove")
    target: Literal["channels", "flops", "params"] = "channels"
    importance: Literal["auto", "l1", "l2", "bn", "activation", "obs"] = pydantic.Field(
        "auto", description="channel score; auto: activation with real data, else l2")
    round_to: int = pydantic.Field(8, ge=1, description="kept channel counts are multiples of this")
    global_: bool | None = pydantic.Field(None, alias="global", description="one ranking over all groups (null: auto)")
    max_group_ratio: float = pydantic.Field(0.9, gt=0.0, le=1.0, description="global: most a group may lose")
    ignore: list[str] = pydantic.Field(default_factory=list, description="node/initializer names left alone")
    ignore_stem: bool | Literal["auto"] = pydantic.Field(
        "auto", description="leave the input stem's group whole: true always, false never; auto keeps a CNN's stem "
        "and a token embedding's width and prunes a vision transformer's embedding width (a stem on a float input "
        "that the attention blocks read), as Torch-Pruning does")
    folded_biases: bool = pydantic.Field(
        True, description="prune heads whose attention adds a constant per-head bias (the exporter's folded "
        "relative-position bias), slicing that constant (graphprune.torch.optimize sets false: its module computes "
        "the bias from a table the plan cannot map)")
    reconstruct: bool | None = pydantic.Field(None, description="least-squares refit of consumers (null: auto)")
    allocate: Literal["auto", "score", "sensitivity"] = pydantic.Field(
        "auto", description="group ratios from the importance scores, or from each group's measured output "
        "sensitivity on the calibration data (auto: sensitivity with real data)")
    refit: Literal["independent", "sequential"] = pydantic.Field(
        "independent", description="reconstruct from the original's activations, or layer after layer from the pruned "
        "model's (slower; not better on MiniLM)")
    search: Literal["none", "mask"] = pydantic.Field(
        "none", description="mask: choose the removed units by a mask search under the ratio's budget (measured "
        "output change per unit, knapsack over FLOPs, rearrangement; importance/global/allocate are then unused)")
    unit_score: Literal["measured", "local"] = pydantic.Field(
        "measured", description="search: measured: leave-one-out output change for groups of at most measure_units "
        "classes (heads), local Hessian diagonal scaled by measured group sensitivity for the rest; local: the latter "
        "everywhere")
    measure_units: int = pydantic.Field(16, ge=1, description="search: groups up to this many classes are measured "
                                        "unit by unit")
    rearrange: int = pydantic.Field(64, ge=0, description="search: most measured evaluations of budget-neutral swaps")
    search_feeds: int = pydantic.Field(4, ge=1, description="search: calibration feeds each evaluation runs")
    plan_out: str | None = pydantic.Field(None, description="write the prune plan (JSON) here")
    plan_in: str | None = pydantic.Field(None, description="apply this plan instead of analysing")


#: What ``auto`` resolves to with the user's real calibration samples, chosen by measurement on MiniLM
#: (docs/benchmarks.md, fidelity table): at ``ratio: 0.3``, group ratios allocated from measured sensitivity kept
#: the most retrieval quality (body-task MRR 0.96 of the original's against 0.93 for score-based global ranking,
#: at FLOPs ×0.73 vs ×0.71); ``obs`` importance and the sequential refit did no better.
DATA_AWARE = {"importance": "activation", "global": True, "reconstruct": True, "allocate": "sensitivity"}
#: ... and without them: magnitude only, since fitting to generated inputs does not carry over to real data.
DATA_FREE = {"importance": "l2", "global": False, "reconstruct": False, "allocate": "score"}


def resolve_method(cfg: ChannelPruneConfig, real_data: bool) -> dict:
    """The importance / global / reconstruct actually used: explicit settings win over the data-aware defaults."""
    base = DATA_AWARE if real_data else DATA_FREE
    return {"importance": base["importance"] if cfg.importance == "auto" else cfg.importance,
            "global": base["global"] if cfg.global_ is None else cfg.global_,
            "reconstruct": base["reconstruct"] if cfg.reconstruct is None else cfg.reconstruct,
            "allocate": base["allocate"] if cfg.allocate == "auto" else cfg.allocate}


def _read_plan(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"plan_in: file {path!r} does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"plan_in: cannot read {path!r}: {e}") from e


def _ensure_names(model: ir.Model) -> None:
    """The plan addresses nodes and values by name: give unnamed or clashing ones unique names (deterministic,
    so a plan written for a model replays on the same model)."""
    names = [n.name for n in model.graph]
    if all(names) and len(set(names)) == len(names) and all(o.name for n in model.graph for o in n.outputs):
        return
    NameFixPass()(model)


def _write_plan(cfg: ChannelPruneConfig, plan: dict, info: dict) -> None:
    if not cfg.plan_out:
        return
    try:
        Path(cfg.plan_out).write_text(json.dumps(plan))
    except OSError as e:
        raise ConfigError(f"plan_out: cannot write {cfg.plan_out!r}: {e}") from e
    info["plan_out"] = cfg.plan_out


def _per_node_flops(model: ir.Model, runtime) -> dict[str, int] | None:
    try:
        report = runtime.measure_flops(model)
    except Exception:  # noqa: BLE001 - FLOPs model falls back to the analysis' own compute terms
        return None
    return None if report.unknown else dict(report.per_node)


def _search(model: ir.Model, analysis, calib: list[dict], cfg: ChannelPruneConfig, refit: bool, per_node, ctx):
    """``search: mask`` (``_channel_masksearch``) over the first ``search_feeds`` calibration feeds."""
    st = SearchSettings(cfg.ratio, cfg.target, cfg.round_to, cfg.max_group_ratio, cfg.unit_score, cfg.measure_units,
                        rearrange=cfg.rearrange, refit=refit)
    fit = calib[cfg.search_feeds:] if len(calib) > cfg.search_feeds else None  # refits fitted out of sample
    return mask_search(model, analysis, calib[:cfg.search_feeds], ctx.runtime.probe, st, per_node, ctx.notify, fit)


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
            rewritten = [GroupPruned(g["id"], g["kind"], g["size"], g["kept"]) for g in plan["groups"]]
            return GraphResult(model, bool(plan["slices"]), rewritten=rewritten, info={"plan_in": cfg.plan_in, **stats})
        method = resolve_method(cfg, self.context.real_data)
        warnings = []
        searching = cfg.search == "mask" and cfg.ratio > 0
        if (method["importance"] in ("activation", "obs") or method["reconstruct"] or method["allocate"] == "sensitivity"
                or searching):
            calib = self.context.feeds(model)
            if not self.context.real_data:
                warnings.append(f"{method['importance'] + ' importance' if method['importance'] in ('activation', 'obs') else 'reconstruct'}"
                                f" fitted to {'synthetic' if self.context.calibration else 'generated'} inputs, which"
                                " do not carry over to real data; pass --data with real samples")
        else:
            calib = None
        with self.context.task("channel analysis", 3) as step:
            analysis = analyze_channels(model, cfg.ignore, cfg.ignore_stem, folded_biases=cfg.folded_biases)
            step(1)
            # memo: a search's trials share what depends only on the model, the data and these settings
            where = {"importance": method["importance"], "ignore": cfg.ignore, "ignore_stem": cfg.ignore_stem,
                     "folded_biases": cfg.folded_biases}
            imp = self.context.memo("channel_prune.importance", where, lambda: compute_importance(
                analysis, method["importance"], self.context.runtime.probe(model, activation_values(analysis), calib)
                if method["importance"] in ("activation", "obs") else None))
            step(1)
            per_node = _per_node_flops(model, self.context.runtime) if cfg.target == "flops" else None
            sens = search = None
            if searching:
                search = _search(model, analysis, calib, cfg, bool(method["reconstruct"]), per_node, self.context)
                kept, used_ratio = search.kept, cfg.ratio
            elif method["allocate"] == "sensitivity" and cfg.ratio > 0:
                sens = self.context.memo(
                    "channel_prune.sensitivity", where | {"refit": bool(method["reconstruct"]), "round_to": cfg.round_to},
                    lambda: measure(model, analysis, imp, calib, refit=bool(method["reconstruct"]), probe=self.context.runtime.probe,
                                    round_to=cfg.round_to, progress=lambda d, t: self.context.notify("sensitivity", d, t)))
            if search is None:
                kept, used_ratio = select(analysis, imp, cfg.ratio, cfg.target, cfg.round_to, method["global"],
                                          cfg.max_group_ratio, per_node, sens)
            pred = predicted(analysis, kept, per_node)
            step(1)
        auto = cfg.importance == "auto" or cfg.global_ is None or cfg.reconstruct is None or cfg.allocate == "auto"
        why = ("real calibration samples: data-aware defaults" if self.context.real_data else
               "no real calibration samples: magnitude defaults") if auto else "as configured"
        info = {"importance": method["importance"], "method": {**method, "why": why}, "target": cfg.target, "channel_ratio": round(used_ratio, 4),
                "predicted_flops_ratio": round(pred["flops_ratio"], 4),
                "predicted_params_ratio": round(pred["params_ratio"], 4),
                "groups": len(analysis.groups), "prunable_groups": sum(g.prunable for g in analysis.groups)}
        if imp.fallback:
            info["bn_fallback_groups"] = imp.fallback
        if search is not None:
            info["search"] = search.info()
        if sens is not None:
            info["sensitivity"] = {str(k): round(v, 6) for k, v in sens.items()}
        plan = build_plan(analysis, kept, dict(info))
        skipped = [Skipped(f"group {g.id} ({', '.join(g.describe()['members'][:2])})", g.reason)
                   for g in analysis.groups if not g.prunable]
        for gid in imp.fallback:
            skipped.append(Skipped(f"group {gid}", "no BatchNormalization: scored with l2 instead of bn"))
        rewritten: list[Rewrite] = [GroupPruned(g["id"], g["kind"], g["size"], g["kept"], g["members"][:4])
                                    for g in plan["groups"]]
        if not plan["slices"]:
            _write_plan(cfg, plan, info)
            return GraphResult(model, False, rewritten=[], skipped=skipped, info=info, warnings=warnings)
        if method["reconstruct"]:
            with self.context.task("least-squares reconstruction", 1) as step:
                refit, refit_skipped = reconstruct(
                    model, analysis, kept, calib, self.context.runtime, sequential=cfg.refit == "sequential",
                    progress=lambda d, t: self.context.notify("reconstruction", d, t))
                step(1)
            rewritten += refit
            skipped += refit_skipped
            info["reconstructed_layers"] = len(refit)
            plan["info"]["reconstructed"] = [r.node for r in refit]
        _write_plan(cfg, plan, info)
        info.update(apply_plan(model, plan))
        return GraphResult(model, True, rewritten=rewritten, skipped=skipped, info=info, warnings=warnings)


__all__ = ["DATA_AWARE", "DATA_FREE", "ChannelPruneConfig", "ChannelPrunePass", "GroupPruned", "apply_plan", "build_plan",
           "resolve_method"]
