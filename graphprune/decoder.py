"""A decoder LM exported as two graphs: a *prefill* graph (the prompt → logits and the KV cache) and a *decode-step*
graph (new tokens and the cache so far → logits and the cache grown by them), as generation loops run them.

* :func:`cache_layout` reads the pair's interface: the token-id input, the logits output, and which ``present``
  output feeds which ``past`` input on the next step. Names are paired as exporters write them
  (``past_key_values.3.key`` ↔ ``present.3.key``; ``past.3.value`` ↔ ``present.3.value``; any spelling whose names
  differ only in the past/present word), else by position when both lists have the same length and shapes. A layout
  it cannot pair is a :class:`~graphprune.errors.GraphpruneError` (exit code 2 in the CLI).
* :func:`generate`: greedy decoding in ONNX Runtime over the pair; each step checks that the cache grew by one.
* :func:`depth_prune_pair`: ``depth_prune`` applied *consistently*: importance measured on the prefill graph, over
  the blocks removable in both, then exactly those units removed from the decode graph too, with their cache inputs
  and outputs, so the cache one graph writes is the cache the other reads.

The cache tensors are ``[batch, kv_heads, length, head_dim]`` (transformers' layout); the length axis is the one
that grows by the number of new tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphprune.errors import ConfigError, GraphpruneError

_WORD = re.compile(r"present_key_values|past_key_values|present|past", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The pair's interface: ``ids`` (token-id input), ``logits`` (output), ``pairs`` (decode-step cache input →
    the output of either graph that carries it on), ``length_axis`` of the cache tensors."""

    ids: str
    logits: str
    pairs: dict[str, str]
    length_axis: int = 2
    positions: str | None = None  # the decode graph's position-id input, when it takes one
    prefill_extra: tuple[str, ...] = ()  # other prefill inputs (pixel_values of a vision-language prefill)


def _model(m: Any) -> ir.Model:
    if isinstance(m, ir.Model):
        return m
    from graphprune.io import load_model

    return load_model(m)


def _copy(m: Any) -> ir.Model:
    """A model of its own: a path is loaded afresh; a model is copied (external weights stay references)."""
    from graphprune.backends.onnxruntime import external_folder

    if not isinstance(m, ir.Model):
        return _model(m)
    copy = ir.from_proto(ir.to_proto(m))
    folder = external_folder(m)
    if folder is not None:
        ir.external_data.set_base_dir(copy.graph, folder)
    return copy


def _rank(v: ir.Value) -> int | None:
    return None if v.shape is None else len(v.shape)


def _is_float(v: ir.Value) -> bool:
    return v.type is not None and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _key(name: str) -> str:
    return _WORD.sub("", name, count=1)


def cache_layout(prefill: Any, decode: Any, prefill_inputs: Sequence[str] = ()) -> CacheLayout:
    """The pair's :class:`CacheLayout`; raises ``GraphpruneError`` naming what does not fit. ``prefill_inputs``:
    other prefill inputs the caller feeds (a vision-language prefill's ``pixel_values``)."""
    pre, dec = _model(prefill), _model(decode)
    ints = [v for v in dec.graph.inputs if v.dtype in (ir.DataType.INT64, ir.DataType.INT32) and _rank(v) == 2]
    pos = [v for v in ints if "position" in v.name.lower()]
    ids = [v for v in ints if v not in pos]
    if len(ids) != 1 or len(pos) > 1 or not any(v.name == ids[0].name for v in pre.graph.inputs):
        raise GraphpruneError("decoder pair: expected one token-id input ([batch, seq] int64) shared by the prefill "
                              f"and decode graphs; the decode graph has {[v.name for v in dec.graph.inputs]}")
    past = [v for v in dec.graph.inputs if _is_float(v) and _rank(v) == 4]
    for g, what, fed in ((pre, "prefill", set(prefill_inputs)), (dec, "decode", {v.name for v in pos})):
        extra = [v.name for v in g.graph.inputs
                 if v.name != ids[0].name and v.name not in fed and not any(v is p for p in past)]
        if extra:
            raise GraphpruneError(f"decoder pair: the {what} graph has inputs this loop cannot feed: {extra}")
    logits = [v for v in dec.graph.outputs if _is_float(v) and _rank(v) == 3]
    present = [v for v in dec.graph.outputs if _is_float(v) and _rank(v) == 4]
    if len(logits) != 1:
        raise GraphpruneError("decoder pair: expected one logits output ([batch, seq, vocab]) in the decode graph, "
                              f"found {[v.name for v in logits]}")
    if not past or len(past) != len(present):
        raise GraphpruneError(f"decoder pair: cache layout not recognised: the decode graph has {len(past)} cache "
                              f"inputs ([batch, heads, length, dim]) and {len(present)} cache outputs")
    by_key = {_key(v.name): v.name for v in present}
    if all(_key(v.name) in by_key for v in past) and len(by_key) == len(present):
        pairs = {v.name: by_key[_key(v.name)] for v in past}
    else:
        pairs = {p.name: q.name for p, q in zip(past, present)}
    pre_out = {v.name for v in pre.graph.outputs}
    missing = [o for o in [logits[0].name, *pairs.values()] if o not in pre_out]
    if missing:
        raise GraphpruneError(f"decoder pair: the prefill graph lacks the decode graph's outputs {missing[:4]}; both "
                              "must write the same cache")
    return CacheLayout(ids[0].name, logits[0].name, pairs, positions=pos[0].name if pos else None,
                       prefill_extra=tuple(prefill_inputs))


