"""The ``deploy``, ``serve`` and ``loadtest`` commands (attached to the ``graphprune`` app by :func:`register`).

Errors follow ``graphprune.cli``: a ``GraphpruneError`` is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphprune.errors import DataError, GraphpruneError


def register(app: typer.Typer, out: Console, err: Console) -> None:
    """Add the three commands to ``app``; they print to ``out`` (results) and ``err`` (progress, warnings)."""

    @app.command("deploy")
    def deploy_cmd(
        model: Annotated[Path, typer.Argument(help="ONNX model to deploy (never modified).")],
        repository: Annotated[Path, typer.Option("--repository", "-r", help="Triton model repository folder (created if missing).")],
        name: Annotated[str | None, typer.Option("--name", help="Model name in Triton (default: the file's stem).")] = None,
        version: Annotated[int | None, typer.Option("--version", help="Version number (default: one above the highest present, else 1).")] = None,
        backend: Annotated[str, typer.Option("--backend", help="onnxruntime (Triton images' ORT backend), python (model.py running ONNX Runtime; what the bundled CPU server runs) or tensorrt (needs TensorRT).")] = "onnxruntime",
        max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Triton max_batch_size; 0 turns batching off (a model without a batch axis gets 0 anyway).")] = 8,
        instances: Annotated[int, typer.Option("--instances", help="Model instances (instance_group count).")] = 1,
        device: Annotated[str, typer.Option("--device", help="cpu or gpu (KIND_CPU / KIND_GPU).")] = "cpu",
        queue_delay_us: Annotated[int, typer.Option("--queue-delay-us", help="Dynamic batcher's max_queue_delay_microseconds.")] = 500,
        threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime intra-op threads per instance (0: all cores).")] = 0,
        graph_optimization: Annotated[str, typer.Option("--graph-optimization", help="ONNX Runtime graph optimisation level: disable, basic, extended or all.")] = "all",
        report: Annotated[Path | None, typer.Option("--report", help="The `graphprune optimize --report` JSON of this model: its pipeline and figures go into the manifest.")] = None,
        check: Annotated[bool, typer.Option("--check/--no-check", help="Run the model in ONNX Runtime on generated inputs first (batch 1, and 2 to confirm the batch axis).")] = True,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing version (and a config.pbtxt other versions were deployed with).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    ) -> None:
        """Write MODEL into a Triton model repository: REPOSITORY/NAME/config.pbtxt and REPOSITORY/NAME/VERSION/.

        The version folder holds model.onnx (and its weights file when large), model.py for the python backend,
        and manifest.json: versions of graphprune/onnx/onnxruntime, the sha256 of every file, the input and output
        specs, the producing pipeline with its figures (from --report) and the plugins the model needs.
        """
        from graphprune.deploy import deploy

        res = deploy(model, repository, name=name, version=version, backend=backend, max_batch_size=max_batch_size,
                     instances=instances, device=device, queue_delay_us=queue_delay_us, threads=threads,
                     graph_level=graph_optimization, report=report, force=force, check=check)
        for note in res.notes:
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        if as_json:
            print(json.dumps(res.manifest, indent=2, default=str))
            return
        m = res.manifest
        files = ", ".join(f"{k} ({v['bytes']:,} B)" for k, v in m["files"].items())
        out.print(f"deployed [bold]{res.name}[/] version {res.version} ({m['model']['backend']} backend, "
                  f"max_batch_size {m['batching']['max_batch_size']}) to {res.path}", highlight=False)
        out.print(f"  files: {files}; manifest {res.path / 'manifest.json'}", highlight=False, soft_wrap=True)
        if m["report"]:
            r = m["report"]
            out.print(f"  pipeline: {' → '.join(p['name'] for p in r['pipeline']) or 'none'}; FLOPs ×{r['flops']['ratio']:.3f}; "
                      f"verify {'passed' if r['verify']['passed'] else 'FAILED'} ({r['verify'].get('data_source')})",
                      highlight=False)
        for p in m["plugins"]:
            out.print(f"  op {p['domain']}::{p['op_type']} ×{p['nodes']}: {p['onnxruntime']}", highlight=False)

    @app.command("serve")
    def serve_cmd(
        repository: Annotated[Path, typer.Argument(help="Triton model repository (written by graphprune deploy).")],
        http_port: Annotated[int, typer.Option("--http-port", help="HTTP port on 127.0.0.1.")] = 8000,
        grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC port on 127.0.0.1.")] = 8001,
        metrics_port: Annotated[int, typer.Option("--metrics-port", help="Metrics port on 127.0.0.1.")] = 8002,
        server: Annotated[Path | None, typer.Option("--server", help="tritonserver binary (default: the one bundled by graphprune[serve], else tritonserver on PATH).")] = None,
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for every model to be ready.")] = 180.0,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Echo the server's log to stderr.")] = False,
    ) -> None:
        """Run tritonserver on REPOSITORY on 127.0.0.1 until Ctrl-C or SIGTERM, then shut it down cleanly.

        Prints each model's state while it loads and fails (exit 2) naming the model that does not load.
        """
        from graphprune.deploy import TritonServer, check_manifest, find_server, repository_models

        binary = find_server(server)
        try:
            import tritonclient.http  # noqa: F401
        except ImportError:
            raise GraphpruneError("serve needs tritonclient: pip install 'graphprune[serve]'") from None
        models = repository_models(repository)
        for name in models:
            versions = sorted(int(p.name) for p in (repository / name).iterdir() if p.is_dir() and p.name.isdigit())
            if versions and (repository / name / str(versions[-1]) / "manifest.json").is_file():
                for problem in check_manifest(repository / name / str(versions[-1])):
                    err.print(f"[yellow]warning:[/] {name}: {escape(problem)}", highlight=False, soft_wrap=True)
        echo = (lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)) if verbose else None
        srv = TritonServer(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                           server=binary, on_log=echo)

        def on_state(name: str, version: str, state: str, reason: str) -> None:
            colour = {"READY": "green", "UNAVAILABLE": "red"}.get(state, "yellow")
            why = f": {escape(reason.strip().splitlines()[0])}" if reason.strip() else ""
            err.print(f"  model {name}{' version ' + version if version else ''}: [{colour}]{state}[/]{why}",
                      highlight=False, soft_wrap=True)

        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        stopping = False
        try:
            where = "bundled" if binary.bundled else "external"
            err.print(f"starting {where} tritonserver {binary.path} on {repository} ({len(models)} models)",
                      highlight=False, soft_wrap=True)
            srv.start()
            srv.wait_ready(timeout=timeout, on_state=on_state)
            out.print(f"serving {', '.join(models)}: HTTP {srv.http_url}, gRPC {srv.grpc_url}, metrics "
                      f"{srv.host}:{srv.metrics_port} (tritonserver pid {srv.proc.pid}); Ctrl-C to stop",
                      highlight=False, soft_wrap=True)
            while srv.alive():
                time.sleep(0.5)
            raise RuntimeError(f"tritonserver exited unexpectedly with code {srv.proc.returncode}: "
                               f"{srv.last_error() or 'see --verbose'}")
        except KeyboardInterrupt:
            stopping = True
        finally:
            for s in previous:  # a second Ctrl-C must not cut the shutdown short
                signal.signal(s, signal.SIG_IGN)
            try:
                if stopping:
                    err.print("stopping tritonserver ...")
                code = srv.stop()
                if stopping:
                    out.print(f"tritonserver stopped (exit code {code})")
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    @app.command("loadtest")
    def loadtest_cmd(
        target: Annotated[str, typer.Argument(help="The server's HOST:PORT (HTTP or gRPC port, to match --protocol).")],
        model: Annotated[str, typer.Option("--model", "-m", help="Model to load-test.")],
        compare: Annotated[str | None, typer.Option("--compare", help="A second model (e.g. the original) timed in interleaved windows; adds the ratio rps(MODEL) / rps(COMPARE).")] = None,
        concurrency: Annotated[str, typer.Option("--concurrency", help="Comma-separated concurrency levels (requests in flight).")] = "1,2,4,8",
        duration: Annotated[float, typer.Option("--duration", help="Seconds per model and level, split into --windows windows.")] = 10.0,
        windows: Annotated[int, typer.Option("--windows", help="Windows per model and level (A B, B A, ... with --compare).")] = 2,
        protocol: Annotated[str, typer.Option("--protocol", help="http or grpc.")] = "http",
        data: Annotated[Path | None, typer.Option("--data", help=".npz with one array per input: the whole request tensor (default: generated from the model's metadata).")] = None,
        batch: Annotated[int, typer.Option("--batch", help="Batch of the generated requests (models with max_batch_size > 0).")] = 1,
        dynamic_dim: Annotated[int, typer.Option("--dynamic-dim", help="Size of the other dynamic axes of generated requests.")] = 32,
        max_requests: Annotated[int, typer.Option("--max-requests", help="Most requests per window.")] = 100_000,
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds before one request counts as an error.")] = 30.0,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ) -> None:
        """Load-test models on a running Triton server: requests/s, p50/p90/p99 latency and errors per level."""
        from graphprune.deploy import load_test, parse_levels

        arrays = _load_npz(data) if data is not None else None
        levels = parse_levels(concurrency)
        progress = None if as_json or not err.is_terminal else (lambda msg: err.print(f"  {msg}", highlight=False))
        res = load_test(target, model, compare=compare, concurrency=levels, duration=duration, protocol=protocol,
                        data=arrays, batch=batch, dynamic_dim=dynamic_dim, windows=windows, max_requests=max_requests,
                        timeout=timeout, progress=progress)
        if as_json:
            print(json.dumps(res, indent=2))
            return
        _loadtest_table(res, out)
        for level in res["levels"]:
            for name, r in level["models"].items():
                for sample in r["error_samples"]:
                    err.print(f"[red]error[/] ({name}, concurrency {level['concurrency']}): {escape(sample)}",
                              highlight=False, soft_wrap=True)


def _load_npz(path: Path) -> dict:
    import numpy as np

    if not path.is_file():
        raise DataError(f"--data: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise DataError(f"--data: {path} is not a readable .npz: {e}") from None


def _loadtest_table(res: dict, out: Console) -> None:
    models = res["models"]
    title = (f"Triton load test: {res['target']} ({res['protocol']}), {res['windows']} × {res['window_s']:g} s "
             f"window(s) per model and level" + (", interleaved" if len(models) == 2 else ""))
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("conc", "model", "req/s", "items/s", "p50 ms", "p90 ms", "p99 ms", "errors"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    if len(models) == 2:
        t.add_column(f"×{models[1]}", justify="right", no_wrap=True)

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for level in res["levels"]:
        for i, name in enumerate(models):
            r = level["models"][name]
            row = [str(level["concurrency"]) if i == 0 else "", name, f"{r['rps']:.1f}", f"{r['items_per_s']:.1f}",
                   ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]), str(r["errors"])]
            if len(models) == 2:
                row.append(f"{level['ratio']:.2f}" if i == 0 and level.get("ratio") is not None else "")
            t.add_row(*row)
    out.print(t)
