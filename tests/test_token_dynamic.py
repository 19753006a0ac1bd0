"""``token_drop`` on dynamic-sequence exports (transformers BERT) and ``restore`` for per-token outputs.

References: the same weights exported with a static sequence length (the static path, checked against torch in
``test_token_drop.py``), the unoptimized model (keep 1.0), and a torch reference of ``restore`` built from the
transformers model's own attention probabilities and hidden states.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from graphprune.backends.onnxruntime import run
from graphprune.ops import token_select
from graphprune.passes import get_pass

transformers = pytest.importorskip("transformers")
TokenDrop = get_pass("token_drop")
NAMES = ["input_ids", "attention_mask"]


class _MeanPool(torch.nn.Module):
    """Sentence-embedding head (mean over the unmasked tokens), as sentence-transformers encoders have."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


class _Hidden(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


class _Unpadded(torch.nn.Module):
    """No attention mask input (unpadded batches): the case ToMe supports. ``pool``: mean over the tokens."""

    def __init__(self, bert, pool: bool):
        super().__init__()
        self.bert, self.pool = bert, pool

    def forward(self, ids):
        h = self.bert(input_ids=ids).last_hidden_state
        return h.mean(1) if self.pool else h


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=200, max_position_embeddings=128)
    return transformers.BertModel(cfg).eval()


def _export(module, path, n: int, dynamic: bool, mask: bool = True):
    from graphprune.torch import export

    ids = torch.randint(0, 200, (2, n), generator=torch.Generator().manual_seed(1))
    args = (ids, torch.ones(2, n, dtype=torch.int64)) if mask else (ids,)
    export(module, args, path, input_names=NAMES[:len(args)], output_names=["out"],
           dynamic_axes={0: "batch", 1: "sequence"} if dynamic else None)
    return path


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    """Paths of one tiny BERT exported four ways: mean-pooled dynamic / static (23 tokens), per-token dynamic."""
    folder = tmp_path_factory.mktemp("dyn")
    bert = _bert()
    return {
        "bert": bert,
        "pool": _export(_MeanPool(bert).eval(), folder / "pool.onnx", 16, True),
        "pool23": _export(_MeanPool(bert).eval(), folder / "pool23.onnx", 23, False),
        "hidden": _export(_Hidden(bert).eval(), folder / "hidden.onnx", 16, True),
        "u_pool": _export(_Unpadded(bert, True).eval(), folder / "u_pool.onnx", 16, True, mask=False),
        "u_pool23": _export(_Unpadded(bert, True).eval(), folder / "u_pool23.onnx", 23, False, mask=False),
        "u_hidden": _export(_Unpadded(bert, False).eval(), folder / "u_hidden.onnx", 16, True, mask=False),
    }


