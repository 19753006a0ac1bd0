"""Vision-language models: ``inspect``'s ``vision_language`` facts, and ``token_drop`` with ``scope: image`` at the
projector (FasterVLM, DivPrune) and in the decoder (FastV), against torch references that make the same selection.

Test models (transformers, random init from small configs, dynamo, opset 18, cached per session):
  * ``llava``: LLaVA (CLIP tower with [CLS], 3 layers, ``hidden_states[-2][:, 1:]``; two-layer projector; Llama
    decoder with 4 query heads over 2 KV heads), the image features concatenated after the first text token:
    image span ``[1, 17)`` of 24 positions;
  * ``llava_ids``: the same weights, the merge written as transformers' ``masked_scatter`` at static shapes
    (``input_ids == 250`` → CumSum → gather of the features → Where): the positions are read from ``input_ids``;
  * ``qwen2_vl``: Qwen2-VL (packed patches ``[P, C·T·p·p]`` without [CLS], 2D rotary, the patch merger as
    projector, M-RoPE positions as an input), batch 1, the masked spelling;
  * ``paligemma`` (below, its own tests): PaliGemma (SigLIP without [CLS], its last layer's features; one linear
    projector; a Gemma decoder with one KV head), the image tokens first, positions read from ``input_ids``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from graphprune.analysis import find_vision_language, summarize
from graphprune.errors import ConfigError
from graphprune.ops import diversity_select
from graphprune.passes.token_drop import TokenDropPass

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

IMG = 250  # LLaVA's image placeholder id in these tests
QWEN_IMG = 103
P = 16  # image tokens: 32×32 pixels, patch 8
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _llava(decoder_layers: int = 2):
    torch.manual_seed(0)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(**dict(TEXT, num_hidden_layers=decoder_layers))
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=text, image_token_index=IMG)
    m = transformers.LlavaForConditionalGeneration(cfg).eval()
    m.config._attn_implementation = "eager"
    return m


class _Llava(torch.nn.Module):
    """LLaVA's forward with the merge written out: ``concat`` (the features after the first text token) or
    ``ids`` (at the positions where ``input_ids == IMG``; the static-shape spelling of ``masked_scatter``)."""

    def __init__(self, m, spelling: str) -> None:
        super().__init__()
        self.m, self.spelling = m, spelling

    def features(self, pixel_values):
        hs = self.m.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        return self.m.model.multi_modal_projector(hs)

    def merged(self, pixel_values, input_ids):
        feats = self.features(pixel_values)
        emb = self.m.model.get_input_embeddings()(input_ids)
        if self.spelling == "concat":
            return torch.cat([emb[:, :1], feats, emb[:, 1:]], 1)
        mask = input_ids == IMG
        idx = (mask.long().cumsum(1) - 1).clamp(min=0)
        g = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return torch.where(mask.unsqueeze(-1), g, emb)

    def forward(self, pixel_values, input_ids):
        emb = self.merged(pixel_values, input_ids)
        return self.m.lm_head(self.m.model.language_model(inputs_embeds=emb, use_cache=False).last_hidden_state)


def _ids(batch: int, spelling: str, seed: int = 0, offsets=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if spelling == "concat":
        return rng.integers(0, 240, (batch, 8)).astype(np.int64)
    ids = rng.integers(0, 240, (batch, 24)).astype(np.int64)
    for b in range(batch):  # each sample its own image position
        o = offsets[b] if offsets is not None else 1 + b % 5
        ids[b, o:o + P] = IMG
    return ids


def _export_llava(spelling: str, folder):
    path = folder / f"llava_{spelling}.onnx"
    px = torch.randn(2, 3, 32, 32)
    ids = torch.from_numpy(_ids(2, spelling))
    batch = torch.export.Dim("batch")
    torch.onnx.export(_Llava(_llava(), spelling).eval(), (px, ids), str(path), dynamo=True, opset_version=18,
                      input_names=["pixel_values", "input_ids"], output_names=["logits"],
                      dynamic_shapes={"pixel_values": {0: batch}, "input_ids": {0: batch}})
    return path


class _QwenVL(torch.nn.Module):
    """Qwen2-VL for one image of 8×8 patches (16 tokens after the 2×2 merger), positions as an input (M-RoPE)."""

    def __init__(self, m) -> None:
        super().__init__()
        self.m = m

    def forward(self, pixel_values, input_ids, position_ids):
        from transformers.models.qwen2_vl import modeling_qwen2_vl as q

        vis = self.m.model.visual
        grid = torch.tensor([[1, 8, 8]])
        h = vis.patch_embed(pixel_values)
        pe = vis.rotary_pos_emb(h, q.get_vision_position_ids(grid, vis.spatial_merge_size, kwargs={}))
        cu = torch.tensor([0, h.shape[0]], dtype=torch.int32)  # one image: the packed split is a no-op
        for blk in vis.blocks:
            h = blk(h, cu_seqlens=cu, max_seqlen=h.shape[0], position_embeddings=pe)
        feats = vis.merger(h).unsqueeze(0)
        emb = self.m.model.get_input_embeddings()(input_ids)
        mask = input_ids == QWEN_IMG
        idx = (mask.long().cumsum(1) - 1).clamp(min=0)
        emb = torch.where(mask.unsqueeze(-1), torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1])),
                          emb)
        out = self.m.model.language_model(inputs_embeds=emb, position_ids=position_ids, use_cache=False)
        return self.m.lm_head(out.last_hidden_state)


def _export_qwen(folder):
    torch.manual_seed(0)
    vc = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
    tc = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    m = transformers.Qwen2VLForConditionalGeneration(
        transformers.Qwen2VLConfig(vision_config=vc, text_config=tc, image_token_id=QWEN_IMG)).eval()
    m.config._attn_implementation = "eager"
    for c in (m.config.vision_config, m.config.text_config):
        c._attn_implementation = "eager"
    px, ids, pos = _qwen_feed()
    path = folder / "qwen2_vl.onnx"
    torch.onnx.export(_QwenVL(m).eval(), tuple(torch.from_numpy(x) for x in (px, ids, pos)), str(path), dynamo=True,
                      opset_version=18, input_names=["pixel_values", "input_ids", "position_ids"],
                      output_names=["logits"])
    return path


def _qwen_feed(seed: int = 0):
    rng = np.random.default_rng(seed)
    px = rng.standard_normal((64, 3 * 2 * 4 * 4)).astype(np.float32)
    ids = rng.integers(110, 250, (1, 24)).astype(np.int64)
    ids[:, 3:19] = QWEN_IMG
    pos = np.broadcast_to(np.arange(24), (3, 1, 24)).copy().astype(np.int64)
    return px, ids, pos


@pytest.fixture(scope="module")
def vlm(model_cache):
    def get(name: str):
        if name == "qwen2_vl":
            return model_cache.get(("vlm", name), _export_qwen)
        return model_cache.get(("vlm", name), lambda folder: _export_llava(name.split("_")[-1] if "_" in name
                                                                            else "concat", folder))
    return get


@pytest.fixture(scope="module")
def llava_torch():
    return _llava()


def _run(path, feed):
    import onnxruntime as ort

    return ort.InferenceSession(str(path)).run(None, feed)[0]


def _apply(path, **cfg):
    model = ir.load(str(path))
    result = TokenDropPass(dict(scope="image", **cfg))(model)
    return model, result


def _save(model, tmp_path, name="pruned.onnx"):
    out = tmp_path / name
    ir.save(model, out, external_data=name + ".data")  # the export's weights are external: copied along
    return out


# ---------------------------------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("name", ["llava", "llava_ids"])
def test_inspect_describes_llava(vlm, name):
    model = ir.load(str(vlm(name)))
    info = summarize(model)
    vl = info["vision_language"]
    # hidden_states[-2]: the last vision layer is dead code, dropped by the exporter: 2 vision + 2 decoder blocks
    assert vl["vision_blocks"] == [0, 1] and vl["decoder_blocks"] == [2, 3]
    assert (vl["image_input"], vl["text_input"], vl["vision_prefix_tokens"]) == ("pixel_values", "input_ids", 1)
    assert vl["projector"]["linear_layers"] == 2 and vl["image_tokens"] == P
    if name == "llava":
        assert (vl["merge"]["op"], vl["image_span"], vl["image_token_id"]) == ("Concat", [1, 1 + P], None)
    else:
        assert (vl["merge"]["op"], vl["image_span"], vl["image_token_id"]) == ("Where", None, IMG)
    blocks = info["attention_blocks"]
    assert [(b["causal"], b["kv_heads"], b["prefix_tokens"]) for b in blocks[2:]] == [(True, 2, 0)] * 2
    assert [(b["causal"], b["prefix_tokens"]) for b in blocks[:2]] == [(False, 1)] * 2


def test_inspect_describes_qwen2_vl(vlm):
    model = ir.load(str(vlm("qwen2_vl")))
    info = summarize(model)
    vl = info["vision_language"]
    assert vl["vision_blocks"] == [0, 1] and vl["decoder_blocks"] == [2, 3] and vl["vision_prefix_tokens"] == 0
    assert (vl["merge"]["op"], vl["image_span"], vl["image_token_id"], vl["image_tokens"]) == ("Where", None,
                                                                                              QWEN_IMG, 16)
    assert vl["projector"]["linear_layers"] == 2  # the patch merger's MLP
    blocks = info["attention_blocks"]
    assert [(b["tokens"], b["causal"]) for b in blocks[:2]] == [(64, False)] * 2
    assert [(b["causal"], b["kv_heads"]) for b in blocks[2:]] == [(True, 2)] * 2


def test_a_model_without_images_has_no_vision_language(hf_export):
    model = ir.load(str(hf_export("vit")))
    assert find_vision_language(model) is None
    assert summarize(model)["vision_language"] is None


def test_inspect_cli_prints_the_vision_language_line(vlm, capsys):
    from graphprune.cli import main

    ids, concat = str(vlm("llava_ids")), str(vlm("llava"))
    capsys.readouterr()  # an export made here prints its progress to stdout
    main(["inspect", ids, "--json"])
    vl = json.loads(capsys.readouterr().out)["vision_language"]
    assert vl["image_token_id"] == IMG and vl["merge"]["op"] == "Where"
    main(["inspect", concat])
    text = " ".join(capsys.readouterr().out.split())
    assert "vision-language: vision blocks 0–1 (1 prefix token(s)), decoder blocks 2–3" in text
    assert "16 image tokens merged by Concat" in text and "at span [1, 17)" in text


# ---------------------------------------------------------------------------------------------- torch references
def _decode_kept(m, full: torch.Tensor, kept: torch.Tensor) -> np.ndarray:
    """The decoder on the kept rows of one sample's merged sequence, at their original positions."""
    with torch.no_grad():
        h = m.model.language_model(inputs_embeds=full[None, kept], position_ids=kept[None],
                                   attention_mask=torch.ones(1, len(kept), dtype=torch.long),  # not a packed batch
                                   use_cache=False).last_hidden_state
        return m.lm_head(h)[0].numpy()


