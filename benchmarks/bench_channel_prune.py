"""Speed of ``channel_prune`` on the ResNet-50-shaped and DeiT-S-shaped examples and small decoder LMs, ORT CPU.

For each model, ratio (fraction of channels removed in every prunable group, L2 importance) and ``round_to``:
FLOPs ratio (``measure_flops``, base / pruned), measured ORT latency ratio (base / pruned, interleaved runs,
spinning off, median of ``--runs``), and speedup efficiency = measured speedup / FLOPs-predicted speedup.

DeiT-S rows: "heads+mlp" keeps the residual stream width (the default: the patch embedding is the input stem);
"+stream" also prunes the embedding dimension (``ignore_stem: false``), as Torch-Pruning does.
The same DeiT-S-shaped ViT in other attention spellings (same weights): ``vit`` is the fused qkv with tuple
indexing ``qkv[0], qkv[1], qkv[2]``; ``vit_unbind`` is timm's ``qkv.unbind(0)``; ``vit_sep`` has separate q/k/v
Linears. ``llama`` (RoPE, 8 query heads over 4 kv heads, SwiGLU) and ``gpt2`` (Conv1D ``addmm``, fused ``c_attn``,
tied embeddings) are built from transformers configs (``DECODERS``, random init) and timed at ``SEQ`` tokens.

Run (one process, under the shared benchmark lock):
    flock /tmp/gp_bench.lock python benchmarks/bench_channel_prune.py --batch 1 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx_ir as ir

from graphprune.analysis.inputs import example_inputs
from graphprune.backends.onnxruntime import benchmark, make_session, measure_flops
from graphprune.passes import get_pass

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file or with -m

from benchmarks.results import Table, add_result_option  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _models():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples import models

    return models


def _respell(vit, spelling: str) -> None:
    """Rewrite every attention of an example ViT in another spelling, keeping its weights (and its function)."""
    import torch
    from torch import nn

    class Unbind(nn.Module):  # timm: qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        def __init__(self, attn) -> None:
            super().__init__()
            self.qkv, self.proj, self.heads, self.scale = attn.qkv, attn.proj, attn.heads, attn.scale

        def forward(self, x, mask=None):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    class Separate(nn.Module):  # q, k, v Linears, each viewed as [B, N, H, D] and transposed
        def __init__(self, attn) -> None:
            super().__init__()
            c = attn.proj.in_features
            self.q, self.k, self.v = (nn.Linear(c, c) for _ in range(3))
            with torch.no_grad():
                for i, lin in enumerate((self.q, self.k, self.v)):
                    lin.weight.copy_(attn.qkv.weight[i * c:(i + 1) * c])
                    lin.bias.copy_(attn.qkv.bias[i * c:(i + 1) * c])
            self.proj, self.heads, self.scale = attn.proj, attn.heads, attn.scale

        def forward(self, x, mask=None):
            b, n, c = x.shape
            q, k, v = (f(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    for blk in vit.blocks:
        blk.attn = (Unbind if spelling == "unbind" else Separate)(blk.attn)


#: Decoder LMs from transformers configs (random init, offline), exported with dynamic batch and sequence.
DECODERS = {
    "llama": dict(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512),
    "gpt2": dict(vocab_size=1024, n_embd=512, n_layer=4, n_head=8, n_positions=512),
}
SEQ = 128  # decoder rows: tokens per sequence (FLOPs and timing)


def _export_decoder(name: str, folder: Path) -> Path:
    import torch
    import transformers

    from graphprune.torch import export

    torch.manual_seed(0)
    if name == "llama":
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODERS[name]))
    else:
        lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(**DECODERS[name], bos_token_id=0, eos_token_id=0))

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, 1024, (2, 40))
    return export(Logits().eval(), (ids,), folder / f"{name}.onnx", dynamic_axes={0: "batch", 1: "seq"},
                  input_names=["input_ids"], output_names=["logits"])


def _export(name: str, folder: Path) -> Path:
    if name in DECODERS:
        return _export_decoder(name, folder)
    models = _models()
    base, _, spelling = name.partition("_")
    model, args = models.build(base)
    if spelling:
        _respell(model, spelling)
    return models.export_model(model, args, folder / f"{name}.onnx")


def _prune(path: Path, **cfg) -> tuple[ir.Model, float]:
    model = ir.load(path)
    t = time.perf_counter()
    get_pass("channel_prune")(cfg)(model)
    return model, time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["resnet50", "vit"],
                   help="resnet50, vit (fused qkv, qkv[0..2]), vit_unbind (timm's unbind(0)), vit_sep (q/k/v Linears), "
                   "llama, gpt2 (decoder LMs from transformers configs, 128 tokens)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="ViTs: only the heads+mlp variant")
    p.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.5])
    p.add_argument("--round-to", nargs="*", type=int, default=[8, 1])
    p.add_argument("--batch", nargs="*", type=int, default=[1])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="benchmark calls per row; the median ratio is kept")
    p.add_argument("--out", default=None, help="folder for the exported models (default: a temporary folder)")
    add_result_option(p)
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory() if a.out is None else None
    folder = Path(a.out or tmp.name)
    table = Table("| model | variant | ratio | round_to | batch | FLOPs cut | speedup | efficiency | base ms | pruned ms | prune s |")
    for name in a.models:
        path = _export(name, folder)
        base = ir.load(path)
        dims = {"seq": SEQ} if name in DECODERS else None
        f0 = measure_flops(base, dims=dims).flops
        if name.startswith("vit"):
            variants = [("heads+mlp", True), ("+stream", False)] if a.stream else [("heads+mlp", True)]
        else:  # decoders: the embedding width is the input stem, as in the ViTs
            variants = [("heads+mlp", True)] if name in DECODERS else [("all", True)]
        for variant, stem in variants:
            for ratio in a.ratios:
                for rt in a.round_to:
                    pruned, secs = _prune(path, ratio=ratio, round_to=rt, ignore_stem=stem)
                    cut = f0 / measure_flops(pruned, dims=dims).flops
                    for batch in a.batch:
                        feeds = example_inputs(base, batch=batch, dims=dims)
                        s0, s1 = make_session(base), make_session(pruned)
                        speed, ms = [], None
                        for _ in range(a.repeats):
                            r = benchmark({"base": s0, "pruned": s1}, feeds, warmup=3, runs=a.runs)
                            speed.append(r["base"]["median_ms"] / r["pruned"]["median_ms"])
                            ms = (r["base"]["median_ms"], r["pruned"]["median_ms"])
                        sp = sorted(speed)[len(speed) // 2]
                        table.add(f"| {name} | {variant} | {ratio:.0%} | {rt} | {batch} | {cut:.2f}× | {sp:.2f}× | "
                              f"{sp / cut:.2f} | {ms[0]:.1f} | {ms[1]:.1f} | {secs:.1f} |")
    table.save(a.result)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
