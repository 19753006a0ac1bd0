"""A small *trained* LLaVA-style vision-language model on scenes drawn with Pillow: the real model for the
image-token pruning benchmarks.

No VLM can be downloaded here, so this module makes one:

- **Scenes**: 64×64 RGB images on an 8×8 grid of 8-pixel cells (one cell per vision patch). Each scene holds 3 to
  6 shapes (square, circle, triangle; 6 or 7 pixels, jittered in the cell) in distinct cells, each in one of six
  colours, drawn with ``PIL.ImageDraw``. Most patches are background, as in photos.
- **Questions** (8 tokens, word-level vocabulary; the answer is the next token), each needing a region of the image:

  - ``colour``: "what colour is the square ?" (the asked shape is unique in the scene);
  - ``count``: "how many circles are there ?" (zero to four);
  - ``left``: "what is left of the triangle" (the shape in the cell directly left of the unique triangle, or
    "nothing": in about 30% of these scenes);
  - ``bottom``: "what colour is at the bottom ?" (the bottom row holds exactly one shape). FEATHER found that
    FastV-style pruning fails on the bottom of the image; this type checks it.

- **Model**: ``transformers.LlavaForConditionalGeneration`` from :data:`CONFIG`: a CLIP vision tower (3 layers,
  width 128, patch 8, a [CLS] token: 64 patches + 1), the last layer's patch features without [CLS] (LLaVA drops it),
  LLaVA's two-layer projector, and a Llama decoder (4 layers, width 256, 8 query heads over 2 KV heads, RoPE). The
  sequence is the 64 image tokens, then the 8 question tokens: the image span is ``[0, 64)``, 89% of the prefill
  (LLaVA-1.5: 576 of about 650).
- **Training**: fixed seeds, AdamW, scenes drawn on the fly. Loss: cross-entropy on the answer token, plus a dense
  auxiliary loss on the vision tower: a linear head (not part of the model) names what each patch holds (empty, or
  kind and colour). LLaVA starts from a pretrained CLIP; this stands in for that pretraining. Without it the
  decoder never learned to read the image here (answer accuracy stayed at chance for 576 steps; even a one-shape
  colour question stayed there for 300), while the tower alone, read by max-pooling, learned it in 20 steps.
- **Report** (``vlm.json``): answer accuracy by question type on :data:`EVAL_SAMPLES` held-out scenes (another seed).

Files (gitignored) go to ``benchmarks/out/vlm/``: ``vlm.pt`` (state dict), ``vlm.json`` (config, report, training
seconds) and ``vlm.onnx`` (``pixel_values [batch, 3, 64, 64]``, ``input_ids [batch, 8]`` → ``logits [batch, 72,
vocab]``, dynamic batch; the merge written as a Concat at fixed positions, as MEASURED.md describes).

    python -m benchmarks.vlm                  # train (about 27 min on 2 cores) or load, then print the report
    python -m benchmarks.vlm --steps 20 --out /tmp/vlm-smoke

Public API: :func:`scenes` (images, ids, answers, types), :func:`get_vlm` (the ONNX path), :func:`module`,
:func:`get_pair` (a prefill graph with its KV cache + the decode step), :func:`accuracy`, :data:`VOCAB`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.digits import _locked, _read_meta, _sha256, _write_atomic
from benchmarks.results import add_result_option, write_result

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = _REPO / "benchmarks" / "out" / "vlm"
TRAIN_THREADS = 2

IMAGE, GRID = 64, 8
CELL = IMAGE // GRID
KINDS = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190), "cyan": (30, 190, 200)}
NUMBERS = ("zero", "one", "two", "three", "four")
TYPES = ("colour", "count", "left", "bottom")
_WORDS = ("<pad>", "<bos>", "what", "colour", "is", "the", "how", "many", "are", "there", "left", "of", "at",
          "bottom", "?", "answer", "nothing", *KINDS, *(k + "s" for k in KINDS), *COLOURS, *NUMBERS)
VOCAB: dict[str, int] = {w: i for i, w in enumerate(_WORDS)}
TEXT_TOKENS = 8
IMAGE_TOKENS = (IMAGE // 8) ** 2
EVAL_SAMPLES = 1200

# Bump "version" when the recipe changes: a mismatch with the cached JSON retrains.
CONFIG: dict[str, Any] = {
    "version": 3,
    "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
               "image_size": IMAGE, "patch_size": 8},
    "text": {"vocab_size": 48, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "rope_theta": 10000.0},
    "batch": 64,
    "steps": 2000,
    "warmup": 50,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "aux_weight": 1.0,
    "seed": 0,
}
assert len(VOCAB) <= CONFIG["text"]["vocab_size"]


# ------------------------------------------------------------------------------------------------ data
def _draw(draw, kind: str, colour: tuple[int, int, int], r: int, c: int, rng: np.random.Generator) -> None:
    s = int(rng.integers(6, 8))
    x0 = c * CELL + int(rng.integers(0, CELL - s + 1))
    y0 = r * CELL + int(rng.integers(0, CELL - s + 1))
    if kind == "square":
        draw.rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=colour)
    elif kind == "circle":
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=colour)
    else:
        draw.polygon([(x0 + s // 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=colour)


def _scene(rng: np.random.Generator, qtype: str) -> tuple[list[tuple[str, str, int, int]], list[str], str]:
    """Objects ``(kind, colour, row, col)``, the question's words and the answer word."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    colours = list(COLOURS)
    while True:
        n = int(rng.integers(3, 7))
        picks = rng.choice(len(cells), size=n, replace=False)
        objs = [(KINDS[int(rng.integers(3))], colours[int(rng.integers(6))], *cells[i]) for i in picks]
        kind = KINDS[int(rng.integers(3))]
        if qtype == "colour":
            same = [o for o in objs if o[0] == kind]
            if len(same) != 1:
                continue
            return objs, ["what", "colour", "is", "the", kind, "?"], same[0][1]
        if qtype == "count":
            k = sum(o[0] == kind for o in objs)
            if k > 4:
                continue
            return objs, ["how", "many", kind + "s", "are", "there", "?"], NUMBERS[k]
        if qtype == "left":
            same = [o for o in objs if o[0] == kind]
            if len(same) != 1 or same[0][3] == 0:
                continue
            r, c = same[0][2], same[0][3]
            objs = [o for o in objs if (o[2], o[3]) != (r, c - 1)]
            if rng.random() < 0.7:  # a neighbour in about 70% of the scenes ("nothing" in the rest)
                other = [k for k in KINDS if k != kind][int(rng.integers(2))]
                objs.append((other, colours[int(rng.integers(6))], r, c - 1))
            left = [o for o in objs if (o[2], o[3]) == (r, c - 1)]
            return objs, ["what", "is", "left", "of", "the", kind], left[0][0] if left else "nothing"
        bottom = [o for o in objs if o[2] == GRID - 1]
        if len(bottom) != 1:
            continue
        return objs, ["what", "colour", "is", "at", "the", "bottom"], bottom[0][1]


