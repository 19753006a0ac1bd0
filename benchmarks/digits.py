"""Small *trained* benchmark models on scikit-learn's bundled digits data set (no download).

Shared by the token-drop, sparse-attention and channel-pruning benchmarks, which need real
accuracy figures, not only output agreement with a random-weight model.

Public API (everything else is private):

- ``load_split(img_size=32, seed=0)`` -> ``(x_train, y_train, x_test, y_test)``: 1797 8x8 digits,
  grey levels 0..16 divided by 16 (so [0, 1]), bilinearly upscaled to ``img_size`` (values stay in
  [0, 1]), float32 NCHW with one channel; labels int64. Fixed stratified split: 20 % test
  (360 test / 1437 train images for ``seed=0``).
- ``get_vit(opset=18, out_dir=...)`` -> path of ``vit_digits.onnx`` (opset 18: MatMul/Softmax
  attention) or ``vit_digits_op23.onnx`` (same weights, ``sdpa=True`` -> standard ``Attention`` op).
  Model: ``examples/models.py`` ``ViT(img_size=32, patch=4, in_chans=1, dim=128, depth=6, heads=4,
  num_classes=10)``: 64 patch tokens + CLS.
- ``get_cnn(out_dir=...)`` -> path of ``cnn_digits.onnx``: ``ResNet(layers=(1, 1, 1, 1), width=16,
  in_chans=1, num_classes=10)`` (Conv+BN+ReLU bottlenecks with residual Adds and 1x1 downsample convs).
- ``vit_module(sdpa=False)`` / ``cnn_module()``: the trained ``nn.Module`` (eval mode), for
  fine-tuning experiments.
- ``evaluate(model, x, y, batch=256)`` -> top-1 accuracy of an ONNX model (path, ``onnx.ModelProto``
  or ``onnx_ir.Model``) in ONNX Runtime CPU.
- ``calibration(n=64, seed=0)`` -> ``{input_name: images}``, ``n`` training images as one ORT feed;
  ``calibration_feeds(n, batch)`` -> the same images as a list of feeds (``PassContext.calibration``).

Training recipe (see ``VIT_CONFIG`` / ``CNN_CONFIG``): AdamW, one-cycle learning rate, random shifts
of up to 2-3 pixels, fixed seeds, one CPU thread (``TRAIN_THREADS``). The ViT's learnable position
embedding starts from 2-D sine-cosine values instead of the default std-0.02 noise: with the default,
the same recipe spent ~8 epochs near chance and ended at 95.0 % after 30 epochs.

All exported models take input ``x`` of shape ``[batch, 1, 32, 32]`` (dynamic batch) and return
logits ``[batch, 10]``.

Caching: files go to ``benchmarks/out/`` (gitignored): ``<name>.pt`` (state dict), ``<name>.onnx``
+ ``.onnx.data``, ``<name>.json`` (test top-1 in torch and in ORT, training seconds, config).
A cached model is reused when its JSON records the same config; otherwise it is retrained.
Training and export run under an exclusive ``fcntl.flock`` on ``out/.train.lock``, so concurrent
callers train once: the second waits, then loads the cache. Files are moved into place atomically,
JSON last, so a reader that sees the JSON sees complete files.

``python -m benchmarks.digits`` builds everything and prints a summary table.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = _REPO / "benchmarks" / "out"
INPUT_NAME = "x"
NUM_CLASSES = 10
# One training thread: on this shared 2-core machine, with another process busy, 2 threads ran a ViT
# epoch 5x slower than 1 thread (58-93 s vs 11-18 s, OpenMP threads waiting on a descheduled peer).
TRAIN_THREADS = 1

# Bump "version" when the training recipe changes: a mismatch with the cached JSON retrains.
VIT_CONFIG = {
    "version": 2,
    "arch": {"img_size": 32, "patch": 4, "in_chans": 1, "dim": 128, "depth": 6, "heads": 4, "num_classes": 10},
    "pos_init": "sincos",
    "epochs": 30,
    "batch": 64,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "label_smoothing": 0.1,
    "max_shift": 2,
    "seed": 0,
    "split_seed": 0,
}
CNN_CONFIG = {
    "version": 2,
    "arch": {"layers": [1, 1, 1, 1], "width": 16, "in_chans": 1, "num_classes": 10},
    "epochs": 30,
    "batch": 64,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "label_smoothing": 0.0,
    "max_shift": 3,
    "seed": 0,
    "split_seed": 0,
}


# ----------------------------------------------------------------------------------------- data
def load_split(img_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)``: float32 NCHW in [0, 1], int64 labels.

    The split is stratified by class, 20 % test, and depends only on ``seed``.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if img_size < 8:
        raise ValueError(f"img_size must be >= 8, got {img_size}")
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # 8x8 grey levels 0..16 -> [0, 1]
    if img_size != 8:
        with torch.no_grad():
            x = F.interpolate(torch.from_numpy(x), size=(img_size, img_size), mode="bilinear", align_corners=False)
        x = np.clip(x.numpy(), 0.0, 1.0)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return (np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te)


def calibration(n: int = 64, seed: int = 0, input_name: str = INPUT_NAME, img_size: int = 32) -> dict[str, np.ndarray]:
    """Return ``{input_name: x}`` with ``n`` training images (random, fixed by ``seed``) as one ORT feed."""
    x_tr, _, _, _ = load_split(img_size)
    if not 1 <= n <= len(x_tr):
        raise ValueError(f"n must be in [1, {len(x_tr)}], got {n}")
    idx = np.random.default_rng(seed).choice(len(x_tr), size=n, replace=False)
    return {input_name: np.ascontiguousarray(x_tr[np.sort(idx)])}


def calibration_feeds(
    n: int = 64, batch: int = 16, seed: int = 0, input_name: str = INPUT_NAME, img_size: int = 32
) -> list[dict[str, np.ndarray]]:
    """The images of ``calibration(n, seed)`` split into feeds of ``batch`` images (last one may be smaller)."""
    x = calibration(n, seed, input_name, img_size)[input_name]
    return [{input_name: x[i : i + batch]} for i in range(0, n, batch)]


# ------------------------------------------------------------------------------------ evaluation
def _session(model):
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    if isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    import onnx_ir as ir

    if not isinstance(model, ir.Model):
        raise TypeError(f"model must be a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    # ir.save copies every initializer (also memory-mapped external ones) into a fresh data file and
    # leaves ``model`` unchanged (onnx-ir >= 1.1 contract); ORT reads the file before it is deleted.
    with tempfile.TemporaryDirectory(prefix="gp_eval_") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def predict(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Return the ONNX model's logits (first output) for ``x``, run in ORT CPU in batches of ``batch``.

    A model with a static batch dimension is run in chunks of that size instead.
    """
    sess = _session(model)
    inp = sess.get_inputs()[0]
    dim0 = inp.shape[0] if inp.shape else None
    step = dim0 if isinstance(dim0, int) and dim0 > 0 else batch
    out = [
        sess.run(None, {inp.name: np.ascontiguousarray(x[i : i + step], dtype=np.float32)})[0]
        for i in range(0, len(x), step)
    ]
    return np.concatenate(out, axis=0)


