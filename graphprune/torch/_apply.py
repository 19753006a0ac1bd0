"""Apply a channel prune plan (``graphprune.channel_plan/1``, computed on the ONNX export) back to an ``nn.Module``.

Mapping a plan entry (node, initializer, axis, keep, the node's ``pkg.torch.onnx.name_scopes``) to a tensor of the
module, in this order:
  1. the scope's deepest module ``M`` has a parameter or buffer with the initializer's leaf name and shape: that
     one (the exporter deduplicates equal tensors, so ``embeddings.LayerNorm.bias`` may feed a query ``Add``);
  2. the initializer's name is a parameter or buffer of that shape: that one (a Conv weight keeps its name when
     the exporter folds the following BatchNorm into it);
  3. ``M`` has a 2-D parameter whose shape is the initializer's, reversed: a weight the exporter transposed for a
     MatMul (``nn.Linear``); the axis is mirrored;
  4. ``<owner>.weight_bias`` (the bias the exporter makes when it folds a BatchNorm into a bias-free Conv): the
     owner's bias, if any.
  When ``M`` is a BatchNorm and the node is a Conv/Gemm (the fold), ``M``'s weight, bias and running statistics
  take the slice of the output channels, and so does the owner's own bias.
An entry that none of these resolves raises :class:`GraphpruneError` naming the node's module and the initializer.

Attributes rewritten from the sliced tensors: ``nn.Linear`` in/out features, ConvNd channels and ``groups`` (from
the plan's ``group`` edit, or kept depthwise), BatchNorm ``num_features``, LayerNorm ``normalized_shape``,
GroupNorm ``num_groups`` / ``num_channels`` (channels per group kept), Embedding ``embedding_dim``,
``nn.MultiheadAttention`` ``embed_dim`` / ``head_dim`` / ``kdim`` / ``vdim``, and head counts of attention modules
with a q (``qkv``, ``query``, ``q_proj``, ``q``) projection child: timm-style ``num_heads`` / ``heads`` (head_dim
kept), Hugging Face ``num_attention_heads`` / ``all_head_size`` (``attention_head_size`` kept).

A plan with ``depth`` entries (``depth_prune`` in the pipeline) first has those modules replaced, in a copy, by
:class:`~graphprune.torch._depth.RemovedUnit` (a removed block returns its input, a removed branch zeros); slices of
nodes inside them are dropped with them (:mod:`._depth`).

Where ``forward`` hard-codes a shape (``reshape(B, N, C)`` with ``C`` read from the input), the eager copy fails
to run; with ``example_inputs`` the module is then rewritten as a torch.fx GraphModule (:mod:`._fx`); without them
apply_plan refuses such a module at once (:mod:`._runcheck`, a shape-only run on the plan's recorded input shapes).
"""

from __future__ import annotations

import ast

import torch
from torch import nn

from graphprune.errors import GraphpruneError
from graphprune.torch._depth import outside_removed, remove_units
from graphprune.torch._fx import FX_META, rewrite_shapes
from graphprune.torch._tensors import Slicing, slice_module, split_fqn

FORMAT = "graphprune.torch_pruned/1"
_BN = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd
_Q_CHILDREN = ("qkv", "query", "q_proj", "q")
_FUSED_NODES = ("Conv", "Gemm", "MatMul")


def _check_plan(plan) -> None:
    if not isinstance(plan, dict) or not str(plan.get("format", "")).startswith("graphprune.channel_plan/"):
        raise GraphpruneError("apply_plan: not a graphprune channel plan (a dict with format graphprune.channel_plan/1)")


def _scope_module(entry: dict, modules: dict[str, nn.Module]) -> str | None:
    """The deepest module of the node's ``name_scopes`` (the exporter writes them as a Python list literal)."""
    raw = entry.get("scope") or []
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raw = []
    scope = [s for s in raw if isinstance(s, str) and s and s in modules]
    return scope[-1] if scope else None


def resolve(module: nn.Module, plan: dict) -> Slicing:
    """Which tensor of ``module`` each plan slice lands on, and along which axis (see module docstring)."""
    _check_plan(plan)
    modules = dict(module.named_modules())
    tensors = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    out = Slicing()
    by_node: dict[str, list[dict]] = {}
    for e in plan.get("slices", []):
        by_node.setdefault(e["node"], []).append(e)
    for node, entries in by_node.items():
        for e in entries:
            fqn, axis = _resolve_entry(e, modules, tensors)
            where = f"node {node!r}"
            if fqn is not None:
                out.add(fqn, axis, e["keep"], where)
            _fused_bn(e, entries, modules, tensors, out, fqn, axis, where)
    return out


