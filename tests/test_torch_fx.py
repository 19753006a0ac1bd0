"""graphprune.torch.token_drop (FX): same places and outputs as the ONNX token_drop pass; trains; exports TokenSelect."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import graphprune as gp  # noqa: E402
import graphprune.torch as gt  # noqa: E402
from graphprune.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def vit(examples):
    m, _ = examples.build("vit_tiny")
    return m, (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)),)


def _ort(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("config", [{"keep_ratio": 0.5}, {"keep_ratio": 0.7, "layers": [1], "fuse_rest": True},
                                    {"keep_ratio": 0.6, "placement": "block", "keep_order": False}])
@pytest.mark.slow
def test_fx_token_drop_equals_onnx_pass(vit, export, tmp_path, config):
    m, args = vit
    gm = gt.token_drop(m, args, **config)
    src = export("vit_tiny")  # the session's export of the same seeded module: the same ONNX as exporting ``m`` here
    report = gp.optimize(src, tmp_path / "td.onnx", gp.Pipeline().add("token_drop", **config), force=True)
    onnx_counts = [r["tokens_after"] for r in report["passes"][0]["rewritten"]]
    assert gm.meta["graphprune_token_drop"]["tokens"][1:] == onnx_counts
    ref = _ort(tmp_path / "td.onnx", args[0])
    with torch.no_grad():
        got = gm(*args).numpy()
        dense = m(*args).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(dense - ref).max() > 1e-3  # tokens really were dropped
    # its own export holds the TokenSelect nodes and runs the same
    import onnx_ir as ir

    p = gt.export(gm, args, tmp_path / "fx.onnx")
    assert [n.op_type for n in ir.load(str(p)).graph if n.domain == "ai.graphprune"] == ["TokenSelect"] * len(onnx_counts)
    np.testing.assert_allclose(_ort(p, args[0]), got, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_fx_token_drop_trains(vit):
    m, args = vit
    gm = gt.token_drop(m, args, keep_ratio=0.5).train()
    opt = torch.optim.SGD(gm.parameters(), lr=1e-2)
    y = torch.tensor([1, 2])
    loss = torch.nn.functional.cross_entropy(gm(*args), y)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in gm.parameters())
    opt.step()
    assert torch.nn.functional.cross_entropy(gm(*args), y).item() < loss.item()


def test_token_select_gradient_matches_gather():
    x = torch.randn(2, 6, 4, requires_grad=True)
    s = torch.rand(2, 6)
    y, idx = torch.ops.graphprune.token_select(x, s, k=3, protect=1)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    expect = torch.zeros_like(x)
    expect.scatter_add_(1, idx[..., None].expand(-1, -1, 4), w)
    torch.testing.assert_close(x.grad, expect)


def test_fx_token_drop_refuses_other_methods(vit):
    m, args = vit
    with pytest.raises(ConfigError, match="tome"):
        gt.token_drop(m, args, method="tome")
