"""Bad input: one line on stderr, exit code 2, and no file written — through the real CLI entry point."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
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


def _save_model(path: Path, nodes, inputs, outputs, opset: int = 18, ir_version: int = 10, domains=(),
                initializers=()) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
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
    if kind in _BAD_TENSORS:  # an initializer whose stored data does not fit its dims: Add(x, w)
        dims, fill = _BAD_TENSORS[kind]
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=dims)
        fill(w)
        if kind == "constant_raw_size":  # the same fault in a Constant node's tensor attribute
            return _save_model(path, [h.make_node("Constant", [], ["w"], value=w), h.make_node("Add", ["x", "w"], ["y"])],
                               [x], [y])
        return _save_model(path, [h.make_node("Add", ["x", "w"], ["y"])], [x], [y], initializers=[w])
    raise AssertionError(kind)


def _raw(n: int):
    return lambda t: setattr(t, "raw_data", b"\0" * n)


_BAD_TENSORS = {  # kind: (dims, how the data is filled in)
    "raw_size": ([1, 4], _raw(12)),
    "negative_init_dim": ([1, -4], _raw(16)),
    "huge_dims": ([1000000, 1000000], _raw(16)),
    "huge_dims_no_data": ([1000000, 1000000], lambda t: None),
    "typed_count": ([1, 4], lambda t: t.float_data.extend([1.0, 2.0, 3.0])),
    "constant_raw_size": ([1, 4], _raw(20)),
}


INVALID = {
    "undefined": "reads 'missing', which no input, initializer or node produces",
    "cycle": "the graph has a cycle or is not topologically sorted",
    "domain": "domain 'com.nowhere' is not one ONNX Runtime provides",
    "opset": "default-domain opset 99 is newer",
    "ir": "IR version 99 is newer",
    "negative_dim": "input 'x' has a negative dim (-3)",
    "string_input": "input 'x' is a string tensor",
    "unknown_op": "no standard op 'Relux' at opset 18",
    "raw_size": "initializer 'w' holds 12 bytes of data, but its shape [1, 4] of float needs 16",
    "negative_init_dim": "initializer 'w' has a negative dim (-4) on axis 1",
    "huge_dims": "initializer 'w' holds 16 bytes of data, but its shape [1000000, 1000000] of float needs 4000000000000",
    "huge_dims_no_data": "initializer 'w' holds no data, but its shape [1000000, 1000000] of float needs 1000000000000",
    "typed_count": "initializer 'w' holds 3 values, but its shape [1, 4] of float needs 4",
    "constant_raw_size": "attribute 'value' holds 20 bytes of data, but its shape [1, 4] of float needs 16",
}


def _broken_file(kind: str, folder: Path) -> Path:
    """A model file that cannot be read (or whose external data cannot be), for the matrix below."""
    if kind == "missing":
        return folder / "nope.onnx"
    bad = folder / "bad.onnx"
    if kind == "not_onnx":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    elif kind == "text":
        bad.write_text("hello\n")
    elif kind == "truncated":
        data = linear_model(folder / "m.onnx", external=False).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "missing_external":
        bad = linear_model(folder / "m.onnx")
        (folder / "m.onnx.data").unlink()
    elif kind == "truncated_external":
        bad = linear_model(folder / "m.onnx")
        data = folder / "m.onnx.data"
        data.write_bytes(data.read_bytes()[:16])
    elif kind == "external_length":  # the data file is long enough, the tensor's declared length is not its size
        bad = linear_model(folder / "m.onnx")
        proto = onnx.load(str(bad), load_external_data=False)
        entry = next(e for e in proto.graph.initializer[0].external_data if e.key == "length")
        entry.value = "16"
        onnx.save_model(proto, str(bad))
    elif kind in ("dotdot", "absolute", "symlink"):
        inner = folder / "model"
        inner.mkdir()
        bad = linear_model(inner / "m.onnx")
        outside = folder / "secret.bin"
        os.replace(inner / "m.onnx.data", outside)
        if kind == "dotdot":
            set_external_location(bad, "../secret.bin")
        elif kind == "absolute":
            set_external_location(bad, str(outside))
        else:
            (inner / "m.onnx.data").symlink_to(outside)
    else:
        raise AssertionError(kind)
    return bad


BROKEN = {
    "missing": "not found",
    "not_onnx": "not a valid ONNX model",
    "text": "not a valid ONNX model",
    "truncated": "not a valid ONNX model",
    "missing_external": "missing",
    "truncated_external": "truncated",
    "external_length": "initializer 'W' has 16 bytes of external data, but its shape [8, 4] of float needs 128",
    "dotdot": "refused",
    "absolute": "refused",
    "symlink": "refused",
}
MALFORMED = sorted(INVALID) + sorted(BROKEN)


@pytest.mark.parametrize("command", ["optimize", "inspect", "bench"])
@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_models_are_user_errors(kind, command, tmp_path, capsys):
    """Every command that loads a model meets the error contract on every malformed model: exit 2, one line
    naming the problem, no traceback, nothing written (they share ``io.load_model``'s validation)."""
    path = _invalid(kind, tmp_path) if kind in INVALID else _broken_file(kind, tmp_path)
    needle = INVALID.get(kind) or BROKEN[kind]
    out = tmp_path / "o.onnx"
    args = {"optimize": ["optimize", path, "-o", out], "inspect": ["inspect", path], "bench": ["bench", path]}[command]
    assert_user_error(args, capsys, out, needle)
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_bench_checks_the_baseline_too(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    good = linear_model(tmp_path / "good.onnx")
    bad = _invalid("raw_size", tmp_path)
    assert_user_error(["bench", good, "--baseline", bad], capsys, out, INVALID["raw_size"])


def test_load_model_accepts_what_the_size_checks_allow(tmp_path):
    """The stored-size checks read sizes right for each storage form: typed fields, raw bytes, packed int4,
    complex, empty tensors and a Constant; the loaded values equal what was written."""
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    x = h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    tensors = [
        h.make_tensor("a", TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0]),
        numpy_helper.from_array(np.arange(4, dtype=np.float16).reshape(1, 4), "b"),
        h.make_tensor("c", TensorProto.FLOAT16, [1, 4], np.arange(4, dtype=np.float16)),
        h.make_tensor("d", TensorProto.INT4, [3], [1, -2, 3]),
        h.make_tensor("e", TensorProto.COMPLEX64, [2], [1 + 2j, 3 - 1j]),
        h.make_tensor("f", TensorProto.FLOAT, [0, 4], []),
        h.make_tensor("g", TensorProto.INT64, [2], [5, 6]),
    ]
    nodes = [h.make_node("Constant", [], ["k"], value=h.make_tensor("kv", TensorProto.FLOAT, [1, 4], [0.5] * 4)),
             h.make_node("Add", ["x", "a"], ["t"]), h.make_node("Add", ["t", "k"], ["y"])]
    path = _save_model(tmp_path / "ok.onnx", nodes, [x], [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                       initializers=tensors)
    model = load_model(path)
    got = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    np.testing.assert_array_equal(got["a"], [[1, 2, 3, 4]])
    np.testing.assert_array_equal(got["b"].astype(np.float32), [[0, 1, 2, 3]])
    np.testing.assert_array_equal(got["d"].astype(np.int8), [1, -2, 3])
    np.testing.assert_array_equal(got["e"], [1 + 2j, 3 - 1j])
    assert got["f"].shape == (0, 4)


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
