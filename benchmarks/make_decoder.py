"""Write a Llama-shaped decoder LM as ONNX, straight from onnx-ir (no torch), with random-init fp32 external weights.

    python -m benchmarks.make_decoder --gb 1            # /tmp/graphprune-decoder-1gb/decoder.onnx (+ .data)
    python -m benchmarks.make_decoder --gb 8 --out /tmp/dec8
    python -m benchmarks.make_decoder --hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 160 --vocab 128

Layout (Hugging Face Llama, as the torch exporter writes it at opset 18, batch and sequence static):
  * ``input_ids [B, S]`` → ``Gather(embed_tokens)``;
  * per layer: RMSNorm (``Pow``/``ReduceMean``/``Add``/``Sqrt``/``Div``/``Mul``), q/k/v projections as ``MatMul`` with
    ``[in, out]`` weights, ``Reshape`` to heads and ``Transpose`` to ``[B, h, S, d]``, RoPE on q and k
    (``x·cos + rotate_half(x)·sin``, rotate_half by ``Slice``/``Neg``/``Concat``), GQA by repeating each kv head
    (``Unsqueeze``/``Expand``/``Reshape``), ``MatMul(q, Transpose(k))``, ``Mul`` by 1/√d, ``Add`` of the causal mask
    (0 / finfo(float32).min), ``Softmax``, ``MatMul`` with v, ``Transpose``/``Reshape`` back, o projection, residual;
    then RMSNorm and the SwiGLU MLP ``down(silu(gate(x)) · up(x))`` with SiLU as ``Sigmoid``/``Mul``, residual;
  * final RMSNorm and ``lm_head`` → ``logits [B, S, vocab]``.

Sizes: ``--gb`` picks hidden/heads/kv-heads/intermediate from a table of Llama-like widths (head dim 64, kv heads a
quarter of the heads, intermediate ≈ 8/3·hidden rounded to 256) and then the layer count that brings the fp32
weights closest to the size asked. Explicit ``--hidden`` etc. override.

Weights are written streaming: one tensor is generated (N(0, 0.02), RMSNorm weights 1 + N(0, 0.02)), written at a
4 KiB-aligned offset of ``<name>.onnx.data`` and dropped before the next, so writing 8 GB needs one tensor of RAM.
The graph then refers to that file (``ir.ExternalTensor``); the ``.onnx`` itself is small.
Generated models go under ``/tmp`` by default and are never committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

ALIGN = 4096


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 160
    vocab: int = 128
    seq: int = 16
    batch: int = 1
    rope_theta: float = 10000.0
    eps: float = 1e-5
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight (name, shape), in the order they are written."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, kv)),
                    (p + "self_attn.v_proj.weight", (h, kv)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (h, self.intermediate)),
                    (p + "mlp.up_proj.weight", (h, self.intermediate)),
                    (p + "mlp.down_proj.weight", (self.intermediate, h))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (h, self.vocab))]

    def nbytes(self) -> int:
        return 4 * sum(math.prod(s) for _, s in self.tensors())


#: (hidden, heads, kv heads, intermediate) by size: Llama-like widths.
WIDTHS = [(1024, 16, 4, 2816), (2048, 32, 8, 5632), (3072, 48, 12, 8192), (4096, 64, 16, 11008)]


def config_for_gb(gb: float, vocab: int = 32000, seq: int = 128) -> DecoderConfig:
    """The Llama-like config whose fp32 weights come closest to ``gb`` GiB (width from :data:`WIDTHS`)."""
    target = gb * 1024**3
    h, nh, nkv, inter = WIDTHS[0 if gb <= 2 else 1 if gb <= 16 else 2 if gb <= 40 else 3]
    base = DecoderConfig(hidden=h, heads=nh, kv_heads=nkv, intermediate=inter, vocab=vocab, seq=seq, layers=0)
    per_layer = DecoderConfig(hidden=h, heads=nh, kv_heads=nkv, intermediate=inter, vocab=vocab, layers=1).nbytes() - base.nbytes()
    layers = max(1, round((target - base.nbytes()) / per_layer))
    return dataclasses.replace(base, layers=layers)


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= 0.02
    if name.endswith("norm.weight"):
        w += 1.0
    return w


def write_weights(cfg: DecoderConfig, data_path: Path) -> dict[str, ir.ExternalTensor]:
    """Write every weight to ``data_path`` one at a time (4 KiB-aligned); return external tensors over it."""
    rng = np.random.default_rng(cfg.seed)
    tensors: dict[str, ir.ExternalTensor] = {}
    tmp = data_path.with_name(data_path.name + ".partial")
    with open(tmp, "wb") as f:
        for name, shape in cfg.tensors():
            offset = -f.tell() % ALIGN
            if offset:
                f.write(b"\0" * offset)
            start = f.tell()
            w = _weight(rng, name, shape)
            w.tofile(f)
            tensors[name] = ir.ExternalTensor(data_path.name, start, w.nbytes, ir.DataType.FLOAT, shape=ir.Shape(shape),
                                              name=name, base_dir=str(data_path.parent))
            del w
    os.replace(tmp, data_path)
    return tensors


class _Builder:
    """Appends nodes to a list with exporter-like names; constants become initializers."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.count: dict[str, int] = {}

    def _name(self, base: str) -> str:
        i = self.count.get(base, 0)
        self.count[base] = i + 1
        return base if i == 0 else f"{base}_{i}"

    def op(self, op_type: str, inputs, attributes=None, outputs: int = 1, name: str | None = None):
        base = name or op_type.lower()
        node = ir.node(op_type, inputs, attributes or {}, num_outputs=outputs, name=self._name("node_" + base))
        for k, o in enumerate(node.outputs):
            o.name = node.name[len("node_"):] + (f"_{k}" if outputs > 1 else "")
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def weight(self, tensor: ir.TensorProtocol) -> ir.Value:
        v = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(v)
        return v

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        name = self._name("val_" + base)
        return self.weight(ir.tensor(np.asarray(array), name=name))


