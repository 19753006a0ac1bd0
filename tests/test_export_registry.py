"""``graphprune.torch._registry``: the exporter's ATen → ONNX table built once per opset gives the same translations
and the same exported model as the table built per export, and one export's custom translations stay its own."""

from __future__ import annotations

import onnx
import pytest

torch = pytest.importorskip("torch")

from torch.onnx._internal.exporter import _registration  # noqa: E402

from graphprune.torch import _registry, export  # noqa: E402


def _fresh(opset=18):
    """The exporter's own table, built now (whatever is installed on the class during the test session)."""
    original = _registry._original if _registry._depth else _registration.ONNXRegistry.__dict__["from_torchlib"]
    return original.__func__(_registration.ONNXRegistry, opset)


def _summary(reg):
    return {str(k): [(m.onnx_function, m.is_custom, m.is_complex, m.opset_introduced) for m in v]
            for k, v in reg.functions.items()}


@pytest.mark.parametrize("opset", [18, 23])
def test_reused_table_equals_a_fresh_one(opset):
    with _registry.reused_registry():
        a = _registration.ONNXRegistry.from_torchlib(opset)
        b = _registration.ONNXRegistry.from_torchlib(opset)
    fresh = _fresh(opset)
    assert a.opset_version == b.opset_version == fresh.opset_version == opset
    assert len(a.functions) > 300  # every ATen op torchlib translates
    assert _summary(a) == _summary(b) == _summary(fresh)


def test_custom_translations_stay_in_their_copy():
    with _registry.reused_registry():
        a = _registration.ONNXRegistry.from_torchlib(18)
        target = torch.ops.aten.relu.default
        before = len(a.get_decomps(target))

        def my_relu(x):
            return x

        a.register_op(target, my_relu)
        b = _registration.ONNXRegistry.from_torchlib(18)
    assert len(a.get_decomps(target)) == before + 1
    assert len(b.get_decomps(target)) == before
    assert all(m.onnx_function is not my_relu for m in b.get_decomps(target))


def test_the_class_is_restored_after_the_outermost_block():
    installed = _registration.ONNXRegistry.__dict__["from_torchlib"]
    with _registry.reused_registry():
        with _registry.reused_registry():
            inner = _registration.ONNXRegistry.__dict__["from_torchlib"]
        assert _registration.ONNXRegistry.__dict__["from_torchlib"] is inner
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is installed


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return torch.softmax(self.norm(self.lin(x)) @ x.transpose(1, 2), -1)


def test_export_is_the_same_with_and_without_the_reused_table(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m, args = _Block(), (torch.randn(2, 5, 8),)
    reused = onnx.load(export(m, args, tmp_path / "reused.onnx"))
    monkeypatch.setattr(_registry, "_registry_class", lambda: None)  # graphprune's export builds its own table
    if _registry._depth:  # the session's table (conftest): put the exporter's own back for this export
        monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", _registry._original)
    fresh = onnx.load(export(m, args, tmp_path / "fresh.onnx"))
    assert reused.graph.SerializeToString() == fresh.graph.SerializeToString()
    assert [f.SerializeToString() for f in reused.functions] == [f.SerializeToString() for f in fresh.functions]
