"""``channel_prune`` on the trained digits models, calibrated and verified on a folder of PNGs vs on synthetic inputs.

What a user does with ``graphprune optimize MODEL.onnx --data images/ --no-normalize``, measured:

1. A fixed seeded subset of the TRAINING images (default 400 of 1437) is written as 8-bit grey PNGs to
   ``benchmarks/out/digits_png/`` (git-ignored). Each PNG is the 32×32 upsampled image ``round(x * 255)``, the
   size of the model input, so the loader's cover-resize and center crop are the identity and the only change is
   8-bit quantization: ``load_data(folder, model, normalize=False)`` must equal ``load_split()``'s images within
   0.5/255 (checked and printed, with the original model's argmax agreement on the two versions).
2. For the CNN and the ViT (``benchmarks.digits``) and channel ratios 0.3 and 0.5, ``graphprune.optimize`` runs
   twice with ``force=True``:
     * ``real PNG``: ``data=<png folder>``, ``DataConfig(normalize=False, calibration_samples=128,
       verify_samples=64)``: channel_prune's ``auto`` resolves to activation importance, group ratios
       from measured sensitivity and a least-squares refit, and verification checks top-1 agreement on 64 held-out PNGs;
     * ``synthetic``: no data, default ``DataConfig()`` (what the CLI does without ``--data``: 8 generated
       calibration and 8 verification inputs): l2, local ranking, no refit; verification checks cosines only.
   Each output model is then scored on the 360 held-out TEST images (``digits.evaluate``), never seen by
   calibration or verification.

Columns: model, ratio, data, FLOPs ratio, test top-1 (original → pruned), verify verdict + summary, data.source.
Prints a markdown table and writes ``benchmarks/out/fidelity_digits.json``.

Run:  python -m benchmarks.bench_fidelity_digits [--images 400] [--ratios 0.3,0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune  # noqa: E402
from benchmarks import digits  # noqa: E402
from benchmarks.results import Table, add_result_option  # noqa: E402
from graphprune.data import load_data  # noqa: E402
from graphprune.pipeline import DataConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
PNG_DIR = OUT / "digits_png"
#: 8-bit quantization moves a value by at most half a grey level; the rest is float32 rounding of ``u8 / 255``.
PNG_TOL = 0.5 / 255 + 1e-6
CALIBRATION, VERIFY = 128, 64


# ------------------------------------------------------------------------------------------ PNGs
def write_pngs(x: np.ndarray, y: np.ndarray, folder: Path, n: int, seed: int = 0) -> np.ndarray:
    """Write ``n`` images of ``x`` (NCHW [N, 1, H, W] in [0, 1]), drawn with ``default_rng(seed)``, as 8-bit grey
    PNGs into ``folder``; return the indices written, in the loader's (file-name) order.

    Names are ``train_<index:04d>_<label>.png``: zero-padded, so sorting by name (the loader's order) is sorting
    by index. Stale ``train_*.png`` files from an earlier run are removed first.
    """
    from PIL import Image

    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grey NCHW images [N, 1, H, W], got shape {x.shape}")
    if not 1 <= n <= len(x):
        raise ValueError(f"n must be in [1, {len(x)}], got {n}")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("train_*.png"):
        stale.unlink()
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    for i in idx:
        u8 = np.round(np.clip(x[i, 0], 0.0, 1.0) * 255.0).astype(np.uint8)
        Image.fromarray(u8, mode="L").save(folder / f"train_{i:04d}_{int(y[i])}.png")
    return idx


def loaded_images(folder: Path, model_path: Path) -> np.ndarray:
    """The folder as the optimizer sees it: ``load_data(..., normalize=False)`` stacked to [N, 1, H, W]."""
    data = load_data(folder, ir.load(model_path), normalize=False)
    return np.stack([next(iter(s.values())) for s in data.samples])


# ----------------------------------------------------------------------------------------- runs
def run_one(model_path: Path, out_path: Path, ratio: float, real: bool) -> tuple[dict, float]:
    """``graphprune.optimize`` with the PNG folder (``real``) or without data; return (report, seconds)."""
    if real:
        cfg = DataConfig(calibration_samples=CALIBRATION, verify_samples=VERIFY, normalize=False)
    else:
        cfg = DataConfig()  # no --data: the CLI's synthetic defaults
    pipe = graphprune.Pipeline(data=cfg).add("channel_prune", ratio=ratio)
    t0 = time.perf_counter()
    report = graphprune.optimize(model_path, out_path, pipe, data=PNG_DIR if real else None, force=True)
    return report, time.perf_counter() - t0


def _logits_metrics(report: dict) -> dict:
    outs = report["verify"]["outputs"]
    m = next((o["metrics"] for o in outs if o.get("kind") == "logits"), outs[0]["metrics"] if outs else {})
    cos = m.get("cosine") or {}
    return {"top1": m.get("top1"), "top5": m.get("top5"), "kl_mean": m.get("kl_mean"),
            "cosine_mean": cos.get("mean"), "cosine_min": cos.get("min")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="training images written as PNGs (default 400)")
    p.add_argument("--ratios", default="0.3,0.5", help="comma-separated channel_prune ratios")
    p.add_argument("--models", default="cnn,vit", help="comma-separated: cnn, vit")
    add_result_option(p)
    a = p.parse_args(argv)
    ratios = [float(r) for r in a.ratios.split(",") if r]
    names = [m for m in a.models.split(",") if m]
    getters = {"cnn": digits.get_cnn, "vit": digits.get_vit}
    if unknown := sorted(set(names) - set(getters)):
        p.error(f"unknown model(s) {unknown}; choose from {sorted(getters)}")

    t_start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits.load_split()
    t0 = time.perf_counter()
    models = {name: Path(getters[name]()) for name in names}  # trains on first use (cached in benchmarks/out)
    t_models = time.perf_counter() - t0

    # 1. PNG folder, and how closely the loader gives back the arrays it was written from.
    t0 = time.perf_counter()
    idx = write_pngs(x_tr, y_tr, PNG_DIR, a.images)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = next(iter(models.values()))
    x_png = loaded_images(PNG_DIR, first)
    t_load = time.perf_counter() - t0
    ref = x_tr[idx]
    if x_png.shape != ref.shape:
        raise SystemExit(f"loader gave {x_png.shape}, expected {ref.shape}")
    diff = float(np.abs(x_png.astype(np.float64) - ref).max())
    png = {"folder": str(PNG_DIR.relative_to(OUT.parent.parent)), "images": int(len(idx)), "seed": 0,
           "size": list(ref.shape[2:]), "max_abs_diff": diff, "max_abs_diff_grey_levels": diff * 255,
           "tolerance": PNG_TOL, "write_s": round(t_write, 2), "load_s": round(t_load, 2)}
    print(f"PNG folder {png['folder']}: {len(idx)} training images, {ref.shape[3]}x{ref.shape[2]} 8-bit grey; "
          f"max |load_data - load_split| = {diff:.6f} ({diff * 255:.3f} grey levels, tolerance {PNG_TOL:.6f}) "
          f"{'OK' if diff <= PNG_TOL else 'TOO LARGE'}; write {t_write:.2f} s, load {t_load:.2f} s", flush=True)
    if diff > PNG_TOL:
        raise SystemExit("the PNG round trip does not reproduce the model input; fix the PNG size/quantization first")
    agreement = {}
    for name, path in models.items():
        same = digits.predict(path, x_png).argmax(1) == digits.predict(path, ref).argmax(1)
        agreement[name] = float(same.mean())
    png["argmax_agreement_png_vs_float"] = agreement
    print("original model, argmax agreement on PNG vs float training images: "
          + ", ".join(f"{k} {v:.2%}" for k, v in agreement.items()), flush=True)

    # 2. optimize with the PNG folder and without data; score every output on the test split.
    base_top1 = {name: digits.evaluate(path, x_te, y_te) for name, path in models.items()}
    rows = []
    table = Table("| model | ratio | data | FLOPs ratio | test top-1 (orig → pruned) | verify | data.source | method | time |")
    with tempfile.TemporaryDirectory(prefix="gp_fid_") as tmp:
        for name, path in models.items():
            for ratio in ratios:
                for real in (True, False):
                    out = Path(tmp) / f"{name}_{ratio}_{'png' if real else 'syn'}.onnx"
                    report, secs = run_one(path, out, ratio, real)
                    top1 = digits.evaluate(out, x_te, y_te)
                    ver = report["verify"]
                    info = report["passes"][0].get("info", {})
                    method = info.get("method", {})
                    row = {
                        "model": name, "ratio": ratio, "data": "real PNG" if real else "synthetic",
                        "flops_ratio": report["flops"]["ratio"], "params_ratio": report["params"]["ratio"],
                        "test_top1_orig": base_top1[name], "test_top1_pruned": top1,
                        "verify_passed": bool(ver["passed"]), "verify_summary": ver["summary"],
                        "verify_failures": list(ver.get("failures", [])), "verify_samples": ver.get("samples"),
                        "verify_metrics": _logits_metrics(report),
                        "data_source": report["data"]["source"], "data_description": report["data"]["description"],
                        "calibration_samples": report["data"]["calibration_samples"],
                        "verify_data_samples": report["data"]["verify_samples"],
                        "method": {k: method.get(k) for k in ("importance", "global", "reconstruct")},
                        "channel_ratio": info.get("channel_ratio"),
                        "warnings": report.get("warnings", []),
                        "optimize_s": round(secs, 2),
                    }
                    rows.append(row)
                    m = row["method"]
                    meth = f"{m['importance']}, {'global' if m['global'] else 'local'}, {'refit' if m['reconstruct'] else 'no refit'}"
                    table.add(f"| {name} | {ratio:.0%} | {row['data']} | {row['flops_ratio']:.3f} | "
                          f"{base_top1[name]:.2%} → {top1:.2%} | {'passed' if row['verify_passed'] else 'FAILED'}: "
                          f"{row['verify_summary']} | {row['data_source']} | {meth} | {secs:.1f} s |")
    total = time.perf_counter() - t_start
    table.save(a.result, description=(
        f"{a.images} training images written as 8-bit PNGs (32×32, so the loader's resize is the identity; loaded "
        f"back within 0.5/255) are the `--data` folder (`--no-normalize`: the models take [0, 1]); the pruned models "
        f"are scored on the {len(y_te)} test images no step has seen. `channel_prune` at each ratio with the "
        f"defaults of each data source (the method column); on the ViT these include its embedding width "
        f"(`ignore_stem: auto`). The digits models are trained on first use (benchmarks/digits.py)."))
    result = {"png": png, "test_images": int(len(y_te)), "base_test_top1": base_top1,
              "calibration_samples": CALIBRATION, "verify_samples": VERIFY, "rows": rows,
              "seconds": {"models": round(t_models, 1), "total": round(total, 1)}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fidelity_digits.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {OUT / 'fidelity_digits.json'} ({total:.0f} s total, {t_models:.0f} s getting the models)")


if __name__ == "__main__":
    main()
