"""Shared fixtures: example models exported once per test session (dynamo exporter, small sizes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Kernel tests (marker `kernels`) run graphprune's Triton kernels on CPU tensors in Triton's interpreter. triton reads
# TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test imports graphprune.kernels.
# GRAPHPRUNE_KERNELS_CUDA=1 tests the compiled kernels on a GPU instead.
if os.environ.get("GRAPHPRUNE_KERNELS_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def examples():
    """The ``examples/models.py`` module (model builders and ``export_model``)."""
    from examples import models

    return models


@pytest.fixture(scope="session")
def export(tmp_path_factory, examples):
    """``export(name, opset=18, **build_kwargs) -> Path``: build an example model and export it (cached)."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("exports")

    def _export(name: str, opset: int = 18, **kw) -> Path:
        key = (name, opset, tuple(sorted(kw.items())))
        if key not in cache:
            model, args = examples.build(name, **kw)
            tag = "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
            cache[key] = examples.export_model(model, args, folder / f"{name}_op{opset}{'_' + tag if tag else ''}.onnx", opset=opset)
        return cache[key]

    return _export


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory):
    """``hf_export(kind, opset) -> Path`` for a random-init transformers BertModel ("bert") or ViTModel ("vit")."""
    transformers = pytest.importorskip("transformers")
    import torch

    cache: dict = {}
    folder = tmp_path_factory.mktemp("hf")

    def _export(kind: str, opset: int = 18, layers: int = 2, heads: int = 4) -> Path:
        key = (kind, opset, layers, heads)
        if key in cache:
            return cache[key]
        torch.manual_seed(0)
        if kind == "bert":
            cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=256, vocab_size=1000, max_position_embeddings=64)
            model = transformers.BertModel(cfg).eval()
            ids = torch.randint(0, 1000, (2, 16))
            mask = torch.ones(2, 16, dtype=torch.int64)
            mask[1, 10:] = 0
            args = (ids, mask)
            names = ["input_ids", "attention_mask"]
        elif kind == "vit":
            cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=layers, num_attention_heads=heads,
                                         intermediate_size=256, image_size=32, patch_size=8)
            model = transformers.ViTModel(cfg).eval()
            args = (torch.randn(2, 3, 32, 32),)
            names = ["pixel_values"]
        else:
            raise ValueError(kind)
        path = folder / f"hf_{kind}_op{opset}_l{layers}.onnx"
        with torch.no_grad():
            torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset, input_names=names, verbose=False)
        cache[key] = path
        return path

    return _export
