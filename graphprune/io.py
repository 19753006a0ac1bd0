"""Model I/O on onnx-ir: validated loading, safe external data, atomic saving.

Loading
  * external weights stay memory-mapped (onnx-ir ``ExternalTensor``), so large models are not copied to RAM;
  * weights stored inside a large ``.onnx`` file (``raw_data`` of main-graph initializers, file above
    ``INLINE_MAP_THRESHOLD``) are not parsed into memory either: the file is memory-mapped, its protobuf framing is
    walked to find each initializer's ``raw_data`` bytes, and the model is parsed from a copy of the framing with
    those bytes replaced by external-data references into the ``.onnx`` file itself (location = its own name,
    offset, length). Each such initializer is then an ``ExternalTensor`` over the input file: nothing is read
    until a pass asks for the values, and nothing is copied when no pass changes them;
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

import mmap
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphprune._ir import unmap
from graphprune._validate import problems
from graphprune.errors import GraphpruneError, ModelLoadError

PROTOBUF_LIMIT = 2 * 1024**3
DEFAULT_EXTERNAL_THRESHOLD = 100 * 1024**2
#: ``.onnx`` files above this size have their inline weights mapped from the file instead of parsed into memory.
INLINE_MAP_THRESHOLD = 16 * 1024**2
#: Inline ``raw_data`` at least this long becomes a reference into the file (smaller tensors are parsed as usual).
INLINE_MAP_MIN_BYTES = 1024


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
        model = _load_mapped(path) if path.stat().st_size > INLINE_MAP_THRESHOLD else None
        if model is None:
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


# -- inline weights mapped from the .onnx file ------------------------------------------------------------------
# Protobuf wire format: a field is a varint tag (field number << 3 | wire type) and a value; wire type 2 is a
# varint length and that many bytes. ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto: raw_data = 9,
# external_data = 13 (StringStringEntryProto: key = 1, value = 2), data_location = 14 (EXTERNAL = 1).


def _varint(buf, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the field, start of its value, end of the field) over ``buf[start:end]``."""
    pos = start
    while pos < end:
        tag, vpos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, stop = _varint(buf, vpos)
        elif wire == 1:
            stop = vpos + 8
        elif wire == 2:
            n, vpos = _varint(buf, vpos)
            stop = vpos + n
        elif wire == 5:
            stop = vpos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if stop > end:
            raise ValueError("truncated field")
        yield field, wire, pos, vpos, stop
        pos = stop


def _len_field(field: int, payload: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(payload)) + payload


def _external_ref(location: str, offset: int, length: int) -> bytes:
    entries = b"".join(_len_field(13, _len_field(1, k.encode()) + _len_field(2, v.encode()))
                       for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))))
    return entries + _enc_varint(14 << 3 | 0) + _enc_varint(1)


def _tensor_framing(buf, start: int, end: int, location: str) -> bytes | None:
    """An initializer's TensorProto with its large ``raw_data`` replaced by a reference into the file, or
    ``None`` to keep it as it is."""
    parts, raw = [], None
    for field, wire, fstart, vstart, stop in _fields(buf, start, end):
        if field == 13 or (field == 14 and (wire != 0 or _varint(buf, vstart)[0] != 0)):
            return None  # already external: leave the tensor alone
        if field == 14:  # data_location DEFAULT, written out: replaced by EXTERNAL below
            continue
        if field == 9 and wire == 2 and stop - vstart >= INLINE_MAP_MIN_BYTES:
            raw = (vstart, stop - vstart)
            continue
        parts.append(bytes(buf[fstart:stop]))
    if raw is None:
        return None
    return b"".join(parts) + _external_ref(location, *raw)


def _graph_framing(buf, start: int, end: int, location: str) -> tuple[bytes, int]:
    parts, mapped = [], 0
    for field, wire, fstart, vstart, stop in _fields(buf, start, end):
        framing = _tensor_framing(buf, vstart, stop, location) if field == 5 and wire == 2 else None
        if framing is None:
            parts.append(bytes(buf[fstart:stop]))
        else:
            parts.append(_len_field(5, framing))
            mapped += 1
    return b"".join(parts), mapped


def _load_mapped(path: Path) -> ir.Model | None:
    """``path`` loaded with its inline weights as ``ExternalTensor`` views into the file itself; ``None`` when the
    file has no inline weights to map (or is not binary protobuf), so that the caller loads it the usual way."""
    import onnx

    if path.suffix.lower() not in (".onnx", ".pb", ""):
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            parts, mapped = [], 0
            for field, wire, fstart, vstart, stop in _fields(buf, 0, len(buf)):
                if field == 7 and wire == 2:
                    graph, mapped = _graph_framing(buf, vstart, stop, path.name)
                    parts.append(_len_field(7, graph))
                else:
                    parts.append(bytes(buf[fstart:stop]))
        except (ValueError, IndexError):
            return None  # not protobuf framing we can walk: the usual loader says what is wrong
        finally:
            buf.release()
    if not mapped:
        return None
    proto = onnx.ModelProto.FromString(b"".join(parts))
    model = ir.serde.deserialize_model(proto)
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.base_dir = str(path.parent)
    return model


def mapped_from_file(model: ir.Model, path: Path) -> bool:
    """Whether ``model`` holds initializers mapped from the ``.onnx`` file ``path`` itself (see ``load_model``)."""
    return any(Path(t.location).name == path.name and Path(t.base_dir).resolve() == path.resolve().parent
               for _, t in _external_tensors(model))


def release_weights(model: ir.Model) -> None:
    """Close the memory maps of ``model``'s external weights (they reopen on the next read): pages a pass read
    stop counting in this process's memory before ONNX Runtime maps the same weights for its own session. A map
    that a live numpy array still views is left open."""
    for _, tensor in _external_tensors(model):
        unmap(tensor)


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
