"""The ``lower`` and ``build`` commands (attached to the ``graphprune`` app by :func:`register`).

``lower`` is pure (reads MODEL, writes OUT atomically, never touches MODEL) and needs no TensorRT; ``build``
needs TensorRT and a GPU, and without them prints one line naming what is missing (exit code 2).
Errors follow ``graphprune.cli``: a ``GraphpruneError`` is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from graphprune.errors import ConfigError

_BACKENDS = ("tensorrt",)


def _backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ConfigError(f"--backend: {name!r} is not one of {', '.join(_BACKENDS)}")


def register(app: typer.Typer, out: Console, err: Console) -> None:
    """Add ``lower`` and ``build`` to ``app``; results go to ``out``, notes to ``err``."""

    @app.command("lower")
    def lower_cmd(
        model: Annotated[Path, typer.Argument(help="Optimized ONNX model (never modified).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Lowered ONNX file (written atomically).")],
        backend: Annotated[str, typer.Option("--backend", help="Target: tensorrt.")] = "tensorrt",
        strip_bodies: Annotated[bool, typer.Option("--strip-bodies", help="Remove the ai.graphprune function bodies (for TensorRT < 10.7, which always inlines them; ONNX Runtime can no longer run the file).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the lowering report as JSON.")] = False,
    ) -> None:
        """Mark every ai.graphprune node as a TensorRT plugin (plugin_namespace=graphprune, plugin_version=1).

        Checks: no op name collides with a standard ONNX op; attributes are TensorRT plugin field types; every
        output dim is an integer shape expression of the input dims; TopK K <= 3840 in bodies that may be
        inlined. A TokenSelect keep_ratio on a static N becomes the explicit k. Absent optional inputs are filled
        (plugins take every input: TokenMerge size -> ones, SparseAttention bias/layout -> unused placeholders).
        The function bodies stay unless
        --strip-bodies, so ONNX Runtime still runs the output with the same numbers.
        """
        from graphprune.backends.tensorrt import lower
        from graphprune.io import check_output_path, load_model, save_model

        _backend(backend)
        m = load_model(model)
        check_output_path(output, m, (model,))
        report = lower(m, strip_bodies=strip_bodies)
        save_model(m, output, inputs=(model,))
        for note in report.notes:
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        if as_json:
            print(json.dumps({"plugins": report.plugins, "explicit_k": report.explicit_k, "filled": report.filled,
                              "stripped_bodies": report.stripped_bodies, "shapes": report.shapes,
                              "notes": report.notes}, indent=2))
            return
        plugins = ", ".join(f"{op} ×{n}" for op, n in sorted(report.plugins.items())) or "none"
        out.print(f"wrote {escape(str(output))}: plugins {plugins}"
                  + (f"; {report.stripped_bodies} bodies stripped" if strip_bodies else ""), highlight=False)
        for line in report.explicit_k + report.filled:
            out.print(f"  {escape(line)}", highlight=False)

    @app.command("build")
    def build_cmd(
        model: Annotated[Path, typer.Argument(help="ONNX model (never modified; lowered in memory first).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Serialized engine (.plan), written atomically.")],
        backend: Annotated[str, typer.Option("--backend", help="Target: tensorrt.")] = "tensorrt",
        fp16: Annotated[bool, typer.Option("--fp16", help="Convert the model to float16 first (networks are strongly typed: precision comes from the ONNX).")] = False,
        shapes: Annotated[list[str] | None, typer.Option("--shapes", help="Optimization profile of an input: name:min/opt/max, shapes as AxBxC (repeat per input). Default: the model's static dims, batch 1/1/8.")] = None,
        aot: Annotated[bool, typer.Option("--aot", help="Ahead-of-time plugins (PTX in the engine, no Python at run time): every op and SparseAttention pattern (block_topk routes in the kernel); TokenMerge and DiversitySelect need a static N. Never run with TensorRT.")] = False,
        timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Timing cache file, read and updated (default: OUT with suffix .timing.cache).")] = None,
        verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run the engine on generated inputs (the profile's opt shapes) against ONNX Runtime and benchmark both, interleaved.")] = True,
    ) -> None:
        """Build a TensorRT engine from MODEL with the graphprune plugins (needs TensorRT and a CUDA GPU)."""
        from graphprune.backends import tensorrt as trt_backend

        _backend(backend)
        spec = trt_backend.parse_shapes(shapes or [])
        trt_backend.require_tensorrt()
        res = trt_backend.build(model, output, fp16=fp16, shapes=spec, aot=aot, timing_cache=timing_cache)
        for note in res.notes:
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        layers = ", ".join(f"{op} ×{n}" for op, n in sorted(res.plugin_layers.items())) or "none"
        out.print(f"wrote {escape(str(res.plan))} (TensorRT {res.tensorrt_version}, {res.seconds:.1f} s): "
                  f"plugin layers {layers}", highlight=False)
        if verify:
            import numpy as np

            rng = np.random.default_rng(0)
            from graphprune.io import load_model

            m = load_model(model)
            feeds = {}
            for v in m.graph.inputs:
                shape = res.profile[v.name][1]
                dtype = v.dtype.numpy() if v.dtype is not None else np.float32
                feeds[v.name] = (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating)
                                 else np.ones(shape)).astype(dtype)
            figures = trt_backend.verify_and_bench(model, res.plan, feeds, aot=aot)
            ms = figures["median_ms"]
            out.print(f"max abs error vs ONNX Runtime {figures['max_abs_err']:.3g}; median "
                      f"onnxruntime {ms['onnxruntime']:.3f} ms, tensorrt {ms['tensorrt']:.3f} ms", highlight=False)
