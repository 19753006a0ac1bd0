"""The state and the rule registry of the channel analysis (:mod:`graphprune.analysis.channels`).

  * records: :class:`Label` (the tracked channel axis of a value), :class:`Member` (a tensor to slice),
    :class:`CountEdit` / :class:`GatherEdit` (constants and attributes to rewrite), :class:`CostTerm`;
  * :class:`Builder`: the mutable state of one analysis run (union-find over atoms, labels, records);
  * the one registry of per-op rules, ``RULES``: rule modules register with ``@rule("Op", ...)``
    (``_channel_rules``: producers, per-channel and broadcasting ops; ``_channel_layout``: layout ops), and
    ``apply`` dispatches a node to its rule. Whole heads are the block-level rule of ``_attention_heads``.
Nothing here imports a rule module, so the rule modules and ``channels`` import this one without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class Label:
    """The tracked channel axis of a value and the atom of every position along it."""

    axis: int
    atoms: np.ndarray  # int64 [dim]


@dataclasses.dataclass
class Member:
    """A constant input of ``node`` whose ``axis`` is indexed by channels: position i belongs to ``atoms[i]``."""

    node: ir.Node
    input_index: int
    axis: int
    atoms: np.ndarray
    role: str  # "out" (producer weight) | "in" (consumer weight) | "param" (bias, norm, gate, embedding)

    @property
    def value(self) -> ir.Value:
        return self.node.inputs[self.input_index]


@dataclasses.dataclass
class CountEdit:
    """Entry ``pos`` of constant input ``input_index`` of ``node`` (or attribute ``attr``) becomes the number of
    rows of ``lines`` ([size, k] atoms) that keep at least one atom. Reshape targets, split sizes, slice bounds,
    head counts, conv ``group``."""

    node: ir.Node
    input_index: int | None
    pos: int
    lines: np.ndarray
    attr: str | None = None
    base: list[int] | None = None  # the full constant, when the input does not exist yet (Split num_outputs)
    #: written even when the count does not change: a bound relative to the axis size (a negative Slice bound
    #: moves with the pruned size) is rewritten as the absolute count
    always: bool = False


@dataclasses.dataclass
class GatherEdit:
    """Constant indices (input ``input_index``) into a channel axis whose positions are ``atoms``."""

    node: ir.Node
    input_index: int
    atoms: np.ndarray


@dataclasses.dataclass
class CostTerm:
    """A compute node: ``flops`` at full width, scaled by the kept fraction of ``fan_in`` and ``fan_out``."""

    node: ir.Node
    flops: int
    fan_in: np.ndarray | None
    fan_out: np.ndarray | None


class Builder:
    """Mutable state of one analysis run; rules call its methods."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.folded_biases = True  # constant per-head attention biases are sliced with the heads
        self.graph = model.graph
        self.labels: dict[ir.Value, Label] = {}
        self.parent: list[int] = []
        self.atom_space: list[int] = []
        self.space_nodes: list[ir.Node] = []
        self.space_sizes: list[int] = []
        self.stem_spaces: set[int] = set()
        self.lookup_stems: set[int] = set()  # stem spaces made by an embedding lookup (token ids), not a float input
        self.blocked: dict[int, str] = {}  # atom -> reason (first reason wins)
        self.members: list[Member] = []
        self.count_edits: list[CountEdit] = []
        self.gather_edits: list[GatherEdit] = []
        self.costs: list[CostTerm] = []
        self._cost_nodes: set[ir.Node] = set()
        self.claimed: set[ir.Node] = set()
        self.shape_lines: list[tuple[ir.Value, int, np.ndarray]] = []  # (value, axis, [dim, k] atoms)
        self.restore: dict[ir.Node, Label] = {}  # a Reshape that undoes an earlier one gets its label back
        self.derived: set[ir.Value] = set()  # values computed from some layer's channels (not input-only)
        self.kinds: dict[int, str] = {}  # space -> kind hint

    # -- atoms ------------------------------------------------------------------------------------
    def new_space(self, node: ir.Node, size: int, kind: str = "channels") -> np.ndarray:
        sid = len(self.space_nodes)
        start = len(self.parent)
        self.parent.extend(range(start, start + size))
        self.atom_space.extend([sid] * size)
        self.space_nodes.append(node)
        self.space_sizes.append(size)
        self.kinds[sid] = kind
        return np.arange(start, start + size, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def union_all(self, atoms: np.ndarray) -> None:
        flat = np.asarray(atoms).ravel()
        if flat.size > 1:
            self.union(np.full(flat.size - 1, flat[0]), flat[1:])

    def block(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is None:
            return
        for a in np.asarray(atoms).ravel().tolist():
            self.blocked.setdefault(a, reason)

    def block_value(self, value: ir.Value | None, reason: str) -> None:
        lab = self.labels.get(value) if value is not None else None
        if lab is not None:
            self.block(lab.atoms, reason)

    # -- labels and records -----------------------------------------------------------------------
    def label(self, value: ir.Value | None) -> Label | None:
        return self.labels.get(value) if value is not None else None

    def set_label(self, value: ir.Value, axis: int, atoms: np.ndarray) -> None:
        self.labels[value] = Label(axis, np.asarray(atoms, dtype=np.int64))

    def member(self, node: ir.Node, index: int, axis: int, atoms: np.ndarray, role: str) -> None:
        self.members.append(Member(node, index, axis, np.asarray(atoms, dtype=np.int64), role))

    def count_edit(self, node: ir.Node, index: int | None, pos: int, lines: np.ndarray, attr: str | None = None,
                   base: list[int] | None = None, always: bool = False) -> None:
        lines = np.asarray(lines, dtype=np.int64)
        if lines.ndim == 1:
            lines = lines[:, None]
        self.count_edits.append(CountEdit(node, index, pos, distinct_rows(lines), attr, base, always))

    def shape_line(self, value: ir.Value, axis: int, lines: np.ndarray) -> None:
        """Record that ``value``'s dim ``axis`` becomes the number of rows of ``lines`` that keep an atom."""
        self.shape_lines.append((value, axis, distinct_rows(lines)))

    def cost(self, node: ir.Node, flops: int | None, fan_in: np.ndarray | None, fan_out: np.ndarray | None) -> None:
        if node not in self._cost_nodes:
            self._cost_nodes.add(node)
            self.costs.append(CostTerm(node, int(flops or 0), fan_in, fan_out))


_BITMAP_CELLS = 1 << 24  # rows × atom span up to which distinct_rows marks atoms in a bitmap instead of sorting


def distinct_rows(lines: np.ndarray) -> np.ndarray:
    """``lines`` ([L, k] atoms) with each row reduced to its distinct atoms, padded with the row's first one.

    A count edit only asks which rows keep at least one atom, which depends on each row's set of atoms alone. A
    simulated attention chain gives rows of k = tokens·channels entries over a handful of distinct atoms (ViT-B:
    [768, 197·3] per value), so this keeps the analysis's memory at the size of the answer, not of the simulation.
    """
    lines = np.asarray(lines, dtype=np.int64)
    if lines.ndim != 2 or lines.shape[1] <= 1:
        return lines
    if (lines.min(axis=1) == lines.max(axis=1)).all():  # one atom per row (a channel repeated over tokens)
        return lines[:, :1].copy()
    lo = int(lines.min())
    span = int(lines.max()) - lo + 1
    if lines.shape[0] * span <= _BITMAP_CELLS:  # mark each row's atoms: no sort of tokens × channels entries
        present = np.zeros((lines.shape[0], span), dtype=bool)
        present[np.arange(lines.shape[0])[:, None], lines - lo] = True
        rows, cols = np.nonzero(present)  # each row's distinct atoms, ascending
        atoms = cols + lo
    else:
        srt = np.sort(lines, axis=1)
        new = np.ones(srt.shape, dtype=bool)
        new[:, 1:] = srt[:, 1:] != srt[:, :-1]
        rows, cols = np.nonzero(new)
        atoms = srt[rows, cols]
    per_row = np.bincount(rows, minlength=lines.shape[0])
    width = int(per_row.max())
    if width == lines.shape[1]:
        return lines
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    first = np.cumsum(per_row) - per_row  # each row's smallest atom pads it
    out = np.repeat(atoms[first][:, None], width, axis=1)
    out[rows, slot] = atoms
    return out


def static_shape(value: ir.Value | None) -> list[int] | None:
    """The shape with symbolic dims as 1 (batch, tokens); ``None`` when the rank or a dim is unknown."""
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value is not None:
            dims.append(1)
        else:
            return None
    return dims


RuleFn = Callable[[Builder, ir.Node], None]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the channels of one op type propagate.

    ``producer``: the rule runs on every node of the op (it may open a new channel space), labeled inputs or not;
    otherwise it runs only on nodes with a labeled input. ``data_first``: channels must arrive on input 0 (on
    another input they are a parameter of the op, and are blocked).
    """

    fn: RuleFn
    producer: bool = False
    data_first: bool = True


#: The per-op channel rules, by op type (standard domain).
RULES: dict[str, Rule] = {}


def rule(*op_types: str, producer: bool = False, data_first: bool = True) -> Callable[[RuleFn], RuleFn]:
    """Decorator: register ``fn`` as the channel rule of ``op_types``."""

    def deco(fn: RuleFn) -> RuleFn:
        for op in op_types:
            if op in RULES:
                raise ValueError(f"two channel rules for {op}")
            RULES[op] = Rule(fn, producer, data_first)
        return fn

    return deco


def block_all(b: Builder, node: ir.Node, reason: str) -> None:
    """Block the channels of every labeled input of ``node``."""
    for v in node.inputs:
        b.block_value(v, reason)


def apply(b: Builder, node: ir.Node) -> None:
    """Propagate labels through one node (graph order) with its rule; an op without one blocks its channels."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        block_all(b, node, f"{node.domain}::{op} {node.name!r} has no channel rule")
        return
    r = RULES.get(op)
    if r is not None and r.producer:
        r.fn(b, node)
        return
    if not any(b.label(v) is not None for v in node.inputs):
        return
    if r is None:
        block_all(b, node, f"{op} {node.name!r} has no channel rule")
    elif r.data_first and b.label(node.inputs[0]) is None:
        block_all(b, node, f"{op} {node.name!r} takes channels as a parameter")
    else:
        r.fn(b, node)
