"""Fine-tuning recovery after structured channel pruning, with the PyTorch front-end.

For the trained digits CNN and ViT (``benchmarks/digits.py``) and each ratio:
  1. ``graphprune.torch.optimize(module, ..., channel_prune ratio)``: magnitude (l2) importance, local, no refit
     (no calibration data is handed over, so the data-free defaults apply); top-1 of the pruned ONNX in ORT is the
     *training-free* figure;
  2. ``graphprune.torch.apply_plan``: the pruned module (the ViT's attention hard-codes ``reshape(B, N, C)``, so it
     comes back as a torch.fx GraphModule); checked against the pruned ONNX on test images;
  3. fine-tuned with the training recipe of ``digits.py`` (AdamW, one-cycle, random shifts, one thread) for
     ``--epochs`` epochs at ``--lr``;
     (``--vit-kd A``: the ViT's loss also distils the unpruned module's logits, ``train_kd``);
  4. exported again (``graphprune.torch.export``) and evaluated in ORT: the *fine-tuned* figure.
Prints a Markdown table: model, ratio, params kept, top-1 original / training-free / fine-tuned, epochs, seconds.

For all-MiniLM-L6-v2 (``--models minilm``, ``benchmarks/minilm.py``; the model comes from the package registry
and lands in ``benchmarks/out/minilm``), per ``--minilm-ratios``:
  1. ``graphprune.torch.optimize`` with ``channel_prune`` on the real calibration texts (``calibration.txt``,
     disjoint from the evaluation pairs): data-aware selection (activation importance, sensitivity allocation,
     global) but ``reconstruct: false``, because ``apply_plan`` slices the original weights and the pruned module
     must be the pruned ONNX; recall@1 of that ONNX in ORT is the *training-free* figure;
  2. ``apply_plan`` → the pruned encoder, checked against the pruned ONNX on evaluation texts;
  3. ``distill``: embedding distillation on the calibration texts (``--minilm-texts`` of them, up to
     ``--minilm-max-length`` tokens): loss ``1 - cos(student, teacher)`` to the original model's embeddings
     (computed once), AdamW with a one-cycle schedule, dropout off (eval mode), ``--minilm-epochs`` epochs;
  4. recall@1 (docstring task, 300 pairs, up to 256 tokens, as ``bench_fidelity``) and the mean embedding cosine
     to the original on the 600 evaluation texts: training-free from the pruned ONNX in ORT (the pruned module
     equals it, ``pruned_vs_onnx_max_abs_err``), fine-tuned from the distilled module in torch.
The ``top-1`` columns hold recall@1 for this model.

``python -m benchmarks.bench_finetune [--models cnn vit minilm] [--ratios 0.3 0.5] [--epochs 8] [--vit-epochs 4]
[--minilm-ratios 0.3 0.4] [--minilm-epochs 2]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import digits
from benchmarks.results import Table, add_result_option


def train_kd(model, teacher, cfg: dict, alpha: float, temperature: float, log) -> tuple[float, float]:
    """``digits._train``'s recipe (AdamW, one-cycle, random shifts, one thread, label smoothing) with a logit
    distillation term: loss = (1 - alpha) · CE + alpha · T² · KL(softmax(teacher / T) || softmax(model / T)), the
    teacher (the unpruned module, eval mode) seeing the same shifted batch. Returns (torch test top-1, seconds)."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(digits.TRAIN_THREADS)
    try:
        torch.manual_seed(cfg["seed"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        x_tr, y_tr, x_te, y_te = digits.load_split(cfg["arch"].get("img_size", 32), cfg["split_seed"])
        xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        steps = cfg["epochs"] * ((len(xt) + cfg["batch"] - 1) // cfg["batch"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps, pct_start=0.1)
        teacher.eval()
        t0 = time.perf_counter()
        for epoch in range(cfg["epochs"]):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(0, len(xt), cfg["batch"]):
                idx = perm[i : i + cfg["batch"]]
                xb = digits._shift(xt[idx], cfg["max_shift"], gen)
                with torch.no_grad():
                    soft = F.softmax(teacher(xb) / temperature, dim=-1)
                logits = model(xb)
                ce = F.cross_entropy(logits, yt[idx], label_smoothing=cfg["label_smoothing"])
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft, reduction="batchmean")
                loss = (1 - alpha) * ce + alpha * temperature**2 * kd
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            if log and (epoch % cfg.get("log_every", 5) == cfg.get("log_every", 5) - 1 or epoch == cfg["epochs"] - 1):
                log(f"  epoch {epoch + 1}/{cfg['epochs']}: loss {total / len(xt):.4f}, test top-1 "
                    f"{digits._torch_accuracy(model, x_te, y_te):.4f}, {time.perf_counter() - t0:.0f} s")
        return digits._torch_accuracy(model, x_te, y_te), time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        model.eval()


def _row(name: str, module, ratio: float, epochs: int, lr: float, tmp: Path, log, kd: float = 0.0,
         temperature: float = 2.0, ignore_stem: str | None = None) -> dict:
    import torch

    import graphprune.torch as gt

    x_tr, y_tr, x_te, y_te = digits.load_split()
    example = (torch.from_numpy(x_te[:8]),)
    base = digits.evaluate(digits.get_cnn() if name == "cnn" else digits.get_vit(), x_te, y_te)
    t0 = time.perf_counter()
    stem = {} if ignore_stem is None else {"ignore_stem": {"true": True, "false": False}.get(ignore_stem, ignore_stem)}
    res = gt.optimize(module, example, [{"name": "channel_prune", "ratio": ratio, **stem}],
                      out=tmp / f"{name}_{ratio}.onnx",
                      force=True)
    free = digits.evaluate(res.onnx_path, x_te, y_te)
    pruned = gt.apply_plan(module, res.plan, example)
    with torch.no_grad():
        ref = digits.predict(res.onnx_path, x_te[:64])
        got = pruned.eval()(torch.from_numpy(x_te[:64])).numpy()
    err = float(np.abs(ref - got).max())
    prune_s = time.perf_counter() - t0
    cfg = dict(digits.CNN_CONFIG if name == "cnn" else digits.VIT_CONFIG)
    cfg.pop("pos_init", None)
    cfg.update(epochs=epochs, lr=lr, log_every=max(1, epochs // 2))
    if kd:
        teacher = digits.cnn_module() if name == "cnn" else digits.vit_module()
        torch_top1, train_s = train_kd(pruned, teacher, cfg, kd, temperature, log)
    else:
        torch_top1, train_s = digits._train(pruned, cfg, log)
    path = gt.export(pruned, example, tmp / f"{name}_{ratio}_ft.onnx")
    tuned = digits.evaluate(path, x_te, y_te)
    return {"model": name, "ratio": ratio, "params": gt.count_parameters(pruned) / gt.count_parameters(module),
            "kind": type(pruned).__name__, "top1": base, "training_free": free, "fine_tuned": tuned,
            "fine_tuned_torch": torch_top1, "epochs": epochs, "lr": lr, "kd_alpha": kd, "kd_temperature": temperature,
            "train_s": train_s, "prune_s": prune_s,
            "pruned_vs_onnx_max_abs_err": err}


def distill(student, teacher, batches: list[tuple], epochs: int, lr: float, log=None, seed: int = 0,
            threads: int | None = None) -> dict:
    """Embedding distillation in place: minimise ``1 - cos(student(*b), teacher(*b))`` over ``batches``.

    ``batches`` are tuples of input tensors (the modules' positional inputs); the teacher's outputs are computed
    once, under ``no_grad``. AdamW (weight decay 0.01), one-cycle schedule peaking at ``lr``, batches shuffled
    each epoch (``seed``); the student stays in eval mode (no dropout: the texts are few). Returns the mean cosine
    to the teacher on ``batches`` before and after, the steps, epochs and training seconds.
    """
    import torch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        teacher.eval()
        student.eval()
        with torch.no_grad():
            targets = [torch.nn.functional.normalize(teacher(*b).float(), dim=-1) for b in batches]

        def mean_cos() -> float:
            with torch.no_grad():
                cs = [torch.nn.functional.cosine_similarity(student(*b), t, dim=-1) for b, t in zip(batches, targets)]
            return float(torch.cat(cs).mean())

        before = mean_cos()
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        steps = max(1, epochs * len(batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            total = 0.0
            for i in torch.randperm(len(batches), generator=gen).tolist():
                cos = torch.nn.functional.cosine_similarity(student(*batches[i]), targets[i], dim=-1)
                loss = (1.0 - cos).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
            if log:
                log(f"  epoch {epoch + 1}/{epochs}: loss {total / len(batches):.4f}, {time.perf_counter() - t0:.0f} s")
        seconds = time.perf_counter() - t0
        return {"cosine_before": before, "cosine_after": mean_cos(), "steps": steps, "epochs": epochs,
                "train_s": seconds}
    finally:
        torch.set_num_threads(old_threads)
        student.eval()


def _text_batches(tok, texts: list[str], batch: int, max_length: int) -> list[tuple]:
    """Tensor batches of ``texts`` (grouped by length, so padding stays small), in ``minilm.INPUT_NAMES`` order."""
    import torch

    from benchmarks import minilm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for i in range(0, len(order), batch):
        feeds = minilm.tokenize(tok, [texts[j] for j in order[i:i + batch]], max_length)
        out.append(tuple(torch.from_numpy(feeds[k]) for k in minilm.INPUT_NAMES))
    return out


def _minilm_row(ratio: float, epochs: int, lr: float, n_texts: int, max_length: int, tmp: Path, log,
                cache: dict) -> dict:
    import torch

    import graphprune as gp
    import graphprune.torch as gt
    from benchmarks import minilm
    from graphprune.pipeline import DataConfig

    folder = minilm.DEFAULT_OUT
    if not (folder / "eval_pairs.jsonl").is_file():
        minilm.prepare(folder)
    tok, calib = folder / "tokenizer.json", folder / "calibration.txt"
    pairs = minilm.load_eval_pairs(folder / "eval_pairs.jsonl")
    eval_texts = [q for q, _ in pairs] + [d for _, d in pairs]
    if "teacher" not in cache:
        cache["teacher"] = minilm.SentenceEncoder(folder / "model")
        cache["eval_emb"] = minilm.encode(cache["teacher"], tok, eval_texts)
    teacher, ref_emb = cache["teacher"], cache["eval_emb"]

    def quality(model) -> tuple[float, float]:
        """(recall@1, mean cosine to the original) on the evaluation texts, from one encode of all 600."""
        emb = minilm.encode(model, tok, eval_texts)
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        q, d = unit[:len(pairs)], unit[len(pairs):]
        recall = float(np.mean(np.argmax(q @ d.T, axis=1) == np.arange(len(pairs))))
        return recall, float((unit * ref_emb).sum(1).mean())

    if "recall" not in cache:
        cache["recall"] = quality(teacher)[0]
    base = cache["recall"]
    module = minilm.SentenceEncoder(folder / "model")
    texts = [t for t in calib.read_text(encoding="utf-8").splitlines() if t][:n_texts]
    ex = minilm.tokenize(tok, texts[:2], 16)
    example = tuple(torch.from_numpy(ex[k]) for k in minilm.INPUT_NAMES)
    pipe = gp.Pipeline(data=DataConfig(path=str(calib), tokenizer=str(tok), max_length=max_length)).add(
        "channel_prune", ratio=ratio, reconstruct=False)
    t0 = time.perf_counter()
    res = gt.optimize(module, example, pipe, out=tmp / f"minilm_{ratio}.onnx", force=True,
                      dynamic_axes={0: "batch", 1: "sequence"}, input_names=list(minilm.INPUT_NAMES),
                      output_names=[minilm.OUTPUT_NAME])
    prune_s = time.perf_counter() - t0
    free, free_cos = quality(res.onnx_path)
    pruned = gt.apply_plan(module, res.plan, example)
    check = eval_texts[:16]
    err = float(np.abs(minilm.encode(pruned, tok, check) - minilm.encode(res.onnx_path, tok, check)).max())
    stats = distill(pruned, teacher, _text_batches(tok, texts, 16, max_length), epochs, lr, log)
    tuned, tuned_cos = quality(pruned)
    return {"model": "minilm", "ratio": ratio, "params": gt.count_parameters(pruned) / gt.count_parameters(module),
            "kind": type(pruned).__name__, "top1": base, "training_free": free, "fine_tuned": tuned,
            "retained_training_free": free / base, "retained_fine_tuned": tuned / base,
            "cosine_eval_training_free": free_cos, "cosine_eval_fine_tuned": tuned_cos,
            "cosine_train_before": stats["cosine_before"], "cosine_train_after": stats["cosine_after"],
            "distill_texts": len(texts), "max_length": max_length, "steps": stats["steps"], "epochs": epochs,
            "lr": lr, "train_s": stats["train_s"], "prune_s": prune_s, "flops_ratio": res.report["flops"]["ratio"],
            "pruned_vs_onnx_max_abs_err": err}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit", "minilm"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--epochs", type=int, default=8, help="CNN fine-tuning epochs")
    p.add_argument("--vit-epochs", type=int, default=4, help="ViT fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="CNN peak learning rate")
    p.add_argument("--vit-lr", type=float, default=3e-4, help="ViT peak learning rate")
    p.add_argument("--vit-kd", type=float, default=0.0,
                   help="ViT: weight of logit distillation from the unpruned module (0: cross-entropy only)")
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--minilm-ratios", nargs="+", type=float, default=[0.3, 0.4])
    p.add_argument("--minilm-epochs", type=int, default=2, help="MiniLM distillation epochs")
    p.add_argument("--minilm-lr", type=float, default=1e-4, help="MiniLM distillation peak learning rate")
    p.add_argument("--minilm-texts", type=int, default=512, help="calibration texts to distil on")
    p.add_argument("--minilm-max-length", type=int, default=128, help="tokens per distillation text")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--ignore-stem", choices=["auto", "true", "false"], default=None,
                   help="channel_prune's ignore_stem for the digits models (default: graphprune.torch.optimize's, "
                   "which keeps the embedding width; auto prunes the ViT's)")
    add_result_option(p)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cache: dict = {}
        for name in a.models:
            if name == "minilm":
                for ratio in a.minilm_ratios:
                    print(f"minilm ratio {ratio}: pruning, then {a.minilm_epochs} epochs of distillation", flush=True)
                    rows.append(_minilm_row(ratio, a.minilm_epochs, a.minilm_lr, a.minilm_texts, a.minilm_max_length,
                                            Path(d), lambda s: print(s, flush=True), cache))
                    print(json.dumps(rows[-1]), flush=True)
                continue
            for ratio in a.ratios:
                module = digits.cnn_module() if name == "cnn" else digits.vit_module()
                epochs, lr = (a.epochs, a.lr) if name == "cnn" else (a.vit_epochs, a.vit_lr)
                print(f"{name} ratio {ratio}: pruning, then {epochs} epochs", flush=True)
                kd = a.vit_kd if name == "vit" else 0.0
                rows.append(_row(name, module, ratio, epochs, lr, Path(d), lambda s: print(s, flush=True), kd,
                                 a.kd_temperature, a.ignore_stem))
                print(json.dumps(rows[-1]), flush=True)
    print()
    table = Table("| model | channels | params kept | metric | original | training-free | fine-tuned | recipe | epochs | "
                  "fine-tune s |")
    for r in rows:
        metric = "recall@1" if r["model"] == "minilm" else "top-1"
        recipe = ("embedding distillation" if r["model"] == "minilm" else
                  f"CE + logit KD (α {r['kd_alpha']}, T {r['kd_temperature']})" if r.get("kd_alpha") else "CE")
        table.add(f"| {r['model']} | {r['ratio']:.0%} | {r['params']:.2f} | {metric} | {r['top1']:.2%} | "
              f"{r['training_free']:.2%} | {r['fine_tuned']:.2%} | {recipe}, lr {r['lr']:g} | {r['epochs']} | "
              f"{r['train_s']:.0f} |")
    table.save(a.result)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
