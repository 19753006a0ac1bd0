"""channel_prune ``search: mask`` (``_channel_masks``, ``_channel_masksearch``) against numpy and the pruned model.

* the masked twin computes the original with the masked units' consumer rows zeroed (numpy reference);
* the search's mask meets the budget, and one chunk less does not;
* rearrangement never raises the measured objective and keeps the budget;
* the pruned model (surgery, no refit) equals the masked twin and the original with the pruned units zeroed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _channel_zoo as zoo  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.analysis.channels import analyze_channels  # noqa: E402
from graphprune.analysis.inputs import example_inputs  # noqa: E402
from graphprune.backends.onnxruntime import probe  # noqa: E402
from graphprune.passes import _channel_masksearch as ms  # noqa: E402
from graphprune.passes import get_pass  # noqa: E402
from graphprune.passes._channel_masks import MaskedModel  # noqa: E402
from graphprune.passes._channel_plan import predicted  # noqa: E402
from tests.test_fidelity import mlp  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return zoo.export("bert", tmp_path_factory.mktemp("masksearch"))


def _mlp(tmp_path):
    model = gp.load_model(mlp(tmp_path / "m.onnx", hidden=24))
    x = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32)
    return model, [{"X": x[:20]}, {"X": x[20:]}], x


def _bert_feeds(model):
    return [example_inputs(model, batch=2, seed=s) for s in range(2)]


def test_masked_twin_equals_numpy(tmp_path):
    model, feeds, x = _mlp(tmp_path)
    analysis = analyze_channels(model, [], True)
    mm = MaskedModel(model, analysis, feeds, probe)
    group = next(g for g in analysis.groups if g.prunable)
    w = {k: v.const_value.numpy().astype(np.float64) for k, v in model.graph.initializers.items()}
    h = np.maximum(np.maximum(x[:20] @ w["W0"], 0) @ w["W1"] + w["B1"], 0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        kept = np.ones(len(analysis.root), dtype=bool)
        kept[group.classes] = rng.random(group.size) < 0.5
        keep_h = kept[group.classes]  # hidden unit i is class i of the group (one consumer, fc2)
        want = (h * keep_h) @ w["W2"]
        np.testing.assert_allclose(mm.outputs(kept, feeds[0])[0], want, rtol=1e-4, atol=1e-5)
    off = np.ones(len(analysis.root), dtype=bool)
    off[group.classes] = False
    np.testing.assert_allclose(mm.outputs(off, feeds[0])[0], 0.0, atol=1e-6)
    # the objective is 1 - cosine against the original, averaged over the samples
    ref = h @ w["W2"]
    got = mm.outputs(kept, feeds[0])[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    mm2 = MaskedModel(model, analysis, feeds[:1], probe)
    np.testing.assert_allclose(mm2.objective(kept), np.mean(1 - cos), rtol=1e-5)


@pytest.mark.parametrize("target,ratio", [("flops", 0.3), ("channels", 0.25), ("params", 0.2)])
def test_search_meets_budget_exactly(bert, target, ratio):
    model = ir.load(bert)
    analysis = analyze_channels(model, [], True)
    feeds = _bert_feeds(model)
    st = ms.SearchSettings(ratio, target, round_to=1, rearrange=0)
    mm = MaskedModel(model, analysis, feeds, probe)
    base, curves = ms.unit_scores(mm, analysis, ms.local_energy(model, analysis, feeds, probe), st)
    ch = ms._chunks(analysis, base, curves, st)
    order = ms.greedy_order(analysis, ch, target)
    met = ms.budget_check(analysis, ratio, target)
    kept, ok = ms.search_prefix(len(analysis.root), ch, order, met)
    assert ok and met(kept)
    k = next(i for i in range(len(order) + 1) if np.array_equal(ms._prefix(len(analysis.root), ch, order, i), kept))
    assert k > 0 and not met(ms._prefix(len(analysis.root), ch, order, k - 1))
    if target != "channels":
        key = "flops_ratio" if target == "flops" else "params_ratio"
        assert predicted(analysis, kept)[key] <= 1 - ratio + 1e-12
    # within every group, the removed units are the lowest-scored
    for g in analysis.groups:
        if g.prunable and not kept[g.classes].all():
            assert base[g.classes][~kept[g.classes]].max() <= base[g.classes][kept[g.classes]].min()
    # heads are measured unit by unit: their base score is the measured objective with that head alone removed
    heads = next(g for g in analysis.groups if g.prunable and g.kind == "heads")
    one = np.ones(len(analysis.root), dtype=bool)
    one[heads.classes[0]] = False
    np.testing.assert_allclose(base[heads.classes[0]], mm.objective(one), rtol=1e-9)


@pytest.mark.parametrize("which", ["mlp", "bert"])
def test_rearrangement_never_worse(bert, tmp_path, which):
    if which == "mlp":
        model, feeds, _ = _mlp(tmp_path)
        st = ms.SearchSettings(0.3, "flops", round_to=1, measure_units=32, rearrange=40)
    else:
        model = ir.load(bert)
        feeds = _bert_feeds(model)
        st = ms.SearchSettings(0.35, "flops", round_to=1, rearrange=40)
    analysis = analyze_channels(model, [], True)
    res = ms.mask_search(model, analysis, feeds, probe, st)
    assert res.budget_met and res.objective <= res.objective_search
    assert ms.budget_check(analysis, st.ratio, st.target)(res.kept)
    again = MaskedModel(model, analysis, feeds, probe)
    np.testing.assert_allclose(again.objective(res.kept), res.objective, rtol=1e-6)
    assert res.evaluations > 0 and (res.moves == 0) == (res.objective == res.objective_search)


def test_pass_equals_masked_original(bert, tmp_path):
    plan_path = tmp_path / "plan.json"
    model = ir.load(bert)
    feeds = example_inputs(model, batch=2, seed=7)
    result = get_pass("channel_prune")({"ratio": 0.3, "target": "flops", "search": "mask", "round_to": 1,
                                        "reconstruct": False, "rearrange": 8, "plan_out": str(plan_path)})(model)
    assert result.modified and result.info["search"]["budget_met"]
    assert result.info["predicted_flops_ratio"] <= 0.7 + 1e-9
    plan = json.loads(plan_path.read_text())
    assert any(g["kind"] == "heads" for g in plan["groups"]) or any(g["kind"] == "channels" for g in plan["groups"])
    out = zoo.run(model, feeds, tmp_path, "pruned")[0]
    masked = zoo.run(zoo.masked_copy(ir.load(bert), plan), feeds, tmp_path, "masked")[0]
    scale = max(1.0, float(np.abs(masked).max()))
    assert float(np.abs(out - masked).max()) <= 1e-4 * scale
    # the masked twin (consumer rows zeroed) computes the same model
    original = ir.load(bert)
    analysis = analyze_channels(original, [], True)
    kept = np.ones(len(analysis.root), dtype=bool)
    by_id = {g.id: g for g in analysis.groups}
    for g in plan["groups"]:
        grp = by_id[g["id"]]
        kept[grp.classes] = False
        kept[grp.classes[g["keep"]]] = True
    twin = MaskedModel(original, analysis, [feeds], probe).outputs(kept, feeds)[0]
    assert float(np.abs(out - twin).max()) <= 1e-4 * scale
    base = zoo.run(ir.load(bert), feeds, tmp_path, "base")[0]
    assert float(np.abs(out - base).max()) > 1e-3  # something was removed


def test_refit_probe_fits_on_fit_feeds(tmp_path):
    """``measure(fit_feeds=...)``: the probe's refit is the ridge solution on those feeds, D measured on ``feeds``."""
    from graphprune.analysis.importance import compute_importance
    from graphprune.passes._channel_sensitivity import measure

    model, feeds, x = _mlp(tmp_path)
    analysis = analyze_channels(model, [], True)
    imp = compute_importance(analysis, "l2")
    group = next(g for g in analysis.groups if g.prunable)
    w = {k: v.const_value.numpy().astype(np.float64) for k, v in model.graph.initializers.items()}

    def hidden(xs):
        return np.maximum(np.maximum(xs @ w["W0"], 0) @ w["W1"] + w["B1"], 0)

    keep = np.sort(np.argsort(-imp.scores[group.id], kind="stable")[:12])  # probe 0.5 of 24 units
    h_fit, h_eval = hidden(x[20:]), hidden(x[:20])
    a = h_fit[:, keep]
    ata = a.T @ a
    sol = np.linalg.solve(ata + (1e-3 * np.mean(np.diag(ata)) + 1e-12) * np.eye(len(keep)), a.T @ h_fit @ w["W2"])
    ref, got = h_eval @ w["W2"], h_eval[:, keep] @ sol
    want = np.mean(1 - (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1))
    d = measure(model, analysis, imp, feeds[:1], refit=True, probe=probe, probe_ratio=0.5, fit_feeds=feeds[1:])
    np.testing.assert_allclose(d[group.id], want, rtol=1e-4)
    in_sample = measure(model, analysis, imp, feeds[:1], refit=True, probe=probe, probe_ratio=0.5)
    assert in_sample[group.id] < d[group.id]  # fitted on the feeds it is measured on, the refit looks better
