"""Fidelity through the real CLI: --data in, disjoint calibration/verification split, the report's data object,
synthetic runs that say so, planted breaks caught on real data, and every bad-data case as one line + exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.passes import register
from graphprune.passes.base import GraphPass, GraphResult
from tests.test_pipeline import cli

RNG = np.random.default_rng(0)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save_model(onnx.shape_inference.infer_shapes(model), str(path))
    return path


def mlp(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    """X[B,16] → MatMul → Relu → MatMul+bias → Relu → MatMul → logits[B,10]; the second hidden layer is one
    prunable group (the first is the input stem, left alone by default). The weights depend on ``seed`` only (a
    generator of its own: other test files build it too, in whatever order pytest-xdist runs them)."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((16, 24)) / 4).astype(np.float32)
    w1 = (rng.standard_normal((24, hidden)) / 5).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, 10)) / np.sqrt(hidden)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W0"], ["a0"], name="fc0"), helper.make_node("Relu", ["a0"], ["a"]),
         helper.make_node("MatMul", ["a", "W1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "B1"], ["h1"]),
         helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["logits"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"),
         numpy_helper.from_array(w2, "W2")])
    return _save(g, path)


def text_encoder(path: Path, vocab: int = 20) -> Path:
    """Token ids → embedding → masked mean → L2-normalised sentence embedding [B, 8]."""
    emb = RNG.standard_normal((vocab, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["e"]),
         helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]), helper.make_node("Mul", ["e", "m3"], ["em"]),
         helper.make_node("ReduceSum", ["em", "ax1"], ["s"], keepdims=0),
         helper.make_node("LpNormalization", ["s"], ["sentence_embedding"], axis=-1, p=2)],
        "enc", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(np.array([2], np.int64), "ax"),
         numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    return _save(g, path)


