"""graphprune search: the loop end to end on a tiny ViT, best.yaml reproducing BEST.onnx, the metrics, the space,
resume, and one-line refusals of bad input with nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from graphprune.errors import ConfigError  # noqa: E402
from graphprune.search import metrics as M  # noqa: E402
from graphprune.search.space import from_dict  # noqa: E402
from tests.helpers import cli  # noqa: E402

# the embedding width stays whole (ignore_stem: true): on this random-weight ViT, pruning it at 30-50% leaves no
# trial above the tests' verification thresholds
SPACE = {"passes": {"channel_prune": {"optional": False, "params": {"ratio": {"low": 0.3, "high": 0.5, "step": 0.1},
                                                                    "allocate": ["score", "sensitivity"],
                                                                    "ignore_stem": [True]}},
                    "token_drop": {"params": {"keep_ratio": {"low": 0.5, "high": 0.7, "step": 0.1},
                                              "layers": [[1, 2, 3], [2, 3]]}}}}




@pytest.fixture(scope="module")
def tiny(export, tmp_path_factory):
    """A tiny ViT, 160 random images, and labels = the original's argmax (accuracy 1.0 before pruning)."""
    folder = tmp_path_factory.mktemp("search")
    model = export("vit_tiny")
    x = np.random.default_rng(0).standard_normal((160, 3, 32, 32)).astype(np.float32)
    np.savez(folder / "data.npz", x=x)
    sess = ort.InferenceSession(str(model))
    labels = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
    np.save(folder / "labels.npy", labels)
    return {"model": model, "data": folder / "data.npz", "labels": folder / "labels.npy", "folder": folder, "x": x,
            "y": labels}


def run_search(tiny, name, **kw):
    from graphprune import search

    out = tiny["folder"] / f"{name}.onnx"
    args = dict(labels=tiny["labels"], calibration_samples=32, selection_samples=64, test_samples=64, trials=4,
                space=SPACE, runs=20, seed=0, verify={"top1_min": 0.5, "cosine_mean_min": 0.5})
    return search(tiny["model"], out, tiny["data"], report_dir=tiny["folder"] / f"{name}-report", **(args | kw)), out


@pytest.fixture(scope="module")
def searched(tiny):
    return run_search(tiny, "best")


def _distinct(trials) -> set[str]:
    return {json.dumps(t["pipeline"], sort_keys=True) for t in trials if t["pipeline"]}


def _weights(path):
    m = ir.load(path)
    return {k: v.const_value.numpy() for k, v in m.graph.initializers.items() if v.const_value is not None}


def test_search_writes_a_verified_model_and_its_files(searched, tiny):
    res, out = searched
    report = res.files["report_dir"]
    rows = [json.loads(line) for line in open(f"{report}/trials.jsonl")]
    assert [r["number"] for r in rows] == list(range(len(rows))) and len(rows) == 4 + res.info["repeats"]
    assert len(_distinct(rows)) == 4  # --trials 4: four distinct pipelines ran (repeats are told, not run)
    assert res.chosen is not None and out.is_file()
    # the chosen model really is what the trial scored: its accuracy on the test split, recomputed here
    sess = ort.InferenceSession(str(out))
    y = sess.run(None, {"x": tiny["x"]})[0].argmax(1)
    perm = np.random.default_rng(0).permutation(160)
    test = perm[96:160]
    acc = float((y[test] == tiny["y"][test]).mean())
    assert res.chosen["test"]["task"]["accuracy"]["value"] == pytest.approx(acc)
    assert res.chosen["test"]["quality"] == pytest.approx(acc)  # base accuracy is 1.0 by construction
    # FLOPs of the written model fell as the trial said
    assert res.optimize_report["flops"]["ratio"] == pytest.approx(res.chosen["flops"]["ratio"])
    assert res.optimize_report["verify"]["passed"]
    html = open(res.files["report"]).read()
    assert "data:image/png;base64," in html and "Pareto front" in html


def test_two_searches_in_one_process_keep_their_own_thresholds(tiny):
    """A search's trials are judged by its own verification thresholds, not by those of an earlier search on the
    same model and calibration data in the same process (each search call runs its own trial runners)."""
    from graphprune.errors import GraphpruneError

    with pytest.raises(GraphpruneError, match="no trial passes verification: .*< 0.9"):  # the default thresholds
        run_search(tiny, "strict", trials=2, verify=None)
    lenient, _ = run_search(tiny, "lenient", trials=2)
    fails = [f for r in lenient.trials if r.get("status") == "complete" for f in r["verify"]["failures"]]
    assert not [f for f in fails if "< 0.9" in f or "< 0.95" in f], fails
    assert lenient.chosen is not None and lenient.chosen["verify"]["passed"]


