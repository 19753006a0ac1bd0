"""A decoder exported as a prefill graph and a decode-step graph with a KV cache (``graphprune.torch.
export_decoder_pair``), generated from in ONNX Runtime (``graphprune.decoder.generate``) and depth-pruned
consistently (``graphprune.decoder.depth_prune_pair``).

References: transformers' own ``generate`` (greedy) on the same weights for the unpruned pair; for the pruned pair,
the transformers model with the same layer deleted, decoding greedily without a cache (every step recomputes the
whole sequence), so a cache that one graph writes and the other misreads would show as different tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from graphprune.decoder import cache_layout, channel_prune_pair, depth_prune_pair, generate  # noqa: E402
from graphprune.errors import ConfigError, GraphpruneError  # noqa: E402

pytestmark = pytest.mark.slow  # two torch exports (~30 s) before the first test

_CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _lm():
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CFG)).eval()
    with torch.no_grad():  # make layers differ in how much they matter (random init makes them all alike)
        for i, layer in enumerate(lm.model.layers):
            layer.mlp.down_proj.weight.mul_(1 + 2 * i)
            layer.self_attn.o_proj.weight.mul_(1 + 2 * i)
    return lm


@pytest.fixture(scope="module")
def pair(model_cache):
    from graphprune.torch import export_decoder_pair

    def make(folder):
        return export_decoder_pair(_lm(), folder)[0]

    pre = model_cache.get(("decoder_pair", "llama4"), make)
    return pre, pre.with_name("decode.onnx")


def _ids(batch=2, n=6, seed=0):
    return np.random.default_rng(seed).integers(0, _CFG["vocab_size"], (batch, n))


def _greedy_without_cache(lm, ids, new):
    x = torch.from_numpy(ids)
    with torch.no_grad():
        for _ in range(new):
            x = torch.cat([x, lm(input_ids=x, use_cache=False).logits[:, -1].argmax(-1)[:, None]], 1)
    return x.numpy()


def _without_layer(lm, k):
    lm = copy.deepcopy(lm)
    del lm.model.layers[k]
    for i, layer in enumerate(lm.model.layers):
        layer.self_attn.layer_idx = i
    lm.config.num_hidden_layers -= 1
    return lm


def test_layout_pairs_every_cache_input_with_its_output(pair):
    layout = cache_layout(*pair)
    assert layout.ids == "input_ids" and layout.logits == "logits"
    assert layout.pairs == {f"past_key_values.{i}.{kv}": f"present.{i}.{kv}" for i in range(4) for kv in ("key", "value")}


def test_unpruned_pair_generates_what_transformers_generates(pair):
    ids = _ids()
    got = generate(*pair, ids, 12)
    ref = _lm().generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                         max_new_tokens=12, do_sample=False).numpy()
    assert got.shape == (2, 18)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("importance", ["angular", "output"])
def test_depth_pruned_pair_equals_transformers_without_the_layer(pair, importance):
    calib = [{"input_ids": _ids(2, 24, seed=s)} for s in (1, 2)]
    pre, dec, info = depth_prune_pair(*pair, {"ratio": 0.25, "importance": importance}, calib)
    assert len(info["removed"]) == 1
    k = int(info["removed"][0].split()[1])
    gone = {f"present.{k}.key", f"present.{k}.value"}
    assert set(info["cache_removed"]) == gone
    assert set(info["decode_cache_removed"]) == gone | {f"past_key_values.{k}.key", f"past_key_values.{k}.value"}
    assert not gone & {v.name for g in (pre, dec) for v in g.graph.outputs}
    assert len(cache_layout(pre, dec).pairs) == 6
    ids = _ids(2, 5, seed=3)
    ref = _greedy_without_cache(_without_layer(_lm(), k), ids, 10)
    np.testing.assert_array_equal(generate(pre, dec, ids, 10), ref)
    # the inputs were not changed
    assert len(ir.load(pair[1]).graph.inputs) == 9


def test_two_blocks_removed_from_the_pair(pair):
    calib = [{"input_ids": _ids(2, 24, seed=1)}]
    pre, dec, info = depth_prune_pair(*pair, {"ratio": 0.5}, calib)
    ks = sorted(int(w.split()[1]) for w in info["removed"])
    assert len(ks) == 2
    lm = _lm()
    for k in reversed(ks):
        lm = _without_layer(lm, k)
    ids = _ids(1, 7, seed=4)
    np.testing.assert_array_equal(generate(pre, dec, ids, 8), _greedy_without_cache(lm, ids, 8))


def test_decode_graph_alone_moves_the_past_length_read(pair):
    """The decode step reads the past length (for the position ids and the mask) off the cache input of a layer the
    exporter picked: removing that layer moves the read to a cache input that stays. Every block is removable, and
    the graph with any one removed still runs and grows the cache by one."""
    from graphprune.passes import get_pass
    from graphprune.passes.base import PassContext

    shape_reads = {v.name for v in ir.load(pair[1]).graph.inputs if any(n.op_type == "Shape" for n, _ in v.uses())}
    assert shape_reads  # what this test is about: the export reads the length off some cache input
    ids, past = _ids(1, 1), np.zeros((1, 2, 5, 16), np.float32)
    for k in range(4):
        dec = ir.load(pair[1])
        res = get_pass("depth_prune")({"units": [f"block {k}"]}, PassContext())(dec)
        assert not res.skipped and res.info["removed"] == [f"block {k}"]
        names = [v.name for v in dec.graph.inputs]
        assert names == ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(4) if i != k for kv in ("key", "value")]
        from graphprune.backends.onnxruntime import make_session

        out = make_session(dec).run(None, {"input_ids": ids, **{n: past for n in names[1:]}})
        assert len(out) == 7 and all(o.shape == (1, 2, 6, 16) for o in out[1:])


def test_explicit_units_remove_exactly_those(pair):
    from graphprune.passes import get_pass
    from graphprune.passes.base import PassContext

    pre = ir.load(pair[0])
    res = get_pass("depth_prune")({"units": ["block 2"]}, PassContext())(pre)
    assert res.info["removed"] == ["block 2"]
    assert {v.name for v in pre.graph.outputs} == {"logits"} | {
        f"present.{i}.{kv}" for i in (0, 1, 3) for kv in ("key", "value")}
    with pytest.raises(ConfigError, match="'block 9' cannot be removed"):
        get_pass("depth_prune")({"units": ["block 9"]}, PassContext())(ir.load(pair[0]))


def test_layouts_that_do_not_pair_are_user_errors(pair, tmp_path):
    pre, dec = pair
    with pytest.raises(GraphpruneError, match="cache layout not recognised"):
        cache_layout(pre, pre)  # a prefill graph has no cache inputs
    m = ir.load(pre)
    m.graph.outputs.pop()  # the prefill graph no longer writes the last layer's value cache
    with pytest.raises(GraphpruneError, match="lacks the decode graph's outputs"):
        cache_layout(m, dec)
    with pytest.raises(GraphpruneError, match="max_new_tokens"):
        generate(pre, dec, _ids(), 0)


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_generate_prints_transformers_greedy_tokens(pair, capsys):
    from tests.helpers import cli

    ids = _ids(1, 5, seed=5)
    code, stdout, err = cli(["generate", *pair, "--ids", ",".join(map(str, ids[0])), "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    ref = _lm().generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                         max_new_tokens=6, do_sample=False).numpy()[0, 5:]
    assert stdout.split() == [str(t) for t in ref]


def test_cli_prune_pair_writes_a_verified_pair_that_generates(pair, tmp_path, capsys):
    from tests.helpers import cli

    data = tmp_path / "ids.npz"
    np.savez(data, input_ids=np.random.default_rng(6).integers(0, 128, (12, 20)))
    out, rep = tmp_path / "pruned", tmp_path / "r.json"
    code, stdout, err = cli(["prune-pair", *pair, "-o", out, "--prune-depth", "0.25", "--data", data,
                             "--calibration-samples", "4", "--verify-samples", "6", "--accuracy-kept-min", "0",
                             "--report", rep], capsys)
    assert code == 0, err
    import json

    r = json.loads(rep.read_text())
    k = int(r["removed"][0].split()[1])
    assert r["real_data"] and r["verify"]["samples"] == 6 and r["verify"]["tokens"] == 6 * 19
    ids = _ids(1, 4, seed=7)
    np.testing.assert_array_equal(generate(out / "prefill.onnx", out / "decode.onnx", ids, 6),
                                  _greedy_without_cache(_without_layer(_lm(), k), ids, 6))
    # the accuracy figures are the models' own, recomputed here from the prefill graphs
    assert 0 <= r["verify"]["top1_agreement"] <= 1 and r["verify"]["next_token_accuracy"]["original"] < 0.2


def _greedy_prefill(prefill, ids, new):
    """Greedy tokens from the prefill graph alone, recomputing the whole sequence each step: no cache."""
    import onnxruntime as ort

    path = prefill
    if isinstance(prefill, ir.Model):
        import tempfile

        path = Path(tempfile.mkdtemp()) / "p.onnx"
        ir.save(prefill, path, external_data="p.onnx.data")
    s = ort.InferenceSession(str(path))
    for _ in range(new):
        ids = np.concatenate([ids, s.run(None, {"input_ids": ids})[0][:, -1].argmax(-1)[:, None]], 1)
    return ids


def _mlp_widths(model):
    """The MLP hidden widths: the widths of the [64, W] weights other than the k/v projections (32) and the
    lm_head (128, the vocabulary; the MLPs' own 128 when unpruned), with their counts."""
    from collections import Counter

    return Counter(v.const_value.shape[1] for v in model.graph.initializers.values()
                   if v.const_value is not None and len(v.const_value.shape) == 2 and v.const_value.shape[0] == 64
                   and v.const_value.shape[1] not in (32, 64))


def test_a_reshape_target_every_layer_reads_couples_their_heads(pair):
    """transformers' repeat_kv: the exporter computes the [B, kv, n_rep, N, D] and [B, H, N, D] targets once and
    every layer reads them, so one count serves all layers: their KV groups form one group (removed alike), or the
    layers would need different values in one constant."""
    from graphprune.analysis.channels import analyze_channels

    groups = [g for g in analyze_channels(ir.load(pair[0])).groups if g.kind == "heads"]
    assert len(groups) == 1 and groups[0].prunable and groups[0].size == 2
    assert len(groups[0].spaces) == 4 * 3  # q, k and v projections of the 4 layers


def _cache_heads(model):
    """Layer → the head axis of every cache tensor it declares (``past_key_values.i.*`` inputs, ``present.i.*``
    outputs)."""
    out = {}
    for v in (*model.graph.inputs, *model.graph.outputs):
        if v.name.startswith(("past_key_values.", "present.")):
            out.setdefault(int(v.name.split(".")[1]), []).append(v.shape[1])
    return out


@pytest.mark.parametrize("real", [False, True])
def test_channel_pruned_pair_decodes_what_its_prefill_computes(pair, real):
    """The MLPs' hidden units and the attention heads (whole KV groups: a key/value head with its query heads)
    chosen on the prefill graph (magnitude; with calibration, activations, measured sensitivity and a least-squares
    refit) leave the decode graph too, with the same (refitted) weights; the decode step's cache Concat carries the
    heads, so its past inputs and both graphs' present outputs lose the same heads. Greedy decoding over the pair's
    cache equals the pruned prefill recomputing the whole sequence."""
    calib = [{"input_ids": _ids(2, 24, seed=s)} for s in (1, 2)] if real else None
    pre, dec, info = channel_prune_pair(*pair, {"ratio": 0.3}, calib, data_source="user" if real else "synthetic")
    # magnitude: 30% of every MLP (128 → 88) and one of the two KV groups of every layer (one group for all
    # layers: transformers' repeat_kv exports one computed reshape target that every layer reads, so every layer
    # keeps the same heads); measured sensitivity may leave the most sensitive groups whole
    assert info["pair_groups"] == 5 if not real else 1 <= info["pair_groups"] <= 5
    assert (info.get("reconstructed_layers", 0) > 0) == real
    assert _mlp_widths(dec) == _mlp_widths(pre)
    heads_pre, heads_dec = _cache_heads(pre), _cache_heads(dec)
    for layer in range(4):  # present k/v of the prefill; past k/v and present k/v of the decode step
        assert len(set(heads_pre[layer] + heads_dec[layer])) == 1, (layer, heads_pre, heads_dec)
    if not real:
        assert all(h == [1, 1] for h in heads_pre.values())
    assert len(cache_layout(pre, dec).pairs) == 8
    ids = _ids(2, 5, seed=4)
    np.testing.assert_array_equal(generate(pre, dec, ids, 8), _greedy_prefill(pre, ids, 8))
    assert _greedy_prefill(pre, ids, 1).shape == (2, 6)


def test_cli_prune_pair_channels_and_depth(pair, tmp_path, capsys):
    from tests.helpers import cli

    out, rep = tmp_path / "pruned", tmp_path / "r.json"
    code, stdout, err = cli(["prune-pair", *pair, "-o", out, "--prune-channels", "0.3", "--prune-depth", "0.25",
                             "--top1-min", "0", "--report", rep], capsys)
    assert code == 0, err
    import json

    r = json.loads(rep.read_text())
    assert r["channels"]["pair_groups"] == 5 and len(r["removed"]) == 1 and "channels: 5 group(s)" in stdout
    ids = _ids(1, 4, seed=9)
    np.testing.assert_array_equal(generate(out / "prefill.onnx", out / "decode.onnx", ids, 6),
                                  _greedy_prefill(out / "prefill.onnx", ids, 6))


@pytest.mark.parametrize(("args", "message"), [
    ([], "give --prune-depth R and/or --prune-channels R"),
    (["--prune-channels", "1.5"], "--prune-channels must be in (0, 1)"),
    (["--prune-depth", "0.99"], "removes all 4 units"),
    (["--prune-depth", "0.25", "--unit", "layer"], "--unit must be"),
    (["--prune-depth", "0.25", "--top1-min", "1.01"], "verification failed"),
])
def test_cli_prune_pair_user_errors(pair, tmp_path, capsys, args, message):
    from tests.helpers import cli

    out = tmp_path / "o"
    code, _, err = cli(["prune-pair", *pair, "-o", out, *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) <= 2, err
    assert not out.exists()


def test_cli_a_pair_whose_cache_does_not_pair_is_exit_2(pair, capsys):
    from tests.helpers import cli

    code, _, err = cli(["generate", pair[0], pair[0], "--ids", "1,2"], capsys)
    assert code == 2 and "cache layout not recognised" in err


def test_cli_optimize_on_a_decode_graph_alone_points_to_prune_pair(pair, tmp_path, capsys):
    """``optimize`` verifies one graph against its original: a decode step whose removed block took its cache
    outputs along cannot match, and the one-line error says what to use instead."""
    from tests.helpers import cli

    out = tmp_path / "o.onnx"
    code, _, err = cli(["optimize", pair[1], "-o", out, "--prune-depth", "0.25"], capsys)
    assert code == 2 and "missing: present." in err and "graphprune prune-pair" in err, err
    assert not out.exists()
