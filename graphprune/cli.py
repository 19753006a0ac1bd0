"""The ``graphprune`` command: optimize, inspect, bench, passes; deploy, serve, loadtest (in ``_cli_deploy``);
lower, build (TensorRT, in ``_cli_trt``); search (``_cli_search``); generate, prune-pair (``_cli_decoder``).

User errors (bad paths, malformed models, bad configs, failed verification) print one line to stderr and exit
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphprune._cli_decoder import register as _register_decoder
from graphprune._cli_deploy import register as _register_deploy
from graphprune._cli_search import ray_flag
from graphprune._cli_search import register as _register_search
from graphprune._cli_trt import register as _register_trt
from graphprune.errors import ConfigError, GraphpruneError, InternalError

app = typer.Typer(
    name="graphprune",
    help="Make trained networks cheaper: token drop, sparse attention and channel pruning on ONNX graphs, verified.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    _state["debug"] = debug


class _Bar:
    """PassContext.progress → a rich progress bar per task (on stderr; silent when not a terminal)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.tasks[name], completed=done, total=total)

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def parse_sparse_spec(spec: str) -> dict[str, Any]:
    """``PATTERN[:key=value,...]`` → a ``sparse_attention`` pass entry (values parsed as YAML scalars)."""
    pattern, _, rest = spec.partition(":")
    if not pattern:
        raise ConfigError("--sparse-attention: expected PATTERN[:key=value,...], e.g. sliding_window:window=256")
    entry: dict[str, Any] = {"name": "sparse_attention", "pattern": pattern}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--sparse-attention: {item!r} is not key=value")
        try:
            entry[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--sparse-attention: cannot parse value of {key!r}: {value!r}") from None
    return entry


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="Input ONNX model (never modified).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output ONNX path (must differ from the input).")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Pipeline YAML (passes + verify).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    bench: Annotated[bool, typer.Option("--bench", help="Benchmark original vs optimized in ONNX Runtime.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write the output even if verification fails.")] = False,
    token_keep: Annotated[float | None, typer.Option("--token-keep", help="Add token_drop with this keep ratio.")] = None,
    token_scope: Annotated[str | None, typer.Option(
        "--token-scope", help="With --token-keep: 'image' drops only the image tokens of a vision-language model "
        "(the ratio is of the image tokens); default 'all'.")] = None,
    token_layers: Annotated[str | None, typer.Option(
        "--token-layers", help="With --token-keep: the blocks to reduce after, comma-separated (token_drop's "
        "'layers'); with --token-stage decoder, the decoder layers K to drop after (default 2, as FastV).")] = None,
    token_stage: Annotated[str | None, typer.Option(
        "--token-stage", help="With --token-scope image: 'projector' (default: after the projector, before the "
        "decoder, scored by the vision tower's [CLS] attention as in FasterVLM) or 'decoder' (after decoder layer 2, "
        "scored by the last token's attention as in FastV).")] = None,
    sparse_attention: Annotated[
        str | None, typer.Option("--sparse-attention", help="Add sparse_attention: PATTERN[:key=value,...].")
    ] = None,
    prune_channels: Annotated[float | None, typer.Option("--prune-channels", help="Add channel_prune removing this fraction of channels from every prunable group: heads, hidden units and a vision transformer's embedding width (activation importance, measured group sensitivity and a least-squares refit with --data; magnitude without).")] = None,
    prune_depth: Annotated[float | None, typer.Option("--prune-depth", help="Add depth_prune removing this share of the transformer blocks (the ones that change the residual stream least on the calibration data; see docs/passes.md).")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Real samples for calibration and verification: .npz (one key per input, [S, ...]), a folder "
        "of images (.png/.jpg/.jpeg/.bmp), or .txt/.jsonl texts (with --tokenizer).")] = None,
    inputs: Annotated[Path | None, typer.Option("--inputs", hidden=True, help="Older form of --data (.npz; its samples serve calibration and verification).")] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Hugging Face tokenizer.json for text data.")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Text data: tokens per sample (default: 128).")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Image data: per-channel mean, e.g. 0.485,0.456,0.406 (default: ImageNet).")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Image data: per-channel std (default: ImageNet).")] = None,
    normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="Image data: apply mean/std after scaling to [0, 1] (default: normalize).")] = None,
    calibration_samples: Annotated[int | None, typer.Option("--calibration-samples", min=1, help="Samples for calibration (default: 128; 8 synthetic without --data).")] = None,
    verify_samples: Annotated[int | None, typer.Option("--verify-samples", min=1, help="Held-out samples for verification (default: 64; 8 synthetic without --data).")] = None,
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help="Let calibration and verification share samples when the data is too small for both.")] = False,
    cosine_min: Annotated[float | None, typer.Option(help="Threshold: smallest per-sample cosine (overrides the config).")] = None,
    cosine_mean_min: Annotated[float | None, typer.Option(help="Threshold: mean per-sample cosine (overrides the config).")] = None,
    neighbor_agreement_min: Annotated[float | None, typer.Option(help="Threshold: embeddings' nearest-neighbour agreement (overrides the config).")] = None,
    max_abs_err: Annotated[float | None, typer.Option(help="Threshold: largest absolute error (overrides the config).")] = None,
    top1_min: Annotated[float | None, typer.Option(help="Threshold: logits' top-1 agreement (overrides the config).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for --bench.")] = 1,
    runs: Annotated[int, typer.Option(help="Timed runs per model for --bench.")] = 20,
    threads: Annotated[int | None, typer.Option(help="ORT intra-op threads (default: all cores).")] = None,
) -> None:
    """Run a pass pipeline on MODEL, verify the result against MODEL, and write it to OUTPUT.

    Without --config or shortcut flags the pipeline is `cleanup`. Shortcut flags append their pass (then
    `cleanup`) after the config's passes. With --data, calibration and verification use disjoint real samples;
    without it they use a few generated inputs, and the report and the terminal say so. Thresholds a config or
    flag leaves out take the default for each output's kind (logits, embedding, per-token, other).
    """
    from graphprune.pipeline import Pipeline
    from graphprune.pipeline import optimize as run_optimize
    from graphprune.verify import VerifyThresholds

    pipe = Pipeline.from_yaml(config) if config else Pipeline()
    if data is not None and inputs is not None:
        raise ConfigError("--inputs is the older name of --data: give one of them")
    if inputs is not None:  # the older option: its samples serve both roles, as they did
        data, allow_overlap = inputs, True
    data_overrides = {k: v for k, v in dict(
        path=str(data) if data is not None else None, tokenizer=str(tokenizer) if tokenizer is not None else None,
        max_length=max_length, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), normalize=normalize,
        calibration_samples=calibration_samples, verify_samples=verify_samples,
        allow_overlap=allow_overlap or None).items() if v is not None}
    if data_overrides:
        pipe.data = pipe.data.model_copy(update=data_overrides)
    shortcut = []  # (the flag, as the user typed it, for error messages; the pass entry)
    if token_keep is not None:
        entry = {"name": "token_drop", "keep_ratio": token_keep}
        entry.update({k: v for k, v in (("scope", token_scope), ("stage", token_stage)) if v is not None})
        if token_layers is not None:
            entry["layers"] = _ints(token_layers, "--token-layers")
        shortcut.append(("--token-keep", entry))
    elif token_scope is not None or token_stage is not None or token_layers is not None:
        raise ConfigError("--token-scope / --token-stage / --token-layers: give --token-keep too (the share of "
                          "tokens to keep)")
    if sparse_attention is not None:
        shortcut.append(("--sparse-attention", parse_sparse_spec(sparse_attention)))
    if prune_channels is not None:
        shortcut.append(("--prune-channels", {"name": "channel_prune", "ratio": prune_channels}))
    if prune_depth is not None:
        shortcut.append(("--prune-depth", {"name": "depth_prune", "ratio": prune_depth}))
    for flag, entry in shortcut:
        pipe.steps.append(Pipeline.step(entry, flag))
    if shortcut or not pipe.steps:
        pipe.add("cleanup")
    overrides = {k: v for k, v in dict(cosine_min=cosine_min, cosine_mean_min=cosine_mean_min, max_abs_err=max_abs_err,
                                       neighbor_agreement_min=neighbor_agreement_min, top1_min=top1_min).items()
                 if v is not None}
    if overrides:
        given = pipe.verify.model_dump(exclude_unset=True)
        pipe.verify = VerifyThresholds.model_validate(given | overrides)
    if report is not None and not report.parent.exists():
        raise GraphpruneError(f"report folder {report.parent} does not exist")
    from graphprune.passes.base import PassContext

    with _Bar() as bar:
        try:
            rep = run_optimize(model, output, pipe, bench=bench, bench_batch=batch, bench_runs=runs,
                               threads=threads, force=force, context=PassContext(progress=bar))
        except GraphpruneError as e:
            if report is not None and getattr(e, "report", None) is not None:
                _write_json_atomic(report, e.report)
            raise
    if report is not None:
        _write_json_atomic(report, rep)
    _summary(rep)
    for w in rep.get("warnings", []):
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated block indices, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag}: expected comma-separated block indices, got {text!r}")
    return values


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _verify_line(v: dict) -> str:
    top1 = f", top-1 agreement {v['top1_agreement']:.4f}" if v.get("top1_agreement") is not None else ""
    return f"max abs err {v['max_abs_err']:.3g}, min cosine {v['cosine_min']:.6f}{top1}"


