"""Channel dependency groups: which channels, heads and hidden units must be removed together. Changes nothing.

Model
  * Every layer that *creates* channels (Conv / ConvTranspose / Gemm / MatMul with a constant weight, an
    embedding Gather) opens a *space*: one atom per output channel.
  * Channels are followed forward through the graph (one tracked axis per value, a *label*: the atom of every
    position along that axis). Per-op rules sit in one registry (``_channel_core.RULES``), filled by
    ``_channel_rules`` (producers, grouped convolution, elementwise, norms, pooling, Concat, Gather) and
    ``_channel_layout`` (Reshape/Flatten, Transpose, Squeeze, Split, Slice, Expand, Pad, Resize); whole heads are
    the block-level rule of ``_attention_heads``. The records and the analysis state live in ``_channel_core``.
  * Rules that couple channels *union* atoms (union-find): a residual ``Add`` unions its inputs position by
    position; a grouped convolution unions each conv group; a head unions all its q/k/v/output channels.
    A broadcast of a 1-channel operand couples nothing.
  * The atoms that end up in one union class form one prunable unit (a channel, a head, a conv group); spaces
    that share a class form one :class:`ChannelGroup`.
  * Whatever the rules cannot prove (an op without a rule, a graph output, a reshape that mixes channels with
    other axes, a shape constant that is not a constant) *blocks* the atoms it touches; a group with a blocked
    atom is unprunable and carries the reason. Nothing is guessed.

The analysis also records every dependent tensor to slice (:class:`Member`), every shape constant and attribute
to rewrite (:class:`CountEdit`, :class:`GatherEdit`) and compute terms for a FLOPs model (:class:`CostTerm`).
``graphprune.passes.channel_prune`` turns a choice of kept classes into a replayable plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

# the rule modules register their per-op rules in _channel_core.RULES when imported
from graphprune.analysis import _attention_head_edits, _attention_heads, _channel_layout, _channel_rules  # noqa: F401
from graphprune.analysis._channel_core import (
    Builder,
    CostTerm,
    CountEdit,
    GatherEdit,
    Label,
    Member,
    apply,
    static_shape,
)
from graphprune.analysis.attention import find_attention_blocks


@dataclasses.dataclass
class ChannelGroup:
    """Coupled spaces: each class (a union of atoms) is removed or kept as a whole."""

    id: int
    spaces: list[int]
    classes: np.ndarray  # root atom of every class
    widths: np.ndarray  # channels per class in the widest space (1 for plain channels, head_dim for heads)
    members: list[Member]
    prunable: bool
    reason: str | None
    kind: str = "channels"  # "channels" | "heads" | "groups" (grouped conv)
    stem: bool = False  # holds the input stem's channels (what ignore_stem decides on)

    @property
    def size(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """JSON-ready summary, as ``graphprune inspect`` prints it."""
        names: list[str] = []
        for m in self.members:
            v = m.value
            name = v.name if (v is not None and v.name and v.is_initializer()) else m.node.name
            if name not in names:
                names.append(name)
        return {
            "id": self.id,
            "kind": self.kind,
            "size": self.size,
            "channels": int(self.widths.sum()),
            "members": names,
            "prunable": self.prunable,
            "reason": self.reason,
        }


@dataclasses.dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]
    members: list[Member]
    count_edits: list[CountEdit]
    gather_edits: list[GatherEdit]
    costs: list[CostTerm]
    root: np.ndarray  # root atom of every atom
    group_of_root: dict[int, int]
    space_nodes: list[ir.Node]
    shape_lines: list[tuple[ir.Value, int, np.ndarray]] = dataclasses.field(default_factory=list)

    def group_of_atom(self, atom: int) -> ChannelGroup:
        return self.groups[self.group_of_root[int(self.root[atom])]]


def _keeps_stem(b: Builder, spaces: list[int], ignore_stem: bool | str, stream: set[int]) -> str | None:
    """Why the input stem's group stays whole, or None. ``auto`` keeps a CNN's stem channels and a token embedding's
    width, and prunes a vision transformer's embedding width: a stem on a float input whose group attention blocks
    read (the residual stream every block reads and writes), as Torch-Pruning does."""
    stems = [s for s in spaces if s in b.stem_spaces]
    if not stems or ignore_stem is False:
        return None
    if ignore_stem == "auto":
        if any(s in b.lookup_stems for s in stems):
            return "input stem: the token embedding width (kept by default; set ignore_stem: false to prune it)"
        if stream.intersection(spaces):
            return None
    if ignore_stem is True:
        return "input stem (ignore_stem: true)"
    return "input stem (kept by default; set ignore_stem: false to prune it)"


def _groups(b: Builder, ignore: set[str], ignore_stem: bool | str, stream: set[int]) -> ChannelAnalysis:
    n = len(b.parent)
    root = np.array([b.find(a) for a in range(n)], dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
    # spaces sharing a class are one group
    sp = list(range(len(b.space_nodes)))

    def sfind(s: int) -> int:
        while sp[s] != s:
            sp[s] = sp[sp[s]]
            s = sp[s]
        return s

    atom_space = np.asarray(b.atom_space, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(b.space_sizes)]).astype(np.int64)  # spaces are contiguous atom ranges
    cross = np.unique(np.stack([atom_space, atom_space[root]], axis=1), axis=0) if n else np.zeros((0, 2), int)
    for sa, sr in cross.tolist():  # pairs of spaces that share a class
        x, y = sfind(sa), sfind(sr)
        if x != y:
            sp[max(x, y)] = min(x, y)
    comp: dict[int, list[int]] = {}
    for s in range(len(sp)):
        comp.setdefault(sfind(s), []).append(s)
    by_space_members: dict[int, list[Member]] = {}
    for m in b.members:
        for s in {sfind(int(x)) for x in np.unique(atom_space[m.atoms]).tolist()}:
            by_space_members.setdefault(s, []).append(m)
    groups: list[ChannelGroup] = []
    group_of_root: dict[int, int] = {}
    for gid, (key, spaces) in enumerate(sorted(comp.items())):
        atoms = np.concatenate([np.arange(starts[s], starts[s] + b.space_sizes[s]) for s in spaces])
        roots = np.unique(root[atoms])
        widest = max(spaces, key=lambda s: b.space_sizes[s])
        w_atoms = np.arange(starts[widest], starts[widest] + b.space_sizes[widest])
        _, wcount = np.unique(root[w_atoms], return_counts=True)
        widths = np.ones(len(roots), dtype=np.int64) * (int(wcount.min()) if len(wcount) else 1)
        reason = next((b.blocked[a] for a in atoms.tolist() if a in b.blocked), None)
        members = by_space_members.get(key, [])
        names = {m.node.name for m in members} | {m.value.name for m in members if m.value is not None}
        names |= {b.space_nodes[s].name for s in spaces}
        hit = sorted(names & ignore)
        if reason is None and hit:
            reason = f"ignored by config ({', '.join(hit)})"
        if reason is None:
            reason = _keeps_stem(b, spaces, ignore_stem, stream)
        if reason is None and len(roots) < 2:
            reason = "a single channel"
        kinds = {b.kinds[s] for s in spaces}
        kind = "heads" if "heads" in kinds else ("groups" if "groups" in kinds else "channels")
        groups.append(ChannelGroup(gid, spaces, roots, widths, members, reason is None, reason, kind,
                                   any(s in b.stem_spaces for s in spaces)))
        for r in roots.tolist():
            group_of_root[r] = gid
    return ChannelAnalysis(groups, b.members, b.count_edits, b.gather_edits, b.costs, root, group_of_root, b.space_nodes,
                           b.shape_lines)


def analyze_channels(model: ir.Model, ignore: list[str] | tuple[str, ...] = (), ignore_stem: bool | str = "auto",
                     folded_biases: bool = True) -> ChannelAnalysis:
    """Run the dependency analysis on the main graph (shapes must be inferred; dynamo exports carry them).
    ``ignore_stem``: true keeps the input stem's group whole, false prunes it, ``auto`` (the default) prunes it only
    where it is a vision transformer's embedding width (see ``_keeps_stem``).
    ``folded_biases=False``: an attention block with a constant per-head bias keeps its heads whole."""
    b = Builder(model)
    b.folded_biases = folded_biases
    blocks = find_attention_blocks(model)
    heads = _attention_heads.claim(b, blocks)
    outputs = set(model.graph.outputs)
    for node in model.graph:
        if node in heads.finishers:
            _attention_head_edits.apply(b, heads.finishers[node])
        elif node not in b.claimed:
            apply(b, node)
        if any(v is not None and (v in b.derived or v in b.labels) for v in node.inputs):
            b.derived.update(node.outputs)
    for value, lab in b.labels.items():  # every other op on channels scales with its output's kept fraction
        b.shape_line(value, lab.axis, lab.atoms[:, None])
        prod = value.producer()
        if prod is not None and prod.outputs[0] is value:
            b.cost(prod, 0, None, lab.atoms)
    for value in outputs:
        b.block_value(value, f"reaches graph output {value.name!r}")
    for value, lab in b.labels.items():
        if value.is_graph_output():
            b.block(lab.atoms, f"reaches graph output {value.name!r}")
    _couple_shared_counts(b)
    stream = set()  # spaces the attention blocks read and add to
    for blk in blocks:
        for v in (blk.attn_input, blk.residual_in):
            lab = b.label(v) if v is not None else None
            if lab is not None:
                stream.update(int(b.atom_space[a]) for a in np.asarray(lab.atoms).ravel().tolist())
    return _groups(b, set(ignore), ignore_stem, stream)


def _couple_shared_counts(b: Builder) -> None:
    """One shape constant counted by several edits (a reshape target the exporter computes once and every block
    reuses, as transformers' ``repeat_kv`` exports): its rows are removed together in every block that reads it,
    or the blocks would need different values in one slot. Row ``r`` of every such edit joins one class."""
    slots: dict[tuple, list] = {}
    for e in b.count_edits:
        slots.setdefault((id(e.node), e.input_index, e.pos, e.attr), []).append(e)
    for edits in slots.values():
        if len(edits) < 2 or len({len(e.lines) for e in edits}) != 1:
            continue
        # rows of one class each (a head count): row r of every edit is one unit. A row spanning classes (a head's
        # width, which every kept head keeps) keeps its count whatever is removed: nothing to couple.
        roots = [np.vectorize(b.find)(e.lines) for e in edits]
        if not all((r == r[:, :1]).all() for r in roots):
            continue
        if len({tuple(r[:, 0].tolist()) for r in roots}) > 1:
            b.union(np.concatenate([r[:, 0] for r in roots[:-1]]), np.concatenate([roots[-1][:, 0]] * (len(roots) - 1)))


def find_channel_groups(model: ir.Model) -> list[ChannelGroup]:
    """Channel dependency groups with default settings, as ``graphprune inspect`` lists them."""
    return analyze_channels(model).groups


__all__ = ["ChannelAnalysis", "ChannelGroup", "CountEdit", "CostTerm", "GatherEdit", "Label", "Member",
           "analyze_channels", "find_channel_groups", "static_shape"]
