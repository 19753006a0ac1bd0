"""Fine-tuning recovery after structured channel pruning, with the PyTorch front-end.

For the trained digits CNN and ViT (``benchmarks/digits.py``) and each ratio:
  1. ``graphprune.torch.optimize(module, ..., channel_prune ratio)``: magnitude (l2) importance, local, no refit
     (no calibration data is handed over, so the data-free defaults apply); top-1 of the pruned ONNX in ORT is the
     *training-free* figure;
  2. ``graphprune.torch.apply_plan``: the pruned module (the ViT's attention hard-codes ``reshape(B, N, C)``, so it
     comes back as a torch.fx GraphModule); checked against the pruned ONNX on test images;
  3. fine-tuned with the training recipe of ``digits.py`` (AdamW, one-cycle, random shifts, one thread) for
     ``--epochs`` epochs at ``--lr``;
  4. exported again (``graphprune.torch.export``) and evaluated in ORT: the *fine-tuned* figure.
Prints a Markdown table: model, ratio, params kept, top-1 original / training-free / fine-tuned, epochs, seconds.

``python -m benchmarks.bench_finetune [--models cnn vit] [--ratios 0.3 0.5] [--epochs 8] [--vit-epochs 4]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import digits


def _row(name: str, module, ratio: float, epochs: int, lr: float, tmp: Path, log) -> dict:
    import torch

    import graphprune.torch as gt

    x_tr, y_tr, x_te, y_te = digits.load_split()
    example = (torch.from_numpy(x_te[:8]),)
    base = digits.evaluate(digits.get_cnn() if name == "cnn" else digits.get_vit(), x_te, y_te)
    t0 = time.perf_counter()
    res = gt.optimize(module, example, [{"name": "channel_prune", "ratio": ratio}], out=tmp / f"{name}_{ratio}.onnx",
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
    torch_top1, train_s = digits._train(pruned, cfg, log)
    path = gt.export(pruned, example, tmp / f"{name}_{ratio}_ft.onnx")
    tuned = digits.evaluate(path, x_te, y_te)
    return {"model": name, "ratio": ratio, "params": gt.count_parameters(pruned) / gt.count_parameters(module),
            "kind": type(pruned).__name__, "top1": base, "training_free": free, "fine_tuned": tuned,
            "fine_tuned_torch": torch_top1, "epochs": epochs, "train_s": train_s, "prune_s": prune_s,
            "pruned_vs_onnx_max_abs_err": err}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--epochs", type=int, default=8, help="CNN fine-tuning epochs")
    p.add_argument("--vit-epochs", type=int, default=4, help="ViT fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="CNN peak learning rate")
    p.add_argument("--vit-lr", type=float, default=3e-4, help="ViT peak learning rate")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.models:
            for ratio in a.ratios:
                module = digits.cnn_module() if name == "cnn" else digits.vit_module()
                epochs, lr = (a.epochs, a.lr) if name == "cnn" else (a.vit_epochs, a.vit_lr)
                print(f"{name} ratio {ratio}: pruning, then {epochs} epochs", flush=True)
                rows.append(_row(name, module, ratio, epochs, lr, Path(d), lambda s: print(s, flush=True)))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| model | ratio | params kept | top-1 original | training-free | fine-tuned | epochs | fine-tune s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ratio']:.0%} | {r['params']:.2f} | {r['top1']:.2%} | {r['training_free']:.2%} | "
              f"{r['fine_tuned']:.2%} | {r['epochs']} | {r['train_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