def _image_positions(ids: np.ndarray, spelling: str, b: int) -> np.ndarray:
    return np.arange(1, 1 + P) if spelling == "concat" else np.flatnonzero(ids[b] == IMG)


def _check_text_rows(got: np.ndarray, ref_rows: np.ndarray, kept: np.ndarray, image_pos: np.ndarray) -> None:
    """Every text position of ``got`` (the pruned model's restored output) equals the reference's row for it."""
    n = got.shape[0]
    text = np.setdiff1d(np.arange(n), image_pos)
    assert np.isin(text, kept).all()  # text tokens are never dropped
    rows = [int(np.flatnonzero(kept == t)[0]) for t in text]
    np.testing.assert_allclose(got[text], ref_rows[rows], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spelling,batch,query", [("concat", 1, "auto"), ("concat", 3, "auto"), ("ids", 1, "auto"),
                                                  ("ids", 3, "auto"), ("ids", 3, "mean")])
def test_projector_stage_matches_fastervlm_reference(vlm, llava_torch, tmp_path, spelling, batch, query):
    """FasterVLM: the [CLS] attention of the last live vision layer picks 4 of 16 image tokens per sample (``query:
    mean``: the attention each patch receives, over every query row); the decoder sees the text and the kept image
    tokens at their original positions."""
    name = "llava" if spelling == "concat" else "llava_ids"
    model, result = _apply(vlm(name), keep_ratio=0.25, query=query)
    assert result.modified and result.info["image_tokens_after"] == 4
    rng = np.random.default_rng(batch)
    px = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    ids = _ids(batch, spelling, seed=batch)
    got = _run(_save(model, tmp_path), {"pixel_values": px, "input_ids": ids})
    net = _Llava(llava_torch, spelling)
    with torch.no_grad():
        vo = llava_torch.model.vision_tower(torch.from_numpy(px), output_hidden_states=True, output_attentions=True)
        att = vo.attentions[1]  # the feature layer (hidden_states[-2]) is vision layer 1
        cls = att[:, :, 0, 1:].mean(1) if query == "auto" else att.mean((1, 2))[:, 1:]
        full = net.merged(torch.from_numpy(px), torch.from_numpy(ids))
    assert got.shape == (batch, full.shape[1], 256)
    for b in range(batch):
        img = _image_positions(ids, spelling, b)
        top = np.sort(torch.topk(cls[b], 4).indices.numpy())
        kept = np.sort(np.concatenate([np.setdiff1d(np.arange(full.shape[1]), img), img[top]]))
        _check_text_rows(got[b], _decode_kept(llava_torch, full[b], torch.from_numpy(kept)), kept, img)


