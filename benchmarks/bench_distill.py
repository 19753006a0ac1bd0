"""Does distillation after pruning recover MiniLM's retrieval quality? (issue 20, item 8: push the frontier)

all-MiniLM-L6-v2 (``benchmarks/minilm.py prepare``) is pruned by ``graphprune.optimize`` with ``channel_prune`` at
``--ratios``, with the least-squares refit (the data-aware default) and without it (``reconstruct: false``). Each
pruned ONNX file is then distilled towards the original: its graph runs in torch (``benchmarks/onnx_torch.py``), the
weights of every layer (MatMul / Gemm / Add / LayerNormalization inputs, not the embedding tables) trained on
``1 - cos(student, original)`` of the sentence embedding, AdamW with a one-cycle schedule, batches of 16 texts at up
to 128 tokens; the trained weights are written back into the ONNX file and scored in ONNX Runtime after each epoch.

Task and split are those of ``bench_search minilm-texts``: the ``body`` task (the query is not inside its document),
the last 400 of ``search_pairs()`` as the test pairs (recall@1 and MRR, each text encoded on its own at up to 256
tokens); the distillation texts are the queries and documents of the other pairs plus ``calibration.txt``, none of
them a test text. Pruning calibrates on ``calibration.txt``.

    python -m benchmarks.minilm prepare
    python -m benchmarks.bench_distill --ratios 0.4 --epochs 2 --result benchmarks/results/distill_minilm.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune  # noqa: E402
from benchmarks import minilm  # noqa: E402
from benchmarks.bench_finetune import _text_batches  # noqa: E402
from benchmarks.bench_search import search_pairs  # noqa: E402
from benchmarks.results import Table, add_result_option  # noqa: E402
from graphprune.io import load_model, save_model  # noqa: E402
from graphprune.pipeline import DataConfig  # noqa: E402

TEST_PAIRS = 400


def scores(model, tok, test) -> tuple[float, float, np.ndarray]:
    """(recall@1, MRR, unit embeddings of the test texts) of ``model`` (a path or session) on ``test``."""
    q = minilm.encode(model, tok, [p[0] for p in test])
    d = minilm.encode(model, tok, [p[1] for p in test])
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    s = q @ d.T
    rank = (s > np.diag(s)[:, None]).sum(1)
    return float(np.mean(rank == 0)), float(np.mean(1.0 / (rank + 1))), np.concatenate([q, d])


def distill_loss(kind: str, emb, target):
    """``cosine``: mean 1 - cos(student, original). ``relational``: mean over the batch's rows of KL(original ‖
    student) between softmax(cosines / 0.05) to the other texts of the batch (the diagonal left out)."""
    import torch

    f = torch.nn.functional
    if kind == "cosine":
        return (1 - f.cosine_similarity(emb, target, dim=-1)).mean()
    e = f.normalize(emb, dim=-1)
    off = ~torch.eye(len(e), dtype=torch.bool)
    s = (e @ e.T)[off].reshape(len(e), -1) / 0.05
    t = (target @ target.T)[off].reshape(len(e), -1) / 0.05
    return f.kl_div(f.log_softmax(s, dim=-1), f.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.4], help="channel_prune ratios")
    p.add_argument("--epochs", type=int, default=2, help="distillation epochs (scored after each)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate with the refit")
    p.add_argument("--lr-no-refit", type=float, default=3e-4, help="peak learning rate without the refit")
    p.add_argument("--loss", nargs="+", choices=["cosine", "relational"], default=["cosine", "relational"],
                   help="cosine: 1 - cos(student, original); relational: the KL divergence between the two models' "
                   "in-batch similarity distributions (softmax of cosines / 0.05, row by row), which asks the student "
                   "to rank the batch's texts as the original does rather than to reproduce its vectors")
    p.add_argument("--no-refit", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the rows without the refit")
    p.add_argument("--threads", type=int, default=2)
    add_result_option(p)
    a = p.parse_args(argv)
    import torch

    from benchmarks.onnx_torch import OnnxModule

    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    prep = minilm.prepare()
    folder = minilm.DEFAULT_OUT
    tok, calib, original = folder / "tokenizer.json", folder / "calibration.txt", Path(prep["onnx"])
    pairs = search_pairs()
    test = pairs[-TEST_PAIRS:]
    held_out = {t for pr in test for t in pr}
    texts = [t for pr in pairs[:-TEST_PAIRS] for t in pr] + [t for t in calib.read_text(encoding="utf-8").splitlines() if t]
    texts = [t for t in texts if t not in held_out]  # a text that recurs in a test pair is never trained on
    r0, m0, e0 = scores(original, tok, test)
    print(f"original: recall@1 {r0:.4f}, MRR {m0:.4f} on {len(test)} test pairs; {len(texts)} distillation texts",
          flush=True)
    teacher = OnnxModule(load_model(original))
    names = teacher.input_names
    if names != list(minilm.INPUT_NAMES):
        raise SystemExit(f"{original}: inputs {names}, expected {list(minilm.INPUT_NAMES)}")
    batches = _text_batches(tok, texts, 16, 128)  # tuples in minilm.INPUT_NAMES order
    with torch.no_grad():
        targets = [torch.nn.functional.normalize(teacher(*b)[0], dim=-1) for b in batches]
    del teacher
    table = Table(["channels removed", "refit", "FLOPs", "distillation", "test recall@1 kept", "test MRR kept",
                   "cosine to original (test texts)", "seconds"])

    def row(ratio, refit, flops, label, path, secs):
        r, m, e = scores(path, tok, test)
        cos = float((e * e0).sum(1).mean())
        table.add([f"{ratio:.0%}", "yes" if refit else "no", f"×{flops:.3f}", label, f"{r / r0:.1%}", f"{m / m0:.1%}",
                   f"{cos:.3f}", f"{secs:.0f}"])

    with tempfile.TemporaryDirectory(prefix="gp_distill_") as tmp:
        for ratio in a.ratios:
            for refit in (True, False) if a.no_refit else (True,):
                out = Path(tmp) / f"pruned_{ratio}_{refit}.onnx"
                pipe = graphprune.Pipeline(data=DataConfig(tokenizer=str(tok), max_length=256)).add(
                    "channel_prune", ratio=ratio, **({} if refit else {"reconstruct": False}))
                t0 = time.perf_counter()
                report = graphprune.optimize(original, out, pipe, data=calib, force=True)
                flops = report["flops"]["ratio"]
                row(ratio, refit, flops, "none (training-free)", out, time.perf_counter() - t0)
                for kind in a.loss:
                    model = load_model(out)
                    student = OnnxModule(model)
                    lr = a.lr if refit else a.lr_no_refit
                    opt = torch.optim.AdamW(student.trained(), lr=lr, weight_decay=0.01)
                    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=a.epochs * len(batches),
                                                                pct_start=0.1)
                    gen = torch.Generator().manual_seed(0)
                    t0 = time.perf_counter()
                    for epoch in range(a.epochs):
                        for i in torch.randperm(len(batches), generator=gen).tolist():
                            loss = distill_loss(kind, student(*batches[i])[0], targets[i])
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                            sched.step()
                        student.write_back()
                        tuned = Path(tmp) / f"distilled_{ratio}_{refit}_{kind}_{epoch}.onnx"
                        save_model(model, tuned)
                        row(ratio, refit, flops, f"{kind}, {epoch + 1} epoch{'s' if epoch else ''}, lr {lr:g}", tuned,
                            time.perf_counter() - t0)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    table.save(a.result, description=(
        f"benchmarks/bench_distill.py: all-MiniLM-L6-v2, `channel_prune` through `graphprune.optimize` (calibration "
        f"on calibration.txt at 256 tokens, 128 samples), with the refit (default) and without; then distilled "
        f"towards the original on {len(texts)} texts ({len(batches)} batches of 16, up to 128 tokens; loss 1 - cos of "
        f"the sentence embeddings, or the relational loss on in-batch similarities; AdamW, one-cycle; layer weights trained, embedding tables not), in torch through "
        f"benchmarks/onnx_torch.py, weights written back to the ONNX file. Scored in ONNX Runtime on the {len(test)} "
        f"test pairs of the body task (the last {TEST_PAIRS} of search_pairs(), none a distillation text): original "
        f"recall@1 {r0:.3f}, MRR {m0:.3f}. Seconds: pruning (with verification), or training so far."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
