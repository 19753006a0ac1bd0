"""graphprune: compiler-style graph transformations that make trained networks cheaper, verified.

The public API is what this module exports; everything else is implementation. Two FLOPs counters:
``graphprune.analysis.count_flops`` reads static shapes and runs nothing; ``measure_flops`` (the backend's) completes
the shapes static inference misses in one ONNX Runtime run. ``graphprune.count_flops``, the old name of
``measure_flops``, still works and warns.
Importing graphprune does not import onnxruntime; the first thing that runs a model does.
"""

from graphprune.analysis import find_attention_blocks, summarize
from graphprune.analysis.attention import AttentionBlock
from graphprune.backends.onnxruntime import measure_flops
from graphprune.data import Dataset, load_data, synthetic_data
from graphprune.errors import ConfigError, DataError, GraphpruneError, ModelLoadError, VerificationError
from graphprune.io import load_model, save_model
from graphprune.passes import (
    GraphPass,
    GraphResult,
    PassConfig,
    PassContext,
    Rewrite,
    Skip,
    Skipped,
    register,
    registry,
)
from graphprune.pipeline import DataConfig, Pipeline, optimize
from graphprune.search import SearchResult, search
from graphprune.verify import VerifyThresholds, compare

__version__ = "0.1.0"

__all__ = [
    "AttentionBlock", "ConfigError", "DataConfig", "DataError", "Dataset", "GraphPass", "GraphResult", "GraphpruneError", "ModelLoadError", "PassConfig",
    "PassContext", "Pipeline", "Rewrite", "SearchResult", "Skip", "Skipped", "VerificationError", "VerifyThresholds", "compare",
    "find_attention_blocks", "load_data", "load_model", "measure_flops", "optimize", "register", "registry", "save_model", "search", "summarize", "synthetic_data",
]


def __getattr__(name: str):
    if name == "count_flops":  # the name ``measure_flops`` had until 2026-12-06
        import warnings

        warnings.warn("graphprune.count_flops is now graphprune.measure_flops (it runs the model in ONNX Runtime "
                      "where static shapes stop); graphprune.analysis.count_flops is the static count",
                      DeprecationWarning, stacklevel=2)
        return measure_flops
    raise AttributeError(f"module 'graphprune' has no attribute {name!r}")