def test_best_yaml_reproduces_the_model_through_optimize(searched, tiny, capsys):
    res, out = searched
    again = tiny["folder"] / "again.onnx"
    code, _, err = cli(["optimize", tiny["model"], "-o", again, "--config", res.files["best_yaml"]], capsys)
    assert code == 0, err
    a, b = _weights(out), _weights(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    s1, s2 = ort.InferenceSession(str(out)), ort.InferenceSession(str(again))
    np.testing.assert_array_equal(s1.run(None, {"x": tiny["x"][:8]})[0], s2.run(None, {"x": tiny["x"][:8]})[0])


def test_resume_continues_the_study(tiny):
    res, _ = run_search(tiny, "resume", trials=2)
    assert len(_distinct(res.trials)) == 2
    res2, _ = run_search(tiny, "resume", trials=4, resume=True)
    assert [t["number"] for t in res2.trials] == list(range(len(res2.trials)))
    # the first run's trials, kept and not run again (without "test": the test-split scores a search adds to its own
    # front, which the resumed search's larger front need not include)
    strip = [[{k: v for k, v in t.items() if k != "test"} for t in trials] for trials in (res.trials, res2.trials)]
    assert strip[1][:len(res.trials)] == strip[0]
    assert len(_distinct(res2.trials)) == 4 and _distinct(res.trials) <= _distinct(res2.trials)


def test_calibration_cache_is_reused_across_trials(tiny):
    space = {"passes": {"channel_prune": {"optional": False, "params": {"ratio": [0.1, 0.2, 0.3],
                                                                        "allocate": ["sensitivity"]}}}}
    res, out = run_search(tiny, "cache", space=space, trials=3, max_loss=0.5, verify=None)
    assert res.info["cache"]["hits"] >= 2  # importance and sensitivity computed once, reused by later trials
    # constraint mode: best.yaml's verification checks the agreement the search measured for the chosen trial
    import yaml

    gate = yaml.safe_load(open(res.files["best_yaml"]))["verify"]
    measured = res.chosen["agreement"]
    assert gate["top1_min"] == pytest.approx(measured["top1"]["mean"] - 0.02, abs=1e-3)
    assert gate["cosine_mean_min"] <= measured["cosine"]["mean"] and out.is_file()
    assert res.optimize_report["verify"]["passed"]


def test_retrieval_metrics_match_hand_counts():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = np.array([[1.0, 0.1], [1.0, 0.0], [0.7, 0.7]])
    r = M.retrieval(q, d)
    # query 0: doc 1 (cos 1.0) beats its own doc 0 (0.995) → rank 2; query 1: docs 2 (0.707) and 0 (0.0995) beat
    # its own doc 1 (0.0) → rank 3; query 2: its own doc 2 (1.0) is first
    assert r["recall@1"].tolist() == [0.0, 0.0, 1.0]
    assert r["mrr"].tolist() == pytest.approx([1 / 2, 1 / 3, 1.0])


def test_agreement_metrics_and_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 8))
    assert M.knn_overlap(a, a).tolist() == [1.0] * 40
    assert M.rank_corr(a, 2 * a) == pytest.approx(np.ones(40))
    shuffled = a[rng.permutation(40)]
    assert M.knn_overlap(a, shuffled).mean() < 0.5
    lo, hi = M.bootstrap(M.cosine(a, a + 0.3 * rng.standard_normal(a.shape)))
    mean = M.cosine(a, a + 0.3 * rng.standard_normal(a.shape)).mean()
    assert lo < hi and lo < mean + 0.05 and hi > mean - 0.05
    base, scores = np.ones(50), np.r_[np.ones(45), np.zeros(5)]
    lo, hi = M.bootstrap(scores, base)
    assert lo <= 0.9 <= hi


