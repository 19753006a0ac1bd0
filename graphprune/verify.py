"""Compare the outputs of an original and an optimized model in ONNX Runtime.

Figures, over all feeds:
  * ``max_abs_err``: the largest absolute difference over every output element;
  * ``cosine_min``: the smallest cosine similarity between matching outputs (flattened per sample);
  * ``top1_agreement``: for outputs that look like logits (float, last axis ≥ 2, rank 2, or rank 3 with a
    class axis), the fraction of samples whose argmax agrees; ``None`` when no output looks like logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pydantic

from graphprune.backends.onnxruntime import ModelLike, make_session, run
from graphprune.errors import VerificationError


class VerifyThresholds(pydantic.BaseModel):
    """The ``verify:`` mapping of a pipeline config. A threshold left out is not checked."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    max_abs_err: float | None = pydantic.Field(default=None, ge=0)
    cosine_min: float | None = pydantic.Field(default=None, ge=-1, le=1)
    top1_min: float | None = pydantic.Field(default=None, ge=0, le=1)


@dataclasses.dataclass
class VerifyReport:
    max_abs_err: float
    cosine_min: float
    top1_agreement: float | None
    outputs: list[dict]
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"passed": self.passed}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0] if a.ndim > 1 else 1, -1).astype(np.float64)
    b = b.reshape(a.shape[0], -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(a - b).max(axis=1) == 0, 1.0, 0.0))
    return float(cos.min())


def _looks_like_logits(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating) and x.ndim == 2 and x.shape[-1] >= 2


def compare(
    original: ModelLike,
    optimized: ModelLike,
    feeds: Sequence[Mapping[str, np.ndarray]],
    thresholds: VerifyThresholds | None = None,
) -> VerifyReport:
    """Run both models on every feed and compare; ``failures`` lists each threshold missed."""
    s0, s1 = make_session(original), make_session(optimized)
    names = [o.name for o in s0.get_outputs()]
    if len(s1.get_outputs()) != len(names):
        raise VerificationError(f"optimized model has {len(s1.get_outputs())} outputs, original has {len(names)}")
    max_err, cos_min = 0.0, 1.0
    agree, total = 0, 0
    per_output = [{"name": n, "max_abs_err": 0.0, "cosine": 1.0} for n in names]
    for feed in feeds:
        a_outs, b_outs = run(s0, feed), run(s1, feed)
        for i, (a, b) in enumerate(zip(a_outs, b_outs)):
            if a.shape != b.shape:
                raise VerificationError(f"output {names[i]!r}: shape {b.shape} differs from the original {a.shape}")
            if np.issubdtype(a.dtype, np.floating):
                err = float(np.nanmax(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
                if np.isnan(b).sum() != np.isnan(a).sum():
                    err = float("inf")
                cos = _cosine(a, b) if a.size else 1.0
            else:
                err = float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) if a.size else 0.0
                cos = 1.0 if err == 0 else 0.0
            per_output[i]["max_abs_err"] = max(per_output[i]["max_abs_err"], err)
            per_output[i]["cosine"] = min(per_output[i]["cosine"], cos)
            max_err, cos_min = max(max_err, err), min(cos_min, cos)
            if _looks_like_logits(a):
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += a.shape[0]
    top1 = agree / total if total else None
    report = VerifyReport(max_err, cos_min, top1, per_output)
    t = thresholds or VerifyThresholds()
    if t.max_abs_err is not None and max_err > t.max_abs_err:
        report.failures.append(f"max_abs_err {max_err:.3g} > {t.max_abs_err:g}")
    if t.cosine_min is not None and cos_min < t.cosine_min:
        report.failures.append(f"cosine {cos_min:.6f} < {t.cosine_min:g}")
    if t.top1_min is not None and top1 is not None and top1 < t.top1_min:
        report.failures.append(f"top-1 agreement {top1:.4f} < {t.top1_min:g}")
    return report