def evaluate(model, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` (path, ``onnx.ModelProto`` or ``onnx_ir.Model``) on (x, y)."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty and equally long, got {len(x)} and {len(y)}")
    logits = predict(model, x, batch)
    return float(np.mean(logits.reshape(len(x), -1).argmax(axis=1) == np.asarray(y)))


# --------------------------------------------------------------------------------------- models
@cache
def _examples():
    from examples import models

    return models


def _build_vit(sdpa: bool = False):
    m = _examples().ViT(**VIT_CONFIG["arch"])
    for blk in m.blocks:
        blk.attn.sdpa = sdpa
    return m


def _build_cnn():
    arch = dict(CNN_CONFIG["arch"])
    arch["layers"] = tuple(arch["layers"])
    return _examples().ResNet(**arch)


def _init_sincos_pos(model) -> None:
    """Set a ViT's learnable ``pos_embed`` to fixed 2-D sine-cosine values (MAE-style; CLS row zero).

    The default init (std 0.02) leaves tokens almost position-blind, and this ViT then spends its
    first ~8 epochs on digits near chance; a sine-cosine start lets attention route by position at once.
    """
    import torch

    n, dim = model.pos_embed.shape[1] - 1, model.pos_embed.shape[2]
    side, quarter = int(round(n**0.5)), dim // 4
    if side * side != n or dim % 4:
        raise ValueError(f"sincos position init needs a square grid and dim % 4 == 0, got {n} tokens, dim {dim}")
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    gy, gx = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    ay, ax = gy.reshape(-1, 1) * omega, gx.reshape(-1, 1) * omega
    table = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:] = table.to(model.pos_embed.dtype)


def _shift(xb, max_shift: int, gen):
    """Random translation by up to ``max_shift`` pixels per image (zero fill), on a torch batch."""
    import torch
    import torch.nn.functional as F

    if max_shift <= 0:
        return xb
    b, _, h, w = xb.shape
    pad = F.pad(xb, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([pad[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(off.tolist())])


def _torch_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i : i + 256])).argmax(1) for i in range(0, len(x), 256)])
    return float((pred.numpy() == y).mean())


def _train(model, cfg: dict, log) -> tuple[float, float]:
    """Train ``model`` in place with AdamW + one-cycle; return (torch test top-1, training seconds)."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        torch.manual_seed(cfg["seed"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        if cfg.get("pos_init") == "sincos":
            _init_sincos_pos(model)
        x_tr, y_tr, x_te, y_te = load_split(cfg["arch"].get("img_size", 32), cfg["split_seed"])
        xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        steps = cfg["epochs"] * ((len(xt) + cfg["batch"] - 1) // cfg["batch"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps, pct_start=0.1)
        t0 = time.perf_counter()
        for epoch in range(cfg["epochs"]):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(0, len(xt), cfg["batch"]):
                idx = perm[i : i + cfg["batch"]]
                loss = F.cross_entropy(
                    model(_shift(xt[idx], cfg["max_shift"], gen)), yt[idx], label_smoothing=cfg["label_smoothing"]
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            if log and (epoch % cfg.get("log_every", 5) == cfg.get("log_every", 5) - 1 or epoch == cfg["epochs"] - 1):
                log(
                    f"  epoch {epoch + 1}/{cfg['epochs']}: loss {total / len(xt):.4f}, test top-1 {_torch_accuracy(model, x_te, y_te):.4f}, {time.perf_counter() - t0:.0f} s"
                )
        seconds = time.perf_counter() - t0
        return _torch_accuracy(model, x_te, y_te), seconds
    finally:
        torch.set_num_threads(threads)
        model.eval()


# ---------------------------------------------------------------------------------------- cache
@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".train.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared with other users' benchmarks
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(onnx_path: Path, cfg: dict, base_json: Path) -> bool:
    """True when ``onnx_path`` and its JSON exist for ``cfg`` and (for re-exports) the base's current weights."""
    record = _read_meta(onnx_path.with_suffix(".json"))
    if not record or not onnx_path.exists():
        return False
    # A cache from a *newer* recipe version wins, so a long-running process that imported older code
    # does not retrain and overwrite it (the working tree is shared by several engineers).
    if record.get("config") != cfg and record.get("config", {}).get("version", 0) <= cfg["version"]:
        return False
    base = record if base_json == onnx_path.with_suffix(".json") else _read_meta(base_json)
    return bool(base) and base.get("weights_sha256") == record.get("weights_sha256")


def _export(model, onnx_path: Path, opset: int) -> None:
    """Export to a temp folder under the same name (the .onnx refers to its data file by name), then move in."""
    import torch

    tmp = Path(tempfile.mkdtemp(dir=onnx_path.parent, prefix=".export_"))
    try:
        _examples().export_model(model, (torch.zeros(1, 1, 32, 32),), tmp / onnx_path.name, opset=opset)
        data = tmp / (onnx_path.name + ".data")
        if data.exists():
            os.replace(data, onnx_path.parent / data.name)
        os.replace(tmp / onnx_path.name, onnx_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _get(name: str, cfg: dict, build, out_dir: Path, opset: int, log) -> Path:
    import torch

    if opset not in (18, 23):
        raise ValueError(f"opset must be 18 or 23, got {opset}")
    out_dir = Path(out_dir)
    if opset != 18:  # other opsets re-export the weights trained (and recorded) by the opset-18 build
        _get(name, cfg, build, out_dir, 18, log)
    onnx_path = out_dir / (name + ("" if opset == 18 else f"_op{opset}") + ".onnx")
    base_json = out_dir / f"{name}.json"
    if _cached(onnx_path, cfg, base_json):
        return onnx_path
    with _locked(out_dir):
        if _cached(onnx_path, cfg, base_json):  # another process finished while we waited
            return onnx_path
        pt = out_dir / f"{name}.pt"
        base = _read_meta(base_json)
        torch.manual_seed(cfg["seed"])  # deterministic initial weights
        model = build(opset != 18)
        if base and (base.get("config") == cfg or base["config"].get("version", 0) > cfg["version"]) and pt.exists():
            model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
            torch_top1, seconds, used_cfg = base["torch_top1"], base["train_seconds"], base["config"]
        else:
            if log:
                log(f"training {name} ({cfg['epochs']} epochs, {TRAIN_THREADS} thread(s))...")
            (torch_top1, seconds), used_cfg = _train(model, cfg, log), cfg
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{pt.name}.")
            os.close(fd)
            torch.save(model.state_dict(), tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, pt)
        model.eval()
        _export(model, onnx_path, opset)
        _, _, x_te, y_te = load_split(cfg["arch"].get("img_size", 32), cfg["split_seed"])
        record = {
            "model": name,
            "onnx": onnx_path.name,
            "opset": opset,
            "params": int(sum(p.numel() for p in model.parameters())),
            "test_images": int(len(y_te)),
            "torch_top1": torch_top1,
            "ort_top1": evaluate(onnx_path, x_te, y_te),
            "train_seconds": round(seconds, 1),
            "weights_sha256": _sha256(pt),
            "config": used_cfg,
        }
        _write_atomic(onnx_path.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
        return onnx_path


def get_vit(opset: int = 18, out_dir: str | Path = DEFAULT_OUT, log=print) -> Path:
    """Path to the trained digits ViT exported at ``opset`` (18 or 23); trains and exports on first use.

    ``log`` (a print-like callable or None) reports training progress.
    """
    return _get("vit_digits", VIT_CONFIG, _build_vit, Path(out_dir), opset, log)


def get_cnn(out_dir: str | Path = DEFAULT_OUT, log=print) -> Path:
    """Path to the trained digits CNN (opset 18); trains and exports on first use."""
    return _get("cnn_digits", CNN_CONFIG, lambda _sdpa: _build_cnn(), Path(out_dir), 18, log)


def _module(name: str, build, getter, out_dir: Path):
    import torch

    getter(out_dir=out_dir)
    model = build()
    model.load_state_dict(torch.load(Path(out_dir) / f"{name}.pt", map_location="cpu", weights_only=True))
    return model.eval()


def vit_module(sdpa: bool = False, out_dir: str | Path = DEFAULT_OUT):
    """The trained digits ViT as an ``nn.Module`` in eval mode (trains it first if not cached)."""
    return _module("vit_digits", lambda: _build_vit(sdpa), get_vit, out_dir)


def cnn_module(out_dir: str | Path = DEFAULT_OUT):
    """The trained digits CNN as an ``nn.Module`` in eval mode (trains it first if not cached)."""
    return _module("cnn_digits", _build_cnn, get_cnn, out_dir)


def meta(onnx_path: str | Path) -> dict:
    """The JSON record written next to a model (accuracies, training seconds, config)."""
    return json.loads(Path(onnx_path).with_suffix(".json").read_text())


def main(out_dir: str | Path = DEFAULT_OUT) -> None:
    """Train/export every digits model (cached) and print a summary table."""
    paths = [get_vit(18, out_dir), get_vit(23, out_dir), get_cnn(out_dir)]
    _, _, x_te, y_te = load_split()
    print(f"\n{'model':<22} {'params':>9} {'torch top-1':>12} {'ORT top-1':>10} {'train s':>8}")
    for p in paths:
        m = meta(p)
        ort_now = evaluate(p, x_te, y_te)
        print(f"{p.name:<22} {m['params']:>9,} {m['torch_top1']:>12.4f} {ort_now:>10.4f} {m['train_seconds']:>8.1f}")
    print(f"({len(y_te)} test images; files in {Path(out_dir)})")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train (if not cached) and export the digits ViT and CNN.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="cache folder (default: benchmarks/out)")
    main(parser.parse_args().out)