def _shape_of(e: dict) -> list[int] | None:
    return list(e["shape"]) if e.get("shape") is not None else None


def _resolve_entry(e: dict, modules: dict, tensors: dict) -> tuple[str | None, int]:
    name, axis, shape = e["initializer"], int(e["axis"]), _shape_of(e)
    scope = _scope_module(e, modules)

    def fits(fqn: str, want=shape) -> bool:
        return fqn in tensors and (want is None or list(tensors[fqn].shape) == want)

    leaf = name.rsplit(".", 1)[-1]
    if scope is not None and fits(f"{scope}.{leaf}"):
        return f"{scope}.{leaf}", axis
    if fits(name):
        return name, axis
    if scope is not None and shape is not None and len(shape) == 2:
        rev = shape[::-1]
        cands = [f"{scope}.{p}" for p, t in modules[scope].named_parameters(recurse=False) if list(t.shape) == rev]
        if len(cands) == 1:
            return cands[0], 1 - axis
    if name.endswith(".weight_bias") and scope is not None and isinstance(modules[scope], _BN):
        return None, 0  # the folded BatchNorm's bias: its tensors are sliced by _fused_bn
    where = f"module {scope!r}" if scope is not None else "no module scope on the node"
    raise GraphpruneError(f"apply_plan: cannot map initializer {name!r} of node {e['node']!r} ({where}) to a parameter "
                          f"or buffer of the module (shape {shape}, axis {axis})")


def _fused_bn(e: dict, entries: list[dict], modules: dict, tensors: dict, out: Slicing, fqn: str | None, axis: int,
              where: str) -> None:
    """A BatchNorm the exporter folded into this Conv/Gemm: its tensors (and the owner's bias) follow the output
    channels of the fused weight."""
    scope = _scope_module(e, modules)
    if scope is None or not isinstance(modules[scope], _BN):
        return
    owner = None
    if fqn is not None and not fqn.startswith(scope + "."):
        owner = split_fqn(fqn)[0]
        if not (e.get("role") == "out" and axis == 0):
            return  # an input-channel slice of the fused weight does not touch the BatchNorm
    elif fqn is None:  # <owner>.weight_bias
        owner = e["initializer"][: -len(".weight_bias")]
    else:
        return
    bn = modules[scope]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if getattr(bn, attr, None) is not None:
            out.add(f"{scope}.{attr}", 0, e["keep"], where)
    if owner in modules and getattr(modules[owner], "bias", None) is not None:
        out.add(f"{owner}.bias", 0, e["keep"], where)


def _group_edits(plan: dict, module: nn.Module) -> dict[str, int]:
    """Conv module fqn → new ``groups`` from the plan's ``group`` attribute edits."""
    weights = {e["node"]: e for e in plan.get("slices", []) if e.get("input") == 1}
    modules = dict(module.named_modules())
    tensors = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for s in plan.get("shape_edits", []):
        if s.get("attr") != "group" or s["node"] not in weights:
            continue
        fqn, _ = _resolve_entry(weights[s["node"]], modules, tensors)
        if fqn is not None:
            out[split_fqn(fqn)[0]] = int(s["value"])
    return out


def rewrite_attributes(original: nn.Module, pruned: nn.Module, groups: dict[str, int]) -> None:
    """Set the shape attributes of every module of ``pruned`` from its (sliced) tensors; ``original`` gives the
    old values (channels per group, head dims)."""
    old = dict(original.named_modules())
    for name, m in pruned.named_modules():
        o = old.get(name)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, _CONV):
            g = groups.get(name)
            if g is None:
                depthwise = o.groups > 1 and o.groups == o.in_channels
                g = (m.weight.shape[1] if m.transposed else m.weight.shape[0]) if depthwise else o.groups
            m.groups = g
            if m.transposed:
                m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * g
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * g
        elif isinstance(m, _BN):
            ref = m.running_mean if m.running_mean is not None else m.weight
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            per = o.num_channels // o.num_groups
            m.num_channels = m.weight.shape[0]
            if m.num_channels % per:
                raise GraphpruneError(f"apply_plan: GroupNorm {name!r} keeps {m.num_channels} channels, not whole "
                                      f"groups of {per}")
            m.num_groups = m.num_channels // per
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.MultiheadAttention):
            _rewrite_mha(name, m)
        _rewrite_heads(name, m, o)