@pytest.mark.parametrize("anchor_share,batch", [(None, 1), (0.25, 3)])
def test_hiprune_at_the_projector_matches_the_reference(vlm, llava_torch, tmp_path, anchor_share, batch):
    """HiPrune keeping 8 of 16 image tokens: anchors by the attention each patch receives in vision layer 0 (the
    middle of the 2 live layers), their 4 grid neighbours on the 4×4 grid, then registers by layer 1's received
    attention. With anchor_share 0.25 the 2 anchors and their buffers can exceed 8: the buffers then compete by
    layer 1's score."""
    kw = {} if anchor_share is None else {"anchor_share": anchor_share}
    model, result = _apply(vlm("llava_ids"), keep_ratio=0.5, method="hiprune", **kw)
    assert result.modified and result.info["image_tokens_after"] == 8
    n_anchor = 1 if anchor_share is None else 2
    assert f"{n_anchor} anchor(s)" in result.rewritten[0].scores
    rng = np.random.default_rng(11 + batch)
    px = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    ids = _ids(batch, "ids", seed=batch)
    got = _run(_save(model, tmp_path), {"pixel_values": px, "input_ids": ids})
    with torch.no_grad():
        vo = llava_torch.model.vision_tower(torch.from_numpy(px), output_attentions=True)
        middle = vo.attentions[0].mean((1, 2))[:, 1:].numpy()
        deep = vo.attentions[1].mean((1, 2))[:, 1:].numpy()
        full = _Llava(llava_torch, "ids").merged(torch.from_numpy(px), torch.from_numpy(ids))
    for b in range(batch):
        anchors = np.argsort(-middle[b], kind="stable")[:n_anchor]
        near = np.zeros((4, 4), dtype=np.float32)
        for a in anchors:
            r, c = divmod(int(a), 4)
            for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= r + dr < 4 and 0 <= c + dc < 4:
                    near[r + dr, c + dc] = 1.0
        score = deep[b] + near.reshape(-1) + np.isin(np.arange(P), anchors)
        top = np.sort(np.argsort(-score, kind="stable")[:8])
        assert set(anchors) <= set(top)
        img = _image_positions(ids, "ids", b)
        kept = np.sort(np.concatenate([np.setdiff1d(np.arange(full.shape[1]), img), img[top]]))
        _check_text_rows(got[b], _decode_kept(llava_torch, full[b], torch.from_numpy(kept)), kept, img)


def test_divprune_at_the_projector_matches_the_reference(vlm, llava_torch, tmp_path):
    model, result = _apply(vlm("llava"), keep_ratio=0.25, method="diversity")
    assert result.modified
    rng = np.random.default_rng(5)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = _ids(2, "concat", seed=5)
    got = _run(_save(model, tmp_path), {"pixel_values": px, "input_ids": ids})
    net = _Llava(llava_torch, "concat")
    with torch.no_grad():
        feats = net.features(torch.from_numpy(px)).numpy()
        full = net.merged(torch.from_numpy(px), torch.from_numpy(ids))
    _, picked = diversity_select.reference(feats, k=4, protect=0, keep_order=True)
    for b in range(2):
        img = np.arange(1, 1 + P)
        kept = np.sort(np.concatenate([[0], img[picked[b]], np.arange(1 + P, 24)]))
        _check_text_rows(got[b], _decode_kept(llava_torch, full[b], torch.from_numpy(kept)), kept, img)


