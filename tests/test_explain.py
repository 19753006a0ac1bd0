"""``inspect --explain``: every Softmax that did not become an attention block and every channel group that is not
prunable is listed with its reason (small models built with ``onnx.helper``, no torch export)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import helper

sys.path.insert(0, str(Path(__file__).parent))
from test_spellings import _weights, build  # noqa: E402

from graphprune.analysis import summarize  # noqa: E402
from graphprune.analysis.attention import unmatched_attention  # noqa: E402
from graphprune.cli import main  # noqa: E402


def _with_head_softmax(tmp_path: Path) -> Path:
    """The two-block attention model of the spelling matrix, plus a classifier softmax over the stream channels
    and a softmax of a softmax (neither is attention)."""
    proto = build("gather_first", "static", "dedup", _weights())
    g = proto.graph
    out = next(n for n in g.node if n.name == "out")
    last = out.input[0]
    g.node.remove(out)
    g.node.extend([helper.make_node("Softmax", [last], ["cls"], axis=-1, name="classifier"),
                   helper.make_node("Softmax", ["cls"], ["y"], axis=1, name="over_tokens")])
    p = tmp_path / "m.onnx"
    onnx.save(proto, p)
    return p


def test_summarize_explains_unmatched_softmax_and_unprunable_groups(tmp_path):
    model = ir.load(_with_head_softmax(tmp_path))
    misses = {m.node.name: m.reason for m in unmatched_attention(model)}
    assert set(misses) == {"classifier", "over_tokens"}
    assert misses["classifier"].startswith("the softmax input is an Add") and "q·kᵀ MatMul" in misses["classifier"]
    assert misses["over_tokens"] == "the softmax is not over the last axis (the keys)"
    info = summarize(model, explain=True)
    assert len(info["attention_blocks"]) == 2
    ex = info["explain"]
    assert [m["node"] for m in ex["unmatched_attention"]] == ["classifier", "over_tokens"]
    bad = {g["id"]: g for g in ex["unprunable_groups"]}
    assert bad and all(g["reason"] for g in bad.values())
    assert {g["id"] for g in info["channel_groups"] if not g["prunable"]} == set(bad)
    assert [g["reason"] for g in bad.values()] == ["Softmax 'classifier' normalizes over channels"]


def test_inspect_explain_prints_the_reasons(tmp_path, capsys):
    path = _with_head_softmax(tmp_path)
    main(["inspect", str(path), "--json", "--explain"])
    ex = json.loads(capsys.readouterr().out)["explain"]
    assert [m["op"] for m in ex["unmatched_attention"]] == ["Softmax", "Softmax"]
    main(["inspect", str(path), "--explain"])
    text = capsys.readouterr().out
    assert "not attention blocks: 2" in text and "classifier" in text and "over the last axis" in text
    assert "channel groups not prunable" in text


def test_no_explain_key_without_the_flag(tmp_path):
    info = summarize(ir.load(_with_head_softmax(tmp_path)))
    assert "explain" not in info
