"""The ``Dataset``: input samples for calibration and verification, split and batched for ONNX Runtime.

A dataset is a list of samples, one dict ``input name -> array`` each, stored WITHOUT the sample (batch) axis, so
samples of different lengths (tokenized texts) can live side by side. It also records where it came from
(``source``: ``"user"`` or ``"synthetic"``), a one-line human ``description``, and ``pad_values``: the value each
input is padded with when the samples of one batch differ in length (pad token id for ids, 0 for masks).

  * ``split(calibration, verify, seed)`` draws two DISJOINT datasets with ``default_rng(seed).permutation``: the
    first ``calibration`` indices of the permutation calibrate, the next ``verify`` verify. With too few samples it
    raises ``DataError`` naming the numbers, unless ``allow_overlap``: then calibration takes ``min(calibration, n)``
    samples and verification ``min(verify, n)``, taking samples unused by calibration first.
  * ``batches(batch_size)`` cuts consecutive chunks (the last one may be smaller) and stacks every input along a new
    axis 0; arrays of one input that differ in shape inside a chunk are padded at the end of each axis to the chunk
    maximum with ``pad_values.get(name, 0)``. Dtypes are kept.

``synthetic_data(model, samples, seed)`` builds a dataset from the model's input specs with
``graphprune.analysis.inputs.example_inputs`` (for when the user brings no data).

A model whose inputs share no batch axis 0 (Qwen2-VL: packed patches beside ``input_ids [1, S]``) cannot have its
samples stacked: its dataset is ``whole``, each sample a complete feed that ``batches`` hands on as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.errors import DataError

Sample = dict[str, np.ndarray]


@dataclass(repr=False)
class Dataset:
    """Input samples (arrays without the sample axis) plus their provenance and pad values."""

    source: str
    description: str
    samples: list[Sample]
    pad_values: dict[str, int | float] = field(default_factory=dict)
    #: each sample is a whole feed, never stacked: the model's inputs share no batch axis 0 (Qwen2-VL's packed
    #: ``pixel_values [patches, C]`` beside ``input_ids [1, S]``); ``batches`` hands every sample on its own
    whole: bool = False

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"Dataset(source={self.source!r}, samples={len(self)}, description={self.description!r})"

    def subset(self, indices: Iterable[int]) -> Dataset:
        """The samples at ``indices`` (in that order), with the same source, description and pad values."""
        n = len(self)
        picked = []
        for i in indices:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"sample index {i} out of range for a dataset of {n} samples")
            picked.append(self.samples[i])
        return Dataset(self.source, self.description, picked, dict(self.pad_values), self.whole)

    def split(
        self, calibration: int, verify: int, seed: int = 0, allow_overlap: bool = False
    ) -> tuple[Dataset, Dataset]:
        """Disjoint ``(calibration, verification)`` datasets drawn with a seeded permutation (see the module doc)."""
        if calibration < 1 or verify < 1:
            raise DataError(
                f"calibration and verification need at least 1 sample each (got {calibration} and {verify})"
            )
        n = len(self)
        if n == 0:
            raise DataError("data has no samples")
        order = np.random.default_rng(seed).permutation(n)
        if n >= calibration + verify:
            return self.subset(order[:calibration]), self.subset(order[calibration : calibration + verify])
        if not allow_overlap:
            raise DataError(
                f"data has {n} samples; {calibration} calibration + {verify} verification need {calibration + verify} "
                "(lower --calibration-samples / --verify-samples, or pass --allow-overlap)"
            )
        n_cal = min(calibration, n)
        cal = order[:n_cal]
        # Unused samples first, then calibration samples (in permutation order) to fill up.
        ver = np.concatenate([order[n_cal:], cal])[: min(verify, n)]
        return self.subset(cal), self.subset(ver)

    def batches(self, batch_size: int, exact: bool = False) -> list[dict[str, np.ndarray]]:
        """ORT feed dicts: consecutive chunks of ``batch_size`` samples stacked along a new axis 0, padded if ragged.

        ``exact``: every chunk holds exactly ``batch_size`` samples (a model with a fixed batch); the last one is
        filled up with samples from the start.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1 (got {batch_size})")
        if self.whole:
            return [dict(s) for s in self.samples]
        chunks = [self.samples[i : i + batch_size] for i in range(0, len(self), batch_size)]
        if exact and chunks and len(chunks[-1]) < batch_size:
            fill = (self.samples * (batch_size // max(len(self.samples), 1) + 1))[: batch_size - len(chunks[-1])]
            chunks[-1] = list(chunks[-1]) + list(fill)
        return [self._stack(c) for c in chunks]

    def _stack(self, chunk: list[Sample]) -> dict[str, np.ndarray]:
        names = list(chunk[0])
        feed: dict[str, np.ndarray] = {}
        for name in names:
            try:
                arrays = [np.asarray(s[name]) for s in chunk]
            except KeyError:
                raise DataError(f"input {name!r} is missing from some samples") from None
            shapes = {a.shape for a in arrays}
            if len(shapes) == 1:
                feed[name] = np.stack(arrays)
                continue
            ranks = {a.ndim for a in arrays}
            if len(ranks) > 1:
                raise DataError(f"input {name!r}: samples of one batch have different ranks {sorted(ranks)}")
            target = tuple(max(a.shape[axis] for a in arrays) for axis in range(arrays[0].ndim))
            out = np.full((len(arrays), *target), self.pad_values.get(name, 0), dtype=arrays[0].dtype)
            for row, a in zip(out, arrays):
                row[tuple(slice(0, d) for d in a.shape)] = a
            feed[name] = out
        return feed


def unbatch(feed: dict[str, np.ndarray], count: int) -> list[Sample]:
    """Split a feed dict whose arrays all have ``count`` rows on axis 0 into ``count`` samples (views)."""
    return [{name: arr[i] for name, arr in feed.items()} for i in range(count)]


def synthetic_data(model: ir.Model, samples: int, seed: int = 0) -> Dataset:
    """``samples`` samples generated from the model's input specs (``example_inputs``), ``source="synthetic"``."""
    from graphprune.analysis.inputs import example_inputs, unbatched_inputs

    if samples < 1:
        raise DataError(f"synthetic data needs at least 1 sample (got {samples})")
    if unbatched_inputs(model):  # whole feeds, one per sample
        rows = [example_inputs(model, batch=1, seed=seed + i) for i in range(samples)]
        planted = _plant_image_tokens(model, rows)
        return Dataset("synthetic", f"{samples} synthetic feeds generated from the input specs (whole: the inputs "
                       f"share no batch axis){planted}", rows, {}, whole=True)
    feed = example_inputs(model, batch=samples, seed=seed)
    scalars = [name for name, arr in feed.items() if arr.ndim == 0]
    if scalars:
        raise DataError(f"model input {scalars[0]!r} is a scalar: it has no sample axis to fill")
    if all(arr.shape[0] == samples for arr in feed.values()):
        rows = unbatch(feed, samples)
    else:
        # A static batch axis (e.g. fixed to 1) ignores ``batch``: draw the samples one by one.
        rows = [
            {name: arr[0] for name, arr in example_inputs(model, batch=1, seed=seed + i).items()}
            for i in range(samples)
        ]
    planted = _plant_image_tokens(model, rows)
    return Dataset("synthetic", f"{samples} synthetic samples generated from the input specs{planted}", rows, {})


def _plant_image_tokens(model: ir.Model, rows: list[Sample]) -> str:
    """A vision-language model that reads its image positions from ``input_ids`` (``image_token_id``) merges as
    many image features as there are image tokens: random ids hold none (or a few), which is no input the model
    is made for. Put the ``P`` image tokens after the first id of every sample (and no stray one elsewhere); the
    description's addition ("" when the model is no such VLM)."""
    ints = [v for v in model.graph.inputs if v.dtype is not None and v.dtype.is_integer()]
    floats = [v for v in model.graph.inputs if v.dtype is not None and v.dtype.is_floating_point()]
    if not ints or not floats:
        return ""
    from graphprune.analysis.attention import find_attention_blocks
    from graphprune.analysis.vision_language import find_vision_language

    blocks = find_attention_blocks(model)
    vl = find_vision_language(model, blocks) if blocks else None
    if vl is None or vl.image_token_id is None or not vl.image_tokens:
        return ""
    name, tok, p = vl.text_input.name, vl.image_token_id, vl.image_tokens
    for row in rows:
        ids = row.get(name)
        if ids is None or ids.shape[-1] < p + 1:
            return ""
        ids[ids == tok] = 0 if tok else 1
        ids[..., 1:1 + p] = tok
    return f"; {p} image tokens (id {tok}) after the first token of {name}"