def _decoder_drop_reference(m, full: torch.Tensor, image_pos: np.ndarray, layers: list[int], keep: float
                            ) -> tuple[np.ndarray, np.ndarray]:
    """FastV / PyramidDrop in torch for one sample: the decoder layer by layer; after each layer K of ``layers``,
    the last row's head-mean attention in K keeps ``kept_count`` of the image tokens left (text always kept); the
    next layers run on the kept tokens with the rotary tables of their original positions. (logits, kept)."""
    from graphprune.ops import token_select

    lm = m.model.language_model
    kept = np.arange(full.shape[0])
    h = full[None]
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            n = len(kept)
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            pe = lm.rotary_emb(h, torch.from_numpy(kept)[None])
            if i in layers:
                _, probs = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_embeddings=pe)
            h = layer(h, attention_mask=mask, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
            if i in layers:
                score = probs[0].mean(0)[-1].numpy()
                img = np.flatnonzero(np.isin(kept, image_pos))
                k = token_select.kept_count(len(img), 0, keep_ratio=keep)
                top = img[np.argsort(-score[img], kind="stable")[:k]]
                rows = np.sort(np.concatenate([np.flatnonzero(~np.isin(kept, image_pos)), top]))
                h, kept = h[:, torch.from_numpy(rows)], kept[rows]
        return m.lm_head(lm.norm(h))[0].numpy(), kept


@pytest.mark.parametrize("spelling", ["concat", "ids"])
def test_decoder_stage_matches_fastv_reference(vlm, llava_torch, tmp_path, spelling):
    """FastV with K = 0: decoder layer 0 runs on every token; its last row's head-mean attention keeps 4 image
    tokens; layer 1 runs on the kept tokens with the rotary tables of their original positions."""
    name = "llava" if spelling == "concat" else "llava_ids"
    model, result = _apply(vlm(name), keep_ratio=0.25, stage="decoder", layers=[0])
    assert result.modified
    rng = np.random.default_rng(9)
    px = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids = _ids(3, spelling, seed=9)
    got = _run(_save(model, tmp_path), {"pixel_values": px, "input_ids": ids})
    with torch.no_grad():
        full = _Llava(llava_torch, spelling).merged(torch.from_numpy(px), torch.from_numpy(ids))
    for b in range(3):
        img = _image_positions(ids, spelling, b)
        ref, kept = _decoder_drop_reference(llava_torch, full[b], img, [0], 0.25)
        _check_text_rows(got[b], ref, kept, img)


def test_pyramiddrop_schedule_matches_the_reference(model_cache, tmp_path):
    """PyramidDrop: 75% of the image tokens left kept after decoder layers 0 and 1 of 3 (16 → 12 → 9; a count equal
    to a model dimension, such as 16 = head_dim, would be refused), each stage scored among the image tokens the
    last one kept; positions read from input_ids."""
    def make(folder):
        path = folder / "llava3.onnx"
        batch = torch.export.Dim("batch")
        torch.onnx.export(_Llava(_llava(3), "ids").eval(), (torch.randn(2, 3, 32, 32), torch.from_numpy(_ids(2, "ids"))),
                          str(path), dynamo=True, opset_version=18, input_names=["pixel_values", "input_ids"],
                          output_names=["logits"], dynamic_shapes={"pixel_values": {0: batch}, "input_ids": {0: batch}})
        return path

    model, result = _apply(model_cache.get(("vlm", "llava3"), make), keep_ratio=0.75, stage="decoder", layers=[0, 1])
    assert [(r.tokens_before, r.tokens_after) for r in result.rewritten] == [(24, 20), (20, 17)]
    assert result.info["image_tokens_after"] == 9 and not result.skipped
    rng = np.random.default_rng(12)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = _ids(2, "ids", seed=12, offsets=[2, 6])
    got = _run(_save(model, tmp_path), {"pixel_values": px, "input_ids": ids})
    m = _llava(3)
    with torch.no_grad():
        full = _Llava(m, "ids").merged(torch.from_numpy(px), torch.from_numpy(ids))
    for b in range(2):
        img = _image_positions(ids, "ids", b)
        ref, kept = _decoder_drop_reference(m, full[b], img, [0, 1], 0.75)
        _check_text_rows(got[b], ref, kept, img)


def test_keep_ratio_one_is_an_identity(vlm, tmp_path):
    path = vlm("llava")
    model, result = _apply(path, keep_ratio=1.0)
    assert not result.modified and "keeps all 16 image tokens" in result.skipped[0].reason
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32),
            "input_ids": _ids(2, "concat")}
    np.testing.assert_array_equal(_run(_save(model, tmp_path), feed), _run(path, feed))


def test_text_tokens_are_never_dropped_wherever_the_image_sits(vlm, tmp_path):
    """The placeholder run sits at a different offset in each sample; the kept indices (a graph output added here)
    hold every text position and exactly 4 image positions of that sample."""
    model, _ = _apply(vlm("llava_ids"), keep_ratio=0.25)
    idx = next(n for n in model.graph if n.op_type == "TokenSelect").outputs[1]
    model.graph.outputs.append(idx)
    offsets = [0, 3, 8]
    ids = _ids(3, "ids", seed=2, offsets=offsets)
    px = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    kept = ort.InferenceSession(str(_save(model, tmp_path))).run([idx.name], {"pixel_values": px, "input_ids": ids})[0]
    for b, o in enumerate(offsets):
        img = set(range(o, o + P))
        assert set(range(24)) - img <= set(kept[b].tolist())
        assert len(set(kept[b].tolist()) & img) == 4 and list(kept[b]) == sorted(kept[b])


def test_qwen2_vl_both_stages_keep_shapes_and_cut_flops(vlm, tmp_path):
    from graphprune.analysis import count_flops

    path = vlm("qwen2_vl")
    px, ids, pos = _qwen_feed(3)
    feed = {"pixel_values": px, "input_ids": ids, "position_ids": pos}
    base = _run(path, feed)
    f0 = count_flops(ir.load(str(path))).flops
    for stage, method in (("projector", "cls_attention"), ("projector", "hiprune"), ("decoder", "cls_attention")):
        model, result = _apply(path, keep_ratio=0.25, stage=stage, method=method,
                               **({"layers": [0]} if stage == "decoder" else {}))
        assert result.modified, result.skipped
        got = _run(_save(model, tmp_path, f"{stage}_{method}.onnx"), feed)
        assert got.shape == base.shape and np.isfinite(got).all()
        assert count_flops(model).flops < f0


def test_keep_ratio_one_on_positions_read_from_ids(vlm, tmp_path):
    model, result = _apply(vlm("llava_ids"), keep_ratio=1.0, stage="decoder", layers=[0])
    assert not result.modified