def _fmt_flops(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _summary(rep: dict) -> None:
    # a light box and short headers keep the figures whole ("22.03M→15.40M", not "22.0…") on 80 columns
    t = Table(title=f"graphprune: {rep['model']} → {rep['output']}", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True)
    for col in ("pass", "chg", "nodes", "FLOPs", "params", "s", "skips"):
        t.add_column(col, no_wrap=True)
    for p in rep["passes"]:
        t.add_row(
            p["name"], "yes" if p["changed"] else "no", f"{p['nodes']['before']}→{p['nodes']['after']}",
            f"{_fmt_flops(p['flops']['before'])}→{_fmt_flops(p['flops']['after'])}",
            f"{_fmt_flops(p['params']['before'])}→{_fmt_flops(p['params']['after'])}", f"{p['seconds']:.2f}",
            str(len(p["skipped"])),
        )
    out.print(t)
    for p in rep["passes"]:
        for s in p["skipped"][:10]:
            out.print(f"  [yellow]skipped[/] {p['name']}: {s.get('where', '')}: {s.get('reason', '')}")
    v = rep["verify"]
    synthetic = rep.get("data", {}).get("source") == "synthetic"
    if v["passed"]:
        status = "[green]passed[/]" + (" [yellow](synthetic inputs)[/]" if synthetic else "")
    else:
        status = "[red]FAILED (written with --force)[/]"
    d = rep.get("data", {})
    where = f"{d.get('verify_samples', '?')} {'synthetic' if synthetic else 'held-out real'} samples"
    if d.get("verify_samples_reason"):
        where += " (housekeeping passes only)"
    out.print(f"verify {status} on {where}: {v.get('summary') or _verify_line(v)}", highlight=False)
    out.print(f"FLOPs ×{rep['flops']['ratio']:.3f}, params ×{rep['params']['ratio']:.3f}")
    if "latency_ms" in rep:
        lat = rep["latency_ms"]
        out.print(f"latency {lat['before']:.2f} ms → {lat['after']:.2f} ms (median, batch {lat['batch']}): {lat['speedup']:.2f}× speedup")


def _fmt_window(b: dict) -> str:
    """``-``; ``4×4/32`` (window rows×cols / windows per image, ``s`` appended when shifted); ``g4×4/8`` (grid groups);
    ``other`` (tokens rearranged otherwise)."""
    if b.get("partition") is None:
        return "-"
    if b["window"] is None:
        return b["partition"]
    size = f"{b['window'][0]}×{b['window'][1]}/{b['windows']}"
    return ("g" if b["partition"] == "grid" else "") + size + ("s" if b["shifted"] else "")


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="ONNX model.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Also list every Softmax/Attention node that did not "
                                          "become an attention block and every channel group that is not prunable, "
                                          "each with its reason.")] = False,
) -> None:
    """Show inputs, outputs, opset, FLOPs/params, attention blocks and channel groups of MODEL."""
    from graphprune.analysis import summarize
    from graphprune.backends.onnxruntime import measure_flops
    from graphprune.io import load_model

    m = load_model(model)
    info = summarize(m, flops=measure_flops(m), explain=explain)  # shapes static inference misses are measured in one ORT run
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    out.print(f"[bold]{model}[/]  opset {info['opset']}  FLOPs {_fmt_flops(info['flops'])} (batch 1)  params {_fmt_flops(info['params'])}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            out.print(f"  {kind[:-1]:6} {v['name']}: {v['dtype']} {v['shape']}")
    windowed = any(b.get("partition") for b in info["attention_blocks"])
    t = Table(title=f"attention blocks: {len(info['attention_blocks'])}", title_justify="left",
              caption="window: rows×cols/windows per image (g: grid groups, s: shifted)" if windowed else None)
    blocks = info["attention_blocks"]
    keys = ["index", "kind", "heads", "kv_heads", "head_dim", "tokens", "prefix_tokens", "causal", "has_probs", "has_mask"]
    if all(b["kv_heads"] in (None, b["heads"]) for b in blocks):  # kv and causal only where a block has them
        keys.remove("kv_heads")
    if not any(b["causal"] for b in blocks):
        keys.remove("causal")
    names = {"kv_heads": "kv", "prefix_tokens": "prefix", "has_probs": "probs", "has_mask": "mask"}
    for col in [*keys, "window"]:
        t.add_column(names.get(col, col))
    for b in blocks:
        t.add_row(*(str(b[k]) for k in keys), _fmt_window(b))
    out.print(t)
    if info.get("vision_language"):
        _print_vision_language(info["vision_language"])
    groups = info.get("channel_groups")
    if groups is not None:
        prunable = [g for g in groups if g.get("prunable")]
        g = Table(title=f"channel groups: {len(groups)} ({len(prunable)} prunable)", title_justify="left")
        for col in ("id", "size", "prunable", "members / reason"):
            g.add_column(col)
        for grp in groups[:200]:
            members = ", ".join(map(str, grp.get("members", [])[:4])) + (" …" if len(grp.get("members", [])) > 4 else "")
            g.add_row(str(grp.get("id")), str(grp.get("size")), "yes" if grp.get("prunable") else "no",
                      members if grp.get("prunable") else str(grp.get("reason", "")))
        out.print(g)
    if explain:
        _print_explain(info["explain"])


def _print_vision_language(vl: dict) -> None:
    """``inspect``: the vision tower, the projector and where the image tokens enter the decoder."""
    where = (f"span [{vl['image_span'][0]}, {vl['image_span'][1]})" if vl["image_span"] is not None else
             f"positions where {vl['text_input']} == {vl['image_token_id']}" if vl["image_token_id"] is not None else
             "positions not known")
    out.print(f"[bold]vision-language[/]: vision blocks {_ranges(vl['vision_blocks'])} "
              f"({vl['vision_prefix_tokens']} prefix token(s)), decoder blocks {_ranges(vl['decoder_blocks'])}; "
              f"projector {vl['projector']['linear_layers']} linear layer(s) → {vl['projector']['output']}; "
              f"{vl['image_tokens'] if vl['image_tokens'] is not None else '?'} image tokens merged by "
              f"{vl['merge']['op']} {vl['merge']['node']} at {where}")


def _ranges(ix: list[int]) -> str:
    return f"{ix[0]}–{ix[-1]}" if ix and ix == list(range(ix[0], ix[-1] + 1)) and len(ix) > 1 else ", ".join(map(str, ix))


def _print_explain(ex: dict) -> None:
    """``inspect --explain``: what did not match or cannot be pruned, and why."""
    t = Table(title=f"not attention blocks: {len(ex['unmatched_attention'])} Softmax/Attention nodes",
              title_justify="left")
    for col in ("node", "op", "reason"):
        t.add_column(col)
    for m in ex["unmatched_attention"]:
        t.add_row(str(m["node"]), str(m["op"]), m["reason"])
    out.print(t)
    g = Table(title=f"channel groups not prunable: {len(ex['unprunable_groups'])}", title_justify="left")
    for col in ("id", "kind", "size", "members", "reason"):
        g.add_column(col)
    for grp in ex["unprunable_groups"]:
        members = ", ".join(map(str, grp["members"][:3])) + (" …" if len(grp["members"]) > 3 else "")
        g.add_row(str(grp["id"]), grp["kind"], str(grp["size"]), members, str(grp["reason"]))
    out.print(g)


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="ONNX model to time.")],
    baseline: Annotated[Path | None, typer.Option("--baseline", help="Time this model too, interleaved, and report the ratio.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    batch: Annotated[int, typer.Option(help="Batch size of the generated inputs.")] = 1,
    runs: Annotated[int, typer.Option(help="Timed runs per model.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per model.")] = 3,
    threads: Annotated[int | None, typer.Option(help="ORT intra-op threads (default: all cores).")] = None,
) -> None:
    """Median and p90 latency of MODEL in ONNX Runtime (CPU), optionally against a baseline."""
    from graphprune.analysis.inputs import example_inputs
    from graphprune.backends.onnxruntime import benchmark
    from graphprune.io import load_model

    m = load_model(model)
    models: dict[str, Any] = {"model": model}
    if baseline is not None:
        load_model(baseline)
        models = {"baseline": baseline, "model": model}
    feeds = example_inputs(m, batch=batch, seed=1)
    with _Bar() as bar:
        res = benchmark(models, feeds, warmup=warmup, runs=runs, threads=threads, progress=lambda d, t: bar("benchmark", d, t))
    result: dict[str, Any] = {"batch": batch, "runs": runs, "latency_ms": res}
    if baseline is not None:
        result["speedup"] = res["baseline"]["median_ms"] / res["model"]["median_ms"]
    if as_json:
        print(json.dumps(result, indent=2))
        return
    t = Table(title=f"ONNX Runtime CPU, batch {batch}, {runs} interleaved runs", title_justify="left")
    for col in ("model", "median ms", "p90 ms"):
        t.add_column(col)
    for k, v in res.items():
        t.add_row(str(models[k]), f"{v['median_ms']:.3f}", f"{v['p90_ms']:.3f}")
    out.print(t)
    if baseline is not None:
        out.print(f"speedup over baseline: {result['speedup']:.2f}×")


def _yaml_type(annotation: Any) -> str:
    """A config field's type as the YAML contract spells it (``number``, ``a | b``, ``... or null``)."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_yaml_type(a) for a in rest)
        return f"{text} or null" if len(rest) < len(args) else text
    if origin in (list, tuple):
        return f"list of {_yaml_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    names = {bool: "true | false", int: "integer", float: "number", str: "string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@app.command("passes")
def list_passes(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """List the registered passes and their options (the YAML keys)."""
    from graphprune.passes import registry

    info = {}
    for name, cls in sorted(registry().items()):
        fields = {}
        for fname, f in cls.Config.model_fields.items():
            default = None if f.is_required() else (f.default_factory() if f.default_factory else f.default)
            fields[f.alias or fname] = {"type": _yaml_type(f.annotation), "default": default,
                                        "required": f.is_required(), "help": f.description or ""}
        info[name] = {"summary": cls.summary, "options": fields}
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    for name, p in info.items():
        out.print(f"[bold]{name}[/]: {p['summary']}", highlight=False)
        for fname, f in p["options"].items():
            default = "required" if f["required"] else f"default {_yaml_value(f['default'])}"
            out.print(f"    {fname}: {f['type']} ({default}){' — ' + f['help'] if f['help'] else ''}", highlight=False,
                      markup=False)


_register_deploy(app, out, err)  # deploy, serve, loadtest
_register_trt(app, out, err)  # lower, build (TensorRT)
_register_search(app, out, err)  # search (Optuna; Ray)
_register_decoder(app, out, err)  # generate, prune-pair (decoder prefill + decode graphs)


def _exceptions(attr: str) -> tuple[type, ...]:
    found = []
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(name), attr, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _usage_types() -> tuple[type, ...]:
    return _exceptions("ClickException")


def _exit_types() -> tuple[type, ...]:
    return _exceptions("Exit")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors with exit code 2 unless --debug."""
    args = ray_flag(sys.argv[1:] if argv is None else argv)
    if "--debug" not in args:  # library warnings (e.g. a constant the folder could not evaluate) are not ours
        for name in ("onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        app(args=args, standalone_mode=False)
    except GraphpruneError as e:
        if "--debug" in args:
            raise
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # usage errors (click's, or the copy of click that typer vendors) and the like
        if isinstance(e, _exit_types()):
            sys.exit(getattr(e, "exit_code", 0))
        if isinstance(e, _usage_types()):
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            err.print(f"[red]error:[/] {escape(message)} (see --help)", highlight=False, soft_wrap=True)
            sys.exit(2)
        if "--debug" in args:
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        message = lines[0] if lines else repr(e)
        if len(message) > 300:
            message = message[:297] + "..."
        kind = "" if isinstance(e, InternalError) else f"{type(e).__name__}: "
        err.print(f"[red]internal error:[/] {kind}{escape(message)} (run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