def _rewrite_mha(name: str, m: nn.MultiheadAttention) -> None:
    if not m._qkv_same_embed_dim:
        raise GraphpruneError(f"apply_plan: nn.MultiheadAttention {name!r} with kdim/vdim != embed_dim is not supported")
    rows, e = m.in_proj_weight.shape
    if rows != 3 * e or m.out_proj.weight.shape != (e, e):
        raise GraphpruneError(
            f"apply_plan: nn.MultiheadAttention {name!r}: parameter in_proj_weight becomes {tuple(m.in_proj_weight.shape)}; "
            "nn.MultiheadAttention needs num_heads * head_dim == embed_dim, so its heads cannot be pruned in place "
            "(pass example_inputs to get the torch.fx rewrite)")
    if e % m.num_heads:
        raise GraphpruneError(f"apply_plan: nn.MultiheadAttention {name!r}: embed_dim {e} is not a multiple of "
                              f"num_heads {m.num_heads}")
    m.embed_dim = m.kdim = m.vdim = e
    m.head_dim = e // m.num_heads


def _rewrite_heads(name: str, m: nn.Module, o: nn.Module | None) -> None:
    q = next((getattr(m, c) for c in _Q_CHILDREN if isinstance(getattr(m, c, None), nn.Linear)), None)
    if q is None or o is None or isinstance(m, nn.MultiheadAttention):
        return
    fused = q is getattr(m, "qkv", None)
    rows = q.weight.shape[0]  # out_features may not be rewritten yet (parents come before children)
    width = rows // 3 if fused else rows
    for heads_attr, dim_attr in (("num_attention_heads", "attention_head_size"), ("num_heads", "head_dim"),
                                 ("heads", "head_dim")):
        if not isinstance(getattr(m, heads_attr, None), int):
            continue
        d = getattr(m, dim_attr, None)
        if not isinstance(d, int):
            d = getattr(o, heads_attr) and _old_width(o, fused) // getattr(o, heads_attr)
        if width % d:
            raise GraphpruneError(f"apply_plan: attention module {name!r}: q projection width {width} is not a "
                                  f"multiple of head dim {d} (the plan prunes inside heads)")
        setattr(m, heads_attr, width // d)
        if hasattr(m, "all_head_size"):
            m.all_head_size = width
        return


def _old_width(o: nn.Module, fused: bool) -> int:
    q = next(getattr(o, c) for c in _Q_CHILDREN if isinstance(getattr(o, c, None), nn.Linear))
    return q.out_features // 3 if fused else q.out_features


def _runs(module: nn.Module, example_inputs: tuple) -> Exception | None:
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(*example_inputs)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # shape errors from hard-coded sizes
        return e
    finally:
        module.train(was)
    return None


def apply_plan(module: nn.Module, plan: dict, example_inputs: tuple | None = None, *, mode: str = "auto",
               dynamic_axes: dict[int, str] | None = None) -> nn.Module:
    """A pruned copy of ``module`` following ``plan`` (the input module is not changed).

    Args:
        module: the module the plan was computed for (its dynamo export).
        plan: the prune plan (``graphprune.torch.optimize(...).plan`` or a ``plan_out`` JSON file's content): channel
            slices, and the blocks and branches ``depth_prune`` removed (``depth``).
        example_inputs: positional inputs; when given, the eager copy is run once, and if it fails (a ``forward``
            that hard-codes a shape) the module is rewritten with torch.fx instead (``mode="auto"``). Without
            them, the eager copy is checked on fake tensors shaped like the inputs the plan records (``info.torch
            .inputs``, from ``graphprune.torch.optimize``; shapes only, no arithmetic), and refused at once when a
            hard-coded shape would make it fail.
        mode: ``auto``, ``eager`` (never the FX rewrite) or ``fx`` (always; needs ``example_inputs``).
        dynamic_axes: for the FX rewrite's export (default: the plan's ``info.torch.dynamic_axes``, else batch).

    Returns:
        An ``nn.Module`` of the same class (eager), or a ``torch.fx.GraphModule`` (FX), in the input's train/eval
        mode, with parameters that train.

    Raises:
        GraphpruneError: a plan entry that maps to no parameter, a tensor sliced two ways, an attribute that cannot
            hold the new shape, a forward that fails on the pruned copy (eager, with ``example_inputs``), or,
            without ``example_inputs``, one whose hard-coded shapes the shape-only check shows would fail.
    """
    if mode not in ("auto", "eager", "fx"):
        raise GraphpruneError(f"apply_plan: mode must be auto, eager or fx, got {mode!r}")
    _check_plan(plan)
    if plan.get("depth"):  # removed blocks and branches first: their weights take no slices
        module, plan = remove_units(module, plan), outside_removed(plan)
    slicing = resolve(module, plan)
    example_inputs = tuple(example_inputs) if example_inputs is not None else None
    if mode == "fx":
        if example_inputs is None:
            raise GraphpruneError("apply_plan: mode 'fx' needs example_inputs (the module is traced with them)")
        return _fx_apply(module, plan, slicing, example_inputs, dynamic_axes)
    pruned = slice_module(module, slicing)
    try:
        rewrite_attributes(module, pruned, _group_edits(plan, module))
    except GraphpruneError:
        if mode == "auto" and example_inputs is not None:
            return _fx_apply(module, plan, slicing, example_inputs, dynamic_axes)
        raise
    if example_inputs is None:
        from graphprune.torch._runcheck import shape_failure

        why = shape_failure(module, pruned, plan)
        if why is not None:
            raise GraphpruneError(f"apply_plan: the pruned {type(module).__name__} would fail to run ({why}); its "
                                  "forward hard-codes a shape: pass example_inputs (e.g. the inputs given to "
                                  "graphprune.torch.optimize) so that apply_plan rewrites it with torch.fx")
    else:
        err = _runs(pruned, example_inputs)
        if err is not None:
            if mode == "auto":
                return _fx_apply(module, plan, slicing, example_inputs, dynamic_axes)
            raise GraphpruneError(f"apply_plan: the pruned {type(module).__name__} fails to run ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); its forward may hard-code a shape "
                                  "(use mode='auto' or 'fx')")
    return pruned


def _fx_apply(module, plan, slicing, example_inputs, dynamic_axes):

    axes = dynamic_axes if dynamic_axes is not None else plan.get("info", {}).get("torch", {}).get("dynamic_axes")
    if axes is not None:
        axes = {int(k): v for k, v in axes.items()}
    return rewrite_shapes(module, plan, slicing, example_inputs, axes)


def count_parameters(module: nn.Module) -> int:
    """Parameters of ``module``, each tied tensor once."""
    return sum(p.numel() for p in module.parameters())


def save_pruned(module: nn.Module, plan: dict, path) -> None:
    """Write ``module``'s state_dict and ``plan`` (and, for an FX-rewritten module, the example input specs that
    rebuild it) to ``path`` with ``torch.save``."""
    _check_plan(plan)

    fx = module.meta.get(FX_META) if isinstance(module, torch.fx.GraphModule) else None
    if isinstance(module, torch.fx.GraphModule) and fx is None:
        raise GraphpruneError("save_pruned: this GraphModule was not made by apply_plan (no graphprune_fx meta)")
    torch.save({"format": FORMAT, "plan": plan, "state_dict": module.state_dict(), "fx": fx}, path)


def load_pruned(factory, path, map_location="cpu") -> nn.Module:
    """Rebuild the pruned module from a fresh ``factory()`` (the unpruned architecture) and the saved plan, then load
    the saved weights (strict)."""
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise GraphpruneError(f"load_pruned: {path} does not exist") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise GraphpruneError(f"load_pruned: {path} is not a file written by graphprune.torch.save_pruned")
    base = factory()
    fx = saved.get("fx")
    if fx:
        example = tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in fx["inputs"])
        axes = {int(k): v for k, v in fx["dynamic_axes"].items()} if fx.get("dynamic_axes") else None
        pruned = apply_plan(base, saved["plan"], example, mode="fx", dynamic_axes=axes)
    else:
        pruned = apply_plan(base, saved["plan"], mode="eager")
    try:
        pruned.load_state_dict(saved["state_dict"], strict=True)
    except RuntimeError as e:
        raise GraphpruneError(f"load_pruned: the saved weights do not fit factory()'s module after the plan: "
                              f"{str(e).splitlines()[0]}") from e
    return pruned