def _rope_tables(cfg: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    freqs = np.outer(np.arange(cfg.seq, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32)[None, None], np.sin(emb).astype(np.float32)[None, None]


def build_model(cfg: DecoderConfig, weights: dict[str, ir.TensorProtocol]) -> ir.Model:
    """The decoder graph over ``weights`` (name → tensor, e.g. from :func:`write_weights`)."""
    b = _Builder()
    B, S, nh, nkv, d = cfg.batch, cfg.seq, cfg.heads, cfg.kv_heads, cfg.head_dim
    ids = ir.Value(name="input_ids", shape=ir.Shape([B, S]), type=ir.TensorType(ir.DataType.INT64))
    w = {k: b.weight(t) for k, t in weights.items()}
    cos_t, sin_t = _rope_tables(cfg)
    cos, sin = b.const("cos", cos_t), b.const("sin", sin_t)
    mask = np.triu(np.full((S, S), np.finfo(np.float32).min, np.float32), k=1)[None, None]
    causal = b.const("causal_mask", mask)
    two, eps = b.const("two", np.array(2.0, np.float32)), b.const("eps", np.array(cfg.eps, np.float32))
    last_axis = b.const("axes", np.array([-1], np.int64))
    scale = b.const("scale", np.array(1.0 / math.sqrt(d), np.float32))
    half = d // 2
    s0, s_half, s_end = (b.const(n, np.array([v], np.int64)) for n, v in (("zero", 0), ("half", half), ("end", d)))
    q_shape = b.const("q_shape", np.array([B, S, nh, d], np.int64))
    kv_shape = b.const("kv_shape", np.array([B, S, nkv, d], np.int64))
    rep_shape = b.const("rep_shape", np.array([B, nkv, nh // nkv, S, d], np.int64))
    heads_shape = b.const("heads_shape", np.array([B, nh, S, d], np.int64))
    merged = b.const("merged_shape", np.array([B, S, nh * d], np.int64))
    two_axis = b.const("unsq_axis", np.array([2], np.int64))

    def rms_norm(x, weight):
        var = b.op("ReduceMean", [b.op("Pow", [x, two]), last_axis], {"keepdims": 1})
        return b.op("Mul", [weight, b.op("Div", [x, b.op("Sqrt", [b.op("Add", [var, eps])])])])

    def rope(x):
        x1 = b.op("Slice", [x, s0, s_half, last_axis])
        x2 = b.op("Slice", [x, s_half, s_end, last_axis])
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], {"axis": -1})
        return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])

    def repeat_kv(x):
        if nkv == nh:
            return x
        x = b.op("Expand", [b.op("Unsqueeze", [x, two_axis]), rep_shape])
        return b.op("Reshape", [x, heads_shape])

    x = b.op("Gather", [w["model.embed_tokens.weight"], ids], name="embedding")
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = b.op("MatMul", [h, w[p + "self_attn.q_proj.weight"]], name="linear")
        k = b.op("MatMul", [h, w[p + "self_attn.k_proj.weight"]], name="linear")
        v = b.op("MatMul", [h, w[p + "self_attn.v_proj.weight"]], name="linear")
        q = b.op("Transpose", [b.op("Reshape", [q, q_shape], name="view")], {"perm": [0, 2, 1, 3]})
        k = b.op("Transpose", [b.op("Reshape", [k, kv_shape], name="view")], {"perm": [0, 2, 1, 3]})
        v = b.op("Transpose", [b.op("Reshape", [v, kv_shape], name="view")], {"perm": [0, 2, 1, 3]})
        q, k = rope(q), rope(k)
        k, v = repeat_kv(k), repeat_kv(v)
        scores = b.op("MatMul", [q, b.op("Transpose", [k], {"perm": [0, 1, 3, 2]})], name="matmul")
        scores = b.op("Add", [b.op("Mul", [scores, scale]), causal])
        probs = b.op("Softmax", [scores], {"axis": -1})
        o = b.op("MatMul", [probs, v], name="matmul")
        o = b.op("Reshape", [b.op("Transpose", [o], {"perm": [0, 2, 1, 3]}), merged], name="view")
        x = b.op("Add", [x, b.op("MatMul", [o, w[p + "self_attn.o_proj.weight"]], name="linear")])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = b.op("MatMul", [h, w[p + "mlp.gate_proj.weight"]], name="linear")
        up = b.op("MatMul", [h, w[p + "mlp.up_proj.weight"]], name="linear")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate])], name="silu")
        down = b.op("MatMul", [b.op("Mul", [act, up]), w[p + "mlp.down_proj.weight"]], name="linear")
        x = b.op("Add", [x, down])
    x = rms_norm(x, w["model.norm.weight"])
    logits = b.op("MatMul", [x, w["lm_head.weight"]], name="linear")
    logits.name = "logits"
    logits.shape, logits.type = ir.Shape([B, S, cfg.vocab]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ids], [logits], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 18},
                     name="llama_decoder")
    return ir.Model(graph, ir_version=10, producer_name="graphprune.benchmarks.make_decoder")