def _session(m: Any, threads: int | None):
    from graphprune.backends.onnxruntime import make_session

    return make_session(m if isinstance(m, ir.Model) else str(m), threads=threads)


def generate(prefill: Any, decode: Any, input_ids: np.ndarray, max_new_tokens: int, *,
             eos_token_id: int | None = None, threads: int | None = None,
             prefill_inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Greedy decoding: ``input_ids [batch, n]`` (no padding) → ``[batch, n + new]``, at most ``max_new_tokens``
    new tokens (fewer when every row has produced ``eos_token_id``; finished rows repeat it). ``prefill`` /
    ``decode``: paths or ``onnx_ir.Model``s. ``prefill_inputs``: other prefill inputs (``pixel_values``).

    A decode graph with a ``position_ids`` input gets each new token's position in the full sequence: the
    prefill's logits length (its sequence, image tokens included) plus the tokens generated so far. That is not
    the cache length when the prefill kept only some tokens in its cache (``token_drop`` with ``scope: image``):
    the cache holds the kept tokens at their original positions."""
    extra = dict(prefill_inputs or {})
    layout = cache_layout(prefill, decode, tuple(extra))
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise GraphpruneError(f"generate: input_ids must be [batch, n] with n ≥ 1, got shape {ids.shape}")
    if max_new_tokens < 1:
        raise GraphpruneError(f"generate: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    pre, dec = _session(prefill, threads), _session(decode, threads)
    names = [o.name for o in pre.get_outputs()]
    out = dict(zip(names, pre.run(None, {layout.ids: ids, **extra})))
    cache = {p: out[q] for p, q in layout.pairs.items()}
    position = out[layout.logits].shape[1]  # the next token's position in the full sequence
    result = [ids]
    done = np.zeros(len(ids), dtype=bool)
    dnames = [o.name for o in dec.get_outputs()]
    logits = out[layout.logits]
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        result.append(nxt[:, None])
        if step == max_new_tokens - 1 or done.all():
            break
        feed = {layout.ids: nxt[:, None], **cache}
        if layout.positions is not None:
            feed[layout.positions] = np.full((len(nxt), 1), position + step, dtype=np.int64)
        got = dict(zip(dnames, dec.run(None, feed)))
        for p, q in layout.pairs.items():
            want = cache[p].shape[layout.length_axis] + 1
            if got[q].shape[layout.length_axis] != want:
                raise GraphpruneError(f"generate: cache output {q!r} has length {got[q].shape[layout.length_axis]} "
                                      f"after one step, expected {want}: the cache layout is not [batch, heads, "
                                      "length, dim]")
            cache[p] = got[q]
        logits = got[layout.logits]
    return np.concatenate(result, axis=1)


def depth_prune_pair(prefill: Any, decode: Any, config: dict | None = None,
                     calibration: Sequence[dict[str, np.ndarray]] | None = None, *,
                     data_source: str = "user") -> tuple[ir.Model, ir.Model, dict]:
    """``depth_prune`` (``config`` as the pass takes it) on a prefill + decode pair, consistently: the units are
    chosen on the prefill graph (importance from ``calibration``, feeds of the prefill graph) among the blocks
    removable in both graphs, then the same units are removed from the decode graph. Returns the two pruned models
    (copies; the inputs are not changed) and the prefill pass's ``info`` plus ``decode_cache_removed``."""
    from graphprune.analysis.depth import residual_blocks
    from graphprune.passes import get_pass
    from graphprune.passes.base import PassContext
    from graphprune.passes.depth_prune import DepthPruneConfig, DepthPrunePass

    pre, dec = _copy(prefill), _copy(decode)
    cache_layout(pre, dec)
    cfg = DepthPruneConfig(**(config or {}))
    if cfg.units is not None:
        raise ConfigError("depth_prune_pair: 'units' is chosen on the prefill graph; leave it unset")
    probe = DepthPrunePass(cfg.model_copy(update={"layers": None}), PassContext())
    pre_units, _, _ = probe._units(pre, probe.config)
    dec_units, dec_skipped, _ = probe._units(dec, probe.config)
    n_pre, n_dec = len(residual_blocks(pre)), len(residual_blocks(dec))
    if n_pre != n_dec:
        raise GraphpruneError(f"decoder pair: the prefill graph has {n_pre} blocks, the decode graph {n_dec}")
    in_dec = {u.where for u in dec_units}
    bad = {u.block.index for u in pre_units if u.where not in in_dec}  # a unit removable in prefill only
    layers = sorted({u.block.index for u in pre_units} - bad)
    if cfg.layers is not None:
        layers = [i for i in layers if i in cfg.layers]
    if not layers:
        why = "; ".join(f"{s.where}: {s.reason}" for s in dec_skipped[:2])
        raise GraphpruneError(f"decoder pair: no block is removable in both graphs ({why})")
    ctx = PassContext(calibration=list(calibration) if calibration else None, data_source=data_source)
    res = get_pass("depth_prune")(cfg.model_copy(update={"layers": layers}).model_dump(), ctx)(pre)
    removed = res.info["removed"]
    res_dec = get_pass("depth_prune")({"units": removed, "unit": cfg.unit}, PassContext())(dec)
    info = dict(res.info, decode_cache_removed=res_dec.info["cache_removed"])
    cache_layout(pre, dec)  # the pruned pair still pairs up
    return pre, dec, info


def _weight_keys(model: ir.Model) -> dict[str, bytes]:
    """Initializer name → a digest of its dtype, shape and bytes: the same weight exported into two graphs (under
    different names: the exporter's ``val_N``) has the same digest."""
    import hashlib

    out = {}
    for name, v in model.graph.initializers.items():
        if v.const_value is None:
            continue
        arr = v.const_value.numpy()
        if arr.size < 2:  # scalars and single values repeat everywhere: no identity
            continue
        out[name] = hashlib.sha1(str((arr.dtype, arr.shape)).encode() + arr.tobytes()).digest()
    return out


def _group_keys(analysis: Any, keys: dict[str, bytes]) -> dict[int, frozenset]:
    """Prunable channel group id → the digests of the weights it slices (its identity across the two graphs)."""
    members: dict[int, set] = {}
    for g in analysis.groups:
        if g.prunable:
            members[g.id] = set()
    cls_group = {int(c): g.id for g in analysis.groups if g.prunable for c in np.asarray(g.classes).ravel()}
    for m in analysis.members:
        if m.value.name not in keys:
            continue
        gids = {cls_group.get(int(analysis.root[a])) for a in np.asarray(m.atoms).ravel()} - {None}
        for gid in gids:
            members[gid].add(keys[m.value.name])
    return {gid: frozenset(k) for gid, k in members.items() if k}


def channel_prune_pair(prefill: Any, decode: Any, config: dict | None = None,
                       calibration: Sequence[dict[str, np.ndarray]] | None = None, *,
                       data_source: str = "user") -> tuple[ir.Model, ir.Model, dict]:
    """``channel_prune`` (``config`` as the pass takes it) on a prefill + decode pair, consistently: the channels are
    chosen on the prefill graph (importance, allocation and refit from ``calibration``) among the groups prunable
    in both graphs (matched by the weights they slice), then the same channels are removed from the decode graph
    and its weights set to the prefill's pruned (refitted) ones. Groups prunable in one graph only stay whole. The
    MLPs and the attention heads (whole key/value groups) are prunable in both: the decode step's cache ``Concat`` is
    followed, so the KV cache's head axis shrinks alike in both graphs.
    Returns the two pruned models (copies) and the prefill pass's ``info`` plus ``pair_groups``."""
    import json
    import tempfile
    from pathlib import Path

    from graphprune.analysis.channels import analyze_channels
    from graphprune.passes import get_pass
    from graphprune.passes.base import PassContext
    from graphprune.passes.channel_prune import ChannelPruneConfig, apply_plan, build_plan

    pre, dec = _copy(prefill), _copy(decode)
    cache_layout(pre, dec)
    cfg = ChannelPruneConfig(**(config or {}))
    if cfg.plan_in or cfg.plan_out:
        raise ConfigError("channel_prune_pair: plan_in / plan_out are not used (the plan is made on the prefill graph)")
    kp, kd = _weight_keys(pre), _weight_keys(dec)
    ap = analyze_channels(pre, cfg.ignore, cfg.ignore_stem, folded_biases=cfg.folded_biases)
    ad = analyze_channels(dec, cfg.ignore, cfg.ignore_stem, folded_biases=cfg.folded_biases)
    gp, gd = _group_keys(ap, kp), _group_keys(ad, kd)
    in_dec = {k: gid for gid, k in gd.items()}
    shared = {gid: in_dec[k] for gid, k in gp.items() if k in in_dec}
    if not shared:
        raise GraphpruneError("decoder pair: no channel group is prunable in both graphs")
    # the prefill's other groups stay whole: their weights go to `ignore`
    names_by_key = {v: n for n, v in kp.items()}
    alone = sorted({names_by_key[k] for gid, ks in gp.items() if gid not in shared for k in ks})
    ctx = PassContext(calibration=list(calibration) if calibration else None, data_source=data_source)
    with tempfile.TemporaryDirectory() as tmp:  # the prefill's plan says which classes each group kept
        plan_path = str(Path(tmp) / "plan.json")
        update = {"ignore": [*cfg.ignore, *alone], "plan_out": plan_path}
        res = get_pass("channel_prune")(cfg.model_copy(update=update).model_dump(by_alias=True), ctx)(pre)
        pre_plan = json.loads(Path(plan_path).read_text())
    # the prefill's group ids are those of its own analysis (the pass re-analyses with `ignore`): match by weights
    ap2 = analyze_channels(_copy(prefill), [*cfg.ignore, *alone], cfg.ignore_stem, folded_biases=cfg.folded_biases)
    gp2 = _group_keys(ap2, kp)
    kept = np.ones(len(ad.root), dtype=bool)
    groups = {g.id: g for g in ad.groups}
    for g in pre_plan["groups"]:
        gid_d = in_dec.get(gp2.get(g["id"]))
        if gid_d is None:
            raise GraphpruneError(f"decoder pair: the prefill's pruned group {g['id']} has no match in the decode graph")
        drop = np.setdiff1d(np.arange(g["size"]), np.asarray(g["keep"], dtype=int))
        kept[np.asarray(groups[gid_d].classes)[drop]] = False
    plan = build_plan(ad, kept)
    apply_plan(dec, plan)
    # the decode graph's weights become the prefill's pruned (and refitted) ones, matched by their original digest
    by_key = {key: pre.graph.initializers[n] for n, key in kp.items() if n in pre.graph.initializers}
    copied = 0
    for name, key in kd.items():
        src = by_key.get(key)
        dst = dec.graph.initializers.get(name)
        if src is None or dst is None or src.const_value is None:
            continue
        if dst.const_value is None or tuple(dst.const_value.shape) != tuple(src.const_value.shape):
            raise GraphpruneError(f"decoder pair: weight {name} does not match the prefill's after pruning")
        dst.const_value = src.const_value
        copied += 1
    from graphprune._ir import infer_shapes

    infer_shapes(dec)
    cache_layout(pre, dec)
    info = dict(res.info, pair_groups=len(pre_plan["groups"]), decode_weights_copied=copied)
    return pre, dec, info


def compare_prefill(original: Any, pruned: Any, feeds: Sequence[dict[str, np.ndarray]], *,
                    threads: int | None = None) -> dict[str, Any]:
    """The pruned prefill graph against the original on ``feeds`` (token ids, one sequence or several of one length
    each): top-1 agreement of the next-token predictions at every position, and each model's next-token accuracy
    on the feeds' own next tokens (a task metric when the feeds are real text; chance when they are generated)."""
    a, b = _session(original, threads), _session(pruned, threads)
    layout = _ids_input(a)
    agree = right_a = right_b = count = 0
    for feed in feeds:
        ids = np.asarray(feed[layout], dtype=np.int64)
        la = a.run(None, {layout: ids})[0][:, :-1].argmax(-1)
        lb = b.run(None, {layout: ids})[0][:, :-1].argmax(-1)
        target = ids[:, 1:]
        agree += int((la == lb).sum())
        right_a += int((la == target).sum())
        right_b += int((lb == target).sum())
        count += target.size
    if count == 0:
        raise GraphpruneError("compare: every sample is a single token; next-token figures need at least two")
    acc_a, acc_b = right_a / count, right_b / count
    return {"tokens": count, "samples": len(feeds), "top1_agreement": agree / count,
            "next_token_accuracy": {"original": acc_a, "pruned": acc_b},
            "accuracy_kept": acc_b / acc_a if acc_a > 0 else None}


def _ids_input(session) -> str:
    """The token-id input of an ORT session of a prefill graph (its one int input)."""
    names = [i.name for i in session.get_inputs() if "int" in i.type]
    if len(names) != 1:
        raise GraphpruneError(f"expected one token-id input, found {names}")
    return names[0]


__all__ = ["CacheLayout", "cache_layout", "compare_prefill", "depth_prune_pair", "generate"]
