"""Token schedules for ``token_drop`` and the FLOPs model that the budget schedule solves against.

FLOPs model: the context runtime's ``measure_flops`` (``graphprune.backends.onnxruntime.measure_flops``: (static shapes, completed in ONNX Runtime where
inference stops) of the unmodified model gives each node's FLOPs at the full token count ``N``. A node after the reduction points runs on ``n`` tokens: attention-core nodes (q·kᵀ,
softmax, ·v) scale with ``(n/N)²``, every other node on the stream with ``n/N``. The token count in effect at
a node is the count after the last reduction placed before it in graph order (nodes before the first block,
such as the patch embedding, keep ``N``). This holds for the transformer stacks the pass supports, where the
stream is sequential; it is a prediction, and the pass also reports ``measure_flops`` of the rewritten model.

Schedules (``keep[i]`` is the fraction of incoming non-prefix tokens kept at ``layers[i]``):
  1. constant: ``keep_ratio`` at every layer (EViT);
  2. list: one ratio per layer;
  3. pyramid: ``stages`` evenly spaced stage boundaries, each keeping ``keep_ratio`` (PyramidDrop);
  4. budget ``{"flops": f}``: the largest constant ratio whose predicted FLOPs are ≤ ``f`` × original
     (bisection on the ratio, to 1e-3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir

from graphprune.analysis.attention import AttentionBlock
from graphprune.errors import ConfigError
from graphprune.ops.token_select import kept_count


@dataclasses.dataclass
class FlopsModel:
    """Per-node FLOPs at full length, with each node's position and whether it is an attention core."""

    total: int
    entries: list[tuple[int, int, bool]]  # (graph position, flops, is_core)
    n_tokens: int

    @classmethod
    def build(cls, model: ir.Model, blocks: Sequence[AttentionBlock], measure_flops, batch: int = 1) -> FlopsModel:
        """``measure_flops(model, batch=...)``: the runtime's FLOPs counter (``PassContext.runtime``)."""
        report = measure_flops(model, batch=batch)
        core = {id(n) for b in blocks for n in b.nodes}
        entries = []
        for pos, node in enumerate(model.graph):
            f = report.per_node.get(node.name, 0)
            if f:
                entries.append((pos, f, id(node) in core))
        n = blocks[0].tokens or 1
        return cls(report.flops, entries, n)

    def predict(self, cuts: Sequence[tuple[int, int]]) -> int:
        """FLOPs when the token count becomes ``count`` after graph position ``pos`` for each ``(pos, count)``."""
        cuts = sorted(cuts)
        total = 0.0
        for pos, f, is_core in self.entries:
            n = self.n_tokens
            for cpos, count in cuts:
                if pos > cpos:
                    n = count
            r = n / self.n_tokens
            total += f * (r * r if is_core else r)
        return int(total)


def counts_for(ratios: Sequence[float], n: int, protect: int) -> list[int]:
    """Token counts after each reduction (prefix included) for per-layer keep ratios."""
    out = []
    for r in ratios:
        n = protect + kept_count(n, protect, keep_ratio=r)
        out.append(n)
    return out


def pyramid_layers(depth: int, stages: int) -> list[int]:
    """Stage boundaries for ``stages`` stages over ``depth`` blocks (the last block of each stage but the last)."""
    if stages < 2:
        raise ConfigError(f"stages: need at least 2 stages, got {stages}")
    return sorted({max(1, round(depth * s / stages) - 1) for s in range(1, stages)})


def default_layers(depth: int) -> list[int]:
    """EViT-style placement: blocks at 1/4, 2/4, 3/4 of the depth (3, 6, 9 for 12 blocks); never block 0."""
    return sorted(i for i in {max(1, int(depth * q / 4 + 0.5)) for q in (1, 2, 3)} if i < depth)


def solve_budget(budget: float, layers: Sequence[int], predict: Callable[[list[float]], int], total: int) -> float:
    """Largest constant keep ratio in (0, 1] whose predicted FLOPs fit ``budget`` × ``total``."""
    target = budget * total
    if predict([1.0] * len(layers)) <= target:
        return 1.0
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if predict([max(mid, 1e-3)] * len(layers)) <= target:
            lo = mid
        else:
            hi = mid
    if lo <= 0.0:
        raise ConfigError(f"schedule: FLOPs budget {budget} is not reachable by dropping tokens at layers {list(layers)}")
    return lo
