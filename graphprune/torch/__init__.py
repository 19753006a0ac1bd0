"""PyTorch front-end (optional extra ``graphprune[torch]``): export an ``nn.Module`` to ONNX for the passes.

``export`` uses ``torch.onnx.export(dynamo=True)``, which keeps parameter names as initializer names, so a plan
computed on the ONNX graph (e.g. a channel-prune plan keyed by initializer names) maps back to the module's
``state_dict`` keys. The exporter always writes a separate ``<path>.data`` weights file.
"""

from __future__ import annotations

from pathlib import Path

from graphprune.errors import GraphpruneError

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise GraphpruneError("graphprune.torch needs PyTorch: pip install torch==2.13.0 (then graphprune[torch])") from e


def export(
    module: torch.nn.Module,
    args: tuple,
    path: str | Path,
    opset: int = 18,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
) -> Path:
    """Export ``module`` (put in eval mode) to ``path``; axis 0 of every input is dynamic when ``dynamic_batch``.

    Opset 18 writes attention as MatMul/Softmax chains; opset ≥ 23 writes ``scaled_dot_product_attention`` as the
    standard ``Attention`` op. Both are understood by ``graphprune.analysis``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        shapes = tuple({0: batch} for _ in args)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                          input_names=input_names, verbose=False)
    return path


__all__ = ["export"]
