"""graphprune.data: npz / image folder / text + tokenizer / feed-dict loading, split, batches, synthetic data."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphprune.analysis.inputs import example_inputs
from graphprune.data import IMAGENET_MEAN, IMAGENET_STD, Dataset, load_data, synthetic_data
from graphprune.errors import DataError

PAD, UNK, CLS, SEP = 3, 0, 1, 2
VOCAB = {"[UNK]": UNK, "[CLS]": CLS, "[SEP]": SEP, "[PAD]": PAD, "hello": 4, "world": 5, "foo": 6, "bar": 7}


# ---------------------------------------------------------------------------------------------------- builders
def _model(inputs, nodes, output="y") -> ir.Model:
    graph = helper.make_graph(nodes, "m", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return ir.from_proto(proto)


def text_model(seq="seq") -> ir.Model:
    """Int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` [batch, seq] → ReduceSum of their sum."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", seq]) for n in names]
    nodes = [
        helper.make_node("Add", ["input_ids", "attention_mask"], ["s1"]),
        helper.make_node("Add", ["s1", "token_type_ids"], ["s2"]),
        helper.make_node("Cast", ["s2"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f"], ["y"], keepdims=0),
    ]
    return _model(inputs, nodes)


def image_model(c=3, h=16, w=20, elem=TensorProto.FLOAT) -> ir.Model:
    inputs = [helper.make_tensor_value_info("pixels", elem, ["batch", c, h, w])]
    return _model(inputs, [helper.make_node("ReduceMean", ["pixels"], ["y"], keepdims=0)])


def mixed_model() -> ir.Model:
    """Float ``x`` [batch, 4] and int64 ``ids`` [batch, 3]."""
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
    ]
    nodes = [
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["x"], ["a"], keepdims=0),
        helper.make_node("ReduceSum", ["idsf"], ["b"], keepdims=0),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    return _model(inputs, nodes)


@pytest.fixture
def tokenizer_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def raises(fn, *words):
    """Assert ``fn()`` raises a one-line ``DataError`` whose message holds every word; return the message."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert str(word) in msg, f"{word!r} not in {msg!r}"
    return msg


def numbered(n: int) -> Dataset:
    """A dataset whose sample i holds ``{"k": [i]}`` (to identify samples after split)."""
    return Dataset("user", "numbers", [{"k": np.array([i])} for i in range(n)], {"k": -1})


def ids_of(ds: Dataset) -> list[int]:
    return [int(s["k"][0]) for s in ds.samples]


# ---------------------------------------------------------------------------------------------------- npz, feeds
def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    ids = rng.integers(0, 50, (5, 3)).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, ids=ids)
    ds = load_data(tmp_path / "d.npz", mixed_model())
    assert len(ds) == 5 and ds.source == "user" and "5 samples" in ds.description
    for i, s in enumerate(ds.samples):
        assert list(s) == ["x", "ids"]
        np.testing.assert_array_equal(s["x"], x[i])
        np.testing.assert_array_equal(s["ids"], ids[i])
        assert s["x"].dtype == np.float32 and s["ids"].dtype == np.int64
    (feed,) = ds.batches(8)
    np.testing.assert_array_equal(feed["x"], x)
    np.testing.assert_array_equal(feed["ids"], ids)


def test_npz_casts_same_kind(tmp_path):
    x = np.arange(8, dtype=np.float64).reshape(2, 4) / 3
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    np.savez(tmp_path / "d.npz", x=x, ids=ids)
    ds = load_data(str(tmp_path / "d.npz"), mixed_model())
    assert ds.samples[1]["x"].dtype == np.float32 and ds.samples[1]["ids"].dtype == np.int64
    np.testing.assert_array_equal(ds.samples[1]["x"], x[1].astype(np.float32))
    np.testing.assert_array_equal(ds.samples[1]["ids"], [3, 4, 5])


def test_npz_errors(tmp_path):
    model = mixed_model()
    x, ids = np.zeros((2, 4), np.float32), np.zeros((2, 3), np.int64)
    np.savez(tmp_path / "keys.npz", x=x, input_ids=ids)
    msg = raises(
        lambda: load_data(tmp_path / "keys.npz", model), "keys.npz", "input_ids", "'x'", "'ids'", "do not match"
    )
    assert msg.index("input_ids") < msg.index("model inputs")
    np.savez(tmp_path / "empty.npz", x=x[:0], ids=ids[:0])
    raises(lambda: load_data(tmp_path / "empty.npz", model), "empty.npz", "empty", "0 samples")
    np.savez(tmp_path / "none.npz")
    raises(lambda: load_data(tmp_path / "none.npz", model), "none.npz", "empty")
    np.savez(tmp_path / "kind.npz", x=x, ids=ids.astype(np.float32))
    raises(lambda: load_data(tmp_path / "kind.npz", model), "'ids'", "float32", "int64")
    np.savez(tmp_path / "kind2.npz", x=x.astype(np.int64), ids=ids)
    raises(lambda: load_data(tmp_path / "kind2.npz", model), "'x'", "int64", "float32")
    np.savez(tmp_path / "rank.npz", x=x[:, :, None], ids=ids)
    raises(lambda: load_data(tmp_path / "rank.npz", model), "'x'", "rank 3", "rank 2")
    np.savez(tmp_path / "dim.npz", x=np.zeros((2, 5), np.float32), ids=ids)
    raises(lambda: load_data(tmp_path / "dim.npz", model), "'x'", "axis 1", "size 5", "expects 4")
    np.savez(tmp_path / "count.npz", x=x, ids=np.zeros((3, 3), np.int64))
    raises(lambda: load_data(tmp_path / "count.npz", model), "different sample counts", "'x': 2", "'ids': 3")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    raises(lambda: load_data(tmp_path / "junk.npz", model), "junk.npz", "not an .npz", "not a zip")
    np.save(tmp_path / "single.npy", x)
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    raises(lambda: load_data(tmp_path / "single.npz", model), "single.npz", "not an .npz", "single .npy array")


def test_feed_dict_iterable():
    model = mixed_model()
    rng = np.random.default_rng(1)
    feeds = [
        {"x": rng.standard_normal((2, 4)), "ids": np.array([[1, 2, 3], [4, 5, 6]], np.int32)},
        {"ids": np.array([[7, 8, 9]]), "x": np.full((1, 4), 0.5, np.float32)},
    ]
    ds = load_data(iter(feeds), model)
    assert len(ds) == 3 and ds.source == "user" and "2 feed dicts" in ds.description
    np.testing.assert_array_equal([s["ids"] for s in ds.samples], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(ds.samples[1]["x"], feeds[0]["x"][1].astype(np.float32))
    assert ds.samples[0]["x"].dtype == np.float32 and ds.samples[0]["ids"].dtype == np.int64
    assert len(load_data(feeds[1], model)) == 1  # one dict is one feed
    raises(lambda: load_data([feeds[0], 5], model), "feed 1", "int")
    raises(lambda: load_data([], model), "no feed dicts")
    raises(lambda: load_data([{"x": feeds[0]["x"]}], model), "feed 0", "['x']", "'ids'")
    raises(lambda: load_data(42, model), "unsupported data source", "int")


def test_missing_and_unknown_suffix(tmp_path):
    raises(lambda: load_data(tmp_path / "nope.npz", mixed_model()), "data not found", "nope.npz")
    (tmp_path / "d.csv").write_text("1,2\n")
    raises(
        lambda: load_data(tmp_path / "d.csv", mixed_model()), "d.csv", "'.csv'", "accepted", ".npz", ".jsonl", ".png"
    )


# ---------------------------------------------------------------------------------------------------- split, batches
def test_split_disjoint_deterministic():
    ds = numbered(20)
    cal, ver = ds.split(8, 5, seed=3)
    assert (len(cal), len(ver)) == (8, 5)
    order = np.random.default_rng(3).permutation(20)
    assert ids_of(cal) == list(order[:8]) and ids_of(ver) == list(order[8:13])
    assert not set(ids_of(cal)) & set(ids_of(ver))
    cal2, ver2 = ds.split(8, 5, seed=3)
    assert ids_of(cal2) == ids_of(cal) and ids_of(ver2) == ids_of(ver)
    assert ids_of(ds.split(8, 5, seed=4)[0]) != ids_of(cal)
    for part in (cal, ver):
        assert (part.source, part.description, part.pad_values) == ("user", "numbers", {"k": -1})
    assert ids_of(ds.subset([4, 2])) == [4, 2]


def test_split_too_small():
    msg = raises(lambda: numbered(10).split(8, 5), "data has 10 samples", "8 calibration + 5 verification need 13")
    assert "--allow-overlap" in msg
    raises(lambda: numbered(10).split(0, 5), "at least 1")
    raises(lambda: numbered(10).split(5, 0), "at least 1")


def test_split_allow_overlap():
    ds = numbered(10)
    cal, ver = ds.split(8, 5, seed=1, allow_overlap=True)
    order = list(np.random.default_rng(1).permutation(10))
    assert ids_of(cal) == order[:8]
    assert ids_of(ver) == order[8:] + order[:3]  # the two unused samples first, then calibration ones
    cal, ver = ds.split(20, 30, allow_overlap=True)
    assert (len(cal), len(ver)) == (10, 10)
    assert sorted(ids_of(cal)) == sorted(ids_of(ver)) == list(range(10))


def test_batches_pad_ragged():
    ids = [np.array([5, 6, 7]), np.array([5, 6, 7, 8, 9]), np.array([4, 4])]
    samples = [{"input_ids": a, "attention_mask": np.ones_like(a)} for a in ids]
    ds = Dataset("user", "t", samples, {"input_ids": 3, "attention_mask": 0})
    first, second = ds.batches(2)
    np.testing.assert_array_equal(first["input_ids"], [[5, 6, 7, 3, 3], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(first["attention_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(second["input_ids"], [[4, 4]])
    assert first["input_ids"].dtype == ids[0].dtype and list(first) == ["input_ids", "attention_mask"]
    # Several ragged axes, default pad 0, float dtype kept.
    grid = Dataset("user", "g", [{"g": np.ones((2, 3), np.float16)}, {"g": np.full((3, 1), 2, np.float16)}])
    (feed,) = grid.batches(4)
    expected = np.zeros((2, 3, 3), np.float16)
    expected[0, :2, :3] = 1
    expected[1, :3, :1] = 2
    np.testing.assert_array_equal(feed["g"], expected)
    assert feed["g"].dtype == np.float16
    assert [len(b["k"]) for b in numbered(7).batches(3)] == [3, 3, 1]
    raises(lambda: numbered(3).batches(0), "batch size")


# ---------------------------------------------------------------------------------------------------- text
def test_txt_dynamic_length(tmp_path, tokenizer_path):
    (tmp_path / "t.txt").write_text("hello world\n\n  foo bar hello  \nzebra\n", encoding="utf-8")
    ds = load_data(tmp_path / "t.txt", text_model(), tokenizer=tokenizer_path)
    assert len(ds) == 3 and "t.txt: 3 texts" in ds.description
    expected = [[CLS, 4, 5, SEP], [CLS, 6, 7, 4, SEP], [CLS, UNK, SEP]]
    assert [s["input_ids"].tolist() for s in ds.samples] == expected
    assert all(s["attention_mask"].tolist() == [1] * len(e) for s, e in zip(ds.samples, expected))
    assert all(not s["token_type_ids"].any() and s["input_ids"].dtype == np.int64 for s in ds.samples)
    assert ds.pad_values == {"input_ids": PAD, "attention_mask": 0, "token_type_ids": 0}
    (feed,) = ds.batches(3)
    np.testing.assert_array_equal(
        feed["input_ids"], [[CLS, 4, 5, SEP, PAD], [CLS, 6, 7, 4, SEP], [CLS, UNK, SEP, PAD, PAD]]
    )
    np.testing.assert_array_equal(feed["attention_mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(feed["token_type_ids"], np.zeros((3, 5)))
    short = load_data(tmp_path / "t.txt", text_model(), tokenizer=tokenizer_path, max_length=4)
    assert short.samples[1]["input_ids"].tolist() == [CLS, 6, 7, SEP]  # truncated, special tokens kept


def test_txt_static_sequence(tmp_path, tokenizer_path):
    (tmp_path / "t.txt").write_text("hello\nhello world foo bar hello world\n", encoding="utf-8")
    ds = load_data(tmp_path / "t.txt", text_model(seq=6), tokenizer=tokenizer_path)
    assert ds.samples[0]["input_ids"].tolist() == [CLS, 4, SEP, PAD, PAD, PAD]
    assert ds.samples[0]["attention_mask"].tolist() == [1, 1, 1, 0, 0, 0]
    assert ds.samples[1]["input_ids"].tolist() == [CLS, 4, 5, 6, 7, SEP]
    assert ds.samples[1]["attention_mask"].tolist() == [1] * 6
    assert ds.batches(2)[0]["input_ids"].shape == (2, 6)


def test_jsonl_text_pair(tmp_path, tokenizer_path):
    lines = [json.dumps({"text": "hello world", "text_pair": "foo"}), "", json.dumps({"text": "bar"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = load_data(tmp_path / "p.jsonl", text_model(), tokenizer=tokenizer_path)
    assert len(ds) == 2
    assert ds.samples[0]["input_ids"].tolist() == [CLS, 4, 5, SEP, 6, SEP]
    assert ds.samples[0]["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1]
    assert ds.samples[1]["input_ids"].tolist() == [CLS, 7, SEP]
    assert ds.samples[1]["token_type_ids"].tolist() == [0, 0, 0]


def test_text_positions_bool_mask_tokenizer_folder(tmp_path, tokenizer_path):
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, ["batch", "seq"]),
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["a"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["position_ids"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    (tmp_path / "t.txt").write_text("hello world\nfoo\n", encoding="utf-8")
    ds = load_data(
        tmp_path / "t.txt", _model(inputs, nodes), tokenizer=tokenizer_path.parent
    )  # folder with tokenizer.json
    (feed,) = ds.batches(2)
    assert feed["input_ids"].dtype == np.int32 and feed["attention_mask"].dtype == np.bool_
    np.testing.assert_array_equal(feed["input_ids"], [[CLS, 4, 5, SEP], [CLS, 6, SEP, PAD]])
    np.testing.assert_array_equal(feed["position_ids"], [[0, 1, 2, 3], [0, 1, 2, 0]])
    np.testing.assert_array_equal(feed["attention_mask"], [[True] * 4, [True, True, True, False]])


def test_text_errors(tmp_path, tokenizer_path):
    model = text_model()
    (tmp_path / "t.txt").write_text("hello\n", encoding="utf-8")
    raises(lambda: load_data(tmp_path / "t.txt", model), "text data needs --tokenizer tokenizer.json")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    raises(lambda: load_data(tmp_path / "empty.txt", model, tokenizer=tokenizer_path), "empty.txt", "no texts")
    (tmp_path / "bad_tok.json").write_text(json.dumps({"vocab": [1, 2]}), encoding="utf-8")
    raises(lambda: load_data(tmp_path / "t.txt", model, tokenizer=tmp_path / "bad_tok.json"), "bad_tok.json", "not a")
    raises(lambda: load_data(tmp_path / "t.txt", model, tokenizer=tmp_path / "nope.json"), "tokenizer not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n{not json\n", encoding="utf-8")
    raises(lambda: load_data(bad, model, tokenizer=tokenizer_path), "bad.jsonl:2", "not valid JSON")
    bad.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"label": 1}) + "\n", encoding="utf-8")
    raises(lambda: load_data(bad, model, tokenizer=tokenizer_path), "bad.jsonl:3", "'text'")
    bad.write_text("[1, 2]\n", encoding="utf-8")
    raises(lambda: load_data(bad, model, tokenizer=tokenizer_path), "bad.jsonl:1", "JSON object")
    raises(
        lambda: load_data(tmp_path / "t.txt", model, tokenizer=tokenizer_path, max_length=2), "length of 2", "2 special"
    )
    other = _model(
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_node("ReduceSum", ["pixel_values"], ["y"])],
    )
    raises(lambda: load_data(tmp_path / "t.txt", other, tokenizer=tokenizer_path), "'pixel_values'", "cannot fill")


# ---------------------------------------------------------------------------------------------------- images
def _save_image(path, h, w, mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_image_folder_rgb(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    _save_image(folder / "b_wide.PNG", h=20, w=30, seed=1)  # scale 0.8 → 24x16, crop x 2..22
    _save_image(folder / "a_tall.bmp", h=40, w=10, seed=2)  # scale 2 → 20x80, crop y 32..48
    (folder / "notes.txt").write_text("not an image")
    ds = load_data(folder, image_model())
    assert len(ds) == 2 and ds.source == "user" and "2 images" in ds.description

    def reference(name, size, box, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        img = Image.open(folder / name).convert("RGB").resize(size, Image.Resampling.BILINEAR).crop(box)
        x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]

    tall = reference("a_tall.bmp", (20, 80), (0, 32, 20, 48))
    wide = reference("b_wide.PNG", (24, 16), (2, 0, 22, 16))
    for sample, ref in zip(ds.samples, (tall, wide)):  # sorted by name: a_tall first
        assert sample["pixels"].shape == (3, 16, 20) and sample["pixels"].dtype == np.float32
        np.testing.assert_allclose(sample["pixels"], ref, rtol=1e-6, atol=1e-6)
    raw = load_data(folder, image_model(), normalize=False)
    np.testing.assert_allclose(
        raw.samples[1]["pixels"], reference("b_wide.PNG", (24, 16), (2, 0, 22, 16), (0,) * 3, (1,) * 3)
    )
    assert 0.0 <= raw.samples[0]["pixels"].min() and raw.samples[0]["pixels"].max() <= 1.0
    custom = load_data(folder, image_model(), mean=[0.5], std=[0.25])
    np.testing.assert_allclose(
        custom.samples[0]["pixels"],
        reference("a_tall.bmp", (20, 80), (0, 32, 20, 48), (0.5,) * 3, (0.25,) * 3),
        atol=1e-6,
    )
    assert ds.batches(2)[0]["pixels"].shape == (2, 3, 16, 20)


def test_image_folder_grayscale(tmp_path):
    from PIL import Image

    folder = tmp_path / "gray"
    folder.mkdir()
    _save_image(folder / "x.png", h=8, w=12, seed=3)  # RGB file into a 1-channel model: no resize, crop x 2..10
    ds = load_data(folder, image_model(c=1, h=8, w=8))
    img = Image.open(folder / "x.png").convert("L").crop((2, 0, 10, 8))
    ref = (np.asarray(img, np.float32)[None] / 255.0 - 0.449) / 0.226
    assert ds.samples[0]["pixels"].shape == (1, 8, 8)
    np.testing.assert_allclose(ds.samples[0]["pixels"], ref, rtol=1e-6, atol=1e-6)


def test_image_errors(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "sub").mkdir()
    raises(lambda: load_data(folder, image_model()), "imgs", "no images", ".png", ".jpeg", "subfolder")
    _save_image(folder / "a.png", 16, 20)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    raises(lambda: load_data(folder, image_model()), "broken.jpg", "cannot decode")
    (folder / "broken.jpg").unlink()
    raises(lambda: load_data(folder, image_model(h="h")), "'pixels'", "static")
    raises(lambda: load_data(folder, image_model(c=4)), "4 channels")
    raises(lambda: load_data(folder, image_model(elem=TensorProto.INT64)), "float input")
    raises(lambda: load_data(folder, mixed_model()), "one input", "'x'", "'ids'")
    raises(lambda: load_data(folder, image_model(), mean=[0.1, 0.2]), "mean has 2 values", "3 channel")


# ---------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_data():
    model = text_model()
    ds = synthetic_data(model, 6, seed=1)
    assert (
        ds.source == "synthetic"
        and len(ds) == 6
        and ds.description == "6 synthetic samples generated from the input specs"
    )
    ref = example_inputs(model, batch=6, seed=1)
    (feed,) = ds.batches(6)
    for name, arr in ref.items():
        np.testing.assert_array_equal(feed[name], arr)
    cal, ver = ds.split(4, 2)
    assert (len(cal), len(ver)) == (4, 2) and cal.source == "synthetic"
    raises(lambda: synthetic_data(model, 0), "at least 1")


def test_exact_batches_fill_the_last_chunk():
    ds = Dataset("user", "five", [{"x": np.full((2,), i, np.float32)} for i in range(5)])
    sizes = [len(b["x"]) for b in ds.batches(2)]
    assert sizes == [2, 2, 1]
    exact = ds.batches(2, exact=True)
    assert [len(b["x"]) for b in exact] == [2, 2, 2]
    np.testing.assert_array_equal(exact[-1]["x"][:, 0], [4, 0])  # filled from the start


def test_optimize_feeds_a_fixed_batch_model_its_batch(tmp_path):
    """A model whose inputs fix batch 2 is calibrated, verified and benchmarked at batch 2 (not 8 or 1)."""
    import onnx

    import graphprune as gp

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    src = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    report = gp.optimize(src, tmp_path / "out.onnx", gp.Pipeline().add("cleanup"), bench=True, bench_runs=2)
    assert report["verify"]["passed"] and report["latency_ms"]["batch"] == 2
    assert report["data"]["verify_samples"] == 2  # cleanup only: one full batch of the fixed batch (2 of 8)
