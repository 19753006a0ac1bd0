"""A small *trained* Llama-style decoder LM on text that ships offline: the real model for the LLM benchmarks.

No LLM can be downloaded here, so this module makes one:

- **Corpus**: the ``.py`` files of Python's own standard library (source and docstrings), this interpreter's copy
  (``sysconfig`` stdlib path, without ``site-packages``, ``test``/``tests``, ``idlelib``, ``lib2to3`` and the
  generated ``_sysconfigdata`` build data). Whole
  top-level modules are held out for evaluation: a module is held out when ``sha1(name)`` mod 20 is 0 (about 5%).
- **Tokenizer**: byte-level BPE trained with ``tokenizers`` on the training modules (vocabulary 4,096), digits
  split one per token, so a pass key of 5 digits is 5 tokens.
- **Model**: ``transformers.LlamaForCausalLM`` (RoPE, grouped-query attention, SwiGLU, RMSNorm, tied embeddings)
  from :data:`CONFIG` ``arch``: 8 layers, width 256, 8 query heads over 2 KV heads, intermediate 688: 6.7 M
  parameters.
- **Training**: first :data:`CONFIG` ``copy_warmup_steps`` steps on copying (a random token segment of 32 written
  twice), then ``steps`` steps of text: 256-token windows for the first ``short_steps``, then windows of 256, 512
  and 1,024 tokens in turn (4,096 tokens a step). A quarter of each step's windows are copy rows (a random segment
  of half the window, written twice), the rest text with a pass key (``# The pass key is 52817. Remember it. 52817
  is the pass key.``) written after a random line, and ending with ``# What is the pass key? The pass key is
  52817``. Loss: the mean next-token loss over the text windows, plus the mean loss on the answer digits (so that
  the retrieval signal is not lost among a thousand tokens), plus the copy rows' loss on their second half.
  Retrieval by content needs induction heads, which text alone forms later than a CPU budget allows; copying
  forms them, and the short windows first let the pass key be learned before the long ones. AdamW, linear warm-up
  then cosine decay, fixed seeds, ``TRAIN_THREADS`` threads.
- **Report** (``decoder.json``): held-out perplexity and next-token accuracy (48 windows of 1,024 tokens spread
  evenly over the held-out modules), the unigram perplexity of the same tokens (training-token frequencies, add-one smoothing),
  and passkey accuracy (all 5 digits right, greedy) by context length, including lengths past the training one.

Files (gitignored) go to ``benchmarks/out/llm/``: ``tokenizer.json``, ``decoder.pt`` (state dict),
``decoder.json`` (config, report, training seconds), ``decoder.onnx`` + ``.data`` (``input_ids [batch, seq]`` →
``logits [batch, seq, vocab]``, dynamic batch and sequence, exported with ``graphprune.torch.export``), and on demand
``pair/prefill.onnx`` + ``pair/decode.onnx`` (:func:`get_pair`). A cache whose JSON records the same config is
reused; training runs under a file lock, files are moved into place atomically.

    python -m benchmarks.llm                  # train (about 30 min on 2 cores) or load, then print the report
    python -m benchmarks.llm --steps 20       # a quick smoke run into another folder: --out /tmp/llm-smoke

Public API: :func:`corpus`, :func:`get_tokenizer`, :func:`get_decoder` (the ONNX path), :func:`module`,
:func:`get_pair` (prefill + decode-step graphs with a KV cache), :func:`eval_windows`,
:func:`passkey_batch`, :func:`next_token_metrics`, :func:`passkey_accuracy`, :func:`report`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.digits import _locked, _read_meta, _write_atomic
from benchmarks.results import add_result_option, write_result

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = _REPO / "benchmarks" / "out" / "llm"
TRAIN_THREADS = 2

# Bump "version" when the recipe changes: a mismatch with the cached JSON retrains.
CONFIG: dict[str, Any] = {
    "version": 4,
    "arch": {"vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 2, "intermediate_size": 688, "max_position_embeddings": 8192,
             "rope_theta": 10000.0, "tie_word_embeddings": True},
    "seq": 1024,
    "lengths": [256, 512, 1024],
    "tokens_per_step": 4096,
    "steps": 750,
    "warmup": 40,
    "lr": 1e-3,
    "weight_decay": 0.1,
    "passkey_share": 1.0,
    "copy_warmup_steps": 220,
    "copy_share": 0.25,
    "short_steps": 300,
    "seed": 0,
}
EVAL_WINDOWS = 48
PASSKEY_LENGTHS = (256, 512, 1024, 2048)
PASSKEY_SAMPLES = 100
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
EOS = "<|endoftext|>"
#: Files of build data, not source (a dict of this interpreter's compiler flags): out of the corpus.
_GENERATED = "_sysconfigdata"
#: Bump when the evaluation changes: a cached report of another version is recomputed (the weights are kept).
EVAL_VERSION = 2


# ------------------------------------------------------------------------------------------------ corpus
def _held_out(module: str) -> bool:
    return int(hashlib.sha1(module.encode()).hexdigest(), 16) % 20 == 0


@cache
def corpus() -> dict[str, list[str]]:
    """``{"train": texts, "eval": texts}``: the stdlib's ``.py`` files, split by top-level module, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[str]] = {"train": [], "eval": []}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or path.stat().st_size > 400_000 or path.name.startswith(_GENERATED):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        module = rel.parts[0].removesuffix(".py")
        out["eval" if _held_out(module) else "train"].append(text)
    return out


