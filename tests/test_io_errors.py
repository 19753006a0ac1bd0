"""Bad input: one line on stderr, exit code 2, and no file written — through the real CLI entry point."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from graphprune.cli import main
from graphprune.errors import ModelLoadError
from graphprune.io import load_model, save_model
from tests.helpers import linear_model, set_external_location


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err.strip()


def assert_user_error(args, capsys, out: Path, needle: str) -> None:
    code, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not out.with_name(out.name + ".data").exists()


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", tmp_path / "nope.onnx", "-o", out], capsys, out, "not found")


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", bad, "-o", out], capsys, out, "not a valid ONNX model")


def test_text_file_is_not_onnx(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello\n")
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", bad, "-o", out], capsys, out, "not a valid ONNX model")


def test_truncated(tmp_path, capsys):
    src = linear_model(tmp_path / "m.onnx", external=False)
    data = src.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", cut, "-o", out], capsys, out, "not a valid ONNX model")


def test_missing_external_data(tmp_path, capsys):
    src = linear_model(tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", src, "-o", out], capsys, out, "missing")


def test_truncated_external_data(tmp_path, capsys):
    src = linear_model(tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:16])
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", src, "-o", out], capsys, out, "truncated")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_folder(tmp_path, capsys, kind):
    inner = tmp_path / "model"
    inner.mkdir()
    src = linear_model(inner / "m.onnx")
    outside = tmp_path / "secret.bin"
    os.replace(inner / "m.onnx.data", outside)
    if kind == "dotdot":
        set_external_location(src, "../secret.bin")
    elif kind == "absolute":
        set_external_location(src, str(outside))
    else:
        (inner / "m.onnx.data").symlink_to(outside)
    out = tmp_path / "o.onnx"
    code, err = run_cli(["optimize", src, "-o", out], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "refused" in err
    assert not out.exists()
    with pytest.raises(ModelLoadError):
        load_model(src)


def test_output_equals_input(tmp_path, capsys):
    src = linear_model(tmp_path / "m.onnx")
    before = src.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    code, err = run_cli(["optimize", src, "-o", src], capsys)
    assert code == 2 and "overwrite" in err and len(err.splitlines()) == 1
    assert (src.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()) == before


def test_output_equal_via_other_spelling(tmp_path, capsys, monkeypatch):
    src = linear_model(tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["optimize", src, "-o", "./sub/../m.onnx"], capsys)
    assert code == 2 and "overwrite" in err


@pytest.mark.parametrize(
    "text, key",
    [
        ("passes:\n  - name: cleanup\n    bogus: 1\n", "bogus"),
        ("passes:\n  - name: no_such_pass\n", "no_such_pass"),
        ("pases: []\n", "pases"),
        ("passes:\n  - name: cleanup\nverify:\n  cosine_min: 7\n", "cosine_min"),
        ("passes:\n  - name: constant_folding\n    input_size_limit: -3\n", "input_size_limit"),
        ("passes: [\n", "invalid YAML"),
        ("passes:\n  - keep_ratio: 0.5\n", "name"),
    ],
)
def test_invalid_yaml_config(tmp_path, capsys, text, key):
    src = linear_model(tmp_path / "m.onnx")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(text)
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", src, "-o", out, "--config", cfg], capsys, out, key)


def test_save_is_atomic_and_loadable(tmp_path):
    src = linear_model(tmp_path / "m.onnx")
    model = load_model(src)
    out = save_model(model, tmp_path / "o.onnx", inputs=(src,), external_threshold=0)
    assert (tmp_path / "o.onnx.data").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.onnx")]  # no temp folder left
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    a = ort.InferenceSession(str(src)).run(None, {"X": x})[0]
    b = ort.InferenceSession(str(out)).run(None, {"X": x})[0]
    np.testing.assert_array_equal(a, b)
    # single-file save below the threshold
    out2 = save_model(load_model(src), tmp_path / "p.onnx", inputs=(src,))
    assert not (tmp_path / "p.onnx.data").exists()
    np.testing.assert_array_equal(ort.InferenceSession(str(out2)).run(None, {"X": x})[0], a)


def test_save_refuses_data_file_in_use(tmp_path):
    from graphprune.errors import GraphpruneError

    src = linear_model(tmp_path / "m.onnx")
    model = load_model(src)
    # "m.onnx" output in another folder is fine; output whose .data is the model's live data file is not
    (tmp_path / "m").mkdir()
    with pytest.raises(GraphpruneError, match="overwrite"):
        save_model(model, tmp_path / "m.onnx")


# ------------------------------------------------------------------ invalid models: inspect and optimize refuse them


def _save_model(path: Path, nodes, inputs, outputs, opset: int = 18, ir_version: int = 10, domains=()) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, 1) for d in domains])
    proto.ir_version = ir_version
    onnx.save(proto, path)
    return path


def _invalid(kind: str, folder: Path) -> Path:
    from onnx import TensorProto
    from onnx import helper as h

    x = h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    relu = [h.make_node("Relu", ["x"], ["y"])]
    path = folder / f"{kind}.onnx"
    if kind == "undefined":
        return _save_model(path, [h.make_node("Add", ["x", "missing"], ["y"])], [x], [y])
    if kind == "cycle":
        return _save_model(path, [h.make_node("Add", ["x", "b"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
                                  h.make_node("Identity", ["a"], ["y"])], [x], [y])
    if kind == "domain":
        return _save_model(path, [h.make_node("Foo", ["x"], ["y"], domain="com.nowhere")], [x], [y],
                           domains=["com.nowhere"])
    if kind == "opset":
        return _save_model(path, relu, [x], [y], opset=99)
    if kind == "ir":
        return _save_model(path, relu, [x], [y], ir_version=99)
    if kind == "negative_dim":
        return _save_model(path, relu, [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, -3])], [y])
    if kind == "string_input":
        s = [h.make_tensor_value_info(n, TensorProto.STRING, [1, 4]) for n in ("x", "y")]
        return _save_model(path, [h.make_node("Identity", ["x"], ["y"])], s[:1], s[1:])
    if kind == "unknown_op":
        return _save_model(path, [h.make_node("Relux", ["x"], ["y"])], [x], [y])
    raise AssertionError(kind)


INVALID = {
    "undefined": "reads 'missing', which no input, initializer or node produces",
    "cycle": "the graph has a cycle or is not topologically sorted",
    "domain": "domain 'com.nowhere' is not one ONNX Runtime provides",
    "opset": "default-domain opset 99 is newer",
    "ir": "IR version 99 is newer",
    "negative_dim": "input 'x' has a negative dim (-3)",
    "string_input": "input 'x' is a string tensor",
    "unknown_op": "no standard op 'Relux' at opset 18",
}


@pytest.mark.parametrize("kind", sorted(INVALID))
def test_invalid_models_are_user_errors(kind, tmp_path, capsys):
    path = _invalid(kind, tmp_path)
    out = tmp_path / "o.onnx"
    code, err = run_cli(["inspect", path], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and INVALID[kind] in err, err
    assert_user_error(["optimize", path, "-o", out], capsys, out, INVALID[kind])
    with pytest.raises(ModelLoadError, match="is not a valid model"):
        load_model(path)


def test_internal_errors_are_one_line_with_the_message(tmp_path, capsys, monkeypatch):
    """An unexpected exception: exit 1, its type and first message line, the --debug hint; never an empty line."""
    import graphprune.analysis as analysis

    def boom(*a, **k):
        raise RuntimeError("first line of the message\nsecond line\nthird")

    monkeypatch.setattr(analysis, "summarize", boom)
    code, err = run_cli(["inspect", linear_model(tmp_path / "m.onnx")], capsys)
    assert code == 1
    assert err == "internal error: RuntimeError: first line of the message (run with --debug for the traceback)"


@pytest.mark.parametrize("args,needle", [
    (["--token-keep", "0"], "--token-keep (token_drop).keep_ratio"),
    (["--prune-channels", "1.0"], "--prune-channels (channel_prune).ratio"),
    (["--sparse-attention", "sliding_window:window=0"], "--sparse-attention (sparse_attention).window"),
])
def test_shortcut_errors_name_the_flag_as_typed(args, needle, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert_user_error(["optimize", linear_model(tmp_path / "m.onnx"), "-o", out, *args], capsys, out, needle)
