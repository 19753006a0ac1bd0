"""A real tritonserver on deployed models: HTTP and gRPC outputs equal ONNX Runtime's, bad requests get errors while
the server keeps serving, load tests count every request, and shutdown leaves no process behind.

Skipped (with the reason) only when the serve extra (nvidia-pytriton, tritonclient) is not installed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from graphprune.deploy import check_manifest, deploy, find_server, free_port, group_alive, load_test
from graphprune.errors import GraphpruneError
from tests._deploy_util import fixed_batch_model, multi_io_model, ort_outputs, token_drop_model
from tests.helpers import linear_model
from tests.test_pipeline import cli

_WHY = "the serve extra is not installed (pip install -e '.[serve]'): "
httpclient = pytest.importorskip("tritonclient.http", reason=_WHY + "no tritonclient")
grpcclient = pytest.importorskip("tritonclient.grpc", reason=_WHY + "no tritonclient")
from tritonclient.utils import InferenceServerException  # noqa: E402

try:
    SERVER = find_server()
except GraphpruneError as e:
    pytest.skip(_WHY + str(e), allow_module_level=True)

pytestmark = pytest.mark.slow  # server start-ups (seconds each) and load tests

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def served(export, tmp_path_factory):
    """Four python-backend models on one server: lin (batching), multi (two inputs, 100 ms batching window),
    vit (token drop: ai.graphprune ops), fixed (max_batch_size 0). Yields (server, {name: source model})."""
    from graphprune.deploy import TritonServer

    folder = tmp_path_factory.mktemp("served")
    vit, _ = token_drop_model(export, tmp_path_factory.mktemp("vit_tokens"))
    sources = {
        "lin": linear_model(folder / "lin.onnx", external=True),
        "multi": multi_io_model(folder / "multi.onnx"),
        "vit": vit,
        "fixed": fixed_batch_model(folder / "fixed.onnx"),
    }
    repo = folder / "repo"
    for name, src in sources.items():
        deploy(src, repo, name=name, backend="python", threads=1,
               queue_delay_us=100_000 if name == "multi" else 500)
    states: list = []
    srv = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), server=SERVER)
    srv.states = states
    try:
        srv.start()
        srv.wait_ready(timeout=240, on_state=lambda *s: states.append(s))
        yield srv, sources
    finally:
        pgid = srv.proc.pid if srv.proc is not None else None
        srv.stop()
        assert pgid is None or not group_alive(pgid), "tritonserver or a python stub outlived stop()"


def _client(srv, protocol):
    return (httpclient.InferenceServerClient(srv.http_url, concurrency=8, network_timeout=60) if protocol == "http"
            else grpcclient.InferenceServerClient(srv.grpc_url))


def _infer(client, protocol, model, feeds, outputs):
    from tritonclient.utils import np_to_triton_dtype

    mod = httpclient if protocol == "http" else grpcclient
    inputs = []
    for name, arr in feeds.items():
        t = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        inputs.append(t)
    res = client.infer(model, inputs)
    return [res.as_numpy(o) for o in outputs]


def _feeds(name, batch, rng, seq=6):
    if name == "lin":
        return {"X": rng.standard_normal((batch, 8)).astype(np.float32)}
    if name == "multi":
        return {"X": rng.standard_normal((batch, 4)).astype(np.float32),
                "ids": rng.integers(0, 10, (batch, seq)).astype(np.int64)}
    if name == "vit":
        return {"x": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    return {"X": rng.standard_normal((1, 8)).astype(np.float32)}


OUTPUTS = {"lin": ["Y"], "multi": ["Y", "Z"], "fixed": ["Y"]}


def _outputs(name, sources):
    if name not in OUTPUTS:
        import onnx

        OUTPUTS[name] = [o.name for o in onnx.load(str(sources[name]), load_external_data=False).graph.output]
    return OUTPUTS[name]


def test_every_model_reported_loading_then_ready(served):
    srv, sources = served
    by_model: dict = {}
    for name, _version, state, _reason in srv.states:
        by_model.setdefault(name, []).append(state)
    assert {n: s[-1] for n, s in by_model.items()} == {n: "READY" for n in sources}
    assert all(s[0] == "LOADING" for s in by_model.values()), by_model


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_outputs_equal_onnxruntime_at_batch_1_and_dynamic_batch(served, protocol):
    srv, sources = served
    client = _client(srv, protocol)
    rng = np.random.default_rng(7)
    for name in sources:
        for batch in ((1,) if name == "fixed" else (1, 3)):
            feeds = _feeds(name, batch, rng)
            outs = _outputs(name, sources)
            got = _infer(client, protocol, name, feeds, outs)
            want = ort_outputs(sources[name], feeds)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.dtype == w.dtype, (name, batch)
                np.testing.assert_allclose(g, w, **TOL, err_msg=f"{name} batch {batch} over {protocol}")
    client.close()


def _stats(client, model):
    s = client.get_inference_statistics(model)["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


def _count_after(client, model, expected: int, wait: float = 5.0) -> int:
    """The model's inference count once it reaches ``expected`` (the server records a request's statistics just
    after it answers it, so the last one can lag the client by a moment), or after ``wait`` seconds."""
    end = time.monotonic() + wait
    while True:
        count = _stats(client, model)[0]
        if count >= expected or time.monotonic() > end:
            return count
        time.sleep(0.05)


def test_dynamic_batcher_joins_concurrent_requests(served):
    srv, sources = served
    client = _client(srv, "http")
    rng = np.random.default_rng(11)
    feeds = [_feeds("multi", b, rng) for b in (1, 2, 1, 3, 1)]
    inf0, exe0 = _stats(client, "multi")
    pending = []
    for f in feeds:
        inputs = []
        for name, arr in f.items():
            t = httpclient.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
            t.set_data_from_numpy(arr)
            inputs.append(t)
        pending.append(client.async_infer("multi", inputs))
    for f, p in zip(feeds, pending):
        res = p.get_result(timeout=60)
        for out, want in zip(("Y", "Z"), ort_outputs(sources["multi"], f)):
            np.testing.assert_allclose(res.as_numpy(out), want, **TOL)
    inf1, exe1 = _stats(client, "multi")
    assert inf1 - inf0 == 8  # items: 1 + 2 + 1 + 3 + 1
    assert exe1 - exe0 < len(feeds), "the 100 ms batching window joined no requests"
    client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_errors_and_the_server_keeps_serving(served, protocol):
    srv, sources = served
    client = _client(srv, protocol)
    rng = np.random.default_rng(5)
    good = _feeds("multi", 2, rng)
    bad = [
        ("lin", {"X": rng.standard_normal((1, 7)).astype(np.float32)}, "shape"),
        ("lin", {"X": rng.standard_normal((1, 8))}, "FP64"),  # float64: wrong dtype
        ("lin", {"W": rng.standard_normal((1, 8)).astype(np.float32)}, "'W'"),
        ("multi", {"X": good["X"]}, "'ids'"),
        ("multi", good | {"ids": np.full((2, 6), 99, np.int64)}, "onnxruntime"),  # passes Triton, fails in ORT
        ("fixed", {"X": rng.standard_normal((2, 8)).astype(np.float32)}, "shape"),
    ]
    for name, feeds, hint in bad:
        with pytest.raises(InferenceServerException) as info:
            _infer(client, protocol, name, feeds, _outputs(name, sources))
        assert hint.lower() in str(info.value).lower(), (name, hint, str(info.value))
    got = _infer(client, protocol, "multi", good, ["Y", "Z"])
    for g, w in zip(got, ort_outputs(sources["multi"], good)):
        np.testing.assert_allclose(g, w, **TOL)
    assert client.is_server_live() and client.is_model_ready("multi")
    client.close()


def test_bad_request_batched_with_good_ones_fails_alone(served):
    srv, sources = served
    client = _client(srv, "http")
    rng = np.random.default_rng(9)
    feeds = [_feeds("multi", 1, rng), _feeds("multi", 1, rng) | {"ids": np.full((1, 6), 50, np.int64)},
             _feeds("multi", 2, rng)]
    pending = []
    for f in feeds:
        inputs = []
        for name, arr in f.items():
            t = httpclient.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
            t.set_data_from_numpy(arr)
            inputs.append(t)
        pending.append(client.async_infer("multi", inputs))
    results = []
    for p in pending:
        try:
            results.append(p.get_result(timeout=60))
        except InferenceServerException as e:
            results.append(e)
    assert isinstance(results[1], InferenceServerException) and "onnxruntime" in str(results[1])
    for i in (0, 2):
        for out, want in zip(("Y", "Z"), ort_outputs(sources["multi"], feeds[i])):
            np.testing.assert_allclose(results[i].as_numpy(out), want, **TOL)
    client.close()


def test_loadtest_concurrency_4_finishes_with_zero_errors(served, capsys):
    srv, _ = served
    client = _client(srv, "http")
    before, _ = _stats(client, "lin")
    code, out, err = cli(["loadtest", srv.http_url, "--model", "lin", "--concurrency", "4", "--duration", "2",
                          "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    (level,) = res["levels"]
    r = level["models"]["lin"]
    assert level["concurrency"] == 4 and r["errors"] == 0 and r["requests"] > 0
    assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert r["rps"] == pytest.approx(r["requests"] / r["seconds"], rel=1e-3)
    after = _count_after(client, "lin", before + r["requests"] + 3)
    assert after - before == r["requests"] + 3  # every timed request and the 3 warm-ups reached the model
    client.close()


def test_loadtest_compare_interleaves_windows_over_grpc(served):
    srv, _ = served
    client = _client(srv, "http")
    before = {m: _stats(client, m)[0] for m in ("lin", "fixed")}
    seen: list[str] = []
    res = load_test(srv.grpc_url, "lin", compare="fixed", concurrency=[2], duration=1.0, windows=2,
                    protocol="grpc", progress=seen.append)
    assert seen == ["concurrency 2: lin window 1/2", "concurrency 2: fixed window 1/2",
                    "concurrency 2: fixed window 2/2", "concurrency 2: lin window 2/2"]
    (level,) = res["levels"]
    a, b = level["models"]["lin"], level["models"]["fixed"]
    assert a["errors"] == b["errors"] == 0 and a["requests"] > 0 and b["requests"] > 0
    assert level["ratio"] == pytest.approx(a["rps"] / b["rps"], rel=1e-3)
    for m, r in (("lin", a), ("fixed", b)):
        assert _count_after(client, m, before[m] + r["requests"] + 3) - before[m] == r["requests"] + 3
    client.close()


def test_loadtest_user_errors(served, capsys):
    srv, _ = served
    for args, message in [
        (["loadtest", srv.http_url, "-m", "nope", "--duration", "1"], "model 'nope' is not ready"),
        (["loadtest", f"127.0.0.1:{free_port()}", "-m", "lin", "--duration", "1"], "no Triton server answers"),
        (["loadtest", "localhost", "-m", "lin"], "expected HOST:PORT"),
        (["loadtest", srv.http_url, "-m", "lin", "--concurrency", "0"], "--concurrency"),
        (["loadtest", srv.http_url, "-m", "lin", "--batch", "9", "--duration", "1"], "max_batch_size 8"),
    ]:
        code, _, err = cli(args, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def _read_lines(proc, lines: queue.Queue) -> None:
    for raw in proc.stdout:
        lines.put(raw.decode(errors="replace"))
    lines.put(None)


def test_cli_serve_stops_cleanly_on_sigterm(tmp_path):
    repo = tmp_path / "repo"
    deploy(linear_model(tmp_path / "lin.onnx"), repo, backend="python", threads=1)
    http = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "graphprune.cli", "serve", str(repo), "--http-port", str(http),
                             "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()
    text, server_pid = [], None
    try:
        deadline = time.monotonic() + 180
        while server_pid is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            text.append(line)
            if "tritonserver pid" in line:
                server_pid = int(line.split("tritonserver pid")[1].split(")")[0])
        assert server_pid is not None, "".join(text)
        assert "model lin version 1: LOADING" in "".join(text) and "model lin version 1: READY" in "".join(text)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        x = np.ones((2, 8), np.float32)
        got = _infer(client, "http", "lin", {"X": x}, ["Y"])[0]
        np.testing.assert_allclose(got, ort_outputs(tmp_path / "lin.onnx", {"X": x})[0], **TOL)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        while (line := lines.get(timeout=10)) is not None:
            text.append(line)
        assert "tritonserver stopped (exit code 0)" in "".join(text), "".join(text)
        assert not group_alive(server_pid), "tritonserver or its python stub is still running"
        assert not group_alive(proc.pid)
    finally:
        for pgid in (proc.pid, server_pid):
            if pgid is not None and group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_serve_names_a_model_that_fails_to_load(tmp_path):
    from graphprune.deploy import TritonServer

    repo = tmp_path / "repo"
    d = deploy(linear_model(tmp_path / "lin.onnx"), repo, name="broken", backend="python")
    (d.path / "model.onnx").write_bytes(b"garbage")
    assert any("1/model.onnx changed" in p for p in check_manifest(d.path))
    srv = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), server=SERVER)
    states: list = []
    try:
        srv.start()
        with pytest.raises(GraphpruneError, match="model 'broken' failed to load"):
            srv.wait_ready(timeout=120, on_state=lambda *s: states.append(s))
    finally:
        pgid = srv.proc.pid if srv.proc is not None else None
        srv.stop()
    assert ("broken", "1", "LOADING", "") in states and states[-1][2] == "UNAVAILABLE"
    assert pgid is not None and not group_alive(pgid)


@pytest.mark.skipif(not SERVER.bundled, reason="the tritonserver found is not the bundled one (it may have the ORT backend)")
def test_bundled_server_refuses_onnxruntime_backend_models(tmp_path, capsys):
    repo = tmp_path / "repo"
    deploy(linear_model(tmp_path / "lin.onnx"), repo)  # default backend: onnxruntime
    code, _, err = cli(["serve", repo, "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                        "--metrics-port", str(free_port())], capsys)
    assert code == 2 and "uses the onnxruntime backend" in err and "--backend python" in err