# ------------------------------------------------------------------------------------------------- configuration
def test_bad_configurations_are_config_errors(vlm, hf_export):
    with pytest.raises(ConfigError, match="no image tokens found"):
        _apply(hf_export("vit"), keep_ratio=0.5)
    with pytest.raises(ConfigError, match="decoder layer 5 does not exist"):
        _apply(vlm("llava"), keep_ratio=0.5, stage="decoder", layers=[5])
    with pytest.raises(ConfigError, match="not available with scope: image"):
        _apply(vlm("llava"), keep_ratio=0.5, method="tome")
    with pytest.raises(ConfigError, match="stage: projector"):
        _apply(vlm("llava"), keep_ratio=0.5, stage="decoder", method="diversity", layers=[0])
    with pytest.raises(ConfigError, match="not used at stage: projector"):
        _apply(vlm("llava"), keep_ratio=0.5, layers=[1])
    with pytest.raises(ConfigError, match="query: 'last' is not available at stage: projector"):
        _apply(vlm("llava"), keep_ratio=0.5, query="last")
    with pytest.raises(ConfigError, match="no \\[CLS\\] token"):
        _apply(vlm("qwen2_vl"), keep_ratio=0.5, query="cls")
    with pytest.raises(ConfigError, match="method: hiprune works at stage: projector"):
        _apply(vlm("llava"), keep_ratio=0.5, stage="decoder", method="hiprune", layers=[0])
    with pytest.raises(ConfigError, match="anchor_share: only used by method: hiprune"):
        _apply(vlm("llava"), keep_ratio=0.5, anchor_share=0.2)
    with pytest.raises(ConfigError, match="use it with scope: image"):
        TokenDropPass(dict(method="hiprune", keep_ratio=0.5))(ir.load(str(vlm("llava"))))
    with pytest.raises(ValueError, match="anchor_share must be in"):
        TokenDropPass(dict(method="hiprune", scope="image", anchor_share=0.0))


@pytest.mark.parametrize("args,needle", [
    (["--token-keep", "0.25", "--token-scope", "image"], "no image tokens found"),
    (["--token-scope", "image"], "give --token-keep too"),
    (["--token-keep", "0.25", "--token-scope", "pixels"], "scope"),
    (["--token-keep", "0", "--token-scope", "image"], "keep_ratio"),
    (["--token-keep", "0.25", "--token-layers", "1,x"], "--token-layers: expected comma-separated block indices"),
    (["--token-layers", "1"], "give --token-keep too"),
])
def test_cli_errors_are_one_line_and_exit_2(hf_export, tmp_path, capsys, args, needle):
    _user_error(["optimize", hf_export("vit"), "-o", tmp_path / "o.onnx", *args], capsys, tmp_path / "o.onnx", needle)


def test_cli_decoder_layer_out_of_range_exits_2(vlm, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    _user_error(["optimize", vlm("llava"), "-o", out, "--token-keep", "0.25", "--token-scope", "image",
                 "--token-stage", "decoder"], capsys, out, "decoder layer 2 does not exist")


def _user_error(args, capsys, out, needle: str) -> None:
    from graphprune.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err and not out.exists()


def test_cli_verifies_text_positions_only(vlm, tmp_path):
    """``--token-scope image`` through ``optimize``: the report says which positions were compared."""
    from graphprune.cli import main

    rep = tmp_path / "r.json"
    main(["optimize", str(vlm("llava_ids")), "-o", str(tmp_path / "o.onnx"), "--token-keep", "0.5",
          "--token-scope", "image", "--force", "--report", str(rep)])
    r = json.loads(rep.read_text())
    out = r["verify"]["outputs"][0]
    assert any("image-token positions not compared" in n for n in out["notes"])
    assert out["metrics"]["samples"] == 8
    assert r["passes"][0]["info"]["image_tokens_after"] == 8


# ------------------------------------------------------------------------------------------------------- KV cache
class _Prefill(_Llava):
    """The LLaVA prefill with its KV cache as outputs (``present.{i}.key`` / ``.value``)."""

    def forward(self, pixel_values, input_ids):
        out = self.m.model.language_model(inputs_embeds=self.merged(pixel_values, input_ids), use_cache=True)
        c = out.past_key_values
        return (self.m.lm_head(out.last_hidden_state),
                *[t for i in range(TEXT["num_hidden_layers"]) for t in (c.layers[i].keys, c.layers[i].values)])


def _export_pair(folder):
    """A LLaVA prefill graph with a cache, and the decode step of its language model taking ``position_ids``."""
    from graphprune.torch import export_decoder_pair

    m = _llava()
    names = ["logits"] + [f"present.{i}.{k}" for i in range(TEXT["num_hidden_layers"]) for k in ("key", "value")]
    batch = torch.export.Dim("batch")
    torch.onnx.export(_Prefill(m, "concat").eval(), (torch.randn(2, 3, 32, 32), torch.from_numpy(_ids(2, "concat"))),
                      str(folder / "prefill.onnx"), dynamo=True, opset_version=18,
                      input_names=["pixel_values", "input_ids"], output_names=names,
                      dynamic_shapes={"pixel_values": {0: batch}, "input_ids": {0: batch}})
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))
    lm.model, lm.lm_head = m.model.language_model, m.lm_head
    lm.config._attn_implementation = "eager"
    _, decode = export_decoder_pair(lm.eval(), folder / "pair", position_ids=True)
    return folder / "prefill.onnx", decode


