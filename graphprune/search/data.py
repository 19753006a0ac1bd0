"""The search's data: one seeded permutation split three ways, disjoint — calibration, selection, test.

  * calibration: what the passes fit to (``PassContext.calibration``);
  * selection: what the search scores every trial on;
  * test: never seen by the search; only the final front and the chosen model are scored on it.

The split reuses ``Dataset.split``'s permutation (``default_rng(seed).permutation(n)``): the first ``c`` samples
calibrate and the next ``s`` select, so ``graphprune optimize`` with ``calibration_samples: c``,
``verify_samples: s`` and the same seed calibrates on exactly the search's calibration samples and verifies on its
selection samples (``best.yaml`` says so). Test takes the next ``t``.

Tasks:
  * ``labels`` (``--labels LABELS.npy``, one label per sample of the data, in file order): accuracy;
  * ``retrieval``: a ``.jsonl`` whose every record has ``text`` and ``text_pair``; a sample is a pair, each text is
    encoded on its own, and the task is recall@1 / MRR of text → text_pair within the split. The calibration and
    selection texts are written to ``DIR/data/search-texts.txt`` in the order that makes optimize's split give back
    the same samples (so ``best.yaml`` points there);
  * ``callable``: a Python ``metric(outputs, batch) -> float`` (API only);
  * ``agreement``: none of the above — the candidate is scored by its agreement with the original.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import ConfigError, DataError


@dataclasses.dataclass
class EvalSet:
    """Samples scored together: ``dataset`` in order; ``labels`` per sample, or ``queries`` (retrieval: samples
    ``[0, q)`` are the queries and ``[q, 2q)`` their documents)."""

    dataset: Any
    labels: np.ndarray | None = None
    queries: int | None = None

    @property
    def size(self) -> int:
        return self.queries if self.queries is not None else len(self.dataset)


@dataclasses.dataclass
class SearchData:
    task: str  # labels | retrieval | callable | agreement
    calibration: Any  # Dataset
    selection: EvalSet
    test: EvalSet
    #: the ``data:`` mapping of best.yaml (optimize reproduces the calibration / selection split from it)
    data_config: dict[str, Any]
    info: dict[str, Any]


def _sizes(n: int, cal: int | None, sel: int | None, test: int | None, default_cal: int) -> tuple[int, int, int]:
    c = cal or min(default_cal, max(1, n // 4))
    rest = n - c
    s = sel or (rest - (test or 0) if test else rest // 2)
    t = test or (rest - s)
    if min(c, s, t) < 1 or c + s + t > n:
        raise DataError(f"data has {n} samples; calibration {c} + selection {s} + test {t} need {c + s + t} "
                        "(each at least 1): lower --calibration-samples / --selection-samples / --test-samples")
    if s < 3 or t < 3:
        raise DataError(f"selection ({s}) and test ({t}) need at least 3 samples each")
    return c, s, t


def load_labels(path: str | Path, n: int) -> np.ndarray:
    path = Path(path)
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"labels {path}: cannot read as .npy ({str(e).splitlines()[0]})") from None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise DataError(f"labels {path}: {len(labels)} labels for {n} samples of the data")
    return labels


def _pair_records(path: Path) -> list[tuple[str, str]] | None:
    from graphprune.data import read_texts

    if path.suffix.lower() != ".jsonl":
        return None
    records = read_texts(path)
    if not records or any(p is None for _, _, p in records):
        return None
    return [(" ".join(t.split()), " ".join(p.split())) for _, t, p in records]


def arrange(first: list[str], second: list[str], seed: int) -> list[str]:
    """Lines such that ``Dataset.split(len(first), len(second), seed)`` gives ``first`` then ``second``, in order."""
    wanted = first + second
    perm = np.random.default_rng(seed).permutation(len(wanted))
    lines = [""] * len(wanted)
    for i, p in enumerate(perm):
        lines[p] = wanted[i]
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def load_search_data(model: Any, path: str | Path, cfg: Any, *, labels: str | Path | None = None,
                     metric: Any = None, calibration: int | None = None, selection: int | None = None,
                     test: int | None = None, data_dir: Path | None = None) -> SearchData:
    """Read and split the data (see the module docstring). ``cfg`` is a ``DataConfig`` (tokenizer, max_length,
    image options, seed, batch size). ``data_dir`` is where retrieval texts go (written only for that task)."""
    from graphprune.data import load_data

    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    pairs = _pair_records(path) if labels is None else None
    common = {k: getattr(cfg, k) for k in ("tokenizer", "max_length", "mean", "std", "normalize")}
    if pairs is not None:
        if metric is not None:
            raise ConfigError("a metric callable and text pairs: give one task")
        c, s, t = _sizes(len(pairs), calibration, selection, test, 64)
        perm = np.random.default_rng(cfg.seed).permutation(len(pairs))
        pick = [pairs[i] for i in perm]
        cal_texts = [x for p in pick[:c] for x in p]
        sel = pick[c:c + s]
        tst = pick[c + s:c + s + t]
        if data_dir is None:
            raise ConfigError("retrieval data needs a folder for its texts")
        texts = data_dir / "search-texts.txt"
        _write_lines(texts, arrange(cal_texts, [q for q, _ in sel] + [d for _, d in sel], cfg.seed))
        _write_lines(data_dir / "test-texts.txt", [q for q, _ in tst] + [d for _, d in tst])
        ds = load_data(texts, model, **common)
        cal_ds, sel_ds = ds.split(2 * c, 2 * s, seed=cfg.seed)
        test_ds = load_data(data_dir / "test-texts.txt", model, **common)
        data_cfg = {"path": str(texts.resolve()), "calibration_samples": 2 * c, "verify_samples": 2 * s}
        info = {"task": "retrieval", "metric": "recall@1", "records": len(pairs), "calibration": c, "selection": s,
                "test": t, "unit": "pairs (each text encoded on its own)"}
        out = SearchData("retrieval", cal_ds, EvalSet(sel_ds, queries=s), EvalSet(test_ds, queries=t), data_cfg, info)
    else:
        ds = load_data(path, model, **common)
        n = len(ds)
        c, s, t = _sizes(n, calibration, selection, test, 128)
        perm = np.random.default_rng(cfg.seed).permutation(n)
        lab = load_labels(labels, n) if labels is not None else None
        parts = [perm[:c], perm[c:c + s], perm[c + s:c + s + t]]
        sets = [EvalSet(ds.subset(p), lab[p] if lab is not None else None) for p in parts[1:]]
        task = "callable" if metric is not None else ("labels" if lab is not None else "agreement")
        data_cfg = {"path": str(path.resolve()), "calibration_samples": c, "verify_samples": s}
        info = {"task": task, "metric": {"labels": "accuracy", "callable": "metric()", "agreement": "agreement"}[task],
                "records": n, "calibration": c, "selection": s, "test": t, "unit": "samples"}
        out = SearchData(task, ds.subset(parts[0]), sets[0], sets[1], data_cfg, info)
    for k in ("tokenizer",):
        if common[k] is not None:
            out.data_config[k] = str(Path(common[k]).resolve())
    for k in ("max_length", "mean", "std", "normalize", "seed", "batch_size"):
        out.data_config[k] = getattr(cfg, k)
    out.info.update({"description": out.calibration.description, "seed": cfg.seed, "source": str(path)})
    return out
