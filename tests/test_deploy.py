"""graphprune deploy: config.pbtxt read back against Triton's ModelConfig schema, manifest hashes, batching
decisions, refusals, atomic replacement, and the python backend's batching logic (no server needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from graphprune.deploy import HOW_TO_GET, check_manifest, sha256_file
from graphprune.deploy import _python_model as pm
from graphprune.io import load_model
from tests._deploy_util import (
    fixed_batch_model,
    multi_io_model,
    ort_outputs,
    static_reshape_model,
    token_drop_model,
)
from tests.helpers import linear_model, set_external_location
from tests.test_pipeline import cli


def parse_config(path: Path):
    """config.pbtxt parsed with protobuf's text format into Triton's own ModelConfig message (unknown fields fail)."""
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                             reason="reading config.pbtxt against Triton's ModelConfig schema needs tritonclient "
                                    "(the serve extra: pip install -e '.[serve]')")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), mc.ModelConfig()), mc


@pytest.fixture
def lin(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return linear_model(src / "lin.onnx", external=True)


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_deploy_variant_files_and_outputs(lin, tmp_path, capsys, backend):
    before = {p.name: sha256_file(p) for p in lin.parent.iterdir()}
    repo = tmp_path / "repo"
    code, out, err = cli(["deploy", lin, "--repository", repo, "--backend", backend], capsys)
    assert code == 0, err
    vdir = repo / "lin" / "1"
    names = sorted(p.name for p in vdir.iterdir())
    assert names == sorted(["manifest.json", "model.onnx"] + (["model.py"] if backend == "python" else []))
    if backend == "python":
        assert (vdir / "model.py").read_bytes() == Path(pm.__file__).read_bytes()
    # the deployed model computes what the source computes (weights carried over from the external data file)
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(ort_outputs(vdir / "model.onnx", {"X": x})[0], ort_outputs(lin, {"X": x})[0])
    assert {p.name: sha256_file(p) for p in lin.parent.iterdir()} == before  # the input was only read
    assert not [p for p in (repo / "lin").iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_config_parses_back_and_matches_the_model(lin, tmp_path, capsys, backend):
    repo = tmp_path / "repo"
    code, _, err = cli(["deploy", lin, "-r", repo, "--backend", backend, "--max-batch-size", "4", "--instances", "2",
                        "--queue-delay-us", "250", "--threads", "1", "--graph-optimization", "basic"], capsys)
    assert code == 0, err
    cfg, mc = parse_config(repo / "lin" / "config.pbtxt")
    model = load_model(lin)
    assert cfg.name == "lin" and cfg.max_batch_size == 4
    assert [i.name for i in cfg.input] == [v.name for v in model.graph.inputs]
    assert [o.name for o in cfg.output] == [v.name for v in model.graph.outputs]
    assert [list(i.dims) for i in cfg.input] == [[8]] and [list(o.dims) for o in cfg.output] == [[4]]
    assert {t.data_type for t in [*cfg.input, *cfg.output]} == {mc.TYPE_FP32}
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    if backend == "onnxruntime":
        assert cfg.backend == "onnxruntime" and cfg.default_model_filename == "model.onnx"
        assert cfg.optimization.graph.level == -1  # the ORT backend's number for basic
        assert params == {"intra_op_thread_count": "1", "inter_op_thread_count": "1"}
    else:
        assert cfg.backend == "python"
        assert params == {"model_file": "model.onnx", "providers": "cpu", "intra_op_threads": "1",
                          "inter_op_threads": "1", "graph_optimization_level": "basic"}


def test_multi_io_config_dynamic_axes_and_gpu(tmp_path, capsys):
    src = multi_io_model(tmp_path / "multi.onnx")
    repo = tmp_path / "repo"
    code, _, err = cli(["deploy", src, "-r", repo, "--backend", "python", "--device", "gpu", "--name", "m2"], capsys)
    assert code == 0, err
    cfg, mc = parse_config(repo / "m2" / "config.pbtxt")
    assert cfg.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("X", mc.TYPE_FP32, [4]),
                                                                         ("ids", mc.TYPE_INT64, [-1])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("Y", [4]), ("Z", [4])]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert cfg.parameters["providers"].string_value == "cuda,cpu"
    manifest = json.loads((repo / "m2" / "1" / "manifest.json").read_text())
    assert manifest["inputs"][1] == {"name": "ids", "onnx_dtype": "INT64", "datatype": "INT64", "shape": ["batch", "seq"]}


@pytest.mark.parametrize("builder, dims, why", [
    (fixed_batch_model, [1, 8], "axis 0 of input 'X' is fixed at 1"),
    (static_reshape_model, [-1, 2, 4], "running batch 2 in ONNX Runtime failed"),
])
def test_model_without_batch_axis_gets_max_batch_size_0(tmp_path, capsys, builder, dims, why):
    src = builder(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    code, _, err = cli(["deploy", src, "-r", repo], capsys)
    assert code == 0, err
    assert why in err and "max_batch_size 0 instead of 8" in err
    text = (repo / "m" / "config.pbtxt").read_text()
    assert f"# max_batch_size 0: {why}" in text
    manifest = json.loads((repo / "m" / "1" / "manifest.json").read_text())
    assert manifest["batching"]["max_batch_size"] == 0 and why in manifest["batching"]["reason"]
    cfg, _ = parse_config(repo / "m" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == dims
    assert not cfg.HasField("dynamic_batching")


def test_manifest_hashes_specs_and_tampering(lin, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, _, err = cli(["deploy", lin, "-r", repo, "--backend", "python"], capsys)
    assert code == 0, err
    vdir = repo / "lin" / "1"
    manifest = json.loads((vdir / "manifest.json").read_text())
    on_disk = {f"1/{p.name}" for p in vdir.iterdir() if p.name != "manifest.json"} | {"config.pbtxt"}
    assert set(manifest["files"]) == on_disk
    for rel, info in manifest["files"].items():
        p = repo / "lin" / rel
        assert info == {"sha256": sha256_file(p), "bytes": p.stat().st_size}, rel
    assert manifest["source"]["sha256"] == sha256_file(lin)
    assert manifest["inputs"] == [{"name": "X", "onnx_dtype": "FLOAT", "datatype": "FP32", "shape": ["batch", 8]}]
    assert manifest["outputs"] == [{"name": "Y", "onnx_dtype": "FLOAT", "datatype": "FP32", "shape": ["batch", 4]}]
    assert manifest["versions"]["onnx"] and manifest["versions"]["onnxruntime"] == ort.__version__
    assert manifest["check"] == {"onnxruntime": ["batch 1", "batch 2"]}
    assert manifest["pipeline"] is None and manifest["plugins"] == []
    assert check_manifest(vdir) == []
    with open(vdir / "model.onnx", "ab") as f:
        f.write(b"\0")
    (vdir / "extra.bin").write_bytes(b"x")
    problems = check_manifest(vdir)
    assert any("1/model.onnx changed" in p for p in problems) and any("extra.bin" in p for p in problems)


def test_existing_version_refused_without_force(lin, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(["deploy", lin, "-r", repo, "--backend", "python"], capsys)[0] == 0
    first = {p.name: sha256_file(p) for p in (repo / "lin" / "1").iterdir()}
    other = linear_model(tmp_path / "lin2.onnx", external=False, w=np.ones((8, 4), np.float32))
    code, out, err = cli(["deploy", other, "-r", repo, "--name", "lin", "--version", "1", "--backend", "python"], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p.name: sha256_file(p) for p in (repo / "lin" / "1").iterdir()} == first
    # the default version is the next one
    assert cli(["deploy", other, "-r", repo, "--name", "lin", "--backend", "python"], capsys)[0] == 0
    assert sorted(p.name for p in (repo / "lin").iterdir()) == ["1", "2", "config.pbtxt"]
    # with --force, version 1 is replaced by the other model
    assert cli(["deploy", other, "-r", repo, "--name", "lin", "--version", "1", "--backend", "python", "--force"], capsys)[0] == 0
    m1 = json.loads((repo / "lin" / "1" / "manifest.json").read_text())
    assert m1["source"]["sha256"] == sha256_file(other) and check_manifest(repo / "lin" / "1") == []
    # a different config for a model whose other versions use the current one is refused too
    code, _, err = cli(["deploy", other, "-r", repo, "--name", "lin", "--backend", "python", "--max-batch-size", "2"], capsys)
    assert code == 2 and "differs" in err and not (repo / "lin" / "3").exists()


def test_failed_replacement_keeps_the_old_version(lin, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    assert cli(["deploy", lin, "-r", repo, "--backend", "python"], capsys)[0] == 0
    before = {p.name: sha256_file(p) for p in (repo / "lin" / "1").iterdir()}
    config_before = (repo / "lin" / "config.pbtxt").read_text()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("graphprune.deploy._repository._write_text_atomic", broken)
    code, _, err = cli(["deploy", lin, "-r", repo, "--backend", "python", "--version", "1", "--force",
                        "--max-batch-size", "2"], capsys)
    assert code == 1 and "disk full" in err
    assert {p.name: sha256_file(p) for p in (repo / "lin" / "1").iterdir()} == before
    assert (repo / "lin" / "config.pbtxt").read_text() == config_before
    assert sorted(p.name for p in (repo / "lin").iterdir()) == ["1", "config.pbtxt"]


def test_user_errors_are_one_line_exit_2(lin, tmp_path, capsys):
    repo = tmp_path / "repo"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    outside = tmp_path / "ext" / "m.onnx"
    outside.parent.mkdir()
    linear_model(outside, external=True)
    set_external_location(outside, "../lin.onnx.data")
    not_report = tmp_path / "r.json"
    not_report.write_text('{"hello": 1}')
    cases = [
        (["deploy", tmp_path / "missing.onnx", "-r", repo], "model file not found"),
        (["deploy", bad, "-r", repo], "not a valid ONNX model"),
        (["deploy", outside, "-r", repo], "outside the model folder"),
        (["deploy", lin, "-r", repo, "--backend", "tensorrt"], "--backend tensorrt needs TensorRT"),
        (["deploy", lin, "-r", repo, "--backend", "tvm"], "--backend: 'tvm'"),
        (["deploy", lin, "-r", repo, "--name", ".hidden"], "not a valid model name"),
        (["deploy", lin, "-r", repo, "--report", not_report], "not a graphprune optimize report"),
        (["deploy", lin, "-r", tmp_path / "no" / "such" / "repo"], "does not exist"),
        (["deploy", lin, "-r", lin], "is not a folder"),
    ]
    for args, message in cases:
        code, _, err = cli(args, capsys)
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not repo.exists()  # nothing written by any refused deploy


def test_serve_without_a_server_binary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("graphprune.deploy._server._bundled", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = cli(["serve", tmp_path], capsys)
    assert code == 2 and err.strip() == f"error: {HOW_TO_GET}"


def test_report_pipeline_and_plugins_in_manifest(export, tmp_path_factory, tmp_path, capsys):
    model, report = token_drop_model(export, tmp_path_factory.mktemp("vit_tokens"))
    rep = json.loads(report.read_text())
    repo = tmp_path / "repo"
    code, out, err = cli(["deploy", model, "-r", repo, "--backend", "python", "--report", report], capsys)
    assert code == 0, err
    manifest = json.loads((repo / model.stem / "1" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["pipeline"]] == [p["name"] for p in rep["passes"]] == ["token_drop", "cleanup"]
    assert manifest["pipeline"][0]["config"]["keep_ratio"] == 0.7
    r = manifest["report"]
    assert r["describes_this_model"] and r["sha256"] == sha256_file(report)
    assert r["flops"]["ratio"] == rep["flops"]["ratio"] < 1
    assert r["verify"]["data_source"] == "synthetic" and r["verify"]["passed"] == rep["verify"]["passed"]
    counts: dict = {}
    for node in load_model(model).graph:
        if node.domain == "ai.graphprune":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    assert counts, "token_drop inserted no ai.graphprune op"
    assert {p["op_type"]: p["nodes"] for p in manifest["plugins"] if p["domain"] == "ai.graphprune"} == counts
    assert all(p["function_body"] and "no plugin needed" in p["onnxruntime"] for p in manifest["plugins"])
    # a report written for another model is recorded, with a note
    other = tmp_path / "copy.onnx"
    shutil.copyfile(model, other)
    code, _, err = cli(["deploy", other, "-r", repo, "--report", report], capsys)
    assert code == 0 and "was written for" in err
    assert json.loads((repo / "copy" / "1" / "manifest.json").read_text())["report"]["describes_this_model"] is False


def test_python_model_batches_requests_and_isolates_a_bad_one(tmp_path):
    src = multi_io_model(tmp_path / "multi.onnx")
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def feed(batch, seq, high=10):
        return {"X": rng.standard_normal((batch, 4)).astype(np.float32),
                "ids": rng.integers(0, high, (batch, seq)).astype(np.int64)}

    feeds = [feed(1, 5), feed(2, 5), feed(3, 7), feed(1, 5, high=1) | {"ids": np.array([[99] * 5])}]
    groups = pm.plan_groups(feeds, batched=True)
    assert sorted(map(sorted, groups)) == [[0, 1, 3], [2]]  # same non-batch dims and dtypes go together
    assert pm.plan_groups(feeds, batched=False) == [[0], [1], [2], [3]]
    calls = []

    def run(names, f):
        calls.append(next(iter(f.values())).shape[0])
        return sess.run(names, f)

    for group in groups:
        results = pm.run_group(run, [feeds[i] for i in group], ["Y", "Z"])
        for i, res in zip(group, results):
            if i == 3:
                assert isinstance(res, Exception)  # id 99 is outside the 10-row table
                continue
            want = sess.run(["Y", "Z"], feeds[i])
            for got, ref in zip(res, want):
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # the group with the bad request failed as one batch of 4, then ran one by one; the good pair ran as a batch
    assert calls[:1] == [4] and sorted(calls[1:]) == [1, 1, 2, 3]
    good = pm.run_group(run, [feeds[0], feeds[1]], ["Y", "Z"])
    assert calls[-1] == 3 and good[1][0].shape == (2, 4)


@pytest.mark.parametrize("numpy2", [False, True])
def test_model_py_hands_outputs_over_by_dlpack_under_numpy_2(monkeypatch, numpy2):
    """Under numpy 2 the bundled 2.51 python-backend stub reads arrays given to ``pb_utils.Tensor(name, array)`` as
    empty (a served output came back with 0 elements) and ``as_numpy()`` of a request input returns wrong values, so
    model.py moves inputs and float/int outputs by DLPack; bool outputs and numpy 1 keep the stub's numpy calls."""
    made = []

    class Tensor:
        def __init__(self, name, array):
            made.append(("ctor", name, np.array(array)))

        @staticmethod
        def from_dlpack(name, obj):
            made.append(("dlpack", name, np.from_dlpack(obj).copy()))

    class PbUtils:
        pass

    PbUtils.Tensor = Tensor
    monkeypatch.setattr(pm, "_NUMPY2", numpy2)
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    mask = np.array([True, False])
    pm._out_tensor(PbUtils, "Y", y)
    pm._out_tensor(PbUtils, "M", mask)
    assert [(how, name) for how, name, _ in made] == [("dlpack" if numpy2 else "ctor", "Y"), ("ctor", "M")]
    np.testing.assert_array_equal(made[0][2], y)
    np.testing.assert_array_equal(made[1][2], mask)

    class InputTensor:  # as_numpy() under numpy 2 read garbage in the stub; DLPack reads the request's memory
        def __init__(self, a):
            self.a = a

        def as_numpy(self):
            return np.zeros_like(self.a) if numpy2 else self.a

        def __dlpack__(self, stream=None):
            return self.a.__dlpack__()

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(pm._in_array(InputTensor(x)), x)