def _feeds(batch: int, n: int, seed: int = 0, pad: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, (batch, n)).astype(np.int64)
    mask = np.ones((batch, n), np.int64)
    if pad and batch > 1:
        mask[1, max(1, n // 2):] = 0  # a padded row: the mask must follow the kept tokens
    return {"input_ids": ids, "attention_mask": mask}


def _apply(path, cfg):
    model = ir.load(str(path))
    result = TokenDrop(cfg)(model)
    return model, result


def _flops(model):
    from graphprune.backends.onnxruntime import measure_flops

    return measure_flops(model, dims={"sequence": 32}).flops


@pytest.mark.slow
def test_dynamic_bert_is_rewritten_and_equals_the_static_export(berts):
    """Dynamic N: every default layer is reduced (k from the runtime N); at N = 23 the result equals the static
    export of the same weights through the static path; several lengths and batches run."""
    dyn, res = _apply(berts["pool"], {"keep_ratio": 0.7})
    assert [r.layer for r in res.rewritten] == [1, 2, 3] and not res.skipped
    assert [r.tokens_before for r in res.rewritten] == ["N", "N1", "N2"]
    assert res.info["tokens"] == "dynamic (sequence)" and res.info["restore"] is False
    assert all("no CLS token" in r.scores for r in res.rewritten)  # BERT has no prepended CLS: column-mean scores
    static, sres = _apply(berts["pool23"], {"keep_ratio": 0.7})
    assert [r.tokens_after for r in sres.rewritten] == [17, 12, 9]  # ceil(0.7·23), ceil(0.7·17), ceil(0.7·12)
    feeds = _feeds(3, 23)
    np.testing.assert_allclose(run(dyn, feeds)[0], run(static, feeds)[0], atol=1e-5)
    assert _flops(dyn) < 0.8 * _flops(ir.load(str(berts["pool"])))
    for batch, n in ((1, 5), (2, 17), (3, 40)):
        out = run(dyn, _feeds(batch, n, seed=n))[0]
        assert out.shape == (batch, 64) and np.isfinite(out).all()


@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.slow
def test_keep_one_is_the_identity_at_every_length(berts, restore):
    """keep 1.0 keeps every token in order: the rewired counts, gathered masks and (with restore) the scatter
    back must reproduce the original at any N."""
    base = ir.load(str(berts["hidden"]))
    model, res = _apply(berts["hidden"], {"keep_ratio": 1.0, "layers": [1, 2], "restore": restore})
    assert len(res.rewritten) == 2
    for batch, n in ((1, 7), (2, 16), (2, 33)):
        feeds = _feeds(batch, n, seed=n)
        np.testing.assert_allclose(run(model, feeds)[0], run(base, feeds)[0], atol=1e-5)


@pytest.mark.slow
def test_restore_is_the_default_for_per_token_outputs(berts):
    model, res = _apply(berts["hidden"], {"keep_ratio": 0.5})
    assert res.info["restore"] is True and res.info["restored_outputs"] == ["out"]
    assert str(model.graph.outputs[0].shape[1]) == "sequence"
    for n in (9, 30):
        assert run(model, _feeds(2, n))[0].shape == (2, n, 64)
    kept, res = _apply(berts["hidden"], {"keep_ratio": 0.5, "restore": False})
    assert res.info["per_token_outputs"] == ["out"]
    n = 30
    k1 = token_select.kept_count(n, 0, keep_ratio=0.5)
    k3 = token_select.kept_count(token_select.kept_count(k1, 0, keep_ratio=0.5), 0, keep_ratio=0.5)
    assert run(kept, _feeds(2, n))[0].shape == (2, k3, 64)


@torch.no_grad()
@pytest.mark.slow
def test_restore_matches_a_torch_reference(berts):
    """Reduce at the last block only: the kept tokens go through its MLP (per token, so they equal the original
    output there) and the dropped ones come back with the value they had when dropped (the block's attention
    output, after its LayerNorm); the kept set is the column-mean top half of that block's attention."""
    bert, n = berts["bert"], 21
    model, res = _apply(berts["hidden"], {"keep_ratio": 0.5, "layers": [3]})
    assert res.info["restore"] is True
    feeds = _feeds(2, n, pad=False)
    got = run(model, feeds)[0]
    ids, mask = (torch.from_numpy(feeds[k]) for k in NAMES)
    captured = {}

    def keep(module, args, output):
        captured["a"] = output[0] if isinstance(output, tuple) else output

    hook = bert.encoder.layer[3].attention.register_forward_hook(keep)
    bert.set_attn_implementation("eager")  # the exports used the default (sdpa); eager returns the probabilities
    try:
        out = bert(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        hook.remove()
        bert.set_attn_implementation("sdpa")
    scores = out.attentions[3].mean(dim=(1, 2))  # [B, N]: attention each token receives
    k = token_select.kept_count(n, 0, keep_ratio=0.5)
    kept = torch.topk(scores, k, dim=1).indices
    want = captured["a"].clone()
    rows = torch.arange(2)[:, None]
    want[rows, kept] = out.last_hidden_state[rows, kept]
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5)
    assert not np.allclose(got, out.last_hidden_state.numpy(), atol=1e-3)  # the dropped tokens did skip the MLP


def _ids(feeds):
    return {"input_ids": feeds["input_ids"]}


@pytest.mark.slow
def test_tome_is_refused_on_padded_inputs(berts):
    """With an attention mask from the inputs, ToMe would merge real tokens into padding: a skip with the reason."""
    model, res = _apply(berts["pool"], {"method": "tome", "r": 3})
    assert not res.modified and "padding" in res.skipped[0].reason and res.skipped[0].where == "model"


@pytest.mark.slow
def test_tome_restore_at_r0_is_the_identity(berts):
    base = ir.load(str(berts["u_hidden"]))
    model, res = _apply(berts["u_hidden"], {"method": "tome", "r": 0})
    assert res.info["restore"] is True and len(res.rewritten) == 4
    for n in (6, 19):
        feeds = _ids(_feeds(2, n, seed=n))
        np.testing.assert_allclose(run(model, feeds)[0], run(base, feeds)[0], atol=1e-5)


@torch.no_grad()
@pytest.mark.slow
def test_tome_unmerge_matches_a_reference(berts):
    """ToMe at the last block with restore: each input token gets the final value of the token it merged into.
    Reference: the op's numpy definition on the block's attention output and head-mean keys, then the block's
    MLP in torch, then the copy back to the sources."""
    from graphprune.ops import token_merge

    bert, n, r = berts["bert"], 15, 5
    model, res = _apply(berts["u_hidden"], {"method": "tome", "r": r, "layers": [3]})
    assert res.info["restore"] is True and "one-hot" in res.rewritten[0].note
    feeds = _feeds(2, n, pad=False)
    got = run(model, _ids(feeds))[0]
    assert got.shape == (2, n, 64)
    layer, captured = bert.encoder.layer[3], {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    hooks = [layer.attention.register_forward_hook(keep("a")),
             layer.attention.self.key.register_forward_hook(keep("k"))]
    try:
        bert(input_ids=torch.from_numpy(feeds["input_ids"]))
    finally:
        for h in hooks:
            h.remove()
    a = captured["a"].numpy()
    metric = captured["k"].reshape(2, n, 4, 16).mean(2).numpy()
    y, _, _ = token_merge.reference(a, metric, r=r, protect=0)
    members, _, _ = token_merge.reference(np.broadcast_to(np.eye(n, dtype=np.float32), (2, n, n)).copy(), metric,
                                          r=r, protect=0)
    yt = torch.from_numpy(y)
    final = layer.output(layer.intermediate(yt), yt).numpy()  # [B, n - r, C]
    src = members.argmax(1)  # [B, n]: the output token holding each input token
    want = np.take_along_axis(final, src[:, :, None], axis=1)
    assert len(np.unique(src[0])) == n - r
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.slow
def test_tome_on_a_dynamic_export_matches_the_static_one(berts):
    dyn, res = _apply(berts["u_pool"], {"method": "tome", "r": 3})
    static, _ = _apply(berts["u_pool23"], {"method": "tome", "r": 3})
    assert len(res.rewritten) == 4, res.skipped
    feeds = _ids(_feeds(2, 23))
    np.testing.assert_allclose(run(dyn, feeds)[0], run(static, feeds)[0], atol=1e-5)
    for n in (3, 5, 40):  # 3 and 5: r clamps to 0 once fewer than two tokens are left
        assert run(dyn, _ids(_feeds(2, n, seed=n)))[0].shape == (2, 64)


# ----------------------------------------------------------------- long single block, spatial-reduction attention

class _SRAttention(torch.nn.Module):
    """PVT/SegFormer-style attention: keys and values from the stream laid out as an H×W grid and reduced by a
    strided conv (``sr`` > 1), or from the stream itself (``sr`` = 1)."""

    def __init__(self, c: int, heads: int, sr: int):
        super().__init__()
        self.heads, self.d, self.sr = heads, c // heads, sr
        self.q, self.kv, self.proj = torch.nn.Linear(c, c), torch.nn.Linear(c, 2 * c), torch.nn.Linear(c, c)
        if sr > 1:
            self.conv, self.norm = torch.nn.Conv2d(c, c, sr, sr), torch.nn.LayerNorm(c)

    def probs(self, x, grid: int):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.d).permute(0, 2, 1, 3)
        y = x
        if self.sr > 1:
            y = self.norm(self.conv(x.permute(0, 2, 1).reshape(b, c, grid, grid)).reshape(b, c, -1).permute(0, 2, 1))
        k, v = self.kv(y).reshape(b, -1, 2, self.heads, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        return (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1), v

    def forward(self, x, grid: int):
        p, v = self.probs(x, grid)
        b, n, c = x.shape
        return self.proj((p @ v).transpose(1, 2).reshape(b, n, c))


class _SREncoder(torch.nn.Module):
    def __init__(self, depth: int, sr: int, image: int, c: int = 32, patch: int = 4):
        super().__init__()
        self.grid = image // patch
        self.embed = torch.nn.Conv2d(3, c, patch, patch)
        self.n1 = torch.nn.ModuleList(torch.nn.LayerNorm(c) for _ in range(depth))
        self.attn = torch.nn.ModuleList(_SRAttention(c, 2, sr) for _ in range(depth))
        self.n2 = torch.nn.ModuleList(torch.nn.LayerNorm(c) for _ in range(depth))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(c, 2 * c), torch.nn.GELU(),
                                                           torch.nn.Linear(2 * c, c)) for _ in range(depth))
        self.head = torch.nn.Linear(c, 10)

    def forward(self, x, keep: float | None = None):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for i in range(len(self.attn)):
            p, _ = self.attn[i].probs(self.n1[i](x), self.grid)
            x = x + self.attn[i](self.n1[i](x), self.grid)
            if keep is not None and i == 0:  # the pass at layers [0]: column-mean scores (no CLS token)
                k = token_select.kept_count(x.shape[1], 0, keep_ratio=keep)
                idx = torch.topk(p.mean(dim=(1, 2)), k, dim=1).indices.sort(dim=1).values
                x = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))
            x = x + self.mlp[i](self.n2[i](x))
        return self.head(x.mean(1))


