"""Cleanup passes, wrapping the onnx-ir and onnxscript optimizers.

  * ``dce``: remove nodes, functions and opset imports nothing uses (onnx-ir ``RemoveUnused*Pass``);
  * ``identity_elimination``: drop ``Identity`` nodes (onnx-ir ``IdentityEliminationPass``);
  * ``constant_folding``: fold constant subgraphs (onnxscript ``fold_constants``; never inlines functions, so
    ``ai.graphprune`` ops survive);
  * ``shape_inference``: ONNX shape inference with data propagation;
  * ``cleanup``: all of the above, in that order (identities first so folding sees through them).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
import pydantic

from graphprune._ir import infer_shapes
from graphprune.passes import register
from graphprune.passes.base import GraphPass, GraphResult, PassConfig, Rewrite


def _count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


@dataclasses.dataclass(frozen=True)
class Cleaned(Rewrite):
    """Nodes a cleanup step removed from the graph."""

    where: str
    what: str
    nodes_removed: int


def _changed(name: str, before: int, after: int) -> list[Cleaned]:
    return [Cleaned("graph", name, before - after)] if before != after else []


@register
class DeadCodeEliminationPass(GraphPass):
    name = "dce"
    summary = "remove unused nodes, functions and opset imports"

    def call(self, model: ir.Model) -> GraphResult:
        before = _count(model)
        modified = False
        for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
            modified |= p(model).modified
        return GraphResult(model, modified, rewritten=_changed("dead nodes", before, _count(model)))


@register
class IdentityEliminationPass(GraphPass):
    name = "identity_elimination"
    summary = "remove Identity nodes"

    def call(self, model: ir.Model) -> GraphResult:
        before = _count(model)
        modified = common.IdentityEliminationPass()(model).modified
        return GraphResult(model, modified, rewritten=_changed("identities", before, _count(model)))


class FoldConfig(PassConfig):
    input_size_limit: int = pydantic.Field(default=8192, gt=0, description="largest constant input (elements) to fold")
    output_size_limit: int = pydantic.Field(default=262144, gt=0, description="largest folded output (elements)")


@register
class ConstantFoldingPass(GraphPass):
    name = "constant_folding"
    summary = "fold constant subgraphs (onnxscript optimizer; functions are not inlined)"
    Config = FoldConfig

    def call(self, model: ir.Model) -> GraphResult:
        before = _count(model)
        result = onnxscript.optimizer.fold_constants(
            model, input_size_limit=self.config.input_size_limit, output_size_limit=self.config.output_size_limit
        )
        common.RemoveUnusedNodesPass()(model)
        after = _count(model)
        return GraphResult(model, bool(result.modified) or before != after, rewritten=_changed("folded", before, after))


@register
class ShapeInference(GraphPass):
    name = "shape_inference"
    summary = "ONNX shape inference with data propagation"

    def call(self, model: ir.Model) -> GraphResult:
        infer_shapes(model)
        return GraphResult(model, False)


@register
class CleanupPass(GraphPass):
    name = "cleanup"
    summary = "identity_elimination, constant_folding, dce, shape_inference"
    Config = FoldConfig

    def call(self, model: ir.Model) -> GraphResult:
        rewritten: list[Rewrite] = []
        modified = False
        for p in (
            IdentityEliminationPass(context=self.context),
            ConstantFoldingPass(self.config, self.context),
            DeadCodeEliminationPass(context=self.context),
            ShapeInference(context=self.context),
        ):
            r = p(model)
            modified |= r.modified
            rewritten += r.rewritten
        return GraphResult(model, modified, rewritten=rewritten)
