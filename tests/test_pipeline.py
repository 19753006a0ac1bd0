"""Pipeline, verification, report JSON and the optimize/inspect/bench/passes commands."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphprune.analysis.inputs import example_inputs
from graphprune.io import load_model
from graphprune.pipeline import Pipeline
from graphprune.verify import VerifyThresholds, compare
from tests.helpers import cli, linear_model


@pytest.mark.slow
def test_cleanup_on_deit_vit_is_identity(export, tmp_path, capsys):
    src = export("vit")  # DeiT-S shaped, dynamo export with external data
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = cli(["optimize", src, "-o", out, "--report", rep, "--bench", "--runs", "3"], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert {"passes", "flops", "params", "verify", "latency_ms"} <= set(report)
    assert set(report["flops"]) >= {"before", "after"} and set(report["params"]) >= {"before", "after"}
    assert set(report["latency_ms"]) >= {"before", "after", "speedup"}
    assert report["passes"][0]["name"] == "cleanup"
    feeds = example_inputs(load_model(src), batch=2, seed=5)
    a = ort.InferenceSession(str(src)).run(None, feeds)[0]
    b = ort.InferenceSession(str(out)).run(None, feeds)[0]
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert report["verify"]["max_abs_err"] <= 1e-5 and report["verify"]["passed"]
    assert "speedup" in stdout


def test_pipeline_from_yaml_runs_and_reports(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("passes:\n  - name: identity_elimination\n  - name: constant_folding\n    input_size_limit: 1024\n  - name: dce\nverify: {cosine_min: 0.99}\n")
    pipe = Pipeline.from_yaml(cfg)
    assert [s.name for s in pipe.steps] == ["identity_elimination", "constant_folding", "dce"]
    assert pipe.verify.cosine_min == 0.99
    model = load_model(linear_model(tmp_path / "m.onnx"))
    records = pipe.run(model)
    assert [r["name"] for r in records] == ["identity_elimination", "constant_folding", "dce"]
    assert records[0]["nodes"] == {"before": 2, "after": 2}
    assert records[0]["flops"]["before"] == 2 * 8 * 4 + 4  # FLOPs are counted at batch 1


def test_dce_removes_dead_nodes(tmp_path):
    model = load_model(linear_model(tmp_path / "m.onnx"))
    x = model.graph.inputs[0]
    model.graph.append(ir.node("Relu", [x]))  # dead
    records = Pipeline().add("dce").run(model)
    assert records[0]["changed"] and records[0]["nodes"] == {"before": 3, "after": 2}


def test_verify_detects_changed_weights(tmp_path):
    a = linear_model(tmp_path / "a.onnx", external=False)
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    w2 = w.copy()
    w2[0, 0] += 0.5
    b = linear_model(tmp_path / "b.onnx", external=False, w=w2)
    feeds = [{"X": np.ones((3, 8), np.float32)}]
    rep = compare(a, b, feeds, VerifyThresholds(max_abs_err=1e-3))
    assert rep.max_abs_err == pytest.approx(0.5, rel=1e-5)  # X=1 → Y[:,0] shifts by exactly 0.5
    assert not rep.passed and "max_abs_err" in rep.failures[0]
    assert compare(a, a, feeds, VerifyThresholds(max_abs_err=0)).passed


def test_verification_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    import graphprune.pipeline as pl
    from graphprune.verify import VerifyReport

    src = linear_model(tmp_path / "m.onnx")
    monkeypatch.setattr("graphprune.verify.compare", lambda *a, **k: VerifyReport(1.0, 0.5, None, [], ["cosine 0.5 < 0.95"]))
    out = tmp_path / "o.onnx"
    code, _, err = cli(["optimize", src, "-o", out], capsys)
    assert code == 2 and "verification failed" in err and not out.exists()
    code, _, err = cli(["optimize", src, "-o", out, "--force"], capsys)
    assert code == 0 and out.exists()
    del pl


def test_inspect_json_keys(export, capsys):
    code, stdout, _ = cli(["inspect", export("vit_tiny"), "--json"], capsys)
    assert code == 0
    info = json.loads(stdout)
    assert {"inputs", "outputs", "opset", "flops", "params", "attention_blocks"} <= set(info)
    assert info["opset"] == 18 and len(info["attention_blocks"]) == 4
    assert {"index", "heads", "head_dim", "tokens", "kind"} <= set(info["attention_blocks"][0])


def test_bench_with_baseline(tmp_path, capsys):
    a = linear_model(tmp_path / "a.onnx")
    code, stdout, _ = cli(["bench", a, "--baseline", a, "--json", "--runs", "5"], capsys)
    assert code == 0
    res = json.loads(stdout)
    assert set(res["latency_ms"]) == {"baseline", "model"} and res["speedup"] > 0


def test_passes_lists_registry(capsys):
    code, stdout, _ = cli(["passes", "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and {"cleanup", "dce", "constant_folding"} <= set(info)
    assert "input_size_limit" in info["constant_folding"]["options"]
    opts = info["channel_prune"]["options"]  # the YAML contract: YAML keys, types and defaults, not Python's
    assert "global" in opts and "global_" not in opts
    assert opts["global"]["type"] == "true | false or null" and opts["ratio"]["type"] == "number"
    assert opts["importance"]["type"] == "auto | l1 | l2 | bn | activation | obs"
    assert opts["ignore"]["default"] == [] and opts["ignore"]["type"] == "list of string"
    code, stdout, _ = cli(["passes"], capsys)
    assert code == 0 and "<class" not in stdout and "PydanticUndefined" not in stdout
    assert "ratio: number (default 0.3)" in stdout


def test_summary_keeps_figures_whole_at_80_columns(monkeypatch, capsys):
    from rich.console import Console

    import graphprune.cli as gcli

    monkeypatch.setattr(gcli, "out", Console(width=80))
    entry = {"name": "channel_prune", "changed": True, "nodes": {"before": 249, "after": 249},
             "flops": {"before": 692.57e6, "after": 563.12e6}, "params": {"before": 22.57e6, "after": 20.57e6},
             "seconds": 0.55, "skipped": []}
    gcli._summary({"model": "minilm.onnx", "output": "out.onnx", "passes": [entry], "data": {"source": "user"},
                   "verify": {"passed": True, "summary": "min cosine 0.9"}, "flops": {"ratio": 0.81},
                   "params": {"ratio": 0.91}})
    stdout = capsys.readouterr().out
    assert "692.57M→563.12M" in stdout and "22.57M→20.57M" in stdout and "channel_prune" in stdout
    assert max(len(line) for line in stdout.splitlines()) <= 80


def test_inputs_npz_used_for_verification(tmp_path, capsys):
    src = linear_model(tmp_path / "m.onnx")
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, X=np.full((5, 8), 2.0, np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = cli(["optimize", src, "-o", out, "--inputs", feeds, "--report", rep], capsys)
    assert code == 0, err
    assert json.loads(rep.read_text())["verify"]["max_abs_err"] == 0.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, Y=np.zeros((1, 8), np.float32))
    code, _, err = cli(["optimize", src, "-o", tmp_path / "o2.onnx", "--inputs", bad], capsys)
    assert code == 2 and "do not match the model inputs ['X']" in err and "['Y']" in err and not (tmp_path / "o2.onnx").exists()


def test_a_pass_that_changes_nothing_warns(tmp_path):
    """Nothing changed is never a silent success: the report (and so the CLI) carries the reason."""
    import graphprune as gp
    from tests.helpers import linear_model

    src = linear_model(tmp_path / "m.onnx")
    report = gp.optimize(src, tmp_path / "o.onnx", gp.Pipeline().add("token_drop").add("cleanup"))
    mine = [w for w in report["warnings"] if "changed nothing" in w]
    assert len(mine) == 1 and mine[0].startswith("token_drop changed nothing; ")


def test_optimize_serialises_the_output_once(tmp_path, monkeypatch):
    """The optimized model is saved once (to a staged file that verification and the benchmark run), never
    serialised in memory for ORT, and the staged folder is gone afterwards."""
    import onnx_ir

    import graphprune as gp
    import graphprune.backends.onnxruntime as backend
    from tests.helpers import linear_model

    saves, sessions = [], []
    real_save, real_session = onnx_ir.save, backend.make_session
    monkeypatch.setattr(onnx_ir, "save", lambda *a, **k: (saves.append(a[1]), real_save(*a, **k))[1])
    monkeypatch.setattr(backend, "make_session", lambda m, *a, **k: (sessions.append(m), real_session(m, *a, **k))[1])
    src = linear_model(tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    report = gp.optimize(src, out, gp.Pipeline().add("cleanup"), bench=True, bench_runs=2)
    assert report["verify"]["passed"] and out.exists()
    assert len(saves) == 1 and saves[0].name == "o.onnx" and saves[0].parent != tmp_path  # staged, then renamed
    assert sessions and not [m for m in sessions if isinstance(m, onnx_ir.Model)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "o.onnx"]


def test_failed_verification_leaves_no_staged_files(tmp_path, monkeypatch):
    import graphprune as gp
    import graphprune.verify as verify
    from graphprune.errors import VerificationError
    from tests.helpers import linear_model

    real = verify.compare

    def failing(*a, **k):
        report = real(*a, **k)
        report.failures.append("forced by the test")
        return report

    monkeypatch.setattr(verify, "compare", failing)
    src = linear_model(tmp_path / "m.onnx")
    with pytest.raises(VerificationError, match="forced by the test"):
        gp.optimize(src, tmp_path / "o.onnx", gp.Pipeline().add("cleanup"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    gp.optimize(src, tmp_path / "o.onnx", gp.Pipeline().add("cleanup"), force=True)  # --force writes anyway
    assert (tmp_path / "o.onnx").exists()


def test_a_pass_that_raises_is_an_internal_error_exit_1(tmp_path, capsys, monkeypatch):
    """A bug inside a pass is exit code 1 with the pass named and the exception's message, one line; a user
    error raised by a pass stays exit code 2."""
    from graphprune.errors import ConfigError
    from graphprune.passes import get_pass

    cls = get_pass("cleanup")

    def boom(self, model):
        raise IndexError("list index out of range")

    monkeypatch.setattr(cls, "call", boom)
    src = linear_model(tmp_path / "m.onnx")
    code, _, err = cli(["optimize", src, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "internal error: pass 'cleanup' failed after no passes: IndexError: list index out of range" in err
    assert not (tmp_path / "o.onnx").exists()

    def user(self, model):
        raise ConfigError("cleanup: bad key 'x'")

    monkeypatch.setattr(cls, "call", user)
    code, _, err = cli(["optimize", src, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2 and err.strip() == "error: cleanup: bad key 'x'", err


def _verified(report: dict) -> int:
    """Samples verification ran on, as the verify report counted them (not the data section's claim)."""
    return report["verify"]["samples"]


@pytest.mark.parametrize("passes, config_samples, want", [
    (["cleanup"], None, 2),  # exact housekeeping: 2 of the 8 synthetic samples
    (["identity_elimination", "constant_folding", "dce"], None, 2),
    (["cleanup"], 5, 5),  # asked for: kept
    (["cleanup", "token_drop"], None, 8),  # any other pass: every sample
])
def test_cleanup_only_pipelines_verify_on_fewer_samples(tmp_path, capsys, passes, config_samples, want):
    import yaml

    src = linear_model(tmp_path / "m.onnx")
    cfg = tmp_path / "p.yaml"
    data = {"verify_samples": config_samples} if config_samples else {}
    cfg.write_text(yaml.safe_dump({"passes": [{"name": p} for p in passes], "data": data}))
    rep_path, out = tmp_path / "r.json", tmp_path / "o.onnx"
    code, stdout, _ = cli(["optimize", src, "-o", out, "--config", cfg, "--report", rep_path], capsys)
    assert code == 0
    report = json.loads(rep_path.read_text())
    assert _verified(report) == report["data"]["verify_samples"] == want
    reason = report["data"].get("verify_samples_reason")
    if want == 2:
        assert reason.startswith(f"every pass is exact housekeeping ({', '.join(passes)}): verified on 2 of 8 samples")
        assert "on 2 synthetic samples (housekeeping passes only)" in " ".join(stdout.split())
    else:
        assert reason is None and "housekeeping passes only" not in " ".join(stdout.split())


def test_cleanup_only_verification_still_catches_a_wrong_rewrite(tmp_path, monkeypatch):
    """Two samples are enough to see a cleanup that changed the numbers: a broken constant fold is refused."""
    import graphprune.passes.cleanup as cleanup
    from graphprune.errors import VerificationError
    from graphprune.pipeline import optimize

    real = cleanup.CleanupPass.call

    def broken(self, model):
        result = real(self, model)
        w = model.graph.initializers["W"]
        w.const_value = ir.tensor(-w.const_value.numpy())  # outputs change sign (up to the bias)
        return result

    monkeypatch.setattr(cleanup.CleanupPass, "call", broken)
    with pytest.raises(VerificationError, match="on 2 synthetic inputs"):
        optimize(linear_model(tmp_path / "m.onnx"), tmp_path / "o.onnx", Pipeline().add("cleanup"))
    assert not (tmp_path / "o.onnx").exists()


def test_cleanup_only_keeps_every_real_sample(tmp_path, capsys):
    """Real data is a check the user asked for: a cleanup-only run verifies on all of its held-out samples."""
    src, rep = linear_model(tmp_path / "m.onnx"), tmp_path / "r.json"
    np.savez(tmp_path / "d.npz", X=np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32))
    code, _, err = cli(["optimize", src, "-o", tmp_path / "o.onnx", "--data", tmp_path / "d.npz",
                        "--allow-overlap", "--report", rep], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert _verified(report) == report["data"]["verify_samples"] == 20
    assert "verify_samples_reason" not in report["data"]
