"""Write one model version into a Triton model repository, with a manifest, atomically.

Layout (``DIR/NAME`` is the model folder, ``N`` the version)::

    DIR/NAME/config.pbtxt          generated from the model's inputs and outputs (see ``_config``)
    DIR/NAME/N/model.onnx          the model, re-saved with graphprune.io (weights in model.onnx.data when large)
    DIR/NAME/N/model.py            python backend only: graphprune's ORT runner (``_python_model``)
    DIR/NAME/N/manifest.json       versions, sha256 of every file, I/O specs, batching, pipeline, plugins

Rules:
  1. the input model is only read; external data outside its folder is refused (``graphprune.io.load_model``);
  2. the version folder is assembled in a hidden temporary folder beside it (Triton ignores non-numeric names),
     then renamed into place; ``config.pbtxt`` is written to a temporary file and renamed. A failure leaves the
     repository as it was;
  3. an existing version is replaced only with ``force`` (the old folder is renamed away first and removed once
     the new one is in place); so is a ``config.pbtxt`` that differs from the one other versions were deployed
     with, since Triton reads one config per model;
  4. unless ``check=False``, the model is run once in ONNX Runtime on generated inputs at batch 1, and at batch 2
     when it looks batchable; a model whose batch-2 run fails or does not keep the batch on axis 0 is deployed
     with ``max_batch_size: 0`` and the reason (in the config's comments, the manifest and ``notes``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphprune.deploy._config import (
    BACKENDS,
    GRAPH_LEVELS,
    TensorSpec,
    batch_axis,
    io_specs,
    model_config,
    render_pbtxt,
)
from graphprune.errors import ConfigError, GraphpruneError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "graphprune.deploy/1"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_DOMAIN = "ai.graphprune"


@dataclasses.dataclass
class Deployment:
    """What :func:`deploy` wrote: the version folder, its config and manifest, and notes for the user."""

    path: Path
    name: str
    version: int
    config: dict
    manifest: dict
    notes: list[str]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("graphprune", "onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist != "onnxruntime-gpu":
                found[dist] = None
    return found


def require_tensorrt() -> str:
    """TensorRT's version, or a one-line error when it is not importable."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception:  # ImportError, or a bindings wheel whose libraries are missing
        raise GraphpruneError("--backend tensorrt needs TensorRT (the tensorrt Python package with its libraries), "
                              "which is not importable here; deploy with --backend onnxruntime or python") from None
    return str(getattr(trt, "__version__", "unknown"))


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _plugins(model: ir.Model) -> list[dict]:
    """The custom-domain ops the model uses and what each backend needs for them."""
    counts: Counter = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            counts[(node.domain, node.op_type)] += 1
    bodies = {(d, n) for (d, n, _overload) in model.functions}
    plugins = []
    for (domain, op), n in sorted(counts.items()):
        entry: dict[str, Any] = {"domain": domain, "op_type": op, "nodes": n, "function_body": (domain, op) in bodies}
        if (domain, op) in bodies:
            entry["onnxruntime"] = "runs the model-local function body (standard ops); no plugin needed"
            if domain == _DOMAIN:
                entry["tensorrt"] = f"plugin graphprune::{op} when registered, else the function body"
        elif domain == "com.microsoft":
            entry["onnxruntime"] = "ONNX Runtime contrib op (built in)"
        else:
            entry["onnxruntime"] = "custom op without a function body: needs a registered custom-op library"
        plugins.append(entry)
    return plugins


