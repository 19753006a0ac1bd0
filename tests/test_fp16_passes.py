"""A float16 export goes through token_drop and sparse_attention, and matches the float32 result."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import graphprune as gp
from graphprune.backends.onnxruntime import make_session
from graphprune.ops import DOMAIN

torch = pytest.importorskip("torch")
import graphprune.torch as gtorch  # noqa: E402
from examples import models  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same random-init ViT (65 tokens) exported in float32 and in float16."""
    out = tmp_path_factory.mktemp("fp16")
    torch.manual_seed(0)
    vit = models.ViT(img_size=64, patch=8, dim=64, depth=4, heads=4, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    p32 = gtorch.export(vit, (x,), out / "v32.onnx")
    p16 = gtorch.export(vit.half(), (x.half(),), out / "v16.onnx")
    return p32, p16


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    sess = make_session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name,config", [
    ("token_drop", {"keep_ratio": 0.6}),
    ("token_drop", {"method": "tome", "r": 6}),
    ("sparse_attention", {"pattern": "sliding_window", "window": 16}),
    ("sparse_attention", {"pattern": "block_topk", "block_size": 16, "topk": 2}),
])
def test_fp16_export_matches_fp32(exports, name, config):
    p32, p16 = exports
    outs = {}
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    for tag, path in (("fp32", p32), ("fp16", p16)):
        model = gp.load_model(path)
        records = gp.Pipeline().add(name, **config).run(model)
        assert records[0]["changed"], records[0]
        nodes = [n for n in model.graph if n.domain == DOMAIN]
        assert nodes
        want = ir.DataType.FLOAT16 if tag == "fp16" else ir.DataType.FLOAT
        assert {n.outputs[0].dtype for n in nodes} == {want}
        outs[tag] = _run(model, x.astype(np.float16) if tag == "fp16" else x)
    assert outs["fp16"].dtype == np.float16
    a, b = outs["fp32"].astype(np.float64), outs["fp16"].astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.999, cos
    np.testing.assert_allclose(b, a, atol=3e-2 * np.abs(a).max(), rtol=0)
