"""Task-aware verification: kinds, metrics (against numpy references), thresholds and defaults, sequential runs."""

from __future__ import annotations

import json
import re
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pydantic
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune.verify as gv
from graphprune.errors import ConfigError, VerificationError
from graphprune.verify import KIND_DEFAULTS, VerifyReport, VerifyThresholds, classify_output, compare

F, I64 = TensorProto.FLOAT, TensorProto.INT64


# ---------------------------------------------------------------- models


def _save(path: Path, nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> Path:
    """Save a graph; ``inputs`` / ``outputs`` are (name, elem type, shape) triples."""
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def _linear(path: Path, w: np.ndarray, name: str = "logits", argmax: bool = False) -> Path:
    """``name`` = X[B, K] @ W; with ``argmax`` a second output ``label`` = ArgMax(name) (int64 [B])."""
    nodes = [helper.make_node("MatMul", ["X", "W"], [name])]
    outputs = [(name, F, ["B", w.shape[1]])]
    if argmax:
        nodes.append(helper.make_node("ArgMax", [name], ["label"], axis=1, keepdims=0))
        outputs.append(("label", I64, ["B"]))
    return _save(path, nodes, [("X", F, ["B", w.shape[0]])], outputs, {"W": w})


def _mlp(path: Path, w1: np.ndarray, w2: np.ndarray) -> Path:
    """logits = Relu(X @ W1) @ W2."""
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("Relu", ["H"], ["R"]),
             helper.make_node("MatMul", ["R", "W2"], ["logits"])]
    return _save(path, nodes, [("X", F, ["B", w1.shape[0]])], [("logits", F, ["B", w2.shape[1]])],
                 {"W1": w1, "W2": w2})


