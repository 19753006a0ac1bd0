"""The toolkit's own cost (issue 10), on small models: weights mapped, not copied; one save; one session at a time.

Also the benchmark decoder generator (``benchmarks/make_decoder.py``): ORT runs it and numpy reproduces it.
"""

from __future__ import annotations

import builtins
import dataclasses
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphprune as gp
import graphprune.backends.onnxruntime as backend
import graphprune.io as gio
from benchmarks import make_decoder
from graphprune.analysis import find_attention_blocks
from tests.helpers import linear_model

TINY = make_decoder.DecoderConfig(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=50, seq=8)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return make_decoder.write_decoder(TINY, tmp_path_factory.mktemp("dec") / "decoder.onnx")


def _numpy_decoder(cfg: make_decoder.DecoderConfig, w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Llama forward pass in float64 numpy, written from the definition (not from the graph)."""
    d, nh, nkv, s = cfg.head_dim, cfg.heads, cfg.kv_heads, ids.shape[1]

    def norm(x, g):
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.eps)

    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.outer(np.arange(s), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [B, h, S, d]
        rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + rot * sin

    def heads(x, n):
        return x.reshape(x.shape[0], s, n, d).transpose(0, 2, 1, 3)

    x = w["model.embed_tokens.weight"][ids]
    causal = np.triu(np.ones((s, s), bool), 1)
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope(heads(h @ w[p + "self_attn.q_proj.weight"], nh))
        k = rope(heads(h @ w[p + "self_attn.k_proj.weight"], nkv))
        v = heads(h @ w[p + "self_attn.v_proj.weight"], nkv)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
        a = np.where(causal, -np.inf, a)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + o @ w[p + "self_attn.o_proj.weight"]
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"]
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"])) @ w[p + "mlp.down_proj.weight"]
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"]


def test_make_decoder_runs_in_ort_and_matches_numpy(decoder):
    model = ir.load(decoder)
    weights = {v.name: v.const_value.numpy().astype(np.float64) for v in model.graph.initializers.values()
               if v.name in dict(TINY.tensors())}
    assert set(weights) == {n for n, _ in TINY.tensors()}
    assert all(isinstance(model.graph.initializers[n].const_value, ir.ExternalTensor) for n in weights)
    ids = np.random.default_rng(0).integers(0, TINY.vocab, (1, TINY.seq))
    got = backend.make_session(decoder).run(None, {"input_ids": ids})[0]
    want = _numpy_decoder(TINY, weights, ids)
    assert got.shape == (1, TINY.seq, TINY.vocab)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert Path(str(decoder) + ".data").stat().st_size >= TINY.nbytes()


def test_make_decoder_sizes_and_recognition(decoder):
    cfg = make_decoder.config_for_gb(1)
    assert abs(cfg.nbytes() / 1024**3 - 1) < 0.05 and cfg.heads % cfg.kv_heads == 0 and cfg.kv_heads < cfg.heads
    assert abs(make_decoder.config_for_gb(8).nbytes() / 1024**3 - 8) < 0.2
    blocks = find_attention_blocks(gp.load_model(decoder))
    assert len(blocks) == TINY.layers and {b.heads for b in blocks} == {TINY.heads}


class _SessionCounter:
    """Wraps the one session factory and records how many sessions are alive at each creation."""

    def __init__(self, monkeypatch):
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.at_creation: list[int] = []
        real = backend.make_session

        def counting(model, *a, **k):
            session = real(model, *a, **k)
            self.alive.add(session)
            self.at_creation.append(len(self.alive))
            return session

        monkeypatch.setattr(backend, "make_session", counting)
        import graphprune.verify as verify

        monkeypatch.setattr(verify, "make_session", counting)


def test_verification_never_has_two_sessions_alive(decoder, tmp_path, monkeypatch):
    counter = _SessionCounter(monkeypatch)
    report = gp.optimize(decoder, tmp_path / "o.onnx", gp.Pipeline().add("channel_prune", ratio=0.3).add("cleanup"),
                         force=True)
    assert report["passes"][0]["changed"]
    assert len(counter.at_creation) >= 2  # the original and the optimized, at least
    assert max(counter.at_creation) == 1, counter.at_creation
    assert set(report["timings"]) >= {"load", "passes", "save", "verify", "commit"}
    out = backend.make_session(tmp_path / "o.onnx").run(None, {"input_ids": np.zeros((1, TINY.seq), np.int64)})[0]
    assert out.shape == (1, TINY.seq, TINY.vocab)


def test_the_output_is_written_once(decoder, tmp_path, monkeypatch):
    """Every file of the output is opened for writing once (the staged save), then renamed into place."""
    writes: list[str] = []
    real_open = builtins.open

    def tracking(file, mode="r", *a, **k):
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+") and Path(file).name.startswith("o.onnx"):
            writes.append(Path(file).name)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", tracking)
    gp.optimize(decoder, tmp_path / "o.onnx", gp.Pipeline().add("channel_prune", ratio=0.3), force=True)
    assert writes == ["o.onnx"], writes
    writes.clear()
    model = gp.load_model(decoder)
    with gio.stage_model(model, tmp_path / "o.onnx", external_threshold=0) as staged:  # weights to o.onnx.data
        staged.commit()
    assert sorted(writes) == ["o.onnx", "o.onnx.data"], writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "o.onnx.data"]


def _refs(model: ir.Model) -> dict[str, tuple[str, int | None]]:
    return {v.name: (str(Path(v.const_value.path).resolve()), v.const_value.offset)
            for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}


def test_unchanged_initializers_keep_pointing_at_the_source_until_the_save(decoder, tmp_path):
    model = gp.load_model(decoder)
    before = _refs(model)
    data = str(Path(str(decoder) + ".data").resolve())
    assert len(before) == len(TINY.tensors()) and {p for p, _ in before.values()} == {data}
    gp.Pipeline().add("channel_prune", ratio=0.3).add("cleanup").run(model)
    after = _refs(model)
    changed = set(before) - set(after)
    # the SwiGLU hidden units and the GQA key/value groups were pruned: only projections changed ...
    assert changed and all(n.endswith("_proj.weight") for n in changed)
    assert {f"model.layers.{i}.{m}" for i in range(TINY.layers) for m in ("mlp.up_proj.weight", "self_attn.k_proj.weight")} <= changed
    # ... and the embeddings, norms and head still point at the source
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(after)
    assert all(after[n] == before[n] for n in after)  # same file, same offset
    pruned = model.graph.initializers["model.layers.0.mlp.up_proj.weight"].const_value
    assert isinstance(pruned, ir.LazyTensor)  # a slice not computed until it is written
    src = ir.load(decoder).graph.initializers["model.layers.0.mlp.up_proj.weight"].const_value.numpy()
    with gio.stage_model(model, tmp_path / "p.onnx", external_threshold=0) as staged:
        saved = ir.load(staged.path)
        keep = saved.graph.initializers["model.layers.0.mlp.up_proj.weight"].const_value.numpy()
        emb = saved.graph.initializers["model.embed_tokens.weight"].const_value
        np.testing.assert_array_equal(emb.numpy(), ir.load(decoder).graph.initializers[
            "model.embed_tokens.weight"].const_value.numpy())
        staged.discard()
    # the kept columns of the pruned weight are columns of the source, in order
    cols = [int(np.nonzero((src == keep[:, [j]]).all(axis=0))[0][0]) for j in range(keep.shape[1])]
    assert cols == sorted(cols) and len(cols) == keep.shape[1] < src.shape[1]


def test_inline_weights_are_mapped_from_the_onnx_file(tmp_path, monkeypatch):
    """A model with its weights inside the .onnx is loaded with them as views into that file (no parsed copy)."""
    monkeypatch.setattr(gio, "INLINE_MAP_THRESHOLD", 0)
    monkeypatch.setattr(gio, "INLINE_MAP_MIN_BYTES", 16)
    w = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    src = linear_model(tmp_path / "m.onnx", external=False, w=w)
    model = gio.load_model(src)
    t = model.graph.initializers["W"].const_value
    assert isinstance(t, ir.ExternalTensor) and Path(t.path).resolve() == src.resolve()
    np.testing.assert_array_equal(t.numpy(), w)
    raw = src.read_bytes()
    assert raw[t.offset: t.offset + t.length] == w.tobytes()
    ref = onnx.load(str(src))
    b = onnx.numpy_helper.to_array(ref.graph.initializer[1])
    np.testing.assert_array_equal(model.graph.initializers["B"].const_value.numpy(), b)
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    from_clone = backend.make_session(model.clone()).run(None, {"X": x})[0]
    np.testing.assert_allclose(from_clone, backend.make_session(src).run(None, {"X": x})[0], rtol=0, atol=0)
    report = gp.optimize(src, tmp_path / "o.onnx", gp.Pipeline().add("cleanup"))
    assert report["verify"]["passed"]
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert not any(i.external_data for i in out.graph.initializer)  # a standalone file, weights inside
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]), w)


def test_fp16_model_pruned_and_verified_at_its_dtype(tmp_path):
    """A float16 export through channel_prune and verification: float16 all the way, checked against the original."""
    torch = pytest.importorskip("torch")
    import graphprune.torch as gtorch
    from examples import models

    torch.manual_seed(0)
    vit = models.ViT(img_size=32, patch=8, dim=64, depth=2, heads=4, num_classes=10).eval().half()
    src = gtorch.export(vit, (torch.randn(2, 3, 32, 32).half(),), tmp_path / "v16.onnx")
    report = gp.optimize(src, tmp_path / "o.onnx", gp.Pipeline().add("channel_prune", ratio=0.25).add("cleanup"),
                         force=True)
    assert report["passes"][0]["changed"] and report["params"]["ratio"] < 0.95
    out = gp.load_model(tmp_path / "o.onnx")
    dtypes = {v.const_value.dtype for v in out.graph.initializers.values() if v.const_value.dtype.is_floating_point()}
    assert dtypes == {ir.DataType.FLOAT16}
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float16)
    a = backend.make_session(src).run(None, {"x": x})[0]
    b = backend.make_session(tmp_path / "o.onnx").run(None, {"x": x})[0]
    assert a.dtype == b.dtype == np.float16
    cos = report["verify"]["outputs"][0]["metrics"]["cosine"]["mean"]
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mine = float(np.mean((a64 * b64).sum(-1) / np.linalg.norm(a64, axis=-1) / np.linalg.norm(b64, axis=-1)))
    assert cos == pytest.approx(mine, abs=0.2)  # same figure, other samples: the report measured the fp16 model


def test_decoder_config_is_a_dataclass():
    assert dataclasses.asdict(TINY)["kv_heads"] == 2 and TINY.head_dim == 16


def test_large_reference_outputs_are_kept_on_disk_with_the_same_figures(decoder, tmp_path, monkeypatch):
    """Past SPILL_BYTES the original's outputs go to a temporary folder, feed by feed; the figures do not change."""
    import graphprune.verify as verify

    out = tmp_path / "o.onnx"
    gp.optimize(decoder, out, gp.Pipeline().add("channel_prune", ratio=0.3), force=True)
    rng = np.random.default_rng(1)
    feeds = [{"input_ids": rng.integers(0, TINY.vocab, (1, TINY.seq))} for _ in range(4)]
    held = verify.compare(decoder, out, feeds).to_dict()
    folders = []
    real = verify._References.append

    def spy(self, arrays):
        real(self, arrays)
        folders.append(self.folder)

    monkeypatch.setattr(verify, "SPILL_BYTES", 1)
    monkeypatch.setattr(verify._References, "append", spy)
    spilled = verify.compare(decoder, out, feeds).to_dict()
    assert folders and all(folders) and not Path(folders[0]).exists()  # used, then removed
    assert spilled == held


def test_the_per_pass_check_reads_no_weights_and_still_rejects_invalid_graphs(decoder):
    from graphprune.errors import InternalError
    from graphprune.pipeline import _check

    model = gp.load_model(decoder)
    v = model.graph.initializers["model.layers.0.mlp.up_proj.weight"]

    def unreadable():
        raise AssertionError("the checker read a weight")

    v.const_value = ir.LazyTensor(unreadable, dtype=v.const_value.dtype, shape=v.const_value.shape, name=v.name)
    _check(model, "test")  # valid, and the lazy weight was never evaluated
    node = next(n for n in model.graph if n.op_type == "Softmax")
    node.attributes["axis"] = ir.AttrString("axis", "last")  # wrong attribute type
    with pytest.raises(InternalError, match="'test' produced an invalid model"):  # a pass bug: exit 1
        _check(model, "test")


def test_count_lines_are_reduced_to_distinct_atoms_without_changing_any_count():
    """The analysis stores each count line as its distinct atoms; which rows keep an atom is unchanged."""
    from graphprune.analysis._channel_core import distinct_rows

    rng = np.random.default_rng(5)
    # the last two cases span more atoms than the bitmap holds (rows × span > 2**24): the sorting path
    for shape, atoms in (((7, 300), 4), ((5, 1), 9), ((3, 64), 200), ((12, 197 * 3), 12), ((4, 50), 10**7),
                         ((6, 300), 5 * 10**6)):
        lines = rng.integers(0, atoms, shape)
        small = distinct_rows(lines)
        assert small.shape[0] == lines.shape[0] and small.shape[1] <= lines.shape[1]
        assert [set(r) for r in small.tolist()] == [set(r) for r in lines.tolist()]
        if small.shape[1] < lines.shape[1]:  # reduced: each row's atoms ascending, then padded with its smallest
            assert (small[:, 0] == lines.min(axis=1)).all()
        for _ in range(20):
            kept = rng.random(atoms) < 0.5
            np.testing.assert_array_equal(kept[small].any(axis=1), kept[lines].any(axis=1))
    heads = np.repeat(np.arange(12), 64)[:, None] + np.zeros((1, 197), np.int64)  # one atom per row, 197 times
    assert distinct_rows(heads).shape == (768, 1)


def test_verification_sessions_skip_weight_prepacking_and_benchmarks_keep_it(decoder, tmp_path, monkeypatch):
    """Verification builds its sessions without ORT's packed second copy of the MatMul weights (and without the
    arena); the benchmark's sessions keep both, as a deployed session has them. The packed-off session's outputs
    equal a default session's."""
    import onnxruntime as ort

    seen: list[tuple[bool, str]] = []
    real = ort.InferenceSession

    class Recording(real):
        def __init__(self, model, so=None, *a, **k):
            try:
                packed_off = so.get_session_config_entry("session.disable_prepacking")
            except Exception:  # noqa: BLE001 - ORT raises for an entry never set
                packed_off = ""
            seen.append((bool(so.enable_cpu_mem_arena), packed_off))
            super().__init__(model, so, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", Recording)
    report = gp.optimize(decoder, tmp_path / "o.onnx", gp.Pipeline().add("cleanup"), bench=True, bench_runs=2,
                         force=True)
    assert report["verify"]["passed"]
    verify_sessions, bench_sessions = seen[:2], seen[2:]
    assert verify_sessions == [(False, "1"), (False, "1")], seen
    assert bench_sessions and all(s == (True, "") for s in bench_sessions), seen
    monkeypatch.setattr(ort, "InferenceSession", real)
    feed = {"input_ids": np.arange(TINY.seq, dtype=np.int64)[None] % TINY.vocab}
    lean = backend.make_session(decoder, arena=False, prepack=False).run(None, feed)[0]
    default = backend.make_session(decoder).run(None, feed)[0]
    np.testing.assert_allclose(lean, default, rtol=1e-5, atol=1e-5)
