"""``graphprune search``: an Optuna study over pass configurations, a shared calibration cache, trials run here or
on Ray, honest (three-way split) evaluation, and a report. See ``docs/search.md``.

Modules: ``space`` (what a trial may choose), ``data`` (the split and the task), ``metrics`` (per-sample figures,
bootstrap intervals), ``evaluate`` (scoring and timing against the original), ``trial`` (one trial; the cache),
``engine`` (the ask/tell loop and the decision), ``_ray`` (trials as Ray tasks), ``report`` (trials.jsonl,
report.html), ``api`` (:func:`search`).
"""

from graphprune.search.api import SearchResult, search
from graphprune.search.space import Space, default_space, from_dict, load_space

__all__ = ["SearchResult", "Space", "default_space", "from_dict", "load_space", "search"]