def scenes(n: int, seed: int, types: tuple[str, ...] = TYPES) -> dict[str, np.ndarray]:
    """``n`` scenes with their questions: ``pixel_values [n, 3, 64, 64]`` float32 in [-1, 1], ``input_ids [n, 8]``
    (``<bos>``, six question words, ``answer``), ``answer [n]`` (vocabulary ids), ``type [n]`` (index into
    :data:`TYPES`) and ``cells [n, 64]`` (what each patch holds: 0 empty, else 1 + kind · 6 + colour; the vision
    tower's auxiliary training target). The question types cycle so each gets a quarter."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    px = np.empty((n, 3, IMAGE, IMAGE), np.float32)
    ids = np.empty((n, TEXT_TOKENS), np.int64)
    ans = np.empty(n, np.int64)
    kind = np.empty(n, np.int64)
    cells = np.zeros((n, GRID * GRID), np.int64)
    for i in range(n):
        t = i % len(types)
        objs, words, answer = _scene(rng, types[t])
        img = Image.new("RGB", (IMAGE, IMAGE), (245, 245, 245))
        draw = ImageDraw.Draw(img)
        for k, col, r, c in objs:
            _draw(draw, k, COLOURS[col], r, c, rng)
            cells[i, r * GRID + c] = 1 + KINDS.index(k) * len(COLOURS) + list(COLOURS).index(col)
        px[i] = np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        ids[i] = [VOCAB[w] for w in ("<bos>", *words, "answer")]
        ans[i] = VOCAB[answer]
        kind[i] = TYPES.index(types[t])
    return {"pixel_values": px, "input_ids": ids, "answer": ans, "type": kind, "cells": cells}


# ------------------------------------------------------------------------------------------------ model
def _llava(cfg: dict):
    import transformers

    vc = transformers.CLIPVisionConfig(**cfg["vision"])
    tc = transformers.LlamaConfig(**cfg["text"])
    lc = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=VOCAB["<pad>"],
                                  vision_feature_layer=-1, vision_feature_select_strategy="default",
                                  projector_hidden_act="gelu")
    m = transformers.LlavaForConditionalGeneration(lc)
    m.config._attn_implementation = "eager"
    for sub in (m.config.vision_config, m.config.text_config):
        sub._attn_implementation = "eager"
    return m


def wrap(m):
    """``(pixel_values, input_ids) → logits``: LLaVA's forward with the merge written out as a Concat of the image
    features in front of the text embeddings (the stock forward's ``masked_scatter`` does not export)."""
    import torch

    class VLM(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, pixel_values, input_ids):
            return self.decode(self.m.model.vision_tower(pixel_values).last_hidden_state[:, 1:], input_ids)

        def decode(self, patches, input_ids):
            """The projector, the merge and the decoder on the vision tower's patch features."""
            emb = torch.cat([self.m.model.multi_modal_projector(patches),
                             self.m.model.get_input_embeddings()(input_ids)], 1)
            return self.m.lm_head(self.m.model.language_model(inputs_embeds=emb, use_cache=False).last_hidden_state)

    return VLM(m).eval()


def prefill_module(net):
    """``(pixel_values, input_ids) → (logits, present.0.key, present.0.value, ...)``: the VLM's prefill with its KV
    cache as outputs (what a generation loop runs first)."""
    import torch

    class Prefill(torch.nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixel_values, input_ids):
            m = self.net.m
            emb = torch.cat([m.model.multi_modal_projector(m.model.vision_tower(pixel_values).last_hidden_state[:, 1:]),
                             m.model.get_input_embeddings()(input_ids)], 1)
            out = m.model.language_model(inputs_embeds=emb, use_cache=True)
            c = out.past_key_values
            return (m.lm_head(out.last_hidden_state),
                    *[t for i in range(len(c.layers)) for t in (c.layers[i].keys, c.layers[i].values)])

    return Prefill(net).eval()


def text_lm(net):
    """The VLM's language model and head as a ``LlamaForCausalLM`` (the same weights), for its decode step."""
    import transformers

    m = net.m
    lm = transformers.LlamaForCausalLM(m.config.text_config)
    lm.model, lm.lm_head = m.model.language_model, m.lm_head
    return lm.eval()


#: bump when the pair's export changes (2: a past length per layer, for decoder-stage drops)
PAIR_VERSION = 2


def get_pair(out_dir: str | Path = DEFAULT_OUT, cfg: dict | None = None, log=print) -> tuple[Path, Path]:
    """The trained VLM as a prefill graph with a KV cache (``pixel_values``, ``input_ids`` → logits,
    ``present.*``) and its language model's decode step taking ``position_ids``
    (``graphprune.torch.export_decoder_pair``), in ``<out>/pair/``; exported once per trained weights."""
    import torch

    from graphprune.torch import export as gexport
    from graphprune.torch import export_decoder_pair

    out_dir = Path(out_dir)
    get_vlm(out_dir, cfg, log=log)
    folder = out_dir / "pair"
    sha = _sha256(out_dir / "vlm.pt")
    rec = _read_meta(folder / "pair.json")
    if not (rec and rec.get("weights_sha256") == sha and rec.get("version") == PAIR_VERSION
            and (folder / "decode.onnx").exists()):
        net = module(out_dir, cfg)
        with _locked(out_dir):
            log("exporting the prefill graph with its cache and the decode step")
            d = scenes(2, seed=5)
            layers = (cfg or CONFIG)["text"]["num_hidden_layers"]
            names = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
            folder.mkdir(parents=True, exist_ok=True)
            gexport(prefill_module(net), (torch.from_numpy(d["pixel_values"]), torch.from_numpy(d["input_ids"])),
                    folder / "prefill.onnx", dynamic_axes={0: "batch"}, input_names=["pixel_values", "input_ids"],
                    output_names=names)
            export_decoder_pair(text_lm(net), folder / "text", position_ids=True)
            (folder / "text" / "decode.onnx").replace(folder / "decode.onnx")
            (folder / "text" / "decode.onnx.data").replace(folder / "decode.onnx.data")
            _write_atomic(folder / "pair.json", json.dumps({"weights_sha256": sha, "version": PAIR_VERSION}).encode())
    return folder / "prefill.onnx", folder / "decode.onnx"


def _lr(step: int, cfg: dict) -> float:
    import math

    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def _train(cfg: dict, log) -> tuple[Any, float]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(cfg["seed"])
    net = wrap(_llava(cfg))
    # the vision tower's dense auxiliary target: what each patch holds (LLaVA starts from a pretrained CLIP; this
    # stands in for that pretraining, and the head is not part of the model)
    aux = torch.nn.Linear(cfg["vision"]["hidden_size"], 1 + len(KINDS) * len(COLOURS))
    params = [*net.parameters(), *aux.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.98))
    t0 = time.perf_counter()
    net.train()
    hits = 0.0
    for step in range(cfg["steps"]):
        d = scenes(cfg["batch"], seed=1_000_000 + cfg["seed"] * 100_000 + step)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        vis = net.m.model.vision_tower(torch.from_numpy(d["pixel_values"])).last_hidden_state[:, 1:]
        logits = net.decode(vis, torch.from_numpy(d["input_ids"]))[:, -1]
        tgt = torch.from_numpy(d["answer"])
        loss = F.cross_entropy(logits, tgt)
        aux_loss = F.cross_entropy(aux(vis).flatten(0, 1), torch.from_numpy(d["cells"]).flatten())
        opt.zero_grad(set_to_none=True)
        (loss + cfg["aux_weight"] * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hits = 0.9 * hits + 0.1 * float((logits.argmax(-1) == tgt).float().mean())
        if step % 25 == 0 or step == cfg["steps"] - 1:
            el = time.perf_counter() - t0
            log(f"step {step + 1}/{cfg['steps']}  loss {loss.item():.3f}  patch loss {aux_loss.item():.3f}  "
                f"train acc (avg) {hits:.2f}  "
                f"{el:.0f} s elapsed, ~{el / (step + 1) * (cfg['steps'] - step - 1):.0f} s left")
    net.eval()
    return net, time.perf_counter() - t0


def _export(net, path: Path) -> None:
    import torch

    from graphprune.torch import export as gexport

    d = scenes(2, seed=5)
    tmp = path.with_name(".tmp-" + path.name)
    gexport(net, (torch.from_numpy(d["pixel_values"]), torch.from_numpy(d["input_ids"])), tmp,
            dynamic_axes={0: "batch"}, input_names=["pixel_values", "input_ids"], output_names=["logits"])
    tmp.replace(path)


def get_vlm(out_dir: str | Path = DEFAULT_OUT, cfg: dict | None = None, log=print) -> Path:
    """The path of ``vlm.onnx``: trained, evaluated and exported on the first call, then cached."""
    import torch

    cfg = cfg or CONFIG
    out_dir = Path(out_dir)
    onnx_path, meta_path, pt = out_dir / "vlm.onnx", out_dir / "vlm.json", out_dir / "vlm.pt"
    with _locked(out_dir):
        meta = _read_meta(meta_path)
        if meta and meta.get("config") == cfg and onnx_path.exists() and pt.exists():
            return onnx_path
        net, secs = _train(cfg, log)
        tmp_pt = out_dir / ".vlm.pt.tmp"
        torch.save(net.state_dict(), tmp_pt)
        tmp_pt.replace(pt)
        log("exporting to ONNX")
        _export(net, onnx_path)
        log("evaluating")
        rep = accuracy(net)
        meta = {"config": cfg, "train_seconds": round(secs, 1), "report": rep}
        _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return onnx_path


def module(out_dir: str | Path = DEFAULT_OUT, cfg: dict | None = None):
    """The trained VLM as a ``(pixel_values, input_ids) → logits`` ``nn.Module`` (eval mode)."""
    import torch

    get_vlm(out_dir, cfg)
    net = wrap(_llava(cfg or CONFIG))
    net.load_state_dict(torch.load(Path(out_dir) / "vlm.pt", weights_only=True))
    return net.eval()


def meta(out_dir: str | Path = DEFAULT_OUT) -> dict:
    get_vlm(out_dir)
    return json.loads((Path(out_dir) / "vlm.json").read_text())


# ------------------------------------------------------------------------------------------------ evaluation
def _runner(model):
    """``(pixel_values, input_ids) → logits`` for an ``nn.Module``, an ONNX path or an ``onnx_ir.Model``."""
    import torch

    if isinstance(model, torch.nn.Module):
        def run(px, ids):
            with torch.no_grad():
                return model(torch.from_numpy(px), torch.from_numpy(ids)).numpy()
        return run
    from graphprune.backends.onnxruntime import make_session

    sess = make_session(str(model) if isinstance(model, Path) else model, threads=TRAIN_THREADS)
    return lambda px, ids: sess.run(None, {"pixel_values": px, "input_ids": ids})[0]


def answers(model, data: dict[str, np.ndarray], batch: int = 50) -> np.ndarray:
    """The predicted answer ids (argmax of the last position's logits)."""
    run = _runner(model)
    out = [run(data["pixel_values"][i:i + batch], data["input_ids"][i:i + batch])[:, -1].argmax(-1)
           for i in range(0, len(data["answer"]), batch)]
    return np.concatenate(out)


def accuracy(model, n: int = EVAL_SAMPLES, seed: int = 7) -> dict[str, float]:
    """Answer accuracy on ``n`` held-out scenes, overall and by question type."""
    d = scenes(n, seed)
    pred = answers(model, d)
    right = pred == d["answer"]
    rep = {"all": float(right.mean())}
    for i, t in enumerate(TYPES):
        rep[t] = float(right[d["type"] == i].mean())
    return rep


def chance() -> dict[str, float]:
    """The accuracy of always answering the most frequent answer of each type (held-out scenes)."""
    d = scenes(EVAL_SAMPLES, 7)
    rep = {}
    for i, t in enumerate(TYPES):
        a = d["answer"][d["type"] == i]
        rep[t] = float(np.bincount(a).max() / len(a))
    return rep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=None, help="override the training steps (a smoke run)")
    p.add_argument("--quiet", action="store_true", help="no training progress")
    add_result_option(p)
    a = p.parse_args(argv)
    cfg = dict(CONFIG, steps=a.steps) if a.steps else CONFIG
    t = time.perf_counter()
    get_vlm(a.out, cfg, log=(lambda *_: None) if a.quiet else (lambda m: print(m, flush=True)))
    m = json.loads((a.out / "vlm.json").read_text())
    r, base = m["report"], chance()
    print(f"trained in {m['train_seconds']:.0f} s (ready after {time.perf_counter() - t:.0f} s)")
    print("answer accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items()))
    print("most frequent answer: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in base.items()))
    if a.result:
        cols = ["all", *(f"{t} (chance)" for t in TYPES), "training"]
        row = [f"{100 * r['all']:.1f}%", *(f"{100 * r[t]:.1f}% ({100 * base[t]:.0f}%)" for t in TYPES),
               f"{m['train_seconds'] / 60:.0f} min"]
        write_result(a.result, cols, [row], description=(
            f"benchmarks/vlm.py: a LLaVA-style VLM (CLIP tower 3×128, patch 8, 64 image tokens; two-layer projector; "
            f"Llama decoder 4×256, 8 query heads over 2 KV heads) trained here from scratch on Pillow scenes "
            f"({cfg['steps']} steps of {cfg['batch']}, seed {cfg['seed']}). Answer accuracy on {EVAL_SAMPLES} "
            f"held-out scenes; chance: the most frequent answer of the type."))


if __name__ == "__main__":
    main()
