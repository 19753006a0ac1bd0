"""The zoo: every architecture of ``tests/_zoo.py`` through ``inspect`` and through each pass family at its default
settings (the CLI shortcuts ``--token-keep 0.7``, ``--sparse-attention sliding_window``, ``--prune-channels 0.3``).

One test id per (model, pass family), so a failing pair is one id, e.g. ``test_pass[bert-token_drop]``. The
contract is in the ``_zoo`` docstring: a changed model is valid (full ONNX check), runs in ORT on the original's
inputs, keeps every output's dtype, rank, static dims and runtime shape, gives finite values and changes FLOPs; a
refusal changes nothing and says why; a user error is one line; nothing else (no internal error) passes.
Each model is exported once per session (``exported``), on first use. The exports and the pass runs take
minutes: ``test_inspect`` and ``test_pass`` are marked ``slow`` (the contract checker's own tests are not).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import _zoo  # noqa: E402

NAMES = [m.name for m in _zoo.ZOO]


@pytest.fixture(scope="session")
def exported(zoo_export):
    """``exported(name) -> Path``: the model exported once per session (``zoo_export`` of conftest.py, shared with
    the other test files; an export failure fails its tests)."""
    return zoo_export


def test_zoo_size():
    """At least 30 architectures (dropped ones are in ``_zoo.DROPPED`` and not counted)."""
    assert len(NAMES) == len(set(NAMES)) >= 30
    assert not set(NAMES) & set(_zoo.DROPPED)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_inspect(exported, name):
    model = _zoo.BY_NAME[name]
    info = _zoo.inspect(exported(name))
    assert info["flops"] > 0 and info["params"] > 0, info
    assert [o["name"] for o in info["outputs"]] == list(model.output_names)
    found = len(info["attention_blocks"])
    if model.blocks is not None:
        assert found == model.blocks, f"{name}: {found} attention blocks found, {model.blocks} expected"
    elif model.attention:
        assert found > 0, f"{name}: no attention block found"
    for b in info["attention_blocks"]:
        assert b["heads"] and b["head_dim"], b


@pytest.mark.slow
@pytest.mark.parametrize("family", list(_zoo.FAMILIES))
@pytest.mark.parametrize("name", NAMES)
def test_pass(exported, tmp_path, name, family):
    out = _zoo.run_family(name, exported(name), family, tmp_path)
    assert out.status in ("changed", "refused", "user_error"), f"{name} × {family}: " + "; ".join(out.problems)
    if out.status == "changed":
        assert out.flops_ratio != 1.0
    else:
        assert out.reason.strip() and "\n" not in out.reason


# -- the contract checker itself catches what it must (small models built in code; no export) ----------------------


def _mlp(path, out_dim=4, scale=1.0, batch="batch"):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, out_dim)) * scale).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, out_dim])],
        [numpy_helper.from_array(w, "W")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def test_contract_accepts_an_equivalent_model(tmp_path):
    assert _zoo.check_output(_mlp(tmp_path / "a.onnx"), _mlp(tmp_path / "b.onnx", scale=0.5)) == []


def test_contract_catches_a_changed_static_dim(tmp_path):
    problems = _zoo.check_output(_mlp(tmp_path / "a.onnx"), _mlp(tmp_path / "b.onnx", out_dim=3))
    assert any("static dim 1 = 4 became 3" in p for p in problems), problems
    assert any("float32[2, 4] became float32[2, 3]" in p for p in problems), problems


def test_contract_catches_non_finite_outputs(tmp_path):
    problems = _zoo.check_output(_mlp(tmp_path / "a.onnx"), _mlp(tmp_path / "b.onnx", scale=float("inf")))
    assert problems and all("non-finite" in p for p in problems), problems


def test_contract_catches_a_lost_static_batch(tmp_path):
    problems = _zoo.check_output(_mlp(tmp_path / "a.onnx", batch=2), _mlp(tmp_path / "b.onnx"))
    assert problems == ["output 'Y': static dim 0 = 2 became dynamic"]


def test_a_pass_without_sites_is_a_refusal_with_its_reason(tmp_path):
    out = _zoo.run_family("mlp", _mlp(tmp_path / "a.onnx"), "token_drop", tmp_path)
    assert out.status == "refused" and out.reason, out
    assert out.cell().startswith("refused: ")