def _train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def get_tokenizer(out_dir: str | Path = DEFAULT_OUT):
    """The trained ``tokenizers.Tokenizer`` (trained once, cached as ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    path = out_dir / "tokenizer.json"
    if not path.exists():  # written atomically: a file that exists is whole (and get_decoder holds the lock)
        with _locked(out_dir):
            if not path.exists():
                tok = _train_tokenizer(corpus()["train"], CONFIG["arch"]["vocab_size"])
                _write_atomic(path, tok.to_str().encode())
    return Tokenizer.from_file(str(path))


def _stream(tok, texts: list[str]) -> np.ndarray:
    """Every text's tokens, each followed by EOS, as one int64 array."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


@cache
def _streams(out_dir: str) -> dict[str, np.ndarray]:
    tok = get_tokenizer(out_dir)
    return {k: _stream(tok, v) for k, v in corpus().items()}


def eval_windows(n: int = EVAL_WINDOWS, seq: int = CONFIG["seq"], out_dir: str | Path = DEFAULT_OUT) -> np.ndarray:
    """``[n, seq]`` int64: non-overlapping windows spread evenly over the held-out modules' token stream."""
    s = _streams(str(out_dir))["eval"]
    if n * seq > len(s):
        raise ValueError(f"the held-out stream has {len(s)} tokens, fewer than {n} windows of {seq}")
    starts = np.linspace(0, len(s) - seq, n).astype(np.int64)
    return np.stack([s[i:i + seq] for i in starts])


def calibration_windows(n: int = 8, seq: int = 512, seed: int = 1,
                        out_dir: str | Path = DEFAULT_OUT) -> np.ndarray:
    """``[n, seq]`` int64 windows of *training* text (for pruning passes; disjoint from :func:`eval_windows`)."""
    s = _streams(str(out_dir))["train"]
    starts = np.random.default_rng(seed).integers(0, len(s) - seq, size=n)
    return np.stack([s[i:i + seq] for i in starts])


# ------------------------------------------------------------------------------------------------ passkey
def _passkey_parts(tok, key: str) -> tuple[list[int], list[int], list[int]]:
    statement = tok.encode(f"# The pass key is {key}. Remember it. {key} is the pass key.\n").ids
    question = tok.encode("\n# What is the pass key? The pass key is").ids
    answer = tok.encode(f" {key}").ids
    return statement, question, answer


