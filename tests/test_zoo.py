"""The zoo: every architecture of ``tests/_zoo.py`` through ``inspect`` and through each pass family at its default
settings (the CLI shortcuts ``--token-keep 0.7``, ``--sparse-attention sliding_window``, ``--prune-channels 0.3``).

One test id per (model, pass family), so a failing pair is one id, e.g. ``test_pass[bert-token_drop]``. The
contract is in the ``_zoo`` docstring: a changed model is valid (full ONNX check), runs in ORT on the original's
inputs, keeps every output's dtype, rank, static dims and runtime shape, gives finite values and changes FLOPs; a
refusal changes nothing and says why; a user error is one line; nothing else (no internal error) passes.
Each model is exported once per session (``exported``), on first use.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import _zoo  # noqa: E402

NAMES = [m.name for m in _zoo.ZOO]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(name) -> Path``: the model exported once per session (an export failure fails its tests)."""
    folder = tmp_path_factory.mktemp("zoo")
    cache: dict = {}

    def _get(name: str):
        if name not in cache:
            try:
                cache[name] = _zoo.export(_zoo.BY_NAME[name], folder)
            except Exception as e:  # noqa: BLE001 - remembered, so each of the model's tests reports it
                cache[name] = e
        if isinstance(cache[name], Exception):
            pytest.fail(f"{name}: export failed: {type(cache[name]).__name__}: {cache[name]}")
        return cache[name]

    return _get


def test_zoo_size():
    """At least 30 architectures (dropped ones are in ``_zoo.DROPPED`` and not counted)."""
    assert len(NAMES) == len(set(NAMES)) >= 30
    assert not set(NAMES) & set(_zoo.DROPPED)


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


@pytest.mark.parametrize("family", list(_zoo.FAMILIES))
@pytest.mark.parametrize("name", NAMES)
def test_pass(exported, tmp_path, name, family):
    out = _zoo.run_family(name, exported(name), family, tmp_path)
    assert out.status in ("changed", "refused", "user_error"), f"{name} × {family}: " + "; ".join(out.problems)
    if out.status == "changed":
        assert out.flops_ratio != 1.0
    else:
        assert out.reason.strip() and "\n" not in out.reason
