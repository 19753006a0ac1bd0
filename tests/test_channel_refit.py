"""channel_prune's data-fitted parts against numpy: ``obs`` importance and the sequential least-squares refit."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort

import graphprune as gp
from graphprune.analysis.channels import analyze_channels
from graphprune.analysis.importance import activation_values, compute_importance
from graphprune.backends.onnxruntime import probe
from graphprune.passes._channel_reconstruct import LayerRefit
from graphprune.passes.base import PassContext
from graphprune.passes.channel_prune import ChannelPrunePass
from tests.test_fidelity import mlp


def _weights(model):
    return {k: v.const_value.numpy().astype(np.float64) for k, v in model.graph.initializers.items()}


def _ridge(a: np.ndarray, target: np.ndarray) -> np.ndarray:
    ata = a.T @ a
    lam = 1e-3 * float(np.mean(np.diag(ata))) + 1e-12
    return np.linalg.solve(ata + lam * np.eye(len(ata)), a.T @ target)


def test_obs_scores_equal_refit_error_increase(tmp_path):
    """ΔE_c = ‖w_c‖² / (H⁻¹)_cc ÷ tr(WᵀGW) for every hidden unit read by the single consumer fc2."""
    model = gp.load_model(mlp(tmp_path / "m.onnx", hidden=24))
    x = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32)
    feeds = [{"X": x[:20]}, {"X": x[20:]}]
    analysis = analyze_channels(model, [], True)
    imp = compute_importance(analysis, "obs", probe(model, activation_values(analysis), feeds))
    w = _weights(model)
    h = np.maximum(np.maximum(x @ w["W0"], 0) @ w["W1"] + w["B1"], 0)
    g = h.T @ h
    hinv = np.linalg.inv(g + (1e-3 * np.mean(np.diag(g)) + 1e-12) * np.eye(len(g)))
    want = (w["W2"] ** 2).sum(axis=1) / np.diag(hinv) / np.trace(w["W2"].T @ g @ w["W2"])
    group = next(gr for gr in analysis.groups if gr.prunable)
    np.testing.assert_allclose(imp.scores[group.id], want, rtol=1e-3)
    assert imp.comparable
    # the score is the error increase (in the ridge metric H) of removing that unit and refitting the rest:
    # the optimal update zeroes row c and moves the others by −H⁻¹[:, c]·w_c / (H⁻¹)_cc
    c = int(np.argmin(want))
    h_ridge = np.linalg.inv(hinv)
    delta = -np.outer(hinv[:, c], w["W2"][c]) / hinv[c, c]
    assert np.abs((w["W2"] + delta)[c]).max() < 1e-9
    rel = np.trace(delta.T @ h_ridge @ delta) / np.trace(w["W2"].T @ g @ w["W2"])
    np.testing.assert_allclose(rel, want[c], rtol=1e-6)
    # and no other single-row refit does better: removing c with the kept rows refitted by ridge least squares
    keep = [i for i in range(len(g)) if i != c]
    sol = np.linalg.solve(h_ridge[np.ix_(keep, keep)], h_ridge[keep] @ w["W2"])
    full = np.zeros_like(w["W2"])
    full[keep] = sol
    d2 = full - w["W2"]
    np.testing.assert_allclose(np.trace(d2.T @ h_ridge @ d2) / np.trace(w["W2"].T @ g @ w["W2"]), want[c], rtol=1e-6)


def test_sequential_refit_matches_numpy_and_differs_from_independent(tmp_path):
    src = mlp(tmp_path / "m.onnx", hidden=32)
    x = np.random.default_rng(6).standard_normal((64, 16)).astype(np.float32)
    feeds = [{"X": x[i:i + 16]} for i in range(0, 64, 16)]
    outs = {}
    for mode in ("sequential", "independent"):
        model = gp.load_model(src)
        plan = tmp_path / f"plan_{mode}.json"
        cfg = {"ratio": 0.25, "importance": "l2", "global": False, "reconstruct": True, "refit": mode,
               "ignore_stem": False, "plan_out": str(plan)}
        res = ChannelPrunePass(cfg, PassContext(calibration=feeds))(model)
        assert res.modified and len([r for r in res.rewritten if isinstance(r, LayerRefit)]) == 2
        path = tmp_path / f"{mode}.onnx"
        gp.save_model(model, path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs[mode] = sess.run(None, {"X": x})[0]
    groups = {g["members"][0]: np.asarray(g["keep"]) for g in json.loads(plan.read_text())["groups"]}
    p0, p1 = groups["W0"], groups["W1"]
    w = _weights(gp.load_model(src))
    a = np.maximum(x @ w["W0"], 0)
    h = np.maximum(a @ w["W1"] + w["B1"], 0)
    ones = np.ones((len(x), 1))
    s1 = _ridge(np.concatenate([a[:, p0], ones], axis=1), a @ w["W1"])  # fc1: its input is the same in both models
    h_pruned = np.maximum(a[:, p0] @ s1[:-1] + w["B1"] + s1[-1], 0)
    seq = h_pruned[:, p1] @ _ridge(h_pruned[:, p1], h @ w["W2"])         # fc2 on the pruned model's activations
    ind = h_pruned[:, p1] @ _ridge(h[:, p1], h @ w["W2"])                # fc2 on the original's
    np.testing.assert_allclose(outs["sequential"], seq, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(outs["independent"], ind, rtol=1e-3, atol=1e-4)
    assert np.abs(seq - ind).max() > 1e-3  # the two modes really differ on this model
    full = h @ w["W2"]
    assert np.linalg.norm(seq - full) < np.linalg.norm(ind - full)  # and feeding errors forward helps here


def test_sensitivity_probe_against_numpy_and_model_restored(tmp_path):
    from graphprune.passes._channel_plan import select
    from graphprune.passes._channel_sensitivity import measure

    src = mlp(tmp_path / "m.onnx", hidden=32, seed=4)  # the two groups' sensitivities 0.14 and 0.30: no near-tie
    model = gp.load_model(src)
    x = np.random.default_rng(7).standard_normal((32, 16)).astype(np.float32)
    feeds = [{"X": x[:16]}, {"X": x[16:]}]
    analysis = analyze_channels(model, [], False)
    imp = compute_importance(analysis, "l2")
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    sens = measure(model, analysis, imp, feeds, refit=False, probe=probe, probe_ratio=0.5)
    after = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    w = _weights(model)
    hidden = next(g for g in analysis.groups if g.prunable and g.size == 32)
    drop = np.argsort(-imp.scores[hidden.id], kind="stable")[16:]  # the lower-scored half, as the probe removes it
    w2 = w["W2"].copy()
    w2[drop] = 0
    h = np.maximum(np.maximum(x @ w["W0"], 0) @ w["W1"] + w["B1"], 0)
    a, b = h @ w["W2"], h @ w2
    want = np.mean(1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    np.testing.assert_allclose(sens[hidden.id], want, rtol=1e-4)
    # the allocation prunes the less sensitive group more, and removes the asked share of channels
    kept, _ = select(analysis, imp, 0.25, "channels", 1, True, 0.9, None, sens)
    frac = {g.id: 1 - kept[g.classes].mean() for g in analysis.groups if g.prunable}
    least, most = min(sens, key=sens.get), max(sens, key=sens.get)
    assert frac[least] > frac[most]
    total = sum(g.size for g in analysis.groups if g.prunable)
    assert abs(sum(frac[g] * analysis.groups[g].size for g in frac) - 0.25 * total) <= 2
