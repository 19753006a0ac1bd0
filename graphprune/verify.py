"""Task-aware comparison of an original and an optimized model in ONNX Runtime, on verification feeds.

Running: the original runs on every feed first and its outputs are kept (numpy; past ``SPILL_BYTES`` in a temporary
folder, read back one feed at a time); its session is dropped, and the memory it freed handed back, before the
optimized session is built, so the two models never hold memory at the same time. Both sessions run without ORT's
memory arena and without weight prepacking (no second, packed copy of the MatMul weights). Outputs are matched by
position; a different output count, or a different shape for any output on any feed, is a ``VerificationError``.

Kinds — one per graph output, classified from the original's outputs over all feeds, unless ``verify.outputs``
names the output (``outputs: {sentence_embedding: {kind: embedding}}``; the report says ``kind_source``):
  * integer or bool output → ``other``, compared exactly;
  * float ``[B, C]`` → ``embedding`` when every row has L2 norm within 1e-3 of 1, or when the name contains
    ``embed``, ``pool``, ``sentence``, ``feature`` or ``hidden``; otherwise ``logits`` when C ≥ 2;
  * float ``[B, N, C]`` → ``per_token``, or ``logits`` (over the last axis) when the name contains ``logit``;
  * anything else → ``other``.

Metrics, in float64. A sample is a row of axis 0 (for the cosine, a float vector ``[B]`` is one sample per feed);
feeds may differ in shape (sequence length), so figures are computed per feed and per-sample values concatenated.
  * every output: ``max_abs_err`` (inf when NaNs differ in place), ``rel_l2`` = ‖a−b‖₂ / ‖a‖₂ over all elements
    (0 when both are 0), and the per-sample cosine (each sample flattened) as ``cosine: {min, p5, mean}``. For an
    integer output, ``max_abs_err`` is taken on int64 and a sample's cosine is 1.0 when identical, else 0.0;
  * ``logits`` (class axis last; rank-3 logits give B·N rows): ``top1``, the fraction of rows whose argmax agrees;
    ``top5``, the fraction whose original argmax is among the optimized's 5 largest (1.0 when C ≤ 5); ``kl_mean``,
    the mean over rows of KL(softmax(a) ‖ softmax(b));
  * ``embedding``: ``neighbor_agreement``: over all samples of all feeds, each sample's nearest other sample by
    cosine, in the original and in the optimized outputs; the fraction whose neighbour is the same (a neighbour
    the original cannot tell from the best, cosine within 1e-6, counts as the same). ``None`` under 3 samples.
    Per-sample cosine misses an optimization that keeps a shared direction and scrambles the rest; this does not;
  * ``per_token``: the cosine along the last axis at every ``[b, n]`` position, ``token_cosine: {mean, p5, min}``.
  A zero vector against a zero vector has cosine 1.0 (against anything else 0.0). A NaN figure fails every check.

Thresholds — the ``verify:`` mapping of a pipeline config (:class:`VerifyThresholds`):
  ``max_abs_err``, ``rel_l2_max``, ``cosine_min``, ``cosine_p5_min``, ``cosine_mean_min``   every float output
  ``top1_min``, ``top5_min``, ``kl_max``                                                     logits
  ``neighbor_agreement_min``                                                                 embedding
  ``token_cosine_mean_min``, ``token_cosine_p5_min``                                         per_token
  A threshold applies only to outputs of the kinds above; integer outputs are reported but not checked. A threshold
  you set is used as given, and ``null`` means "not checked". One you leave out takes the default for the output's
  kind (:data:`KIND_DEFAULTS`), unless ``defaults: false``:
    logits      cosine_mean_min 0.95, top1_min 0.9
    embedding   cosine_mean_min 0.85, neighbor_agreement_min 0.8   (measured on MiniLM: pruned encoders that
                kept ≥ 95% of retrieval MRR had mean cosine 0.87-0.94 and agreement 0.83-0.91; one calibrated on
                synthetic inputs, which lost 30-60% of recall, had 0.59 and 0.0)
    per_token   token_cosine_mean_min 0.95
    other       cosine_mean_min 0.95
  On synthetic inputs (``compare(..., real_data=False)``; ``optimize`` without ``--data``) the defaults are
  :data:`SYNTHETIC_DEFAULTS`, the cosines only: on generated inputs the logits of a model sit near ties and
  nearest neighbours are noise, so agreement figures say nothing and are reported, not checked.
  The report lists, per output, the thresholds applied and each one missed, e.g.
  ``embedding 'sentence_embedding': neighbour agreement 0.781 < 0.9``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import numpy as np
import onnx_ir as ir
import pydantic

from graphprune._dtype import BF16_EMULATED, has_bfloat16, upcast_bfloat16
from graphprune.backends.onnxruntime import ModelLike, make_session, return_freed_memory, run
from graphprune.errors import ConfigError, ModelLoadError, VerificationError
from graphprune.io import load_model

Kind = Literal["logits", "embedding", "per_token", "other"]

#: Default thresholds per output kind, applied to thresholds the user left out (unless ``defaults: false``).
KIND_DEFAULTS: dict[str, dict[str, float]] = {
    "logits": {"cosine_mean_min": 0.95, "top1_min": 0.9},
    "embedding": {"cosine_mean_min": 0.85, "neighbor_agreement_min": 0.8},
    "per_token": {"token_cosine_mean_min": 0.95},
    "other": {"cosine_mean_min": 0.95},
}

#: Defaults on synthetic inputs: the cosine figures only (agreement on generated inputs measures noise).
SYNTHETIC_DEFAULTS: dict[str, dict[str, float]] = {
    "logits": {"cosine_mean_min": 0.95},
    "embedding": {"cosine_mean_min": 0.95},
    "per_token": {"token_cosine_mean_min": 0.95},
    "other": {"cosine_mean_min": 0.95},
}

_EMBEDDING_WORDS = ("embed", "pool", "sentence", "feature", "hidden")
_UNIT_NORM_TOL = 1e-3
_NEIGHBOR_TIE = 1e-6

# threshold → (metric path, "min" | "max" bound, label in failures, kind it applies to; None: every float output)
_CHECKS: dict[str, tuple[tuple[str, ...], str, str, str | None]] = {
    "max_abs_err": (("max_abs_err",), "max", "max_abs_err", None),
    "rel_l2_max": (("rel_l2",), "max", "rel_l2", None),
    "cosine_min": (("cosine", "min"), "min", "min cosine", None),
    "cosine_p5_min": (("cosine", "p5"), "min", "p5 cosine", None),
    "cosine_mean_min": (("cosine", "mean"), "min", "mean cosine", None),
    "top1_min": (("top1",), "min", "top-1 agreement", "logits"),
    "top5_min": (("top5",), "min", "top-5 agreement", "logits"),
    "kl_max": (("kl_mean",), "max", "mean KL", "logits"),
    "neighbor_agreement_min": (("neighbor_agreement",), "min", "neighbour agreement", "embedding"),
    "token_cosine_mean_min": (("token_cosine", "mean"), "min", "mean token cosine", "per_token"),
    "token_cosine_p5_min": (("token_cosine", "p5"), "min", "p5 token cosine", "per_token"),
}
THRESHOLD_NAMES: tuple[str, ...] = tuple(_CHECKS)

_Cos = pydantic.Field(default=None, ge=-1, le=1)
_Frac = pydantic.Field(default=None, ge=0, le=1)
_NonNeg = pydantic.Field(default=None, ge=0)


class OutputSpec(pydantic.BaseModel):
    """``verify.outputs.<name>``: settings for one graph output."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    kind: Kind