def _report_summary(report: Path, model_path: Path) -> tuple[dict, list[str]]:
    """The pipeline and figures of a ``graphprune optimize --report`` JSON file, and notes about it."""
    if not report.is_file():
        raise ConfigError(f"report file not found: {report}")
    try:
        rep = json.loads(report.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{report} is not JSON: {e}") from None
    if not isinstance(rep, dict) or not {"passes", "flops", "verify"} <= set(rep):
        raise ConfigError(f"{report} is not a graphprune optimize report (it lacks passes, flops or verify)")
    notes = []
    output = rep.get("output")
    same = False
    if output:
        try:
            same = Path(output).resolve() == model_path.resolve() or os.path.samefile(output, model_path)
        except OSError:
            same = False
    if not same:
        notes.append(f"{report} was written for {output!r}, not {str(model_path)!r}; recorded as given")
    v = rep.get("verify") or {}
    summary = {
        "file": str(report), "sha256": sha256_file(report), "describes_this_model": same,
        "original": rep.get("model"), "output": output,
        "pipeline": [{"name": p.get("name"), "config": p.get("config"), "changed": p.get("changed")}
                     for p in rep.get("passes", [])],
        "flops": rep.get("flops"), "params": rep.get("params"),
        "verify": {k: v.get(k) for k in ("passed", "data_source", "summary", "samples", "max_abs_err",
                                          "cosine_min", "top1_agreement")},
        "data": rep.get("data"),
    }
    if "latency_ms" in rep:
        summary["latency_ms"] = rep["latency_ms"]
    return summary, notes


def _check_in_ort(model_path: Path, model: ir.Model, outputs: list[TensorSpec], batchable: bool,
                  threads: int) -> tuple[str | None, list[str]]:
    """Run the model at batch 1 (and 2): (reason it cannot batch, or None; what was run)."""
    from graphprune.analysis.inputs import example_inputs
    from graphprune.backends.onnxruntime import make_session, run

    try:
        sess = make_session(model_path, threads=threads or None)
    except GraphpruneError:
        raise
    except Exception as e:
        raise GraphpruneError(f"{model_path} does not load in ONNX Runtime: {str(e).splitlines()[0]}") from None
    try:
        run(sess, example_inputs(model, batch=1, seed=0))
    except Exception as e:
        raise GraphpruneError(f"{model_path} fails in ONNX Runtime on generated batch-1 inputs: "
                              f"{str(e).splitlines()[0]} (use --no-check to deploy anyway)") from None
    ran = ["batch 1"]
    if not batchable:
        return None, ran
    try:
        outs = run(sess, example_inputs(model, batch=2, seed=0))
    except Exception as e:
        return f"running batch 2 in ONNX Runtime failed ({str(e).splitlines()[0][:160]})", ran
    ran.append("batch 2")
    for spec, o in zip(outputs, outs):
        if o.ndim == 0 or o.shape[0] != 2:
            return f"at batch 2, output {spec.name!r} has shape {list(o.shape)} (axis 0 is not the batch)", ran
    return None, ran


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def deploy(
    model_path: str | os.PathLike,
    repository: str | os.PathLike,
    *,
    name: str | None = None,
    version: int | None = None,
    backend: str = "onnxruntime",
    max_batch_size: int = 8,
    instances: int = 1,
    device: str = "cpu",
    queue_delay_us: int = 500,
    threads: int = 0,
    graph_level: str = "all",
    report: str | os.PathLike | None = None,
    force: bool = False,
    check: bool = True,
) -> Deployment:
    """Write ``model_path`` as version ``version`` (default: the next) of model ``name`` in ``repository``.

    Args:
        model_path: the ONNX model (read only).
        repository: the model repository folder (created if its parent exists).
        name: the model's name in Triton (default: the file's stem, made folder-safe).
        version: the version number (≥ 1); default one above the highest present, or 1.
        backend: ``onnxruntime`` (Triton images' ORT backend), ``python`` (graphprune's model.py running ORT; what
            the bundled CPU server runs) or ``tensorrt`` (needs TensorRT).
        max_batch_size: Triton's batch limit; 0 turns batching off. Forced to 0 for a model that cannot batch.
        instances: ``instance_group`` count.
        device: ``cpu`` or ``gpu`` (KIND_CPU / KIND_GPU).
        queue_delay_us: the dynamic batcher's ``max_queue_delay_microseconds``.
        threads: ORT intra-op threads per instance (0: ORT's default, all cores).
        graph_level: ORT graph optimisation level (disable|basic|extended|all).
        report: a ``graphprune optimize --report`` JSON: its pipeline and figures go into the manifest.
        force: replace an existing version (and a differing config.pbtxt).
        check: run the model in ONNX Runtime on generated inputs first (batch 1, and 2 to confirm batching).

    Raises:
        GraphpruneError: every problem a user can fix (bad path or model, bad option, existing version without
            ``force``, ``tensorrt`` without TensorRT); nothing is written then.
    """
    from graphprune.io import load_model, save_model

    model_path, repository = Path(model_path), Path(repository)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if graph_level not in GRAPH_LEVELS:
        raise ConfigError(f"--graph-optimization: {graph_level!r} is not one of {', '.join(GRAPH_LEVELS)}")
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"--device: {device!r} is not cpu or gpu")
    for flag, value, low in (("--max-batch-size", max_batch_size, 0), ("--instances", instances, 1),
                             ("--queue-delay-us", queue_delay_us, 0), ("--threads", threads, 0)):
        if value < low:
            raise ConfigError(f"{flag}: must be at least {low}, got {value}")
    if version is not None and version < 1:
        raise ConfigError(f"--version: must be at least 1, got {version}")
    name = name if name is not None else re.sub(r"[^A-Za-z0-9_.-]", "_", model_path.stem).lstrip(".") or "model"
    if not _NAME.match(name):
        raise ConfigError(f"--name: {name!r} is not a valid model name (letters, digits, _ . -; not starting with .)")
    trt_version = require_tensorrt() if backend == "tensorrt" else None
    if backend == "tensorrt":  # the engine builder is the TensorRT backend's work; nothing to write it with yet
        raise GraphpruneError(f"TensorRT {trt_version} is importable, but graphprune cannot build model.plan yet "
                              "(no graphprune.backends.tensorrt); deploy with --backend onnxruntime or python")
    if repository.exists() and not repository.is_dir():
        raise GraphpruneError(f"repository {repository} is not a folder")
    if not repository.exists() and not repository.parent.is_dir():
        raise GraphpruneError(f"repository's parent folder {repository.parent} does not exist")

    model = load_model(model_path)
    inputs, outputs = io_specs(model)
    notes: list[str] = []
    reason = batch_axis(inputs, outputs) if max_batch_size > 0 else "max_batch_size 0 was asked for"
    ran: list[str] = []
    if check:
        found, ran = _check_in_ort(model_path, model, outputs, reason is None, threads)
        reason = reason or found
    if reason is not None and max_batch_size > 0:
        notes.append(f"max_batch_size 0 instead of {max_batch_size}: {reason}")
    mbs = max_batch_size if reason is None else 0
    summary, report_notes = _report_summary(Path(report), model_path) if report is not None else (None, [])
    notes += report_notes

    model_dir = repository / name
    present = existing_versions(model_dir)
    version = version if version is not None else (max(present) + 1 if present else 1)
    target = model_dir / str(version)
    if target.exists() and not force:
        raise GraphpruneError(f"{target} already exists; pass --force to replace it, or choose another --version")
    config = model_config(name, backend, inputs, outputs, max_batch_size=mbs, instances=instances, device=device,
                          queue_delay_us=queue_delay_us, threads=threads, graph_level=graph_level)
    comments = [f"generated by graphprune {_versions().get('graphprune')} from {model_path.name} (version {version})"]
    if mbs == 0:
        comments.append(f"max_batch_size 0: {reason}")
    text = render_pbtxt(config, comments)
    config_path = model_dir / "config.pbtxt"
    others = [v for v in present if v != version]
    if config_path.is_file() and others and not force and _strip_comments(config_path.read_text()) != _strip_comments(text):
        raise GraphpruneError(f"{config_path} differs from the config for this model (versions {others} were deployed "
                              "with it, and Triton reads one config per model); pass --force to replace it, or "
                              "deploy under another --name")

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".graphprune-{version}-", dir=model_dir))
    old: Path | None = None
    placed = False
    try:
        save_model(model, tmp / "model.onnx", inputs=(model_path,))
        if backend == "python":
            shutil.copyfile(Path(__file__).with_name("_python_model.py"), tmp / "model.py")
        files = {f"{version}/{p.name}": {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        files["config.pbtxt"] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "bytes": len(text.encode())}
        manifest = {
            "format": MANIFEST_FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": name, "version": version, "backend": backend, "device": device},
            "source": {"path": str(model_path.resolve()), "sha256": sha256_file(model_path)},
            "versions": _versions(),
            "files": files,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "batching": {"max_batch_size": mbs, "requested": max_batch_size, "reason": reason if mbs == 0 else None,
                         "dynamic_batching": config.get("dynamic_batching")},
            "instances": config["instance_group"][0] | {"kind": str(config["instance_group"][0]["kind"])},
            "check": {"onnxruntime": ran} if check else None,
            "pipeline": summary["pipeline"] if summary else None,
            "report": summary,
            "plugins": _plugins(model),
            "notes": notes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".graphprune-old-{version}-", dir=model_dir))
            os.replace(target, old / "v")
        os.replace(tmp, target)
        placed = True
        _write_text_atomic(config_path, text)
    except BaseException:
        if placed:  # the config could not be written: take the new version out again
            shutil.rmtree(target, ignore_errors=True)
        if old is not None and not target.exists() and (old / "v").exists():
            os.replace(old / "v", target)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return Deployment(target, name, version, config, manifest, notes)


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def check_manifest(version_dir: str | os.PathLike) -> list[str]:
    """Problems with a deployed version: files missing, changed or not listed in its manifest."""
    version_dir = Path(version_dir)
    path = version_dir / MANIFEST
    if not path.is_file():
        return [f"{path} is missing"]
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{path} is not a graphprune manifest"]
    problems = []
    model_dir = version_dir.parent
    for rel, info in files.items():
        p = model_dir / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(p) != info.get("sha256"):
            what = "config.pbtxt changed since this version was deployed" if rel == "config.pbtxt" else f"{rel} changed"
            problems.append(f"{what} (sha256 differs from the manifest)")
    listed = {rel.split("/", 1)[1] for rel in files if "/" in rel}
    for p in sorted(version_dir.iterdir()):
        if p.is_file() and p.name != MANIFEST and p.name not in listed:
            problems.append(f"{version_dir.name}/{p.name} is not in the manifest")
    return problems