@pytest.mark.parametrize("space, needle", [
    ({"passes": {"prune_everything": {}}}, "unknown pass 'prune_everything'"),
    ({"passes": {"channel_prune": {"params": {"ratioo": [0.1]}}}}, "unknown key 'ratioo'"),
    ({"passes": {"channel_prune": {"params": {"ratio": [1.5]}}}}, "value 1.5 refused"),
    ({"passes": {"channel_prune": {"params": {"ratio": {"low": 0.5, "high": 0.1}}}}}, "low ≤ high"),
    ({"passes": {"token_drop": {"bogus": 1}}}, "unknown key 'bogus'"),
])
def test_space_refuses_unknown_passes_keys_and_values(space, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(space)


def test_space_samples_typed_values():
    import optuna

    space = from_dict(SPACE)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        for entry in space.sample(study.ask()):
            if entry["name"] == "token_drop":
                assert entry["layers"] in ([2, 3], [1, 2, 3]) and 0.5 <= entry["keep_ratio"] <= 0.7
            seen.add(entry["name"])
    assert seen == {"channel_prune", "token_drop"}


@pytest.mark.parametrize("extra, needle", [
    (["--trials", "0"], "--trials must be at least 1"),
    (["--time-budget", "0"], "--time-budget must be positive"),
    (["--labels", "BADLABELS"], "labels for 160 samples"),
    (["--storage", "notadriver://x"], "--storage 'notadriver://x' cannot be opened"),
    (["--ray", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    (["--space", "SPACE"], "unknown pass 'nope'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, extra, needle):
    np.save(tmp_path / "bad.npy", np.zeros(7, dtype=np.int64))
    (tmp_path / "space.yaml").write_text("passes:\n  nope: {}\n")
    extra = [{"BADLABELS": tmp_path / "bad.npy", "SPACE": tmp_path / "space.yaml"}.get(a, a) for a in extra]
    out = tmp_path / "o" / "best.onnx"
    out.parent.mkdir()
    code, _, err = cli(["search", tiny["model"], "-o", out, "--data", tiny["data"], *extra], capsys)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_ray_trials_equal_the_local_run(tiny):
    """Trials as tasks on a real local Ray runtime (2 CPUs) ask and score the same trials as a local run with the
    same rounds of 2: pipelines, quality, FLOPs and params equal (latency is measured, so it differs)."""
    ray = pytest.importorskip("ray")
    local, _ = run_search(tiny, "local2", trials=4, workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote, _ = run_search(tiny, "ray2", trials=4, workers=2, ray=True)
    finally:
        ray.shutdown()
    assert len(remote.trials) == len(local.trials) and len(_distinct(local.trials)) == 4
    for a, b in zip(local.trials, remote.trials):
        assert a["pipeline"] == b["pipeline"] and a["status"] == b["status"]
        if a["status"] == "complete":
            assert a["quality"] == pytest.approx(b["quality"], abs=1e-9)
            assert a["flops"] == b["flops"] and a["params"] == b["params"]
            assert a["agreement"]["cosine"]["mean"] == pytest.approx(b["agreement"]["cosine"]["mean"], abs=1e-6)


def _screenshot(html_path, png_path, tmp_path):
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is required (apt-get install -y chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}",
           f"--screenshot={png_path}", "--window-size=1400,1000", f"file://{html_path}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    from PIL import Image

    return np.asarray(Image.open(png_path).convert("RGB")).astype(int)


def test_report_renders_its_plots_in_a_real_browser(searched, tmp_path):
    """Chromium draws the page; the plot area holds the front's blue and the chosen trial's red star, which the
    same page without its plot images does not."""
    res, _ = searched
    page = open(res.files["report"]).read()
    bare = tmp_path / "bare.html"
    bare.write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA"))
    full = _screenshot(res.files["report"], tmp_path / "full.png", tmp_path)
    empty = _screenshot(bare, tmp_path / "bare.png", tmp_path)

    def count(img, rgb):  # pixels within 40 of a plot colour, in the top 700 rows (the plots' band)
        return int((np.abs(img[:700] - np.array(rgb)).sum(axis=2) < 40).sum())

    assert count(full, (0x1F, 0x5F, 0xBF)) > 60 and count(full, (0xD6, 0x20, 0x20)) > 60
    assert count(empty, (0x1F, 0x5F, 0xBF)) < 20 and count(empty, (0xD6, 0x20, 0x20)) < 20


def test_without_optuna_search_says_what_to_install(tiny, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_optuna(name, *a, **k):
        if name == "optuna":
            raise ImportError("No module named 'optuna'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    code, _, err = cli(["search", tiny["model"], "-o", tmp_path / "b.onnx", "--data", tiny["data"]], capsys)
    assert code == 2 and "search needs optuna: pip install 'graphprune[search]'" in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_loop_and_the_study_keeps_finished_trials():
    import optuna

    from graphprune.search.engine import Loop

    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    space = from_dict({"passes": {"token_drop": {"optional": False, "params": {"keep_ratio": {"low": 0.5, "high": 0.9}}}}})
    calls = []

    def evaluate(pipes):
        calls.append(pipes)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [{"status": "complete", "pipeline": p, "quality": 0.9, "quality_ci": (0.8, 1.0),
                 "latency": {"speedup": 1.2}, "verify": {"passed": True, "failures": []}} for p in pipes]

    loop = Loop(study, space, evaluate, trials=10, time_budget=None, workers=1, max_loss=None, target=None)
    loop.run()
    states = [t.state.name for t in study.trials]
    assert loop.interrupted and states == ["COMPLETE", "COMPLETE", "FAIL"]
    assert study.trials[0].user_attrs["result"]["pipeline"][0]["name"] == "token_drop"


def test_ray_flag_without_an_address_means_a_local_runtime():
    from graphprune._cli_search import ray_flag

    assert ray_flag(["search", "m.onnx", "--ray"]) == ["search", "m.onnx", "--ray", "local"]
    assert ray_flag(["search", "--ray", "--trials", "3"]) == ["search", "--ray", "local", "--trials", "3"]
    assert ray_flag(["search", "--ray", "10.0.0.1:6379"]) == ["search", "--ray", "10.0.0.1:6379"]


def _keep_ratio_trials():
    """(pipelines run so far, an ``evaluate`` for ``Loop``): a token_drop trial scores quality = keep_ratio and
    speedup = 1 / keep_ratio, and runs nothing."""
    ran = []

    def evaluate(pipes):
        ran.extend(pipes)
        return [{"status": "complete", "pipeline": p, "quality": p[0]["keep_ratio"], "quality_ci": (0.4, 1.0),
                 "latency": {"speedup": 1 / p[0]["keep_ratio"]}, "verify": {"passed": True, "failures": []}}
                for p in pipes]

    return ran, evaluate


def test_a_pipeline_sampled_again_is_not_run_again():
    import optuna

    from graphprune.search.engine import STALE_ROUNDS, Loop

    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    space = from_dict({"passes": {"token_drop": {"optional": False, "params": {"keep_ratio": [0.5, 0.9]}}}})
    ran, evaluate = _keep_ratio_trials()

    loop = Loop(study, space, evaluate, trials=8, time_budget=None, workers=1, max_loss=None, target=None)
    loop.run()
    assert len(ran) == 2 and len({json.dumps(p) for p in ran}) == 2  # each pipeline ran once
    # the space holds 2 pipelines: after STALE_ROUNDS rounds with nothing new the loop stops, and says why
    assert loop.exhausted and loop.repeats == len(study.trials) - 2 >= STALE_ROUNDS
    assert all(t.values == [t.params["token_drop.keep_ratio"], 1 / t.params["token_drop.keep_ratio"]]
               for t in study.trials)


def test_repeats_do_not_count_against_trials():
    """``trials`` is the number of distinct pipelines evaluated: trials that re-propose one, or pick no pass, are
    told and not counted."""
    import optuna

    from graphprune.search.engine import Loop

    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1))
    space = from_dict({"passes": {"token_drop": {"params": {"keep_ratio": [0.5, 0.6, 0.7, 0.8, 0.9]}}}})
    ran, evaluate = _keep_ratio_trials()

    loop = Loop(study, space, evaluate, trials=4, time_budget=None, workers=2, max_loss=None, target=None)
    loop.run()
    keys = [json.dumps(p, sort_keys=True) for p in ran]
    assert len(keys) == len(set(keys)) == 4 and not loop.exhausted
    assert len(study.trials) == 4 + loop.repeats and loop.repeats > 0  # this seed re-proposes (or skips) some


def test_pareto_front_holds_each_pipeline_once():
    """A pipeline sampled again shares its first trial's result: the front lists it once, under its first trial,
    and keeps the points no other trial beats."""
    from graphprune.search.engine import pareto

    def r(n, pipe, q, s):
        return {"number": n, "pipeline": pipe, "quality": q, "latency": {"speedup": s}}

    a = [{"name": "channel_prune", "ratio": 0.05}]
    b = [{"name": "token_drop", "keep_ratio": 0.5}]
    c = [{"name": "channel_prune", "ratio": 0.5}]
    trials = [r(4, a, 1.07, 1.03), r(2, a, 1.07, 1.03), r(3, b, 0.5, 1.6), r(5, c, 0.4, 1.5), r(6, a, 1.07, 1.03)]
    front = pareto(trials)
    assert [t["number"] for t in front] == [3, 2]  # fastest first; c is beaten by b; a once, as trial 2