def passkey_batch(tok, filler: np.ndarray, n: int, length: int, rng: np.random.Generator,
                  depths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences of exactly ``length`` tokens: filler text with a 5-digit pass key after a random line, ending
    with the question and the answer. Returns ``(ids [n, length], answer_mask [n, length])``; the mask marks the
    positions whose *next* token is an answer digit (where the logits are read). ``depths`` (0..1, one per sequence)
    places the key; random when ``None``."""
    newline = np.array(["\n" in tok.id_to_token(i).replace("Ċ", "\n") for i in range(tok.get_vocab_size())])
    ids = np.empty((n, length), dtype=np.int64)
    mask = np.zeros((n, length), dtype=bool)
    for j in range(n):
        key = "".join(str(d) for d in rng.integers(0, 10, size=5))
        statement, question, answer = _passkey_parts(tok, key)
        body = length - len(statement) - len(question) - len(answer)
        if body < 8:
            raise ValueError(f"length {length} is too short for a pass key")
        start = int(rng.integers(0, len(filler) - body))
        text = filler[start:start + body]
        lines = np.flatnonzero(newline[text]) + 1
        depth = rng.random() if depths is None else float(depths[j])
        at = int(lines[np.argmin(np.abs(lines - depth * body))]) if len(lines) else int(depth * body)
        seq = np.concatenate([text[:at], statement, text[at:], question, answer])
        ids[j] = seq
        mask[j, length - len(answer) - 1:length - 1] = True
    return ids, mask


# ------------------------------------------------------------------------------------------------ model
def _lm_config():
    import transformers

    return transformers.LlamaConfig(**CONFIG["arch"], attn_implementation="sdpa")


def _logits_module(lm):
    import torch

    class _Logits(torch.nn.Module):
        """``input_ids → logits`` without a cache: the graph the ONNX export and the benchmarks run."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return _Logits(lm).eval()


def _lr(step: int, cfg: dict) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _train(cfg: dict, out_dir: Path, log) -> tuple[Any, float]:
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(cfg["seed"])
    tok = get_tokenizer(out_dir)
    stream = _streams(str(out_dir))["train"]
    lm = transformers.LlamaForCausalLM(_lm_config())
    decay = [p for n, p in lm.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in lm.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    lm.train()
    vocab = CONFIG["arch"]["vocab_size"]

    def step_on(loss, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()

    def copy_rows(n, seq):
        """``n`` rows of a random token segment written twice (the second half is predictable only by copying)."""
        half = torch.randint(1, vocab, (n, seq // 2), generator=gen)
        return torch.cat([half, half], 1)

    # Copying first: retrieval by content needs induction heads, which the text alone forms too late.
    warm = cfg.get("copy_warmup_steps", 0)
    for step in range(warm):
        x = copy_rows(cfg["tokens_per_step"] // 64, 64)
        logits = lm(input_ids=x, use_cache=False).logits[:, 32:-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 33:].reshape(-1))
        step_on(loss, cfg["lr"] * min(1.0, (step + 1) / 30))
        if step % 20 == 0 or step == warm - 1:
            log(f"copy warm-up {step + 1}/{warm}  copy loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s")
    for step in range(cfg["steps"]):
        # the shortest windows first: retrieval is learned there, then carried to the longer ones
        short = step < cfg.get("short_steps", 0)
        seq = cfg["lengths"][0] if short else cfg["lengths"][step % len(cfg["lengths"])]
        batch = cfg["tokens_per_step"] // seq
        n_copy = int(round(batch * cfg.get("copy_share", 0.0)))
        n_key = int(round((batch - n_copy) * cfg["passkey_share"]))
        starts = rng.integers(0, len(stream) - seq - 1, size=batch - n_copy - n_key)
        plain = np.stack([stream[i:i + seq] for i in starts]) if len(starts) else np.zeros((0, seq), np.int64)
        keyed, mask = passkey_batch(tok, stream, n_key, seq, rng)
        text = len(plain) + n_key
        x = torch.cat([torch.from_numpy(np.concatenate([plain, keyed])), copy_rows(n_copy, seq)])
        m = torch.from_numpy(np.concatenate([np.zeros_like(plain, dtype=bool), mask]))[:, :-1]
        logits = lm(input_ids=x, use_cache=False).logits[:, :-1]
        tgt = x[:, 1:]
        tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                   reduction="none").view_as(tgt)
        lm_loss = tok_loss[:text].mean()
        key_loss = tok_loss[:text][m].mean()
        copy_loss = tok_loss[text:, seq // 2:].mean() if n_copy else torch.zeros(())
        step_on(lm_loss + key_loss + copy_loss, _lr(step, cfg))
        if step % 20 == 0 or step == cfg["steps"] - 1:
            el = time.perf_counter() - t0
            log(f"step {step + 1}/{cfg['steps']}  lm loss {lm_loss.item():.3f}  key loss {key_loss.item():.3f}  "
                f"copy loss {copy_loss.item():.3f}  {el:.0f} s elapsed, "
                f"~{el / (warm + step + 1) * (cfg['steps'] - step - 1):.0f} s left")
    lm.eval()
    return lm, time.perf_counter() - t0


def _export(lm, path: Path) -> None:
    import torch

    from graphprune.torch import export as gexport

    ids = torch.randint(0, CONFIG["arch"]["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(".tmp-" + path.name)
    gexport(_logits_module(lm), (ids,), tmp, dynamic_axes={0: "batch", 1: "seq"},
            input_names=["input_ids"], output_names=["logits"])
    import onnx_ir as ir

    model = ir.load(tmp)
    ir.save(model, path, external_data=path.name + ".data")
    for p in (tmp, tmp.with_name(tmp.name + ".data")):
        p.unlink(missing_ok=True)


def get_decoder(out_dir: str | Path = DEFAULT_OUT, cfg: dict | None = None, log=print) -> Path:
    """The path of ``decoder.onnx``: trained, evaluated and exported on the first call, then cached."""
    import torch

    cfg = cfg or CONFIG
    out_dir = Path(out_dir)
    onnx_path, meta_path, pt = out_dir / "decoder.onnx", out_dir / "decoder.json", out_dir / "decoder.pt"
    get_tokenizer(out_dir)
    with _locked(out_dir):
        meta = _read_meta(meta_path)
        if meta and meta.get("config") == cfg and onnx_path.exists() and pt.exists():
            if meta.get("eval_version") != EVAL_VERSION:
                log("re-evaluating (the evaluation changed; the weights are kept)")
                meta.update(report=report(_loaded(out_dir), out_dir), eval_version=EVAL_VERSION)
                _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
            return onnx_path
        lm, secs = _train(cfg, out_dir, log)
        tmp_pt = out_dir / ".decoder.pt.tmp"
        torch.save(lm.state_dict(), tmp_pt)
        tmp_pt.replace(pt)
        log("exporting to ONNX")
        _export(lm, onnx_path)
        log("evaluating")
        rep = report(_logits_module(lm), out_dir)
        meta = {"config": cfg, "train_seconds": round(secs, 1), "report": rep, "eval_version": EVAL_VERSION}
        _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return onnx_path


def get_pair(out_dir: str | Path = DEFAULT_OUT, log=print) -> tuple[Path, Path]:
    """The trained decoder as a prefill + decode-step pair with a KV cache (``graphprune.torch.export_decoder_pair``),
    in ``<out>/pair/``; exported once per trained weights (``pair.json`` records the checkpoint's hash)."""
    from graphprune.torch import export_decoder_pair

    out_dir = Path(out_dir)
    get_decoder(out_dir, log=log)
    folder = out_dir / "pair"
    sha = hashlib.sha256((out_dir / "decoder.pt").read_bytes()).hexdigest()

    def fresh() -> bool:
        rec = _read_meta(folder / "pair.json")
        return bool(rec and rec.get("weights_sha256") == sha and (folder / "decode.onnx").exists())

    if not fresh():
        lm = module(out_dir).lm
        with _locked(out_dir):
            if not fresh():
                log("exporting the prefill + decode pair")
                export_decoder_pair(lm, folder)
                _write_atomic(folder / "pair.json", json.dumps({"weights_sha256": sha}).encode())
    return folder / "prefill.onnx", folder / "decode.onnx"


def _loaded(out_dir: str | Path):
    import torch
    import transformers

    lm = transformers.LlamaForCausalLM(_lm_config())
    lm.load_state_dict(torch.load(Path(out_dir) / "decoder.pt", weights_only=True))
    return _logits_module(lm.eval())


def module(out_dir: str | Path = DEFAULT_OUT):
    """The trained decoder as ``input_ids → logits`` ``nn.Module`` (eval mode)."""
    get_decoder(out_dir)
    return _loaded(out_dir)


def meta(out_dir: str | Path = DEFAULT_OUT) -> dict:
    get_decoder(out_dir)
    return json.loads((Path(out_dir) / "decoder.json").read_text())


# ------------------------------------------------------------------------------------------------ evaluation
def _runner(model):
    """``ids [b, n] → logits`` for an ``nn.Module``, an ONNX path or an ``onnx_ir.Model``."""
    import torch

    if isinstance(model, torch.nn.Module):
        def run(ids):
            with torch.no_grad():
                return model(torch.from_numpy(ids)).numpy()
        return run
    from graphprune.backends.onnxruntime import make_session

    sess = make_session(model if not isinstance(model, Path) else str(model), threads=TRAIN_THREADS)
    name = sess.get_inputs()[0].name
    return lambda ids: sess.run(None, {name: ids})[0]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def next_token_metrics(model, windows: np.ndarray, batch: int = 4) -> dict[str, float]:
    """Perplexity and next-token (top-1) accuracy over every position of ``windows`` but the last."""
    run = _runner(model)
    nll, hits, count = 0.0, 0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        lp = _log_softmax(run(ids)[:, :-1].astype(np.float64))
        tgt = ids[:, 1:]
        nll -= float(np.take_along_axis(lp, tgt[..., None], -1).sum())
        hits += int((lp.argmax(-1) == tgt).sum())
        count += tgt.size
    return {"perplexity": math.exp(nll / count), "next_token_accuracy": hits / count, "tokens": count}


def passkey_accuracy(model, length: int, n: int = PASSKEY_SAMPLES, seed: int = 7, batch: int = 4,
                     out_dir: str | Path = DEFAULT_OUT) -> float:
    """Share of ``n`` held-out passkey sequences of ``length`` tokens whose 5 digits are all predicted (greedy;
    teacher-forced argmax over the answer, which equals greedy decoding of it). Keys sit at evenly spread depths."""
    tok = get_tokenizer(out_dir)
    ids, mask = passkey_batch(tok, _streams(str(out_dir))["eval"], n, length, np.random.default_rng(seed),
                              depths=np.linspace(0.0, 1.0, n))
    run = _runner(model)
    right = 0
    for i in range(0, n, batch):
        x, m = ids[i:i + batch], mask[i:i + batch]
        pred = run(x).argmax(-1)
        for row in range(len(x)):
            pos = np.flatnonzero(m[row])
            right += bool((pred[row, pos] == x[row, pos + 1]).all())
    return right / n


def unigram_perplexity(windows: np.ndarray, out_dir: str | Path = DEFAULT_OUT) -> float:
    """The perplexity of a unigram model (training-token counts, add-one smoothing) on the targets of ``windows``."""
    counts = np.bincount(_streams(str(out_dir))["train"], minlength=CONFIG["arch"]["vocab_size"]) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[windows[:, 1:]].mean()))


def report(model, out_dir: str | Path = DEFAULT_OUT, lengths=PASSKEY_LENGTHS) -> dict:
    """Held-out perplexity, next-token accuracy, the unigram perplexity, and passkey accuracy by length."""
    w = eval_windows(out_dir=out_dir)
    rep: dict[str, Any] = next_token_metrics(model, w)
    rep["unigram_perplexity"] = unigram_perplexity(w, out_dir)
    rep["passkey"] = {str(n): passkey_accuracy(model, n, out_dir=out_dir) for n in lengths}
    return rep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=None, help="override the training steps (a smoke run)")
    p.add_argument("--quiet", action="store_true", help="no training progress")
    add_result_option(p)
    a = p.parse_args(argv)
    cfg = (dict(CONFIG, steps=a.steps, copy_warmup_steps=min(a.steps, CONFIG["copy_warmup_steps"])) if a.steps
           else CONFIG)
    t = time.perf_counter()
    get_decoder(a.out, cfg, log=(lambda *_: None) if a.quiet else (lambda m: print(m, flush=True)))
    m = json.loads((a.out / "decoder.json").read_text())
    r = m["report"]
    print(f"trained in {m['train_seconds']:.0f} s (ready after {time.perf_counter() - t:.0f} s)")
    print(f"held-out perplexity {r['perplexity']:.2f} (unigram {r['unigram_perplexity']:.1f}), "
          f"next-token accuracy {100 * r['next_token_accuracy']:.1f}% over {r['tokens']} tokens")
    print("passkey accuracy: " + ", ".join(f"{k} tokens {100 * v:.0f}%" for k, v in r["passkey"].items()))
    if a.result:
        cols = ["held-out perplexity", "unigram perplexity", "next-token accuracy",
                *(f"passkey @{k}" for k in r["passkey"]), "training"]
        row = [f"{r['perplexity']:.2f}", f"{r['unigram_perplexity']:.0f}", f"{100 * r['next_token_accuracy']:.1f}%",
               *(f"{100 * v:.0f}%" for v in r["passkey"].values()), f"{m['train_seconds'] / 60:.0f} min"]
        write_result(a.result, cols, [row], description=(
            f"benchmarks/llm.py: a Llama-style decoder (8 layers, width 256, 8 query heads over 2 KV heads, SwiGLU, "
            f"RoPE; 6.7 M parameters) trained here from scratch on Python's standard library ({cfg['copy_warmup_steps']} "
            f"steps of copying, then {cfg['steps']} steps of {cfg['tokens_per_step']} tokens, windows of 256 to 1,024 "
            f"tokens, a quarter of them copy rows, seed {cfg['seed']}). Held-out: "
            f"{r['tokens']} tokens of whole modules never trained on; unigram: training-token frequencies. Passkey: "
            f"{PASSKEY_SAMPLES} keys of 5 digits at evenly spread depths in held-out code, all digits right; "
            f"2,048 is twice the longest training window."))


if __name__ == "__main__":
    main()
