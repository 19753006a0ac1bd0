"""Attention facts on standard decoder exports (transformers, random init from small configs, dynamo, opset 18).

Llama and Mistral (grouped-query attention: 4 query heads over 2 KV heads, expanded by ``repeat_kv`` before the
matmuls; a causal mask combined with the padding mask before it is added), GPT-2 (causal, 4 heads) and a tiny
LLaVA-style model (a CLIP vision tower with a CLS token, ``hidden_states[-2][:, 1:]``, a projector, image features
concatenated in front of the text embeddings, a Llama decoder). ``inspect`` must report the causal blocks, the
real number of KV heads, and a prefix token only on the vision blocks. The exports are cached per session.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

from graphprune.analysis.attention import find_attention_blocks

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


class _Logits(torch.nn.Module):
    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _Llava(torch.nn.Module):
    """LLaVA's forward with the merge written out (MEASURED.md: the stock forward does not export)."""

    def __init__(self, m) -> None:
        super().__init__()
        self.m = m

    def forward(self, pixel_values, input_ids):
        hs = self.m.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        emb = torch.cat([self.m.model.multi_modal_projector(hs), self.m.model.get_input_embeddings()(input_ids)], 1)
        return self.m.lm_head(self.m.model.language_model(inputs_embeds=emb, use_cache=False).last_hidden_state)


def _export(name: str, path):
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    if name == "llava":
        vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
        cfg = transformers.LlavaConfig(vision_config=vc, text_config=transformers.LlamaConfig(**_TEXT),
                                       image_token_index=255)
        m = transformers.LlavaForConditionalGeneration(cfg).eval()
        m.config._attn_implementation = "eager"
        args = (torch.randn(2, 3, 32, 32), torch.randint(0, 250, (2, 8)))
        torch.onnx.export(_Llava(m).eval(), args, str(path), dynamo=True, opset_version=18,
                          dynamic_shapes={"pixel_values": {0: batch}, "input_ids": {0: batch}})
        return ir.load(path)
    if name == "llama":
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TEXT))
    elif name == "mistral":
        lm = transformers.MistralForCausalLM(transformers.MistralConfig(**_TEXT, sliding_window=None))
    else:
        lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                                  n_positions=128))
    lm.config._attn_implementation = "eager"
    seq = torch.export.Dim("seq")
    args = (torch.randint(0, 256, (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    torch.onnx.export(_Logits(lm.eval()).eval(), args, str(path), dynamo=True, opset_version=18,
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    return ir.load(path)


@pytest.fixture(scope="session")
def decoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoder_facts")
    cache: dict[str, ir.Model] = {}

    def get(name: str) -> ir.Model:
        if name not in cache:
            cache[name] = _export(name, folder / f"{name}.onnx")
        return cache[name]

    return get


@pytest.mark.parametrize(("name", "kv_heads"), [("llama", 2), ("mistral", 2), ("gpt2", 4)])
def test_decoders_are_causal_with_their_kv_heads(decoders, name, kv_heads):
    blocks = find_attention_blocks(decoders(name))
    assert len(blocks) == 2
    assert [(b.heads, b.kv_heads, b.causal, b.prefix_tokens) for b in blocks] == [(4, kv_heads, True, 0)] * 2
    if kv_heads != 4:  # the core still multiplies the expanded k/v
        assert all(b.core_kv_heads == 4 for b in blocks)


def test_llava_prefix_only_on_the_vision_tower(decoders):
    blocks = find_attention_blocks(decoders("llava"))
    # the last vision layer is dead code with hidden_states[-2] (the exporter drops it): 1 vision + 2 text blocks
    got = [(b.tokens, b.heads, b.kv_heads, b.causal, b.prefix_tokens) for b in blocks]
    assert got == [(17, 4, 4, False, 1), (24, 4, 2, True, 0), (24, 4, 2, True, 0)]
