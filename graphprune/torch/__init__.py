"""PyTorch front-end (optional extra ``graphprune[torch]``): export an ``nn.Module`` to ONNX for the passes.

``export`` uses ``torch.onnx.export(dynamo=True)``, which keeps parameter names as initializer names, so a plan
computed on the ONNX graph (e.g. a channel-prune plan keyed by initializer names) maps back to the module's
``state_dict`` keys. The exporter always writes a separate ``<path>.data`` weights file.

Importing this module registers every ``ai.graphprune`` op as ``torch.ops.graphprune.<snake_name>`` (eager kernel,
fake kernel, autograd, ONNX translation); a module that calls them exports to the ``ai.graphprune`` nodes with
their bodies.

Beyond export: ``optimize`` (a module through a pipeline, verified against the module), ``apply_plan`` (the channel
plan back onto the module), ``save_pruned`` / ``load_pruned``, and the FX passes ``token_drop`` and ``sparse_attention``.
"""

from __future__ import annotations

from graphprune.errors import GraphpruneError

try:
    import torch  # noqa: F401 - the friendly error when the extra is missing
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise GraphpruneError("graphprune.torch needs PyTorch: pip install torch==2.13.0 (then graphprune[torch])") from e

from graphprune.torch._apply import apply_plan, count_parameters, load_pruned, save_pruned  # noqa: E402
from graphprune.torch._decoder import export_decoder_pair  # noqa: E402
from graphprune.torch._export import AXIS_RANGE, BATCH_RANGE, export, export_program  # noqa: E402
from graphprune.torch._optimize import TorchResult, optimize  # noqa: E402
from graphprune.torch._sparse_fx import sparse_attention  # noqa: E402
from graphprune.torch._token_fx import token_drop  # noqa: E402

__all__ = ["AXIS_RANGE", "BATCH_RANGE", "TorchResult", "apply_plan", "count_parameters", "export",
           "export_decoder_pair", "export_program", "load_pruned", "optimize", "save_pruned", "sparse_attention", "token_drop"]