def _export_static(module, x, path):
    from graphprune.torch import export

    export(module.eval(), (x,), path, input_names=["x"], output_names=["y"])
    return path


@pytest.mark.slow
@torch.no_grad()
def test_long_single_block_encoder_matches_torch(tmp_path):
    """4096 tokens, one block: the default layers select nothing (a skip with the reason); layers [0] rewrites
    and equals the torch forward with the same selection."""
    torch.manual_seed(0)
    enc = _SREncoder(depth=1, sr=1, image=256).eval()
    x = torch.randn(2, 3, 256, 256)
    path = _export_static(enc, x, tmp_path / "long.onnx")
    model, res = _apply(path, {"keep_ratio": 0.7})
    assert not res.modified and "no layer selected" in res.skipped[0].reason
    model, res = _apply(path, {"keep_ratio": 0.7, "layers": [0]})
    assert [(r.tokens_before, r.tokens_after) for r in res.rewritten] == [(4096, 2868)]
    np.testing.assert_allclose(run(model, {"x": x.numpy()})[0], enc(x, keep=0.7).numpy(), atol=2e-5)


@pytest.mark.slow  # a torch export of its own (the fast tier leaves those to CI)
def test_spatial_reduction_attention_is_refused_with_reasons(tmp_path):
    """SegFormer-style blocks: the block 0 keys are a reduced sequence (its columns score no token) and every later
    block lays the tokens out as a grid for the reducing conv: each is a skip naming why, never an error."""
    torch.manual_seed(0)
    enc = _SREncoder(depth=4, sr=4, image=64).eval()
    path = _export_static(enc, torch.randn(2, 3, 64, 64), tmp_path / "sr.onnx")
    for cfg in ({"keep_ratio": 0.7}, {"keep_ratio": 0.7, "layers": [0]}, {"method": "tome", "r": 4}):
        model, res = _apply(path, cfg)
        assert not res.modified and res.skipped
        assert all("grid" in s.reason or "another sequence" in s.reason for s in res.skipped), res.skipped
