"""Model I/O on onnx-ir: validated loading, safe external data, atomic saving.

Loading
  * external weights stay memory-mapped (onnx-ir ``ExternalTensor``), so large models are not copied to RAM;
  * every external-data location is checked before use: it must be a relative path that resolves (symlinks
    included) inside the model's folder, the file must exist and be long enough for ``offset + length``.

Saving
  * never to the input model or to an external-data file the model still reads from;
  * atomically: the model (and its ``.data`` file) are written into a temporary folder beside the output,
    then renamed into place, data file first; an interrupted run leaves the previous output (or nothing);
  * weights go to ``<output>.data`` when the model holds more than ``external_threshold`` bytes of
    initializers (default 100 MiB) and always above 2 GiB, the protobuf limit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphprune._validate import problems
from graphprune.errors import GraphpruneError, ModelLoadError

PROTOBUF_LIMIT = 2 * 1024**3
DEFAULT_EXTERNAL_THRESHOLD = 100 * 1024**2


def _external_tensors(model: ir.Model):
    for graph in (model.graph, *(f.graph for f in model.functions.values())):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.name, value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                yield f"{node.name}.{attr.name}", attr.value


def check_external_data(model: ir.Model, model_path: Path) -> None:
    """Refuse external-data locations outside the model's folder, and missing or short data files."""
    folder = model_path.resolve().parent
    for name, tensor in _external_tensors(model):
        loc = tensor.location
        if os.path.isabs(loc) or Path(loc).drive:
            raise ModelLoadError(f"{model_path}: tensor {name!r} has an absolute external-data path {loc!r}; refused")
        target = (folder / loc).resolve()
        if not target.is_relative_to(folder):
            raise ModelLoadError(
                f"{model_path}: tensor {name!r} external data {loc!r} resolves outside the model folder; refused"
            )
        if not target.is_file():
            raise ModelLoadError(f"{model_path}: external data file {loc!r} (tensor {name!r}) is missing")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if target.stat().st_size < end:
            raise ModelLoadError(
                f"{model_path}: external data file {loc!r} is truncated (tensor {name!r} needs bytes up to {end})"
            )


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and validate an ONNX model; raise :class:`ModelLoadError` with one line on any problem."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty")
    try:
        model = ir.load(path)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a valid ONNX model (corrupt or truncated): {str(e).splitlines()[0]}") from e
    if model.ir_version <= 0 or not model.graph.outputs or len(model.graph) == 0:
        raise ModelLoadError(f"{path} is not a valid ONNX model (no graph, outputs or IR version)")
    check_external_data(model, path)
    found = problems(model)
    if found:
        more = f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise ModelLoadError(f"{path} is not a valid model: {found[0]}{more}")
    return model


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_path(output: str | os.PathLike, model: ir.Model | None = None, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output path that would overwrite an input model or an external-data file still in use."""
    out = Path(output)
    protected = list(inputs)
    if model is not None:
        for _, tensor in _external_tensors(model):
            protected.append(Path(tensor.base_dir) / tensor.location)
    for p in protected:
        for candidate in (out, out.with_name(out.name + ".data")):
            if _same_file(candidate, Path(p)):
                raise GraphpruneError(f"output {out} would overwrite an input file ({p}); choose another path")
    if out.exists() and out.is_dir():
        raise GraphpruneError(f"output {out} is a directory")
    if not out.parent.exists():
        raise GraphpruneError(f"output folder {out.parent} does not exist")
    return out


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class StagedModel:
    """A model written once into a hidden temporary folder beside its output, ready to be run from there
    (``path``) and then renamed into place (``commit``) or dropped (``discard``). A context manager: leaving the
    block without ``commit`` discards it."""

    def __init__(self, model: ir.Model, out: Path, tmpdir: Path, external: bool) -> None:
        self.model, self.out, self.tmpdir, self.external = model, out, tmpdir, external
        self.path = tmpdir / out.name
        self.data_name = out.name + ".data"
        self.done = False

    def commit(self) -> Path:
        """Rename the staged files into place (weights first, so the model never points at missing data)."""
        if self.done:
            raise RuntimeError("staged model already committed or discarded")
        try:
            if self.external:
                os.replace(self.tmpdir / self.data_name, self.out.parent / self.data_name)
            os.replace(self.path, self.out)
            stale = self.out.parent / self.data_name
            if not self.external and stale.exists() and not _is_referenced(stale, self.model):
                stale.unlink()  # a weights file from an earlier save of this output would mislead
        finally:
            self.discard()
        return self.out

    def discard(self) -> None:
        self.done = True
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc) -> None:
        if not self.done:
            self.discard()


def stage_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    inputs: tuple[Path, ...] = (),
    external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
) -> StagedModel:
    """Serialise ``model`` once, into a temporary folder beside ``path`` (weights to ``<path>.data`` when large).

    Run the staged file (``.path``) for verification and benchmarks, then ``commit()`` it: nothing goes through an
    in-memory ``SerializeToString``, and the output appears atomically.
    """
    out = check_output_path(path, model, inputs)
    total = initializer_bytes(model)
    external = total > external_threshold or total >= PROTOBUF_LIMIT
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staged = StagedModel(model, out, tmpdir, external)
    try:
        if external:
            ir.save(model, staged.path, external_data=staged.data_name, size_threshold_bytes=1024)
        else:
            # Pull externally stored weights into the single file; otherwise it would point at the input's data.
            ir.save(_with_weights_in_memory(model), staged.path)
    except BaseException:
        staged.discard()
        raise
    return staged


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    inputs: tuple[Path, ...] = (),
    external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
) -> Path:
    """Write ``model`` to ``path`` atomically; weights to ``<path>.data`` when large. Returns the path."""
    return stage_model(model, path, inputs=inputs, external_threshold=external_threshold).commit()


def _is_referenced(p: Path, model: ir.Model) -> bool:
    return any(_same_file(Path(t.base_dir) / t.location, p) for _, t in _external_tensors(model))


def _with_weights_in_memory(model: ir.Model) -> ir.Model:
    """``model`` with every external initializer replaced by an in-memory copy (small models only)."""
    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor):
            value.const_value = ir.Tensor(t.numpy(), name=t.name)
    return model
