"""The ``generate`` and ``prune-pair`` commands (attached to the ``graphprune`` app by :func:`register`): a decoder
exported as a prefill graph and a decode-step graph with a KV cache (``graphprune.decoder``).

Errors follow ``graphprune.cli``: a ``GraphpruneError`` is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from graphprune.errors import ConfigError, DataError, VerificationError

#: Generated samples when there is no --data (token ids drawn uniformly; they verify agreement, not a task).
SYNTHETIC = (8, 64)


def _ids(text: str) -> np.ndarray:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--ids: expected token ids separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise ConfigError("--ids: no token ids given")
    return np.asarray([ids], dtype=np.int64)


def _vocab(model) -> int | None:
    out = [v for v in model.graph.outputs if v.shape is not None and len(v.shape) == 3]
    dim = out[0].shape[2] if out else None
    return dim if isinstance(dim, int) else None


def register(app: typer.Typer, out: Console, err: Console) -> None:
    """Add ``generate`` and ``prune-pair`` to ``app``; results go to ``out``, notes to ``err``."""

    @app.command("generate")
    def generate_cmd(
        prefill: Annotated[Path, typer.Argument(help="Prefill graph: input_ids -> logits and the KV cache.")],
        decode: Annotated[Path, typer.Argument(help="Decode-step graph: input_ids and the cache -> logits and the grown cache.")],
        ids: Annotated[str | None, typer.Option("--ids", help="Prompt token ids, e.g. 12,7,99.")] = None,
        text: Annotated[str | None, typer.Option("--text", help="Prompt text (with --tokenizer).")] = None,
        tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Hugging Face tokenizer.json: encodes --text, decodes the output.")] = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 32,
        eos: Annotated[int | None, typer.Option("--eos", help="Stop when every row produced this token id.")] = None,
        threads: Annotated[int | None, typer.Option(help="ORT intra-op threads (default: all cores).")] = None,
    ) -> None:
        """Greedy generation in ONNX Runtime over a prefill + decode-step pair (see docs/llm.md)."""
        from graphprune.data import load_tokenizer
        from graphprune.decoder import generate
        from graphprune.io import load_model

        if (ids is None) == (text is None):
            raise ConfigError("give the prompt as one of --ids or --text")
        tok = load_tokenizer(tokenizer) if tokenizer is not None else None
        if text is not None:
            if tok is None:
                raise ConfigError("--text needs --tokenizer tokenizer.json")
            prompt = np.asarray([tok.encode(text, add_special_tokens=False).ids], dtype=np.int64)
            if prompt.size == 0:
                raise DataError("--text: the tokenizer made no tokens of it")
        else:
            prompt = _ids(ids)
        pre, dec = load_model(prefill), load_model(decode)
        vocab = _vocab(pre)
        if vocab is not None and (prompt.max() >= vocab or prompt.min() < 0):
            raise DataError(f"prompt token ids must be in [0, {vocab}) for this model")
        result = generate(pre, dec, prompt, max_new_tokens, eos_token_id=eos, threads=threads)[0]
        new = result[prompt.shape[1]:]
        out.print(" ".join(str(int(t)) for t in new), highlight=False)
        if tok is not None:
            out.print(escape(tok.decode([int(t) for t in new])), highlight=False)

    @app.command("prune-pair")
    def prune_pair_cmd(
        prefill: Annotated[Path, typer.Argument(help="Prefill graph (never modified).")],
        decode: Annotated[Path, typer.Argument(help="Decode-step graph (never modified).")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the pruned prefill.onnx and decode.onnx (written atomically).")],
        prune_depth: Annotated[float | None, typer.Option("--prune-depth", help="Share of the transformer blocks (or, with --unit sublayer, of the attention and MLP branches) to remove.")] = None,
        prune_channels: Annotated[float | None, typer.Option("--prune-channels", help="Share of the channels to remove from every group prunable in both graphs (the MLPs' hidden units and the attention heads in whole KV groups, the cache with them; chosen on the prefill graph, with a refit from --data), before any depth pruning.")] = None,
        unit: Annotated[str, typer.Option("--unit", help="block | sublayer.")] = "block",
        importance: Annotated[str, typer.Option("--importance", help="angular (ShortGPT) | output (FinerCut).")] = "angular",
        data: Annotated[Path | None, typer.Option("--data", help="Real text: .txt (one sample per line) or .jsonl, with --tokenizer; or .npz with input_ids.")] = None,
        tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Hugging Face tokenizer.json for text data.")] = None,
        max_length: Annotated[int, typer.Option("--max-length", help="Text data: tokens per sample.")] = 256,
        calibration_samples: Annotated[int, typer.Option("--calibration-samples", min=1, help="Samples that measure importance.")] = 16,
        verify_samples: Annotated[int, typer.Option("--verify-samples", min=1, help="Held-out samples that verify the result.")] = 16,
        accuracy_kept_min: Annotated[float, typer.Option("--accuracy-kept-min", help="With --data: the pruned pair's next-token accuracy on the held-out text, as a share of the original's, must reach this.")] = 0.9,
        top1_min: Annotated[float, typer.Option("--top1-min", help="Without --data: top-1 agreement with the original on generated tokens must reach this.")] = 0.9,
        force: Annotated[bool, typer.Option("--force", help="Write the pair even if verification fails.")] = False,
        report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    ) -> None:
        """Depth- and/or width-prune a prefill + decode pair consistently: the same blocks leave both graphs, with
        their KV cache, and the same channels (MLP hidden units), so the cache one writes is the cache the other
        reads. Verified against the original pair on held-out
        samples (next-token accuracy on your text with --data; agreement on generated tokens without, and it says
        so), and by generating from the pruned pair."""
        from graphprune.data import load_data
        from graphprune.decoder import cache_layout, channel_prune_pair, compare_prefill, depth_prune_pair, generate
        from graphprune.io import load_model, save_model

        if unit not in ("block", "sublayer") or importance not in ("angular", "output"):
            raise ConfigError("--unit must be block or sublayer, --importance angular or output")
        if prune_depth is None and prune_channels is None:
            raise ConfigError("prune-pair: give --prune-depth R and/or --prune-channels R")
        if prune_channels is not None and not 0 < prune_channels < 1:
            raise ConfigError(f"--prune-channels must be in (0, 1), got {prune_channels}")
        pre, dec = load_model(prefill), load_model(decode)
        layout = cache_layout(pre, dec)
        for f in (prefill, decode):
            if output.resolve() == f.resolve().parent:
                raise ConfigError(f"--output {output} is the input's folder; choose another (inputs are never "
                                  "overwritten)")
        if report is not None and not report.parent.exists():
            raise ConfigError(f"report folder {report.parent} does not exist")
        if data is not None:
            ds = load_data(data, pre, tokenizer=tokenizer, max_length=max_length)
            need = calibration_samples + verify_samples
            if len(ds) < 2:
                raise DataError(f"{data}: {len(ds)} sample; need at least 2 (calibration and verification)")
            n_ver = min(verify_samples, max(1, len(ds) * verify_samples // need))
            cal, ver = ds.split(min(calibration_samples, len(ds) - n_ver), n_ver)
            feeds = [[{layout.ids: np.asarray(s[layout.ids])[None]} for s in d.samples] for d in (cal, ver)]
            source = f"{data} ({len(cal)} calibration, {len(ver)} verification samples)"
        else:
            rng = np.random.default_rng(0)
            vocab = _vocab(pre) or 2
            n, length = SYNTHETIC
            gen = [{layout.ids: rng.integers(0, vocab, (1, length))} for _ in range(2 * n)]
            feeds = [gen[:n], gen[n:]]
            source = "generated token ids"
            err.print("[yellow]warning:[/] no --data: importance and verification use generated token ids, which "
                      "say nothing of your task; pass --data with real text", highlight=False, soft_wrap=True)
        kind = "user" if data is not None else "synthetic"
        p2, d2, rep = pre, dec, {}
        if prune_channels is not None:
            p2, d2, cinfo = channel_prune_pair(p2, d2, {"ratio": prune_channels}, feeds[0], data_source=kind)
            rep["channels"] = {k: cinfo.get(k) for k in ("channel_ratio", "predicted_flops_ratio", "pair_groups",
                                                           "reconstructed_layers", "method")}
        if prune_depth is not None:
            p2, d2, info = depth_prune_pair(p2, d2, {"ratio": prune_depth, "unit": unit, "importance": importance},
                                            feeds[0], data_source=kind)
            rep.update({"removed": info["removed"], "scores": info["scores"], "cache_removed": {
                "prefill": info["cache_removed"], "decode": info["decode_cache_removed"]}})
        cmp = compare_prefill(pre, p2, feeds[1])
        first = feeds[1][0][layout.ids]
        steps = 8
        same = generate(p2, d2, first, steps)[0, first.shape[1]:] == generate(pre, dec, first, steps)[0, first.shape[1]:]
        rep.update({"data": source, "real_data": data is not None, "verify": cmp,
                    "generation_agreement": float(same.mean())})
        if data is not None:
            kept = cmp["accuracy_kept"]
            passed = kept >= accuracy_kept_min if kept is not None else accuracy_kept_min <= 0
            gate = (f"next-token accuracy kept {100 * kept:.1f}%" if kept is not None else
                    "next-token accuracy kept n/a (the original predicts none of the held-out tokens)") + \
                f" (min {100 * accuracy_kept_min:.0f}%)"
        else:
            passed = cmp["top1_agreement"] >= top1_min
            gate = f"top-1 agreement {100 * cmp['top1_agreement']:.1f}% on generated tokens (min {100 * top1_min:.0f}%)"
        rep["verify"]["passed"] = passed
        if report is not None:
            tmp = tempfile.NamedTemporaryFile("w", dir=report.parent, delete=False, suffix=".tmp")
            with tmp:
                json.dump(rep, tmp, indent=1)
            os.replace(tmp.name, report)
        if "channels" in rep:
            c = rep["channels"]
            out.print(f"channels: {c['pair_groups']} group(s) pruned in both graphs, {100 * c['channel_ratio']:.0f}% of "
                      f"their channels, FLOPs ×{c['predicted_flops_ratio']:.3f} (prefill, predicted)", highlight=False)
        if "removed" in rep:
            out.print(f"removed {', '.join(rep['removed'])}; cache inputs/outputs removed: "
                      f"{len(rep['cache_removed']['decode'])} (decode), {len(rep['cache_removed']['prefill'])} "
                      "(prefill)", highlight=False)
        acc = cmp["next_token_accuracy"]
        out.print(f"verified on {source}: {gate}; next-token accuracy {100 * acc['original']:.1f}% -> "
                  f"{100 * acc['pruned']:.1f}%; greedy tokens equal to the original's on {steps} steps: "
                  f"{100 * float(same.mean()):.0f}%", highlight=False)
        if not passed and not force:
            raise VerificationError(f"verification failed: {gate}; nothing written (--force writes it anyway)")
        output.mkdir(parents=True, exist_ok=True)
        save_model(p2, output / "prefill.onnx", inputs=(prefill, decode))
        save_model(d2, output / "decode.onnx", inputs=(prefill, decode))
        out.print(f"wrote {output / 'prefill.onnx'} and {output / 'decode.onnx'}", highlight=False)
