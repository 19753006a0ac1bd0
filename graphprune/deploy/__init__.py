"""Deploying to NVIDIA Triton Inference Server: model repository + manifest, a real server, a load test.

  * :func:`deploy` writes ``DIR/NAME/config.pbtxt`` and ``DIR/NAME/N/`` (model files and ``manifest.json``)
    atomically, for the ``onnxruntime``, ``python`` or ``tensorrt`` backend;
  * :class:`TritonServer` runs a ``tritonserver`` binary (the one bundled by the ``serve`` extra, or one on PATH)
    on 127.0.0.1 and stops it with its whole process group;
  * :func:`load_test` measures requests per second and latency percentiles per concurrency level, interleaving
    two models when comparing.
"""

from graphprune.deploy._config import BACKENDS, TensorSpec, batch_axis, io_specs, model_config, render_pbtxt
from graphprune.deploy._loadtest import load_test, parse_levels, parse_target
from graphprune.deploy._repository import MANIFEST, Deployment, check_manifest, deploy, sha256_file
from graphprune.deploy._server import (
    HOW_TO_GET,
    ServerBinary,
    TritonServer,
    find_server,
    free_port,
    group_alive,
    repository_models,
)

__all__ = [
    "BACKENDS", "HOW_TO_GET", "MANIFEST", "Deployment", "ServerBinary", "TensorSpec", "TritonServer", "batch_axis",
    "check_manifest", "deploy", "find_server", "free_port", "group_alive", "io_specs", "load_test", "model_config",
    "parse_levels", "parse_target", "render_pbtxt", "repository_models", "sha256_file",
]