def image_model(path: Path) -> Path:
    """NCHW [B,3,8,8] → Conv → ReduceMean → logits [B,4]."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["c", "axes"], ["logits"], keepdims=0)],
        "img", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    return _save(g, path)


def tokenizer(path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow",
             "big", "small", "red", "blue", "and", "then"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return path


def texts(path: Path, n: int) -> Path:
    words = "the a cat dog sat ran on mat fast slow big small red blue and then".split()
    rng = np.random.default_rng(1)
    path.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(n)) + "\n")
    return path


@register
class _PlantedBreak(GraphPass):
    """Test-only pass: permutes the rows of one weight matrix (a bug a pass could make)."""

    name = "test_planted_break"

    def call(self, model: ir.Model) -> GraphResult:
        v = model.graph.initializers["W2"]
        w = v.const_value.numpy()
        v.const_value = ir.tensor(w[np.random.default_rng(3).permutation(len(w))], name="W2")
        return GraphResult(model, True)


def test_synthetic_run_says_so(tmp_path, capsys):
    src, out, rep = mlp(tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = cli(["optimize", src, "-o", out, "--report", rep], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["data"]["source"] == "synthetic" and report["verify"]["data_source"] == "synthetic"
    # cleanup only: 2 of the 8 generated verification samples (pipeline.cleanup_verify_samples), and it says why
    assert report["data"]["calibration_samples"] == 8 and report["data"]["verify_samples"] == 2
    assert report["data"]["verify_samples_reason"].startswith("every pass is exact housekeeping (cleanup)")
    assert "verification used 2 synthetic inputs" in err and "--data" in err
    assert "passed (synthetic inputs)" in stdout
    assert report["verify"]["outputs"][0]["kind"] == "logits"


def test_npz_data_split_is_disjoint_and_counted(tmp_path, capsys):
    src, out, rep = mlp(tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    np.savez(tmp_path / "d.npz", X=RNG.standard_normal((50, 16)).astype(np.float32))
    code, stdout, err = cli(["optimize", src, "-o", out, "--report", rep, "--data", tmp_path / "d.npz",
                             "--calibration-samples", 30, "--verify-samples", 20], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["data"] == {"source": "user", "description": report["data"]["description"],
                              "calibration_samples": 30, "verify_samples": 20, "overlap_samples": 0}
    assert report["verify"]["samples"] == 20
    assert "synthetic" not in err and "held-out real" in stdout
    assert report["warnings"] == []


def test_too_small_for_both_names_numbers_unless_overlap(tmp_path, capsys):
    src, out = mlp(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    np.savez(tmp_path / "d.npz", X=RNG.standard_normal((40, 16)).astype(np.float32))
    code, _, err = cli(["optimize", src, "-o", out, "--data", tmp_path / "d.npz"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "40" in err and "192" in err and not out.exists()
    rep = tmp_path / "r.json"
    code, _, err = cli(["optimize", src, "-o", out, "--data", tmp_path / "d.npz", "--allow-overlap", "--report", rep],
                       capsys)
    assert code == 0, err
    d = json.loads(rep.read_text())["data"]
    assert d["calibration_samples"] == 40 and d["verify_samples"] == 40 and d["overlap_samples"] == 40


def test_planted_break_caught_on_real_data(tmp_path, capsys):
    src, out, rep = mlp(tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    cfg = tmp_path / "p.yaml"
    cfg.write_text("passes:\n  - name: test_planted_break\n")
    np.savez(tmp_path / "d.npz", X=RNG.standard_normal((100, 16)).astype(np.float32))
    code, _, err = cli(["optimize", src, "-o", out, "--config", cfg, "--data", tmp_path / "d.npz",
                        "--calibration-samples", 36, "--verify-samples", 64, "--report", rep], capsys)
    assert code == 2 and "verification failed" in err and not out.exists()
    v = json.loads(rep.read_text())["verify"]
    assert not v["passed"] and v["outputs"][0]["metrics"]["top1"] < 0.9
    assert "on 64 held-out real samples" in err
    # without data the failure says it was judged on synthetic inputs
    code, _, err = cli(["optimize", src, "-o", out, "--config", cfg], capsys)
    assert code == 2 and "on 8 synthetic inputs" in err and "--data" in err and len(err.splitlines()) == 1


def test_text_data_end_to_end_with_yaml_data_mapping(tmp_path, capsys):
    src = text_encoder(tmp_path / "enc.onnx")
    tokenizer(tmp_path / "tokenizer.json")
    texts(tmp_path / "texts.txt", 30)
    cfg = tmp_path / "p.yaml"  # data paths are relative to the config file
    cfg.write_text("data:\n  path: texts.txt\n  tokenizer: tokenizer.json\n  max_length: 6\n"
                   "  calibration_samples: 10\n  verify_samples: 20\npasses:\n  - name: cleanup\n")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = cli(["optimize", src, "-o", out, "--config", cfg, "--report", rep], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["data"]["source"] == "user" and report["data"]["verify_samples"] == 20
    o = report["verify"]["outputs"][0]
    assert o["kind"] == "embedding" and o["metrics"]["neighbor_agreement"] == 1.0
    assert o["metrics"]["cosine"]["min"] > 0.9999


def test_image_folder_data(tmp_path, capsys):
    from PIL import Image

    src = image_model(tmp_path / "img.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(RNG.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = cli(["optimize", src, "-o", out, "--data", folder, "--calibration-samples", 4,
                        "--verify-samples", 8, "--report", rep], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["data"]["source"] == "user" and report["verify"]["samples"] == 8


def test_channel_prune_defaults_follow_the_data(tmp_path, capsys):
    src = mlp(tmp_path / "m.onnx", hidden=64)
    np.savez(tmp_path / "d.npz", X=RNG.standard_normal((96, 16)).astype(np.float32))
    rep = tmp_path / "r.json"
    args = ["optimize", src, "-o", tmp_path / "o.onnx", "--prune-channels", 0.25, "--report", rep, "--force"]
    code, _, err = cli(args + ["--data", tmp_path / "d.npz", "--calibration-samples", 64, "--verify-samples", 32], capsys)
    assert code == 0, err
    real = json.loads(rep.read_text())["passes"][0]
    assert real["info"]["method"]["importance"] == "activation" and real["info"]["method"]["reconstruct"] is True
    assert any("refit" in r for r in real["rewritten"]) and "warnings" not in real
    code, _, err = cli(args, capsys)
    assert code == 0, err
    synth = json.loads(rep.read_text())["passes"][0]
    assert synth["info"]["method"] == {"importance": "l2", "global": False, "reconstruct": False, "allocate": "score",
                                       "why": "no real calibration samples: magnitude defaults"}
    # asking for activation importance without data: done, with a warning in the pass entry and on stderr
    cfg = tmp_path / "p.yaml"
    cfg.write_text("passes:\n  - name: channel_prune\n    ratio: 0.25\n    importance: activation\n")
    code, _, err = cli(["optimize", src, "-o", tmp_path / "o2.onnx", "--config", cfg, "--report", rep, "--force"], capsys)
    assert code == 0, err
    entry = json.loads(rep.read_text())["passes"][0]
    assert "synthetic" in entry["warnings"][0] and "channel_prune: activation importance" in err


@pytest.mark.parametrize("case, needle", [
    ("missing", "not found"),
    ("empty_txt", "empty"),
    ("names", "['Z']"),
    ("dtype", "int64"),
    ("rank", "rank"),
    ("bad_image", "broken.png"),
    ("bad_tokenizer", "tok.json"),
    ("no_tokenizer", "--tokenizer"),
    ("too_few", "need"),
])
def test_bad_data_is_one_line_exit_2_nothing_written(tmp_path, capsys, case, needle):
    src, out = mlp(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    extra: list = []
    if case == "missing":
        data = tmp_path / "nope.npz"
    elif case == "empty_txt":
        data = tmp_path / "t.txt"
        data.write_text("\n")
        extra = ["--tokenizer", tokenizer(tmp_path / "tokenizer.json")]
        src = text_encoder(tmp_path / "enc.onnx")
    elif case == "names":
        data = tmp_path / "d.npz"
        np.savez(data, Z=np.zeros((4, 16), np.float32))
    elif case == "dtype":
        data = tmp_path / "d.npz"
        np.savez(data, X=np.zeros((4, 16), np.int64))
    elif case == "rank":
        data = tmp_path / "d.npz"
        np.savez(data, X=np.zeros((4, 2, 16), np.float32))
    elif case == "bad_image":
        src = image_model(tmp_path / "img.onnx")
        data = tmp_path / "imgs"
        data.mkdir()
        (data / "broken.png").write_bytes(b"not a png")
    elif case in ("bad_tokenizer", "no_tokenizer"):
        src = text_encoder(tmp_path / "enc.onnx")
        data = texts(tmp_path / "t.txt", 10)
        if case == "bad_tokenizer":
            (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
            extra = ["--tokenizer", tmp_path / "tok.json"]
    else:
        data = tmp_path / "d.npz"
        np.savez(data, X=np.zeros((10, 16), np.float32))
        extra = ["--calibration-samples", 8, "--verify-samples", 8]
    code, _, err = cli(["optimize", src, "-o", out, "--data", data, *extra], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--dat", "x.npz"], "--data"),                      # a mistyped option names the close ones
    (["--calibration-samples", "0"], "--calibration-samples"),
    (["--verify-samples", "-3"], "--verify-samples"),
])
def test_option_errors_are_one_line_exit_2(tmp_path, capsys, args, needle):
    src, out = mlp(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    code, _, err = cli(["optimize", src, "-o", out, *args], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err and "internal error" not in err, err
    assert not out.exists()
