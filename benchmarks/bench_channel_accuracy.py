"""Top-1 of the trained digits CNN (``benchmarks.digits``) after ``channel_prune``, no fine-tuning.

Three models: the digits ViT (``digits.get_vit()``: heads and MLP units pruned, stream kept) and two exports
of the same trained CNN weights:
  * ``folded``: ``digits.get_cnn()``, the dynamo exporter's default (BatchNorm folded into Conv);
  * ``bn kept``: the module exported with ``optimize=False`` then constant-folded (onnxscript ``fold_constants``
    only), so ``BatchNormalization`` nodes remain and the ``bn`` (|γ|) criterion has something to read.
For each criterion (l1, l2, bn, activation with 64 calibration images) × local/global ranking × round_to (8, 1)
× least-squares refit (``reconstruct``, same 64 images) × ratio: top-1 on the 360 test images, FLOPs and
params kept (``measure_flops``).

Run:  python benchmarks/bench_channel_accuracy.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import digits  # noqa: E402
from benchmarks.results import Table, add_result_option  # noqa: E402
from graphprune.backends.onnxruntime import measure_flops  # noqa: E402
from graphprune.passes import PassContext, get_pass  # noqa: E402


def _bn_kept_export(folder: Path) -> Path:
    import onnxscript.optimizer
    import torch

    module = digits.cnn_module()
    x = torch.zeros(1, 1, 32, 32)
    raw = folder / "cnn_bn_raw.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(module, (x,), str(raw), dynamo=True, opset_version=18, optimize=False,
                      dynamic_shapes=({0: batch},), verbose=False)
    model = ir.load(raw)
    onnxscript.optimizer.fold_constants(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    out = folder / "cnn_bn.onnx"
    ir.save(model, out, external_data="cnn_bn.onnx.data")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_result_option(p)
    a = p.parse_args(argv)
    x_tr, y_tr, x_te, y_te = digits.load_split()
    calib = digits.calibration_feeds(64, 16)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    exports = {"folded": Path(digits.get_cnn()), "bn kept": _bn_kept_export(folder), "vit": Path(digits.get_vit())}
    table = Table("| export | criterion | ranking | round_to | refit | ratio | top-1 | FLOPs kept | params kept |")
    for label, path in exports.items():
        base = ir.load(path)
        f0, p0 = measure_flops(base).flops, measure_flops(base).params
        table.add(f"| {label} | (unpruned) | | | | 0% | {digits.evaluate(base, x_te, y_te):.2%} | 1.00 | 1.00 |")
        criteria = ["l1", "l2", "activation"] + (["bn"] if label == "bn kept" else [])
        for crit in criteria:
            for glob in (False, True):
                for rt, rec in ((8, False), (1, False), (1, True)):
                    for ratio in (0.3, 0.5):
                        model = ir.load(path)
                        ctx = PassContext(calibration=calib)
                        cfg = {"ratio": ratio, "importance": crit, "global": glob, "round_to": rt, "reconstruct": rec}
                        get_pass("channel_prune")(cfg, ctx)(model)
                        fr = measure_flops(model)
                        acc = digits.evaluate(model, x_te, y_te)
                        table.add(f"| {label} | {crit} | {'global' if glob else 'local'} | {rt} | {'yes' if rec else 'no'} | "
                                  f"{ratio:.0%} | {acc:.2%} | {fr.flops / f0:.2f} | {fr.params / p0:.2f} |")
    tmp.cleanup()
    table.save(a.result)


if __name__ == "__main__":
    main()