def test_pruned_prefill_cache_and_generation_keep_original_positions(model_cache, llava_torch, tmp_path):
    """The pruned prefill writes the kept tokens' keys and values only (24 → 12 positions); greedy generation over
    it, with the decode step at positions 24, 25, ..., gives the tokens a torch decoder gives from the kept
    embeddings at their original positions."""
    from graphprune.decoder import generate

    prefill, decode = model_cache.get(("vlm", "pair"), _export_pair)
    model, result = _apply(prefill, keep_ratio=0.25)
    assert result.info["cache_outputs"] == [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    pruned = _save(model, tmp_path)
    rng = np.random.default_rng(4)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = _ids(2, "concat", seed=4)
    import onnxruntime as ort

    outs = ort.InferenceSession(str(pruned)).run(None, {"pixel_values": px, "input_ids": ids})
    assert outs[0].shape == (2, 24, 256) and all(o.shape == (2, 2, 12, 16) for o in outs[1:])
    got = generate(pruned, decode, ids, 4, prefill_inputs={"pixel_values": px})
    assert got.shape == (2, 8 + 4) and (got[:, :8] == ids).all()
    net, lm = _Llava(llava_torch, "concat"), llava_torch.model.language_model
    with torch.no_grad():
        vo = llava_torch.model.vision_tower(torch.from_numpy(px), output_hidden_states=True, output_attentions=True)
        cls = vo.attentions[1][:, :, 0, 1:].mean(1)
        full = net.merged(torch.from_numpy(px), torch.from_numpy(ids))
        for b in range(2):
            top = np.sort(torch.topk(cls[b], 4).indices.numpy())
            pos = torch.from_numpy(np.concatenate([[0], 1 + top, np.arange(1 + P, 24)]))
            emb, new = full[b:b + 1, pos], []
            for t in range(4):
                h = lm(inputs_embeds=emb, position_ids=pos[None], attention_mask=torch.ones(1, len(pos)),
                       use_cache=False).last_hidden_state
                nxt = int(llava_torch.lm_head(h)[0, -1].argmax())
                new.append(nxt)
                emb = torch.cat([emb, llava_torch.model.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
                pos = torch.cat([pos, torch.tensor([24 + t])])
            assert got[b, 8:].tolist() == new


def test_generation_after_a_decoder_stage_drop(model_cache, llava_torch, tmp_path):
    """FastV after decoder layer 0: layer 0's cache keeps all 24 prefill tokens, layer 1's the 12 kept; the decode
    step takes caches of different lengths. Reference without a cache: every step runs layer 0 on the whole
    sequence (prefill + generated), then layer 1 on the kept prefill tokens and the generated ones, at their
    original positions (the selection made at the prefill, as the cache fixes it)."""
    from graphprune.decoder import generate

    prefill, decode = model_cache.get(("vlm", "pair"), _export_pair)
    model, result = _apply(prefill, keep_ratio=0.25, stage="decoder", layers=[0])
    assert result.info["cache_outputs"] == ["present.1.key", "present.1.value"]
    pruned = _save(model, tmp_path)
    rng = np.random.default_rng(6)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = _ids(2, "concat", seed=6)
    import onnxruntime as ort

    outs = ort.InferenceSession(str(pruned)).run(None, {"pixel_values": px, "input_ids": ids})
    assert [o.shape[2] for o in outs[1:]] == [24, 24, 12, 12]
    got = generate(pruned, decode, ids, 4, prefill_inputs={"pixel_values": px})
    lm = llava_torch.model.language_model
    with torch.no_grad():
        full = _Llava(llava_torch, "concat").merged(torch.from_numpy(px), torch.from_numpy(ids))
        for b in range(2):
            _, kept = _decoder_drop_reference(llava_torch, full[b], np.arange(1, 1 + P), [0], 0.25)
            emb, new = full[b:b + 1], []
            for t in range(4):
                n = emb.shape[1]
                h, pos = emb, torch.arange(n)
                for i, layer in enumerate(lm.layers):
                    if i == 1:
                        rows = torch.from_numpy(np.concatenate([kept, np.arange(24, n)]))
                        h, pos = h[:, rows], pos[rows]
                    m = len(pos)
                    h = layer(h, attention_mask=torch.full((m, m), float("-inf")).triu(1)[None, None],
                              position_embeddings=lm.rotary_emb(h, pos[None]))
                    h = h[0] if isinstance(h, tuple) else h
                nxt = int(llava_torch.lm_head(lm.norm(h))[0, -1].argmax())
                if t == 0:
                    assert int(outs[0][b, -1].argmax()) == nxt  # the prefill's own prediction
                new.append(nxt)
                emb = torch.cat([emb, llava_torch.model.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
            assert got[b, 8:].tolist() == new


@pytest.mark.parametrize("stage", ["projector", "decoder"])
def test_optimize_runs_qwen2_vl_on_whole_feeds(vlm, tmp_path, stage):
    """Qwen2-VL's packed patches [64, 96] beside input_ids [1, 24] share no batch axis: optimize calibrates and
    verifies on whole feeds, never stacked. Synthetic feeds get the 16 image tokens the model merges; the written
    model equals the pass applied through the Python API."""
    from graphprune.cli import main
    from graphprune.data import synthetic_data

    path = vlm("qwen2_vl")
    ds = synthetic_data(ir.load(str(path)), 3)
    assert ds.whole and "16 image tokens (id" in ds.description
    feeds = ds.batches(8)
    assert len(feeds) == 3 and feeds[0]["pixel_values"].shape == (64, 96)
    assert [int((f["input_ids"] == QWEN_IMG).sum()) for f in feeds] == [16, 16, 16]
    rep, out = tmp_path / "r.json", tmp_path / "o.onnx"
    args = ["optimize", str(path), "-o", str(out), "--token-keep", "0.25", "--token-scope", "image",
            "--token-stage", stage, "--force", "--report", str(rep)]
    if stage == "decoder":  # 2 decoder layers: drop after layer 0
        args += ["--token-layers", "0"]
    main(args)
    r = json.loads(rep.read_text())
    assert r["passes"][0]["info"]["image_tokens_after"] == 4 and r["flops"]["ratio"] < 1
    assert "whole" in r["data"]["description"]
    px, ids, pos = _qwen_feed(7)
    feed = {"pixel_values": px, "input_ids": ids, "position_ids": pos}
    model, _ = _apply(path, keep_ratio=0.25, stage=stage, **({"layers": [0]} if stage == "decoder" else {}))
    np.testing.assert_allclose(_run(out, feed), _run(_save(model, tmp_path, "api.onnx"), feed), atol=1e-5)


def test_whole_feed_data_from_npz(vlm, tmp_path, capsys):
    """An .npz for a model without a common batch axis holds [S, *input shape] per input; a sample axis missing
    is one line, exit code 2."""
    from graphprune.cli import main

    path = vlm("qwen2_vl")
    feeds = [_qwen_feed(s) for s in range(6)]
    good = tmp_path / "d.npz"
    np.savez(good, pixel_values=np.stack([f[0] for f in feeds]), input_ids=np.stack([f[1] for f in feeds]),
             position_ids=np.stack([f[2] for f in feeds]))
    rep = tmp_path / "r.json"
    main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--token-keep", "0.25", "--token-scope", "image",
          "--data", str(good), "--calibration-samples", "3", "--verify-samples", "3", "--force", "--report", str(rep)])
    r = json.loads(rep.read_text())
    assert r["data"]["source"] == "user" and r["verify"]["outputs"][0]["metrics"]["samples"] == 3
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixel_values=feeds[0][0], input_ids=feeds[0][1], position_ids=feeds[0][2])
    out = tmp_path / "o2.onnx"
    _user_error(["optimize", path, "-o", out, "--token-keep", "0.25", "--token-scope", "image", "--data", bad],
                capsys, out, "each sample is a whole feed")

# ------------------------------------------------------------------------------------------------------- search
def test_search_space_and_scores_on_a_vlm(vlm, tmp_path):
    """The default search space drops image tokens only; a trial's agreement figures leave the image positions out
    (as verification does) and its accuracy reads the last position of [B, T, V] logits."""
    from graphprune.backends.onnxruntime import make_session
    from graphprune.data import Dataset
    from graphprune.pipeline import skipped_tokens
    from graphprune.search.data import EvalSet
    from graphprune.search.evaluate import Evaluator
    from graphprune.search.space import default_space

    path = vlm("llava_ids")
    space = default_space(ir.load(str(path)))
    td = {q.key: q for q in next(p for p in space.passes if p.name == "token_drop").params}
    assert td["scope"].fixed == "image" and set(td["method"].choices) == {"cls_attention", "diversity", "hiprune"}
    assert td["keep_ratio"].high <= 0.5 and "layers" not in td
    rng = np.random.default_rng(3)
    px = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    ids = _ids(6, "ids", seed=3)
    ds = Dataset("user", "test", [{"pixel_values": px[i], "input_ids": ids[i]} for i in range(6)])
    ref = _run(path, {"pixel_values": px, "input_ids": ids})
    labels = ref[:, -1].argmax(-1)
    labels[:2] = (labels[:2] + 1) % 256  # two answers the original gets wrong: accuracy 4/6
    ev = Evaluator(make_session(str(path)), EvalSet(ds, labels=labels), batch=4, task="labels")
    assert ev.original() == {"accuracy": pytest.approx(4 / 6)}
    model = ir.load(str(path))
    result = TokenDropPass(dict(scope="image", keep_ratio=0.25))(model)
    rec = [{"changed": True, "info": result.info}]
    pruned = _save(model, tmp_path)
    got = _run(pruned, {"pixel_values": px, "input_ids": ids})
    score = ev.score(make_session(str(pruned)), skip_tokens=skipped_tokens(rec))
    text = ids != IMG
    cos = [float(np.dot(a := ref[b][text[b]].ravel().astype(np.float64), c := got[b][text[b]].ravel())
                 / np.linalg.norm(a) / np.linalg.norm(c)) for b in range(6)]
    assert score["agreement"]["cosine"]["mean"] == pytest.approx(np.mean(cos), rel=1e-6)
    acc = float((got[:, -1].argmax(-1) == labels).mean())
    assert score["task"]["accuracy"]["value"] == pytest.approx(acc)
    whole = ev.score(make_session(str(pruned)))  # without: the restored image rows lower the cosine
    assert whole["agreement"]["cosine"]["mean"] < score["agreement"]["cosine"]["mean"]


def test_flops_fall_as_the_kept_share_predicts(vlm):
    """At the projector, keeping 4 of 16 image tokens leaves 12 of the decoder's 24: the decoder blocks' FLOPs (the
    nodes after the merge, up to the final norm, where the logits' rows are restored) fall to between (12/24)² (attention scores) and 12/24 (every linear layer) of what they were,
    and the vision tower's stay. After decoder layer 0 (FastV), layer 0 still sees 24: less is saved."""
    from graphprune.analysis import streams
    from graphprune.analysis.attention import find_attention_blocks
    from graphprune.analysis.tokens import downstream_nodes
    from graphprune.backends.onnxruntime import measure_flops

    path = vlm("llava")
    model = ir.load(str(path))
    blocks = find_attention_blocks(model)
    vl = find_vision_language(model, blocks)
    per_node = measure_flops(model).per_node  # static inference leaves some shapes unknown: measured in one run
    # the decoder's blocks; after the stream's end (final norm, lm_head) every position is restored: full length
    tail = {n.name for n in downstream_nodes(streams.stream_end(blocks[-1]))}
    dec = {n.name for n in downstream_nodes(vl.merge.outputs[0])} - tail
    f_dec = sum(f for name, f in per_node.items() if name in dec)
    f_rest = sum(per_node.values()) - f_dec
    assert f_dec > 0.2 * f_rest
    proj, _ = _apply(path, keep_ratio=0.25)
    f_proj = measure_flops(proj).flops
    r = 12 / 24
    assert f_rest + f_dec * r * r <= f_proj <= f_rest + f_dec * r * 1.02
    fastv, _ = _apply(path, keep_ratio=0.25, stage="decoder", layers=[0])
    assert f_proj < measure_flops(fastv).flops < f_rest + f_dec



# ---------------------------------------------------------------------------------------------------- PaliGemma
PG_IMG = 257


def _paligemma():
    torch.manual_seed(0)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
    tc = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16)
    cfg = transformers.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_index=PG_IMG, projection_dim=64)
    m = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    m.config._attn_implementation = "eager"
    return m