def write_decoder(cfg: DecoderConfig, out: str | os.PathLike) -> Path:
    """Write ``out`` (the graph) and ``<out>.data`` (the weights, streamed); returns the model path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = write_weights(cfg, out.with_name(out.name + ".data"))
    model = build_model(cfg, weights)
    from graphprune._ir import infer_shapes

    infer_shapes(model)
    tmp = out.with_name(out.name + ".partial")
    ir.save(model, tmp)  # the external tensors are written as references to <out>.data, next to it
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, help="size of the fp32 weights in GiB (picks widths and layers)")
    p.add_argument("--out", help="output .onnx (default /tmp/graphprune-decoder-<size>/decoder.onnx)")
    for k in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "seq", "batch", "seed"):
        p.add_argument(f"--{k}", type=int)
    a = p.parse_args(argv)
    cfg = config_for_gb(a.gb) if a.gb else DecoderConfig()
    over = {k.replace("-", "_"): getattr(a, k.replace("-", "_")) for k in
            ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "seq", "batch", "seed")}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads or cfg.head_dim % 2:
        print("make_decoder: hidden must split into heads of even size, and heads into kv-heads groups", file=sys.stderr)
        return 2
    tag = f"{a.gb:g}gb" if a.gb else f"h{cfg.hidden}l{cfg.layers}"
    out = Path(a.out) if a.out else Path(f"/tmp/graphprune-decoder-{tag}/decoder.onnx")
    path = write_decoder(cfg, out)
    print(f"wrote {path} (+ .data, {cfg.nbytes() / 1024**3:.2f} GiB): {dataclasses.asdict(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
