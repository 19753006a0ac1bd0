"""``load_data``: read the user's input data into a :class:`Dataset` that fits the model.

``source`` decides the format:
  1. a path that does not exist → ``DataError("data not found: PATH")``;
  2. ``.npz``: one key per model input, each ``[S, ...]``: S samples (keys must equal the model inputs);
  3. a folder: the images in it (``IMAGE_SUFFIXES``, case-insensitive, not recursive), for a model with one
     float NCHW input of static H and W (see ``_images``);
  4. ``.txt`` (one text per non-empty line) or ``.jsonl`` (``{"text": ..., "text_pair": ...}`` per line), tokenized
     with a Hugging Face ``tokenizer.json`` (see ``_text``);
  5. any other path → ``DataError`` listing the accepted formats;
  6. (Python API) an iterable of feed dicts ``name -> array`` with a leading batch axis (one dict is accepted too),
     unbatched into samples.

Arrays from npz files and feed dicts are checked against the model's inputs (those not in the initializers):
  * names: the input names must equal the model's, else one line naming both sides;
  * dtype: the same kind is cast (float64 → float32, int32 → int64); another kind (float for an int input, int for
    a float input, bool for either) is refused, naming the input, the dtype found and the one expected;
  * rank: array rank (sample axis included) must equal the model input's rank;
  * static dims other than the batch axis must match.

A model whose inputs share no batch axis 0 (Qwen2-VL: ``pixel_values [patches, C]`` beside ``input_ids [1, S]``)
takes whole feeds: an .npz array is ``[S, *the input's shape]`` (a sample axis before every model dim, all
checked), a feed dict is one sample as the model takes it; the dataset is ``whole`` (never stacked). Images and
texts cannot fill such inputs.
Every problem the user can fix raises ``DataError`` with a one-line message naming the file, input or numbers.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.analysis.inputs import unbatched_inputs
from graphprune.data._checks import check_names, fit_array, model_inputs, shape_text
from graphprune.data._dataset import Dataset, unbatch
from graphprune.data._images import IMAGE_SUFFIXES, load_images
from graphprune.data._text import TEXT_SUFFIXES, load_texts
from graphprune.errors import DataError

ACCEPTED = (
    f"accepted: .npz, a folder of images ({', '.join(IMAGE_SUFFIXES)}), "
    f"{' or '.join(TEXT_SUFFIXES)} text with --tokenizer, or (Python) an iterable of feed dicts"
)


def load_data(
    source,
    model: ir.Model,
    *,
    tokenizer: str | Path | None = None,
    max_length: int = 128,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalize: bool = True,
) -> Dataset:
    """Read ``source`` (path or iterable of feed dicts) into a ``source="user"`` dataset fitting ``model``.

    Args:
        source: an ``.npz`` file, a folder of images, a ``.txt``/``.jsonl`` text file, or an iterable of feed dicts.
        model: the model the data is fed to; its graph inputs decide names, dtypes and static dims.
        tokenizer: a Hugging Face ``tokenizer.json`` (or a folder holding one); required for text data.
        max_length: texts are truncated to this many tokens (special tokens included).
        mean: per-channel mean for image normalization (default ImageNet's).
        std: per-channel std for image normalization (default ImageNet's).
        normalize: apply ``(x - mean) / std`` to images after scaling them to [0, 1].
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"data not found: {path}")
        suffix = path.suffix.lower()
        if (path.is_dir() or suffix in TEXT_SUFFIXES) and unbatched_inputs(model):
            raise DataError(f"{path}: the model's inputs share no batch axis 0 "
                            f"({', '.join(unbatched_inputs(model)[:3])}); images and texts cannot fill them: pass "
                            "an .npz with one whole feed per sample ([S, *input shape] per input)")
        if path.is_dir():
            return load_images(path, model, mean=mean, std=std, normalize=normalize)
        if suffix == ".npz":
            return _load_npz(path, model)
        if suffix in TEXT_SUFFIXES:
            return load_texts(path, model, tokenizer=tokenizer, max_length=max_length)
        raise DataError(f"{path}: unsupported data format {suffix or '(no suffix)'!r} ({ACCEPTED})")
    if isinstance(source, (bytes, bytearray, np.ndarray)):
        raise DataError(f"unsupported data source of type {type(source).__name__} ({ACCEPTED})")
    if isinstance(source, Mapping):
        source = [source]
    try:
        items = iter(source)
    except TypeError:
        raise DataError(f"unsupported data source of type {type(source).__name__} ({ACCEPTED})") from None
    return _load_feeds(items, model)


def _fit_whole(where: str, feed: Mapping[str, np.ndarray], model: ir.Model, stacked: bool
               ) -> tuple[dict[str, np.ndarray], int]:
    """``_fit_feed`` for a model whose inputs share no batch axis: ``stacked`` arrays carry a leading sample axis
    before the input's whole shape (an .npz), else the feed is one sample."""
    check_names(where, list(feed), model)
    out: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for value in model_inputs(model):
        arr = np.asarray(feed[value.name])
        one = arr if stacked else arr[None]
        if one.ndim == 0:
            raise DataError(f"{where}: input {value.name!r} is a scalar; it needs a leading sample axis")
        dims = list(value.shape) if value.shape is not None else None
        if dims is not None and one.ndim != len(dims) + 1:
            raise DataError(f"{where}: input {value.name!r} has shape {list(arr.shape)}; the model's inputs share no "
                            f"batch axis, so each sample is a whole feed: "
                            f"{'[samples, ' + shape_text(dims)[1:] if stacked else shape_text(dims)}")
        for axis, d in enumerate(dims or []):
            if isinstance(d, int) and one.shape[axis + 1] != d:
                raise DataError(f"{where}: input {value.name!r} axis {axis} has size {one.shape[axis + 1]}; the model "
                                f"expects {d} {shape_text(dims)}")
        out[value.name] = fit_array(where, _AnyShape(value), one)
        rows[value.name] = one.shape[0]
    if len(set(rows.values())) > 1:
        raise DataError(f"{where}: inputs have different sample counts {rows}")
    return out, next(iter(rows.values()), 0)


class _AnyShape:
    """A model input seen by ``fit_array`` for its dtype only (``_fit_whole`` checked the dims)."""

    def __init__(self, value: ir.Value) -> None:
        self.name, self.dtype, self.shape = value.name, value.dtype, None


def _fit_feed(where: str, feed: Mapping[str, np.ndarray], model: ir.Model) -> tuple[dict[str, np.ndarray], int]:
    """Validate one batched feed (names, dtypes, ranks, dims) and return it in model-input order with its row count."""
    if unbatched_inputs(model):
        return _fit_whole(where, feed, model, stacked=True)
    check_names(where, list(feed), model)
    out: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for value in model_inputs(model):
        arr = np.asarray(feed[value.name])
        if arr.ndim == 0:
            raise DataError(f"{where}: input {value.name!r} is a scalar; it needs a leading sample axis")
        out[value.name] = fit_array(where, value, arr)
        rows[value.name] = arr.shape[0]
    if len(set(rows.values())) > 1:
        raise DataError(f"{where}: inputs have different sample counts {rows}")
    return out, next(iter(rows.values()), 0)


def _load_npz(path: Path, model: ir.Model) -> Dataset:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise DataError(f"{path}: not an .npz archive (it is a single .npy array; save with np.savez)")
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not an .npz archive (not a zip file)")
        data = np.load(path, allow_pickle=False)
        try:
            arrays = {key: data[key] for key in data.files}
        finally:
            data.close()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read as .npz ({_first_line(e)})") from e
    if not arrays:
        raise DataError(f"{path}: empty .npz (no arrays)")
    feed, count = _fit_feed(str(path), arrays, model)
    if count == 0:
        raise DataError(f"{path}: empty .npz (0 samples on axis 0)")
    return Dataset("user", f"{path.name}: {count} samples", unbatch(feed, count), {}, whole=bool(unbatched_inputs(model)))


def _load_feeds(items: Iterable, model: ir.Model) -> Dataset:
    whole = bool(unbatched_inputs(model))
    samples = []
    count = 0
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(f"feed {i}: expected a dict of input name -> array, got {type(item).__name__}")
        if whole:  # each feed dict is one sample
            feed, rows = _fit_whole(f"feed {i}", item, model, stacked=False)
        else:
            feed, rows = _fit_feed(f"feed {i}", item, model)
        samples.extend(unbatch(feed, rows))
        count += 1
    if not samples:
        raise DataError("no samples: the feed dicts are empty" if count else "no feed dicts given")
    return Dataset("user", f"{count} feed dict{'s' if count != 1 else ''}: {len(samples)} samples", samples, {},
                   whole=whole)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