class _PaliGemma(torch.nn.Module):
    """PaliGemma's forward with the merge written as a static ``masked_scatter`` and a causal decoder (the
    prefix-LM mask left out: the image tokens attend causally, as in LLaVA)."""

    def __init__(self, m) -> None:
        super().__init__()
        self.m = m

    def merged(self, pixel_values, input_ids):
        feats = self.m.model.get_image_features(pixel_values)
        feats = getattr(feats, "pooler_output", feats)
        emb = self.m.model.get_input_embeddings()(input_ids)
        mask = input_ids == PG_IMG
        idx = (mask.long().cumsum(1) - 1).clamp(min=0)
        gathered = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return torch.where(mask.unsqueeze(-1), gathered, emb)

    def forward(self, pixel_values, input_ids):
        h = self.m.model.language_model(inputs_embeds=self.merged(pixel_values, input_ids), use_cache=False)
        return self.m.lm_head(h.last_hidden_state)


def _pg_ids(batch: int, seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, 250, (batch, 24)).astype(np.int64)
    ids[:, :P] = PG_IMG
    return ids


@pytest.fixture(scope="module")
def paligemma(model_cache):
    def export(folder):
        path = folder / "paligemma.onnx"
        batch = torch.export.Dim("batch")
        torch.onnx.export(_PaliGemma(_paligemma()).eval(), (torch.randn(2, 3, 32, 32), torch.from_numpy(_pg_ids(2, 0))),
                          str(path), dynamo=True, opset_version=18, input_names=["pixel_values", "input_ids"],
                          output_names=["logits"], dynamic_shapes={"pixel_values": {0: batch}, "input_ids": {0: batch}})
        return path

    return model_cache.get(("vlm", "paligemma"), export)


