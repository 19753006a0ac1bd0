"""graphprune: compiler-style graph transformations that make trained networks cheaper, verified.

The public API is what this module exports; everything else is implementation. ``count_flops`` is the backend's:
static shapes, completed in ONNX Runtime where inference stops (``graphprune.analysis.count_flops`` runs nothing).
Importing graphprune does not import onnxruntime; the first thing that runs a model does.
"""

from graphprune.analysis import find_attention_blocks, summarize
from graphprune.analysis.attention import AttentionBlock
from graphprune.backends.onnxruntime import count_flops
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
    "PassContext", "Pipeline", "Rewrite", "SearchResult", "Skip", "Skipped", "VerificationError", "VerifyThresholds", "compare", "count_flops",
    "find_attention_blocks", "load_data", "load_model", "optimize", "register", "registry", "save_model", "search", "summarize", "synthetic_data",
]