class VerifyThresholds(pydantic.BaseModel):
    """The ``verify:`` mapping of a pipeline config; see the module docstring for what each threshold checks."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    max_abs_err: float | None = _NonNeg
    rel_l2_max: float | None = _NonNeg
    cosine_min: float | None = _Cos
    cosine_p5_min: float | None = _Cos
    cosine_mean_min: float | None = _Cos
    top1_min: float | None = _Frac
    top5_min: float | None = _Frac
    kl_max: float | None = _NonNeg
    neighbor_agreement_min: float | None = _Frac
    token_cosine_mean_min: float | None = _Cos
    token_cosine_p5_min: float | None = _Cos
    outputs: dict[str, OutputSpec] = pydantic.Field(default_factory=dict)
    defaults: bool = True

    def explicit(self) -> dict[str, float | None]:
        """The thresholds the user set (``None``: set to null, so not checked)."""
        return {n: getattr(self, n) for n in THRESHOLD_NAMES if n in self.model_fields_set}

    def for_output(self, kind: str, floating: bool = True, real_data: bool = True) -> dict[str, float]:
        """The thresholds checked on an output of ``kind`` (``floating``: its dtype is float; ``real_data``:
        the feeds are real samples, else :data:`SYNTHETIC_DEFAULTS` fill in)."""
        table = KIND_DEFAULTS if real_data else SYNTHETIC_DEFAULTS
        out = {}
        for name, (_, _, _, only) in _CHECKS.items():
            if (only is None and not floating) or (only is not None and only != kind):
                continue
            value = getattr(self, name) if name in self.model_fields_set else (
                table.get(kind, {}).get(name) if self.defaults else None)
            if value is not None:
                out[name] = float(value)
        return out


@dataclasses.dataclass
class OutputReport:
    name: str
    kind: str
    kind_source: str  # "auto" | "config"
    metrics: dict
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class VerifyReport:
    max_abs_err: float
    cosine_min: float
    top1_agreement: float | None
    outputs: list[OutputReport]
    failures: list[str] = dataclasses.field(default_factory=list)
    samples: int = 0
    compute_dtype: str = "model"  # "model", or ``_dtype.BF16_EMULATED`` on a backend without bfloat16 kernels

    @property
    def passed(self) -> bool:
        return not self.failures

    def output(self, name: str) -> OutputReport:
        """The report of the output called ``name``."""
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        keys = ("passed", "failures", "samples", "max_abs_err", "cosine_min", "top1_agreement", "compute_dtype",
                "outputs")
        return {k: (self.passed if k == "passed" else d[k]) for k in keys}

    def summary(self) -> str:
        """One line for the terminal: min cosine, then the task figure of each logits / embedding / token output."""
        parts = [f"min cosine {self.cosine_min:.4f}"]
        for o in self.outputs:
            m = o.metrics
            if o.kind == "logits" and m.get("top1") is not None:
                parts.append(f"top-1 {m['top1']:.2f} ({o.name})")
            elif o.kind == "embedding" and m.get("neighbor_agreement") is not None:
                parts.append(f"neighbour agreement {m['neighbor_agreement']:.2f} ({o.name})")
            elif o.kind == "per_token" and "token_cosine" in m:
                parts.append(f"token cosine {m['token_cosine']['mean']:.4f} ({o.name})")
        line = ", ".join(parts)
        return line if self.passed else f"{line}; {len(self.failures)} check(s) failed"


def _is_float(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating)


def classify_output(name: str, values: Iterable[np.ndarray]) -> str:
    """The kind of output ``name`` from the original's values on every feed (rules in the module docstring).
    ``values`` is iterated once, one array at a time (they may be read back from disk)."""
    count, floating, ranks, rows, unit, wide = 0, True, set(), 0, True, True
    for v in values:
        v = np.asarray(v)
        count += 1
        floating = floating and _is_float(v)
        ranks.add(v.ndim)
        if floating and v.ndim == 2:
            rows += v.shape[0]
            wide = wide and v.shape[1] >= 2
            unit = unit and bool(np.all(np.abs(np.linalg.norm(v.astype(np.float64), axis=1) - 1) <= _UNIT_NORM_TOL))
    if not count or not floating:
        return "other"
    lname = name.lower()
    if ranks == {2}:
        if (rows > 0 and unit) or any(w in lname for w in _EMBEDDING_WORDS):
            return "embedding"
        return "logits" if wide else "other"
    if ranks == {3}:
        return "logits" if "logit" in lname else "per_token"
    return "other"


def _samples(x: np.ndarray) -> np.ndarray:
    """Samples as rows, each flattened. A float vector is one sample (the cosine of two scalars is only their signs'
    agreement); an integer vector is one sample per element."""
    if x.ndim >= 2 or (x.ndim == 1 and not _is_float(x)):
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def _vectors(x: np.ndarray) -> np.ndarray:
    """Vectors along the last axis, one row per position of the leading axes."""
    return x.reshape(-1, x.shape[-1]) if x.ndim >= 1 else x.reshape(1, 1)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.clip(num / (na * nb), -1.0, 1.0)
    return np.where((na == 0) | (nb == 0), np.where((na == 0) & (nb == 0), 1.0, 0.0), cos)


def _stats(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"min": 1.0, "p5": 1.0, "mean": 1.0}
    return {"min": float(x.min()), "p5": float(np.percentile(x, 5)), "mean": float(x.mean())}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _neighbor_agreement(a: np.ndarray, b: np.ndarray, block: int = 1024) -> float | None:
    """Fraction of samples (rows) whose nearest other sample by cosine is the same in ``a`` and ``b``."""
    n = a.shape[0]
    if n < 3:
        return None

    def unit(x):
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    ua, ub = unit(a), unit(b)
    agree = 0
    for s in range(0, n, block):
        rows = np.arange(s, min(s + block, n))
        sa, sb = ua[rows] @ ua.T, ub[rows] @ ub.T
        sa[rows - s, rows] = -np.inf
        sb[rows - s, rows] = -np.inf
        nb = sb.argmax(axis=1)
        agree += int((sa[rows - s, nb] >= sa.max(axis=1) - _NEIGHBOR_TIE).sum())
    return agree / n


class _Accumulator:
    """Figures of one output, accumulated feed by feed."""

    def __init__(self, name: str, kind: str, floating: bool) -> None:
        self.name, self.kind, self.floating = name, kind, floating
        self.samples, self.max_abs, self.diff_sq, self.ref_sq = 0, 0.0, 0.0, 0.0
        self.cos: list[np.ndarray] = []
        self.rows, self.top1, self.top5, self.kl = 0, 0, 0, 0.0
        self.tok: list[np.ndarray] = []
        self.emb: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise VerificationError(f"output {self.name!r}: shape {b.shape} differs from the original {a.shape}")
        self.samples += a.shape[0] if a.ndim else 1
        if self.floating:
            a, b = a.astype(np.float64), b.astype(np.float64)
            both = (a == b) | (np.isnan(a) & np.isnan(b))
            fix = both & ~np.isfinite(a)  # the same NaN / inf in both: equal, and kept out of the sums
            if fix.any():
                a, b = np.where(fix, 0.0, a), np.where(fix, 0.0, b)
            with np.errstate(invalid="ignore"):
                diff = np.abs(a - b)
            err = float("inf") if np.isnan(diff).any() else float(diff.max(initial=0.0))
            self.diff_sq += float((diff**2).sum())
            self.ref_sq += float((a**2).sum())
            self.cos.append(_row_cosine(_samples(a), _samples(b)))
        else:
            same = (_samples(a) == _samples(b)).all(axis=1)
            if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
                ia, ib = a.astype(np.int64), b.astype(np.int64)
                err = float(np.abs(ia - ib).max(initial=0))
                self.diff_sq += float(((ia - ib).astype(np.float64) ** 2).sum())
                self.ref_sq += float((ia.astype(np.float64) ** 2).sum())
            else:  # strings and other non-numeric outputs: equal or not
                err = 0.0 if same.all() else float("inf")
                self.diff_sq += 0.0 if same.all() else float("inf")
            self.cos.append(same.astype(np.float64))
            if self.kind != "other":  # an integer output overridden to a float kind: its figures in float64
                a, b = a.astype(np.float64), b.astype(np.float64)
        self.max_abs = max(self.max_abs, err)
        if self.kind == "logits":
            self._add_logits(_vectors(a), _vectors(b))
        elif self.kind == "embedding":
            self.emb.append((_samples(a), _samples(b)))
        elif self.kind == "per_token":
            self.tok.append(_row_cosine(_vectors(a), _vectors(b)))

    def _add_logits(self, la: np.ndarray, lb: np.ndarray) -> None:
        if la.shape[0] == 0:
            return
        best = la.argmax(axis=1)
        self.rows += la.shape[0]
        self.top1 += int((best == lb.argmax(axis=1)).sum())
        if la.shape[1] <= 5:
            self.top5 += la.shape[0]
        else:
            top = np.argpartition(-lb, 4, axis=1)[:, :5]
            self.top5 += int((top == best[:, None]).any(axis=1).sum())
        lpa, lpb = _log_softmax(la), _log_softmax(lb)
        pa = np.exp(lpa)
        with np.errstate(invalid="ignore"):
            kl = np.where(pa > 0, pa * (lpa - lpb), 0.0).sum(axis=1)
        self.kl += float(np.maximum(kl, 0.0).sum())

    def metrics(self, notes: list[str]) -> dict:
        cos = np.concatenate(self.cos) if self.cos else np.ones(0)
        if self.ref_sq > 0:
            rel = math.sqrt(self.diff_sq / self.ref_sq)
        else:
            rel = 0.0 if self.diff_sq == 0 else float("inf")
        m = {"samples": self.samples, "max_abs_err": self.max_abs, "rel_l2": rel, "cosine": _stats(cos)}
        if self.kind == "logits":
            r = self.rows
            m |= {"top1": self.top1 / r if r else None, "top5": self.top5 / r if r else None,
                  "kl_mean": self.kl / r if r else None}
            if not r:
                notes.append("no logits rows: top-1, top-5 and KL not computed")
        elif self.kind == "embedding":
            widths = {a.shape[1] for a, _ in self.emb}
            if len(widths) > 1:
                m["neighbor_agreement"] = None
                notes.append(f"neighbour agreement not computed: samples differ in size across feeds {sorted(widths)}")
            else:
                a = np.concatenate([a for a, _ in self.emb])
                b = np.concatenate([b for _, b in self.emb])
                m["neighbor_agreement"] = _neighbor_agreement(a, b)
                if m["neighbor_agreement"] is None:
                    notes.append(f"neighbour agreement not computed: {a.shape[0]} sample(s), needs at least 3")
        elif self.kind == "per_token":
            tok = np.concatenate(self.tok) if self.tok else np.ones(0)
            s = _stats(tok)
            m["token_cosine"] = {"mean": s["mean"], "p5": s["p5"], "min": s["min"]}
        return m


def _fmt(value: float, bound: float) -> str:
    """``value`` with enough decimals to differ visibly from ``bound``."""
    if not math.isfinite(value):
        return str(value)
    for digits in range(3, 10):
        if f"{value:.{digits}f}" != f"{bound:.{digits}f}" and (abs(value) >= 1e-3 or value == 0):
            return f"{value:.{digits}f}"
    return f"{value:.3g}"


def _check(out: OutputReport, limits: dict[str, float]) -> None:
    for name, bound in limits.items():
        path, side, label, _ = _CHECKS[name]
        value = out.metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            out.notes.append(f"{name} not checked: {label} not computed")
            continue
        out.thresholds[name] = bound
        ok = value >= bound if side == "min" else value <= bound  # NaN fails either way
        if not ok:
            op = "<" if side == "min" else ">"
            out.failures.append(f"{out.kind} {out.name!r}: {label} {_fmt(value, bound)} {op} {bound:g}")


def compare(
    original: ModelLike,
    optimized: ModelLike,
    feeds: Iterable[Mapping[str, np.ndarray]],
    thresholds: VerifyThresholds | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    real_data: bool = True,
    skip_tokens: Mapping[str, SkipTokens] | None = None,
) -> VerifyReport:
    """Run the original, then the optimized model, on every feed and compare output by output.

    Args:
        original: the reference model (a path or an ``onnx_ir.Model``).
        optimized: the model checked against it.
        feeds: feed dicts (input name → array), iterated once; a single mapping counts as one feed.
        thresholds: what to check; ``None`` checks the kind defaults.
        progress: called as ``progress(done, total)`` after each of the ``2 * len(feeds)`` runs.
        real_data: the feeds are real samples (``False``: generated ones, checked with :data:`SYNTHETIC_DEFAULTS`).
        skip_tokens: output name → the token positions (axis 1) of that ``[B, N, ...]`` output left out of every
            figure (:class:`SkipTokens`; a pass that drops image tokens and restores their rows from before the
            decoder sets it). The output's notes say so.

    Returns:
        The report; ``failures`` lists every threshold missed (empty: passed).

    Raises:
        VerificationError: no feeds, or the outputs differ in count or shape.
        ConfigError: ``thresholds.outputs`` names an output the model does not have.
    """
    t = thresholds or VerifyThresholds()
    feeds = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    if not feeds:
        raise VerificationError("no verification feeds: give at least one feed dict")
    total = 2 * len(feeds)
    original, up_a, size_a = _runnable(original)
    optimized, up_b, size_b = _runnable(optimized)
    # a full garbage collection costs ~0.3 s in a large process (a test run, a search); it only pays where the
    # weights are large enough for a freed copy to matter to the peak
    collect = max(size_a, size_b) >= GC_MIN_WEIGHT_BYTES

    return_freed_memory(collect)  # what the passes freed, before the first session
    try:
        session = make_session(original, arena=False, prepack=False)
    except Exception as e:  # the input model itself: ORT cannot load it (an op or opset it lacks, ...)
        if type(e).__module__.startswith("onnxruntime"):
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ModelLoadError(f"ONNX Runtime cannot load the original model: {first}") from e
        raise
    names = [o.name for o in session.get_outputs()]
    unknown = sorted(set(t.outputs) - set(names))
    if unknown:
        raise ConfigError(f"verify.outputs: unknown output {unknown[0]!r} (the model's outputs: {', '.join(names)})")
    reference = _References()
    try:
        for i, feed in enumerate(feeds):
            reference.append([np.asarray(x) for x in run(session, feed)])
            if progress is not None:
                progress(i + 1, total)
        del session  # released before the optimized session exists: never two models in memory
        return_freed_memory(collect)
        report = _compare_with(reference, optimized, feeds, names, t, progress, total, real_data, skip_tokens or {})
        if up_a or up_b:
            report.compute_dtype = BF16_EMULATED
        return report
    finally:
        reference.close()


def _runnable(model: ModelLike) -> tuple[ModelLike, bool, int]:
    """``model`` as ORT's CPU provider can run it, whether it was upcast, and its weights' size in bytes: a bfloat16
    model becomes its float32 twin with every op's output rounded to bfloat16 (:func:`graphprune._dtype.upcast_bfloat16`,
    on a copy; a path is mapped, not parsed)."""
    m = model if isinstance(model, ir.Model) else load_model(model)
    size = sum(v.const_value.nbytes for v in m.graph.initializers.values() if v.const_value is not None)
    if not has_bfloat16(m):
        return model, False, size
    twin = m.clone() if m is model else m
    upcast_bfloat16(twin, round_outputs=True)
    return twin, True, size


#: Weights from this size up get a full garbage collection before each verification session (see ``compare``).
GC_MIN_WEIGHT_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class SkipTokens:
    """Token positions of one output not compared: a static ``span`` ``[start, stop)``, or, per sample, the
    positions where the integer input ``input`` equals ``value`` (an image placeholder id); ``why`` goes to the
    output's notes."""

    why: str
    span: tuple[int, int] | None = None
    input: str | None = None
    value: int | None = None

    def keep(self, feed: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """bool ``[B, N]``: the positions compared."""
        if self.span is not None:
            k = np.ones(shape[:2], dtype=bool)
            k[:, self.span[0]:self.span[1]] = False
            return k
        ids = np.asarray(feed[self.input])
        if ids.shape != tuple(shape[:2]):
            raise VerificationError(f"input {self.input!r} {ids.shape} does not match the token axis of {shape}")
        return ids != self.value


def _kept_rows(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``x [B, N, ...]`` without the positions ``keep`` leaves out, as ``[B, M, ...]`` (M the same for every row)."""
    counts = keep.sum(1)
    if len(set(counts.tolist())) > 1:
        raise VerificationError(f"samples compare different numbers of token positions ({sorted(set(counts.tolist()))})")
    return x[keep].reshape(x.shape[0], int(counts[0]) if len(counts) else 0, *x.shape[2:])


def _compare_with(reference: _References, optimized, feeds, names, t, progress, total, real_data,
                  skip_tokens: Mapping[str, SkipTokens]) -> VerifyReport:
    accs = []
    for j, name in enumerate(names):
        values = reference.output(j)
        if name in t.outputs:
            kind, source = t.outputs[name].kind, "config"
        else:
            kind, source = classify_output(name, values), "auto"
        accs.append((_Accumulator(name, kind, _is_float(reference.feed(0)[j])), source))

    session = make_session(optimized, arena=False, prepack=False)
    if len(session.get_outputs()) != len(names):
        have = {o.name for o in session.get_outputs()}
        missing = [n for n in names if n not in have]
        hint = ""
        if missing:
            from graphprune.analysis.depth import CACHE_NAME

            hint = f" (missing: {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
            if all(CACHE_NAME.search(n) for n in missing):
                hint += ("; removed blocks took their KV cache with them: prune a decoder's prefill and decode graphs "
                         "together with `graphprune prune-pair`")
        raise VerificationError(f"optimized model has {len(session.get_outputs())} outputs, original has "
                                f"{len(names)}{hint}")
    for i, feed in enumerate(feeds):
        outs = run(session, feed)
        for (acc, _), a, b in zip(accs, reference.feed(i), outs):
            b = np.asarray(b)
            skip = skip_tokens.get(acc.name)
            if skip is not None and a.ndim >= 2 and a.shape == b.shape:
                keep = skip.keep(feed, a.shape)
                a, b = _kept_rows(a, keep), _kept_rows(b, keep)
            acc.add(a, b)
        if progress is not None:
            progress(len(feeds) + i + 1, total)
    del session

    outputs = []
    for acc, source in accs:
        notes: list[str] = [skip_tokens[acc.name].why] if acc.name in skip_tokens else []
        out = OutputReport(acc.name, acc.kind, source, acc.metrics(notes), notes=notes)
        _check(out, t.for_output(acc.kind, acc.floating, real_data))
        outputs.append(out)
    return _report(outputs, [acc.floating for acc, _ in accs])


#: The original's outputs beyond this many bytes are kept on disk, one file per feed, and read back one feed at a
#: time (a decoder's logits are seq × vocab floats per sample: 16 MiB at 128 × 32000).
SPILL_BYTES = 64 * 1024**2


class _References:
    """The original's outputs per feed: in memory, or, past :data:`SPILL_BYTES`, in a temporary folder."""

    def __init__(self, spill_bytes: int | None = None) -> None:
        self.spill_bytes = SPILL_BYTES if spill_bytes is None else spill_bytes
        self.items: list[list[np.ndarray] | str] = []
        self.held = 0
        self.folder: str | None = None

    def append(self, arrays: list[np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays)
        if self.held + size <= self.spill_bytes:
            self.items.append(arrays)
            self.held += size
            return
        import tempfile

        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="graphprune-verify-")
        path = f"{self.folder}/{len(self.items)}.npz"
        np.savez(path, *arrays)
        self.items.append(path)

    def feed(self, i: int) -> list[np.ndarray]:
        item = self.items[i]
        if isinstance(item, str):
            with np.load(item, allow_pickle=False) as z:
                return [z[f"arr_{k}"] for k in range(len(z.files))]
        return item

    def output(self, j: int):
        """Output ``j`` on every feed, read as it is iterated."""
        return (self.feed(i)[j] for i in range(len(self.items)))

    def close(self) -> None:
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _report(outputs: list[OutputReport], floating: list[bool]) -> VerifyReport:
    def worst(values: list[float], pick) -> float:
        return float("nan") if any(math.isnan(v) for v in values) else pick(values)

    errs = [o.metrics["max_abs_err"] for o in outputs]
    cos = [o.metrics["cosine"]["min"] for o, f in zip(outputs, floating) if f] or [
        o.metrics["cosine"]["min"] for o in outputs]
    top1 = next((o.metrics["top1"] for o in outputs if o.kind == "logits"), None)
    return VerifyReport(
        max_abs_err=worst(errs, max) if errs else 0.0,
        cosine_min=worst(cos, min) if cos else 1.0,
        top1_agreement=top1,
        outputs=outputs,
        failures=[f for o in outputs for f in o.failures],
        samples=outputs[0].metrics["samples"] if outputs else 0,
    )