def test_paligemma_is_described_and_pruned_as_the_reference(paligemma, tmp_path):
    """A spelling the pass was not written for: no [CLS] (SigLIP), the image first, one KV head. ``inspect`` finds
    it; at the projector the attention each patch receives in SigLIP's last layer keeps 4 of 16 image tokens, and
    the text rows equal Gemma's on the kept rows at their original positions."""
    model = ir.load(str(paligemma))
    vl = summarize(model)["vision_language"]
    assert vl["vision_prefix_tokens"] == 0 and vl["image_token_id"] == PG_IMG and vl["image_tokens"] == P
    decoder = [b for b in summarize(model)["attention_blocks"] if b["index"] in vl["decoder_blocks"]]
    assert len(decoder) == 3 and all(b["causal"] and b["kv_heads"] == 1 and b["prefix_tokens"] == 0 for b in decoder)
    pruned, result = _apply(paligemma, keep_ratio=0.25)
    assert result.modified and result.info["image_tokens_after"] == 4
    rng = np.random.default_rng(2)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = _pg_ids(2, 2)
    got = _run(_save(pruned, tmp_path), {"pixel_values": px, "input_ids": ids})
    m = _paligemma()
    with torch.no_grad():
        att = m.model.vision_tower(torch.from_numpy(px), output_attentions=True).attentions[-1]
        received = att.mean((1, 2))
        full = _PaliGemma(m).merged(torch.from_numpy(px), torch.from_numpy(ids))
    img = np.arange(P)
    for b in range(2):
        top = np.sort(torch.topk(received[b], 4).indices.numpy())
        kept = np.sort(np.concatenate([top, np.arange(P, 24)]))
        with torch.no_grad():
            h = m.model.language_model(inputs_embeds=full[b:b + 1, kept], position_ids=torch.from_numpy(kept)[None],
                                       attention_mask=torch.ones(1, len(kept), dtype=torch.long), use_cache=False)
            ref = m.lm_head(h.last_hidden_state)[0].numpy()
        _check_text_rows(got[b], ref, kept, img)


def test_paligemma_through_the_cli_at_both_stages(paligemma, tmp_path):
    from graphprune.cli import main

    for stage, extra in (("projector", []), ("decoder", ["--token-layers", "1"])):
        rep = tmp_path / f"{stage}.json"
        main(["optimize", str(paligemma), "-o", str(tmp_path / f"{stage}.onnx"), "--token-keep", "0.25",
              "--token-scope", "image", "--token-stage", stage, *extra, "--force", "--report", str(rep)])
        r = json.loads(rep.read_text())
        assert r["passes"][0]["info"]["image_tokens_after"] == 4 and r["flops"]["ratio"] < 0.9
        assert r["verify"]["passed"], r["verify"]


# ------------------------------------------------------------- LLaVA with vision_feature_select_strategy: full
class _LlavaFull(_Llava):
    """LLaVA keeping the [CLS] feature (``vision_feature_select_strategy: full``): 17 image tokens."""

    def features(self, pixel_values):
        hs = self.m.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.m.model.multi_modal_projector(hs)


@pytest.mark.parametrize("method", ["cls_attention", "hiprune"])
def test_image_features_that_keep_the_cls_token(model_cache, llava_torch, tmp_path, method):
    """The [CLS] feature is one of the 17 image tokens: it keeps its own score and competes with the patches
    ([CLS] row: its attention to itself; HiPrune: a register), and the patch grid is the other 16."""

    def export(folder):
        path = folder / "llava_full.onnx"
        batch = torch.export.Dim("batch")
        torch.onnx.export(_LlavaFull(_llava(), "concat").eval(),
                          (torch.randn(2, 3, 32, 32), torch.from_numpy(_ids(2, "concat"))), str(path), dynamo=True,
                          opset_version=18, input_names=["pixel_values", "input_ids"], output_names=["logits"],
                          dynamic_shapes={"pixel_values": {0: batch}, "input_ids": {0: batch}})
        return path

    path = model_cache.get(("vlm", "llava_full"), export)
    model, result = _apply(path, keep_ratio=0.25 if method == "cls_attention" else 0.5, method=method)
    k = 5 if method == "cls_attention" else 9
    assert result.modified and result.info["image_tokens_after"] == k
    rng = np.random.default_rng(8)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = _ids(2, "concat", seed=8)
    got = _run(_save(model, tmp_path), {"pixel_values": px, "input_ids": ids})
    with torch.no_grad():
        att = llava_torch.model.vision_tower(torch.from_numpy(px), output_attentions=True).attentions
        full = _LlavaFull(llava_torch, "concat").merged(torch.from_numpy(px), torch.from_numpy(ids))
    img = np.arange(1, 1 + P + 1)
    for b in range(2):
        if method == "cls_attention":
            score = att[1][b, :, 0, :].mean(0).numpy()  # over all 17, [CLS] included
        else:
            middle, deep = att[0][b].mean((0, 1)).numpy(), att[1][b].mean((0, 1)).numpy()
            anchor = int(np.argmax(middle[1:]))  # one anchor (0.1 · 9 rounds to 1) on the 4×4 grid
            near = np.zeros(P, dtype=np.float32)
            r, c = divmod(anchor, 4)
            for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= r + dr < 4 and 0 <= c + dc < 4:
                    near[(r + dr) * 4 + c + dc] = 1.0
            score = np.concatenate([deep[:1], deep[1:] + near + (np.arange(P) == anchor)])
        top = np.sort(np.argsort(-score, kind="stable")[:k])
        kept = np.sort(np.concatenate([[0], img[top], np.arange(1 + P + 1, full.shape[1])]))
        _check_text_rows(got[b], _decode_kept(llava_torch, full[b], torch.from_numpy(kept)), kept, img)