def _embedding(path: Path, w: np.ndarray, bias: np.ndarray, name: str = "sentence_embedding") -> Path:
    """``name`` = LpNormalization(X @ W + bias): unit rows."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["T"]), helper.make_node("Add", ["T", "Bias"], ["E"]),
             helper.make_node("LpNormalization", ["E"], [name], axis=-1, p=2)]
    return _save(path, nodes, [("X", F, ["B", w.shape[0]])], [(name, F, ["B", w.shape[1]])], {"W": w, "Bias": bias})


def _tokens(path: Path, w1: np.ndarray, w2: np.ndarray) -> Path:
    """last_hidden_state = X[B, N, K] @ W1 (per_token); token_logits = X @ W2 (rank-3 logits)."""
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["last_hidden_state"]),
             helper.make_node("MatMul", ["X", "W2"], ["token_logits"])]
    return _save(path, nodes, [("X", F, ["B", "N", w1.shape[0]])],
                 [("last_hidden_state", F, ["B", "N", w1.shape[1]]), ("token_logits", F, ["B", "N", w2.shape[1]])],
                 {"W1": w1, "W2": w2})


def _ort(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def _x(rng, *shape) -> dict:
    return {"X": rng.standard_normal(shape).astype(np.float32)}


# ---------------------------------------------------------------- numpy references


def _cos_rows(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _softmax(x):
    e = np.exp(x.astype(np.float64))
    return e / e.sum(1, keepdims=True)


def _nearest(e):
    e = e.astype(np.float64) / np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def _per_sample_cos(outs_a, outs_b):
    return np.concatenate([_cos_rows(a.reshape(len(a), -1), b.reshape(len(b), -1)) for a, b in zip(outs_a, outs_b)])


# ---------------------------------------------------------------- metrics


def test_logits_metrics_match_numpy(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 10)).astype(np.float32)
    pa = _linear(tmp_path / "a.onnx", w)
    pb = _linear(tmp_path / "b.onnx", w + 0.6 * rng.standard_normal(w.shape).astype(np.float32))
    feeds = [_x(rng, 70, 8), _x(rng, 53, 8)]  # two feeds of different batch
    a = np.concatenate([o[0] for o in _ort(pa, feeds)]).astype(np.float64)
    b = np.concatenate([o[0] for o in _ort(pb, feeds)]).astype(np.float64)

    rep = compare(pa, pb, feeds)
    out = rep.output("logits")
    m = out.metrics
    assert (out.kind, out.kind_source) == ("logits", "auto")
    cos = _cos_rows(a, b)
    assert m["samples"] == rep.samples == 123
    assert m["cosine"]["min"] == pytest.approx(cos.min(), abs=1e-9)
    assert m["cosine"]["p5"] == pytest.approx(np.percentile(cos, 5), abs=1e-9)
    assert m["cosine"]["mean"] == pytest.approx(cos.mean(), abs=1e-9)
    assert m["max_abs_err"] == pytest.approx(np.abs(a - b).max(), rel=1e-9)
    assert m["rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-9)
    top1 = (a.argmax(1) == b.argmax(1)).mean()
    top5 = np.mean([a[i].argmax() in np.argsort(-b[i])[:5] for i in range(len(a))])
    kl = (_softmax(a) * np.log(_softmax(a) / _softmax(b))).sum(1).mean()
    assert m["top1"] == pytest.approx(top1) and rep.top1_agreement == pytest.approx(top1)
    assert m["top5"] == pytest.approx(top5)
    assert m["kl_mean"] == pytest.approx(kl, rel=1e-7)
    assert 0.3 < top1 < 0.95 and top1 < top5 < 1 and kl > 0  # the figures are not trivially 0 or 1
    assert rep.max_abs_err == m["max_abs_err"] and rep.cosine_min == m["cosine"]["min"]


def test_top5_is_one_for_five_classes_or_fewer(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    pa, pb = _linear(tmp_path / "a.onnx", w), _linear(tmp_path / "b.onnx", -w)  # argmax becomes argmin
    m = compare(pa, pb, [_x(rng, 20, 8)]).output("logits").metrics
    assert m["top1"] == 0.0 and m["top5"] == 1.0


def test_per_token_and_rank3_logits_over_feeds_of_different_length(tmp_path):
    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((8, 7)).astype(np.float32)
    pa = _tokens(tmp_path / "a.onnx", w1, w2)
    pb = _tokens(tmp_path / "b.onnx", w1 + 0.3 * rng.standard_normal(w1.shape).astype(np.float32),
                 w2 + 0.3 * rng.standard_normal(w2.shape).astype(np.float32))
    feeds = [_x(rng, 4, 5, 8), _x(rng, 3, 9, 8)]  # sequence lengths 5 and 9
    ra, rb = _ort(pa, feeds), _ort(pb, feeds)

    rep = compare(pa, pb, feeds)
    hid, tok = rep.output("last_hidden_state"), rep.output("token_logits")
    assert (hid.kind, tok.kind) == ("per_token", "logits")

    ha, hb = [r[0] for r in ra], [r[0] for r in rb]
    tcos = np.concatenate([_cos_rows(a.reshape(-1, 6), b.reshape(-1, 6)) for a, b in zip(ha, hb)])
    assert tcos.size == 4 * 5 + 3 * 9
    assert hid.metrics["token_cosine"]["mean"] == pytest.approx(tcos.mean(), abs=1e-9)
    assert hid.metrics["token_cosine"]["p5"] == pytest.approx(np.percentile(tcos, 5), abs=1e-9)
    assert hid.metrics["token_cosine"]["min"] == pytest.approx(tcos.min(), abs=1e-9)
    cos = _per_sample_cos(ha, hb)
    assert hid.metrics["samples"] == 7 and hid.metrics["cosine"]["mean"] == pytest.approx(cos.mean(), abs=1e-9)
    num = sum(np.sum((a.astype(np.float64) - b) ** 2) for a, b in zip(ha, hb))
    den = sum(np.sum(a.astype(np.float64) ** 2) for a in ha)
    assert hid.metrics["rel_l2"] == pytest.approx(np.sqrt(num / den), rel=1e-9)

    la = np.concatenate([r[1].reshape(-1, 7) for r in ra]).astype(np.float64)
    lb = np.concatenate([r[1].reshape(-1, 7) for r in rb]).astype(np.float64)
    assert tok.metrics["top1"] == pytest.approx((la.argmax(1) == lb.argmax(1)).mean())  # over all B·N rows
    assert tok.metrics["kl_mean"] == pytest.approx((_softmax(la) * np.log(_softmax(la) / _softmax(lb))).sum(1).mean())
    assert rep.top1_agreement == tok.metrics["top1"]


def test_per_token_zero_vectors_count_as_equal(tmp_path):
    w = np.zeros((8, 6), np.float32)
    w[:, 0] = 1
    pa = _tokens(tmp_path / "a.onnx", w, np.ones((8, 3), np.float32))
    x = np.zeros((1, 4, 8), np.float32)
    x[0, :2] = 1  # positions 2 and 3 give zero vectors in both models
    wb = w.copy()
    wb[:, 1] = 1  # positions 0, 1: [8, 0, ...] vs [8, 8, ...] → cosine 1/√2
    pb = _tokens(tmp_path / "b.onnx", wb, np.ones((8, 3), np.float32))
    tc = compare(pa, pb, [{"X": x}]).output("last_hidden_state").metrics["token_cosine"]
    assert tc["min"] == pytest.approx(2 ** -0.5) and tc["mean"] == pytest.approx((2 * 2 ** -0.5 + 2) / 4)


def test_embedding_neighbor_agreement_matches_numpy(tmp_path):
    rng = np.random.default_rng(4)
    w, bias = rng.standard_normal((8, 16)).astype(np.float32), np.zeros(16, np.float32)
    pa = _embedding(tmp_path / "a.onnx", w, bias, name="out")  # kind from the unit norm, not the name
    pb = _embedding(tmp_path / "b.onnx", w + 0.5 * rng.standard_normal(w.shape).astype(np.float32), bias, name="out")
    feeds = [_x(rng, 25, 8), _x(rng, 15, 8)]
    a = np.concatenate([r[0] for r in _ort(pa, feeds)])
    b = np.concatenate([r[0] for r in _ort(pb, feeds)])
    out = compare(pa, pb, feeds).output("out")
    assert out.kind == "embedding"
    ref = (_nearest(a) == _nearest(b)).mean()
    assert 0 < ref < 1 and out.metrics["neighbor_agreement"] == pytest.approx(ref)  # over both feeds' 40 samples
    assert out.metrics["cosine"]["mean"] == pytest.approx(_cos_rows(a, b).mean(), abs=1e-9)
    assert compare(pa, pa, feeds).output("out").metrics["neighbor_agreement"] == 1.0
    few = compare(pa, pb, [_x(rng, 2, 8)]).output("out")
    assert few.metrics["neighbor_agreement"] is None and "needs at least 3" in few.notes[0]
    assert "neighbor_agreement_min" not in few.thresholds


def test_neighbor_agreement_catches_what_cosine_misses(tmp_path):
    """A large shared direction plus a small per-sample part; the optimized model scrambles the small part."""
    rng = np.random.default_rng(5)
    w = (0.05 * rng.standard_normal((8, 16))).astype(np.float32)
    bias = np.zeros(16, np.float32)
    bias[0] = 10.0  # the common direction dominates every embedding
    pa = _embedding(tmp_path / "a.onnx", w, bias)
    pb = _embedding(tmp_path / "b.onnx", w[rng.permutation(8)], bias)  # rows permuted: inputs scrambled
    feeds = [_x(rng, 32, 8), _x(rng, 32, 8)]
    a = np.concatenate([r[0] for r in _ort(pa, feeds)])
    b = np.concatenate([r[0] for r in _ort(pb, feeds)])

    rep = compare(pa, pb, feeds)
    out = rep.output("sentence_embedding")
    assert out.kind == "embedding"
    assert _cos_rows(a, b).min() >= 0.99 and out.metrics["cosine"]["min"] >= 0.99
    na = (_nearest(a) == _nearest(b)).mean()
    assert na < 0.5 and out.metrics["neighbor_agreement"] == pytest.approx(na)
    assert compare(pa, pb, feeds, VerifyThresholds(cosine_min=0.99, defaults=False)).passed  # cosine alone passes
    assert not rep.passed and len(rep.failures) == 1
    assert re.fullmatch(r"embedding 'sentence_embedding': neighbour agreement 0\.\d{3,} < 0\.8", rep.failures[0])
    assert f"{na:.3f}" in rep.failures[0]
    assert out.thresholds == {"cosine_mean_min": 0.85, "neighbor_agreement_min": 0.8}


def test_integer_output_compared_exactly_and_not_checked(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 10)).astype(np.float32)
    pa = _linear(tmp_path / "a.onnx", w, argmax=True)
    pb = _linear(tmp_path / "b.onnx", w + 0.05 * rng.standard_normal(w.shape).astype(np.float32), argmax=True)
    feeds = [_x(rng, 200, 8)]
    (la, ia), (lb, ib) = _ort(pa, feeds)[0], _ort(pb, feeds)[0]
    assert ia.dtype == np.int64 and (ia != ib).any()
    rep = compare(pa, pb, feeds)
    lab = rep.output("label")
    assert (lab.kind, lab.kind_source) == ("other", "auto")
    assert lab.metrics["max_abs_err"] == float(np.abs(ia - ib).max())  # on int64
    assert lab.metrics["samples"] == 200  # one sample per label: its cosine is 1 when identical, else 0
    assert lab.metrics["cosine"]["mean"] == pytest.approx((ia == ib).mean())
    assert lab.metrics["cosine"]["min"] == 0.0 and lab.thresholds == {} and lab.failures == []
    assert rep.cosine_min == rep.output("logits").metrics["cosine"]["min"]  # over float outputs only
    assert rep.max_abs_err == max(lab.metrics["max_abs_err"], rep.output("logits").metrics["max_abs_err"])
    assert rep.output("logits").metrics["top1"] == pytest.approx((la.argmax(1) == lb.argmax(1)).mean())


def test_nan_in_optimized_fails(tmp_path):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    pa = _linear(tmp_path / "a.onnx", w)
    wb = w.copy()
    wb[0, 1] = np.nan
    pb = _linear(tmp_path / "b.onnx", wb)
    rep = compare(pa, pb, [_x(rng, 6, 8)])
    assert rep.max_abs_err == float("inf") and not rep.passed
    assert any("mean cosine nan" in f for f in rep.failures)


def test_shape_and_output_count_mismatch(tmp_path):
    rng = np.random.default_rng(8)
    pa = _linear(tmp_path / "a.onnx", rng.standard_normal((8, 4)).astype(np.float32))
    pb = _linear(tmp_path / "b.onnx", rng.standard_normal((8, 5)).astype(np.float32))
    with pytest.raises(VerificationError, match=r"output 'logits': shape \(3, 5\) differs from the original \(3, 4\)"):
        compare(pa, pb, [_x(rng, 3, 8)])
    pc = _linear(tmp_path / "c.onnx", rng.standard_normal((8, 4)).astype(np.float32), argmax=True)
    with pytest.raises(VerificationError, match="optimized model has 2 outputs, original has 1"):
        compare(pa, pc, [_x(rng, 3, 8)])
    with pytest.raises(VerificationError, match="no verification feeds"):
        compare(pa, pa, [])


# ---------------------------------------------------------------- kinds


def test_classification_rules():
    rng = np.random.default_rng(9)
    unit = rng.standard_normal((6, 16))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    raw = rng.standard_normal((6, 16)).astype(np.float32)
    assert classify_output("y", [np.arange(6)]) == "other"  # integer
    assert classify_output("y", [np.ones((6, 3), bool)]) == "other"  # bool
    assert classify_output("y", [unit.astype(np.float32), unit[:2].astype(np.float32)]) == "embedding"
    assert classify_output("y", [unit.astype(np.float32), raw]) == "logits"  # every row over all feeds
    assert classify_output("y", [unit * (1 + 2e-3)]) == "logits"  # norm 1.002 is not unit
    for name in ("text_embeds", "pooler_output", "sentence_vec", "features", "hidden"):
        assert classify_output(name, [raw]) == "embedding", name
    assert classify_output("scores", [raw]) == "logits"
    assert classify_output("score", [raw[:, :1]]) == "other"  # C = 1
    assert classify_output("last_hidden_state", [raw.reshape(2, 3, 16)]) == "per_token"
    assert classify_output("start_logits_tok", [raw.reshape(2, 3, 16)]) == "logits"
    assert classify_output("y", [raw[:, 0]]) == "other"  # rank 1
    assert classify_output("y", [raw.reshape(1, 2, 3, 16)]) == "other"  # rank 4


def test_kind_override_and_unknown_output(tmp_path):
    rng = np.random.default_rng(10)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    pa = _linear(tmp_path / "a.onnx", w, name="Y")
    pb = _linear(tmp_path / "b.onnx", w + 0.3 * rng.standard_normal(w.shape).astype(np.float32), name="Y")
    feeds = [_x(rng, 30, 8)]
    assert compare(pa, pb, feeds).output("Y").kind == "logits"
    t = VerifyThresholds.model_validate({"outputs": {"Y": {"kind": "embedding"}}})
    out = compare(pa, pb, feeds, t).output("Y")
    assert (out.kind, out.kind_source) == ("embedding", "config")
    a, b = _ort(pa, feeds)[0][0], _ort(pb, feeds)[0][0]
    assert out.metrics["neighbor_agreement"] == pytest.approx((_nearest(a) == _nearest(b)).mean())
    assert "top1" not in out.metrics and out.thresholds == KIND_DEFAULTS["embedding"]
    with pytest.raises(ConfigError, match=r"'logitz'.*Y"):
        compare(pa, pb, feeds, VerifyThresholds(outputs={"logitz": {"kind": "logits"}}))
    with pytest.raises(pydantic.ValidationError):
        VerifyThresholds(outputs={"Y": {"kind": "segmentation"}})


# ---------------------------------------------------------------- thresholds


def test_thresholds_validation():
    assert VerifyThresholds(**{}).explicit() == {}
    assert VerifyThresholds().defaults is True and VerifyThresholds().outputs == {}
    for bad in ({"cosine_min": 1.5}, {"token_cosine_p5_min": -1.1}, {"top1_min": -0.1}, {"top5_min": 1.1},
                {"kl_max": -1}, {"neighbor_agreement_min": 2}, {"rel_l2_max": -0.1}, {"max_abs_err": float("nan")},
                {"cosine": 0.9}, {"outputs": {"y": {"kind": "logits", "top1": 1}}}):
        with pytest.raises(pydantic.ValidationError):
            VerifyThresholds.model_validate(bad)
    t = VerifyThresholds.model_validate({"top1_min": None, "cosine_min": 0.9})
    assert t.explicit() == {"top1_min": None, "cosine_min": 0.9}
    with pytest.raises(pydantic.ValidationError):
        t.cosine_min = 0.5  # frozen
    assert set(gv.THRESHOLD_NAMES) == set(VerifyThresholds.model_fields) - {"outputs", "defaults"}
    assert all(set(d) <= set(gv.THRESHOLD_NAMES) for d in KIND_DEFAULTS.values())


def test_thresholds_apply_by_kind():
    t = VerifyThresholds(top1_min=0.5, neighbor_agreement_min=0.5, token_cosine_p5_min=0.5, max_abs_err=1.0)
    assert t.for_output("logits") == {"max_abs_err": 1.0, "cosine_mean_min": 0.95, "top1_min": 0.5}
    assert t.for_output("embedding") == {"max_abs_err": 1.0, "cosine_mean_min": 0.85, "neighbor_agreement_min": 0.5}
    assert t.for_output("per_token") == {"max_abs_err": 1.0, "token_cosine_mean_min": 0.95, "token_cosine_p5_min": 0.5}
    assert t.for_output("other") == {"max_abs_err": 1.0, "cosine_mean_min": 0.95}
    assert t.for_output("other", floating=False) == {}


def test_defaults_null_explicit_and_disabled(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 10)).astype(np.float32)
    pa = _linear(tmp_path / "a.onnx", w)
    pb = _linear(tmp_path / "b.onnx", w + 0.2 * rng.standard_normal(w.shape).astype(np.float32))
    feeds = [_x(rng, 200, 8)]

    rep = compare(pa, pb, feeds)  # defaults: cosine_mean_min 0.95 passes, top1_min 0.9 fails
    m = rep.output("logits").metrics
    assert m["cosine"]["mean"] >= 0.95 and m["top1"] < 0.9
    assert rep.output("logits").thresholds == {"cosine_mean_min": 0.95, "top1_min": 0.9}
    assert rep.failures == [f"logits 'logits': top-1 agreement {m['top1']:.3f} < 0.9"]

    nulled = compare(pa, pb, feeds, VerifyThresholds.model_validate({"top1_min": None}))  # null: not checked
    assert nulled.passed and nulled.output("logits").thresholds == {"cosine_mean_min": 0.95}

    lower = compare(pa, pb, feeds, VerifyThresholds(top1_min=m["top1"] - 0.01))  # explicit overrides the default
    assert lower.passed and lower.output("logits").thresholds["top1_min"] == pytest.approx(m["top1"] - 0.01)
    assert not compare(pa, pb, feeds, VerifyThresholds(top1_min=m["top1"] + 0.01)).passed

    off = compare(pa, pb, feeds, VerifyThresholds(defaults=False))
    assert off.passed and off.output("logits").thresholds == {}
    strict = compare(pa, pb, feeds, VerifyThresholds(defaults=False, cosine_mean_min=0.999, kl_max=1e-6))
    assert [f.split(":")[1].split()[:2] for f in strict.failures] == [["mean", "cosine"], ["mean", "KL"]]
    assert compare(pa, pa, feeds).passed


def test_planted_break_in_mlp_fails_defaults(tmp_path):
    rng = np.random.default_rng(11)
    w1 = rng.standard_normal((8, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 10)).astype(np.float32)
    pa = _mlp(tmp_path / "a.onnx", w1, w2)
    feeds = [_x(rng, 100, 8), _x(rng, 28, 8)]
    mild = _mlp(tmp_path / "mild.onnx", w1 + 1e-3 * rng.standard_normal(w1.shape).astype(np.float32), w2)
    assert compare(pa, mild, feeds).passed  # the defaults do not fail a harmless change
    broken = _mlp(tmp_path / "broken.onnx", w1[rng.permutation(8)], w2)  # rows of W1 permuted
    rep = compare(pa, broken, feeds)
    a = np.concatenate([r[0] for r in _ort(pa, feeds)])
    b = np.concatenate([r[0] for r in _ort(broken, feeds)])
    top1 = (a.argmax(1) == b.argmax(1)).mean()
    assert not rep.passed and rep.top1_agreement == pytest.approx(top1) and top1 < 0.9
    assert any(f.startswith("logits 'logits': top-1 agreement") for f in rep.failures)


# ---------------------------------------------------------------- running and the report


def test_original_runs_and_is_released_before_the_optimized_session(tmp_path, monkeypatch):
    rng = np.random.default_rng(12)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    pa = _linear(tmp_path / "a.onnx", w)
    optimized = ir.load(_linear(tmp_path / "b.onnx", w * 1.01))
    events: list[tuple[str, str]] = []
    tags: dict[int, str] = {}
    real_make, real_run = gv.make_session, gv.run

    def make_session(model, *args, **kwargs):
        tag = "optimized" if isinstance(model, ir.Model) else "original"
        session = real_make(model, *args, **kwargs)
        tags[id(session)] = tag
        events.append(("make", tag))
        weakref.finalize(session, events.append, ("released", tag))
        return session

    def run(session, feed):
        events.append(("run", tags[id(session)]))
        return real_run(session, feed)

    monkeypatch.setattr(gv, "make_session", make_session)
    monkeypatch.setattr(gv, "run", run)
    calls: list[tuple[int, int]] = []
    rep = compare(pa, optimized, (_x(rng, 4, 8) for _ in range(3)), progress=lambda d, t: calls.append((d, t)))
    assert rep.samples == 12
    expected = [("make", "original")] + [("run", "original")] * 3 + [("released", "original"), ("make", "optimized")]
    assert events == expected + [("run", "optimized")] * 3 + [("released", "optimized")]
    assert calls == [(i, 6) for i in range(1, 7)]


def test_report_dict_and_summary(tmp_path):
    rng = np.random.default_rng(13)
    w = rng.standard_normal((8, 10)).astype(np.float32)
    pa = _linear(tmp_path / "a.onnx", w)
    pb = _linear(tmp_path / "b.onnx", w + 0.01 * rng.standard_normal(w.shape).astype(np.float32))
    rep = compare(pa, pb, [_x(rng, 40, 8)], VerifyThresholds(max_abs_err=10.0, top1_min=None))
    d = json.loads(json.dumps(rep.to_dict()))
    assert list(d) == ["passed", "failures", "samples", "max_abs_err", "cosine_min", "top1_agreement", "compute_dtype",
                       "outputs"]
    assert d["compute_dtype"] == "model"  # float32 models run at their own dtype
    assert d["passed"] and d["samples"] == 40 and d["top1_agreement"] == rep.top1_agreement
    (o,) = d["outputs"]
    assert {"name", "kind", "kind_source", "metrics", "thresholds", "failures"} <= set(o)
    assert o["thresholds"] == {"max_abs_err": 10.0, "cosine_mean_min": 0.95}
    assert set(o["metrics"]) >= {"max_abs_err", "rel_l2", "cosine", "top1", "top5", "kl_mean"}
    assert rep.summary() == f"min cosine {rep.cosine_min:.4f}, top-1 {rep.top1_agreement:.2f} (logits)"
    legacy = VerifyReport(1.0, 0.5, None, [], ["cosine 0.5 < 0.95"])  # positional, as tests/test_pipeline.py builds it
    assert not legacy.passed and legacy.to_dict()["failures"] == ["cosine 0.5 < 0.95"]
    assert legacy.summary() == "min cosine 0.5000; 1 check(s) failed"


# ---------------------------------------------------------------- positions left out (image tokens)


def _offset_at(path: Path, bump: np.ndarray) -> Path:
    """last_hidden_state = X[B, N, 4] + bump[N, 4]; an ``ids [B, N]`` input is read (ArgMax keeps it live)."""
    nodes = [helper.make_node("Add", ["X", "Bump"], ["last_hidden_state"]),
             helper.make_node("ArgMax", ["ids"], ["where"], axis=1, keepdims=0)]
    return _save(path, nodes, [("X", F, ["B", 6, 4]), ("ids", I64, ["B", 6])],
                 [("last_hidden_state", F, ["B", 6, 4]), ("where", I64, ["B"])], {"Bump": bump})


def test_skip_tokens_leaves_out_a_span_or_the_positions_of_an_id(tmp_path):
    rng = np.random.default_rng(0)
    orig = _offset_at(tmp_path / "a.onnx", np.zeros((6, 4)))
    bump = np.zeros((6, 4))
    bump[2:4] = -5.0  # the optimized model is wrong at positions 2 and 3 only
    opt = _offset_at(tmp_path / "b.onnx", bump)
    ids = np.zeros((3, 6), np.int64)
    ids[:, 2:4] = 99
    feeds = [{"X": rng.standard_normal((3, 6, 4)).astype(np.float32) + 3.0, "ids": ids}]
    plain = compare(orig, opt, feeds)
    assert not plain.passed and plain.output("last_hidden_state").metrics["token_cosine"]["min"] < 0.9
    for skip in (gv.SkipTokens("span", span=(2, 4)), gv.SkipTokens("ids", input="ids", value=99)):
        rep = compare(orig, opt, feeds, skip_tokens={"last_hidden_state": skip})
        out = rep.output("last_hidden_state")
        assert rep.passed and out.notes[0] == skip.why
        assert out.metrics["max_abs_err"] == 0.0 and out.metrics["token_cosine"]["min"] == pytest.approx(1.0)
    wrong = gv.SkipTokens("too few", span=(0, 2))  # leaves the bad positions in: still fails
    assert not compare(orig, opt, feeds, skip_tokens={"last_hidden_state": wrong}).passed
