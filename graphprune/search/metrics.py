"""Quality figures of a search trial, per sample, so that a paired bootstrap gives each one an interval.

Every metric returns a vector of per-sample scores (its mean is the figure), computed from the original's and the
candidate's outputs on the same samples:
  * task metrics: ``accuracy`` (labels; argmax of logits; of per-token logits ``[B, T, V]``, the last position's:
    the answer after the prompt), ``recall@1`` and ``mrr`` (retrieval: query i's document is document i; cosine
    similarity over all documents of the split);
  * agreement metrics (no task): for embeddings, ``knn_overlap`` (|N_k(a) ∩ N_k(b)| / k with N_k the k nearest other
    samples by cosine, k = 10), ``neighbor_agreement`` (k = 1, as verification) and ``rank_corr`` (each sample's
    Spearman correlation between its cosine similarities to all others, original vs candidate); for logits,
    ``top1`` (argmax agreement); for every float output, ``cosine`` (per-sample cosine to the original).
``bootstrap(scores, base)`` resamples samples (seeded) and returns the interval of mean(scores) / mean(base) —
the *retained* share of the original's figure — so both figures come from the same resampled samples.
"""

from __future__ import annotations

import numpy as np

#: neighbours compared by ``knn_overlap``
KNN_K = 10


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine of the candidate ``b`` to the original ``a`` (zero vs zero counts 1)."""
    ua, ub = unit(a), unit(b)
    both_zero = (np.abs(a.reshape(len(a), -1)).sum(1) == 0) & (np.abs(b.reshape(len(b), -1)).sum(1) == 0)
    return np.where(both_zero, 1.0, (ua * ub).sum(axis=1))


def _sims(x: np.ndarray) -> np.ndarray:
    u = unit(x)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    return s


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Per-sample share of its k nearest neighbours (cosine) that the candidate keeps."""
    n = len(a)
    k = max(1, min(k, n - 1))
    na = np.argsort(-_sims(a), axis=1, kind="stable")[:, :k]
    nb = np.argsort(-_sims(b), axis=1, kind="stable")[:, :k]
    return np.array([len(set(na[i]) & set(nb[i])) / k for i in range(n)])


def rank_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample Spearman correlation of its similarities to every other sample, original vs candidate."""
    sa, sb = _sims(a), _sims(b)
    n = len(a)
    out = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        ra = np.argsort(np.argsort(sa[i, keep])).astype(np.float64)
        rb = np.argsort(np.argsort(sb[i, keep])).astype(np.float64)
        ra -= ra.mean()
        rb -= rb.mean()
        den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
        out[i] = (ra * rb).sum() / den if den > 0 else 1.0
    return out


def retrieval(queries: np.ndarray, docs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query hit at 1 and reciprocal rank of document i for query i (cosine over all documents)."""
    s = unit(queries) @ unit(docs).T
    own = s[np.arange(len(s)), np.arange(len(s))]
    rank = (s > own[:, None]).sum(axis=1) + 1
    return {"recall@1": (rank == 1).astype(np.float64), "mrr": 1.0 / rank}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits).reshape(len(logits), -1)
    return (logits.argmax(axis=1) == np.asarray(labels).reshape(-1)).astype(np.float64)


def agreement(a: np.ndarray, b: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """The agreement metrics of an output of ``kind`` (``embedding`` | ``logits`` | other)."""
    out = {"cosine": cosine(a, b)}
    if kind == "embedding" and len(a) >= 3:
        out["knn_overlap"] = knn_overlap(a, b)
        out["neighbor_agreement"] = knn_overlap(a, b, 1)
        out["rank_corr"] = rank_corr(a, b)
    elif kind == "logits":
        a2, b2 = np.asarray(a).reshape(len(a), -1), np.asarray(b).reshape(len(b), -1)
        out["top1"] = (a2.argmax(1) == b2.argmax(1)).astype(np.float64)
    return out


def bootstrap(scores: np.ndarray, base: np.ndarray | None = None, confidence: float = 0.8, rounds: int = 1000,
              seed: int = 0) -> tuple[float, float]:
    """Interval (two-sided, ``confidence``) of mean(scores) / mean(base) over samples resampled with replacement
    (paired: the same draw for both); ``base`` None: of mean(scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    num = scores[idx].mean(axis=1)
    if base is not None:
        den = np.asarray(base, dtype=np.float64)[idx].mean(axis=1)
        num = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(num, tail)), float(np.percentile(num, 100 - tail))
