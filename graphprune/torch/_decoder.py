"""Export a transformers causal LM as a prefill graph and a decode-step graph with an explicit KV cache (the pair
``graphprune.decoder`` runs and prunes)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from graphprune.errors import GraphpruneError
from graphprune.torch._export import _to_onnx


class _Prefill(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, input_ids):
        out = self.lm(input_ids=input_ids, use_cache=True)
        return (out.logits, *_flat(out.past_key_values, self.layers))


class _Step(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, input_ids, *past):
        start = past[0].shape[2]
        pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.step(input_ids, pos, past)

    def step(self, input_ids, pos, past, **kw):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm(input_ids=input_ids, past_key_values=cache, position_ids=pos, use_cache=True, **kw)
        return (out.logits, *_flat(out.past_key_values, self.layers))


class _PositionedStep(_Step):
    """The decode step with the new tokens' positions as an input (a cache shorter than the positions: a prefill
    that kept some tokens only). An all-ones attention mask tells transformers the positions are one sequence,
    not packed ones (it reads jumps in ``position_ids`` as sequence starts when no mask is given).

    The layers' caches may differ in length (a decoder-stage drop keeps every token in the first layers): the mask
    is built for layer 0's, the longest, and each layer's attention reads its last ``own cache + new`` columns
    (:func:`_any_cache_attention`)."""

    def forward(self, input_ids, position_ids, *past):
        mask = torch.ones(input_ids.shape[0], past[0].shape[2] + input_ids.shape[1], dtype=torch.long,
                          device=input_ids.device)
        return self.step(input_ids, position_ids, past, attention_mask=mask)


ANY_CACHE_ATTENTION = "graphprune_any_cache"


def _any_cache_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The model's own eager attention, with the mask cut to this layer's keys from the right: the new tokens'
    causal columns are the last ones, and every earlier column of an all-ones mask is visible."""
    import sys

    if attention_mask is not None:
        attention_mask = attention_mask[..., attention_mask.shape[-1] - key.shape[-2]:]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, *args, **kwargs)


def _register_any_cache_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ANY_CACHE_ATTENTION, _any_cache_attention)
    AttentionMaskInterface.register(ANY_CACHE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _flat(cache, layers: int) -> list[torch.Tensor]:
    return [t for i in range(layers) for t in (cache.layers[i].keys, cache.layers[i].values)]


def export_decoder_pair(lm: torch.nn.Module, folder: str | Path, *, opset: int = 18,
                        position_ids: bool = False) -> tuple[Path, Path]:
    """Export a transformers causal LM (Llama, Mistral, Qwen2... anything whose forward takes ``past_key_values``
    as a ``DynamicCache``) to ``folder/prefill.onnx`` and ``folder/decode.onnx`` (each with its ``.data``).

    * prefill: ``input_ids [batch, seq]`` → ``logits [batch, seq, vocab]``, ``present.{i}.key`` / ``.value``
      ``[batch, kv_heads, seq, head_dim]`` per layer;
    * decode step: ``input_ids [batch, seq]`` and ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads,
      past, head_dim]`` → ``logits`` and ``present.{i}.*`` of length ``past + seq``.

    Batch, sequence and past length are dynamic; no attention mask (unpadded batches). With ``position_ids`` the
    decode step takes ``position_ids [batch, seq]`` (the new tokens' positions) instead of counting from the cache
    length: for a cache that holds some positions only (image tokens dropped at the prefill), and each layer's
    past length is its own (a decoder-stage drop leaves the first layers' caches longer; layer 0's must be the
    longest); this needs the model's eager attention. Returns the two paths."""
    cfg = getattr(lm, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        raise GraphpruneError("export_decoder_pair: expected a transformers causal LM (with .config)")
    layers = cfg.num_hidden_layers
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm = lm.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=gen)
    past = tuple(torch.randn(2, kv, 7, dim, generator=gen) for _ in range(2 * layers))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=65536)
    plen = torch.export.Dim("past", min=1, max=65536)
    cache_out = [f"present.{i}.{kv_}" for i in range(layers) for kv_ in ("key", "value")]
    cache_in = [f"past_key_values.{i}.{kv_}" for i in range(layers) for kv_ in ("key", "value")]
    out = []
    if position_ids:
        # a past length per layer: after a decoder-stage drop (FastV) the first layers keep every prefill token and
        # the later ones the kept tokens only; layer 0's is the longest, and the mask its length (each layer's
        # attention reads the mask up to its own cache length)
        plens = [torch.export.Dim(f"past_{i}", min=1, max=65536) for i in range(layers)]
        past = tuple(torch.randn(2, kv, 9 if j < 2 else 7, dim, generator=gen) for j in range(2 * layers))
        pos = torch.arange(9, 14).unsqueeze(0).expand(2, 5)
        step = ("decode", _PositionedStep(lm, layers), (ids, pos, *past),
                ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: plens[j // 2]} for j in range(len(past)))),
                ["input_ids", "position_ids", *cache_in])
    else:
        step = ("decode", _Step(lm, layers), (ids, *past), ({0: batch, 1: seq}, tuple({0: batch, 2: plen} for _ in past)),
                ["input_ids", *cache_in])
    for name, module, args, shapes, inputs in (
            ("prefill", _Prefill(lm, layers), (ids,), ({0: batch, 1: seq},), ["input_ids"]), step):
        # every config the modules hold (a language model taken out of a VLM keeps the VLM's text config)
        configs = list({id(c): c for m in lm.modules() if hasattr(c := getattr(m, "config", None),
                                                                   "_attn_implementation")}.values())
        impls = [c._attn_implementation for c in configs]
        if name == "decode" and position_ids:
            if set(impls) != {"eager"} or not hasattr(sys.modules[type(lm).__module__], "eager_attention_forward"):
                raise GraphpruneError(f"export_decoder_pair(position_ids=True): needs the model's eager attention "
                                      f"(config._attn_implementation = 'eager', got {sorted(set(map(str, impls)))})")
            _register_any_cache_attention()
            for c in configs:
                c._attn_implementation = ANY_CACHE_ATTENTION
        try:
            program = _to_onnx(module, args, opset, shapes, inputs, ["logits", *cache_out])
        finally:
            for c, impl in zip(configs, impls):
                c._attn_implementation = impl
        path = folder / f"{name}.onnx"
        program.save(str(path), external_data=True)
        out.append(path)
    return out[0], out[1]
