"""Image folders → NCHW float samples, preprocessed the way ImageNet-trained classifiers expect.

Contract:
  * the files are those directly in the folder whose suffix is in ``IMAGE_SUFFIXES`` (case-insensitive), sorted by
    name; hidden files (``.name``, e.g. macOS ``._x.jpg``) are skipped; subfolders are not searched;
  * the model must have exactly one input (initializers aside), of rank 4, float, NCHW with static C, H and W;
    C == 3 decodes to RGB, C == 1 to grayscale ("L"); any other C is refused;
  * each image is resized (BILINEAR) so that it covers H×W keeping its aspect ratio
    (``scale = max(H / h, W / w)``), then center-cropped to H×W (the crop box starts at ``(size - target) // 2``);
  * values are scaled to [0, 1] (``/ 255``) and, when ``normalize``, mapped to ``(x - mean) / std`` per channel.
    ``mean``/``std`` default to ImageNet's for C == 3 and to (0.449,) / (0.226,) (ImageNet's averaged) for C == 1;
    user values must have C entries (or 1, broadcast to every channel);
  * each sample is a CHW array of the model input's float dtype.
A file that does not decode raises ``DataError`` naming it. Pillow is imported only when images are loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.data._checks import dtype_kind, model_inputs, shape_text
from graphprune.data._dataset import Dataset
from graphprune.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    files = [
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: p.name)


def _image_input(model: ir.Model, folder: Path) -> ir.Value:
    inputs = model_inputs(model)
    if len(inputs) != 1:
        raise DataError(f"{folder}: image data fits a model with one input; this one has {[v.name for v in inputs]}")
    value = inputs[0]
    if value.shape is None or len(value.shape) != 4:
        raise DataError(
            f"{folder}: image data needs a rank-4 NCHW input; {value.name!r} has shape {shape_text(value.shape)}"
        )
    if value.dtype is None or dtype_kind(value.dtype.numpy()) != "float":
        got = value.dtype.numpy() if value.dtype is not None else "untyped"
        raise DataError(f"{folder}: image data needs a float input; {value.name!r} is {got}")
    _, c, h, w = list(value.shape)
    if not all(isinstance(d, int) for d in (c, h, w)):
        raise DataError(
            f"{folder}: image input {value.name!r} {shape_text(value.shape)} needs static channels, height and width "
            "(export the model with a fixed image size)"
        )
    if c not in (1, 3):
        raise DataError(
            f"{folder}: image input {value.name!r} has {c} channels; only 1 (grayscale) or 3 (RGB) are supported"
        )
    return value


def _per_channel(name: str, values: Sequence[float] | None, default: Sequence[float], channels: int) -> np.ndarray:
    values = default if values is None else tuple(float(v) for v in values)
    if len(values) not in (1, channels):
        raise DataError(f"{name} has {len(values)} values; the image input has {channels} channel(s)")
    return np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).reshape(channels, 1, 1)


def resize_crop(image, height: int, width: int):
    """Resize a PIL image (BILINEAR) to cover ``height``×``width`` keeping its aspect, then center-crop to it."""
    from PIL import Image

    w, h = image.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_images(
    folder: Path,
    model: ir.Model,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalize: bool = True,
) -> Dataset:
    """Every image in ``folder`` as one CHW sample for the model's single NCHW input (see the module doc)."""
    files = image_files(folder)
    if not files:
        subfolders = sum(1 for p in folder.iterdir() if p.is_dir())
        hint = f"; its {subfolders} subfolder(s) are not searched" if subfolders else ""
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}){hint}")
    value = _image_input(model, folder)
    _, c, h, w = list(value.shape)
    if normalize:
        mean_arr = _per_channel("mean", mean, IMAGENET_MEAN if c == 3 else GRAY_MEAN, c)
        std_arr = _per_channel("std", std, IMAGENET_STD if c == 3 else GRAY_STD, c)
        if np.any(std_arr == 0):
            raise DataError(f"std must not contain 0 (got {[float(s) for s in std_arr.ravel()]})")
    out_dtype = value.dtype.numpy()

    from PIL import Image, UnidentifiedImageError

    samples = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if c == 3 else "L")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            text = str(e).strip().splitlines()
            raise DataError(f"{path}: cannot decode image ({text[0] if text else type(e).__name__})") from e
        pixels = np.asarray(resize_crop(image, h, w), dtype=np.float32) / np.float32(255.0)
        x = pixels.transpose(2, 0, 1) if c == 3 else pixels[None]
        if normalize:
            x = (x - mean_arr) / std_arr
        samples.append({value.name: np.ascontiguousarray(x).astype(out_dtype, copy=False)})
    norm = "normalized" if normalize else "scaled to [0, 1]"
    plural = "s" if len(samples) != 1 else ""
    desc = f"{folder.name}: {len(samples)} image{plural}, resized and center-cropped to {h}x{w}, {norm}"
    return Dataset("user", desc, samples, {})
