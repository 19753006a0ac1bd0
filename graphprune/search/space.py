"""The search space: which passes a trial may use, and the values each config key may take.

YAML (``--space``); every pass is a registry name and every key a field of that pass's typed config, so an option a
pass gains joins the space by one line::

    passes:                       # pipeline order: a trial runs the chosen passes in this order, then cleanup
      channel_prune:
        optional: true            # a trial may leave the pass out (default true); false: every trial runs it
        params:
          ratio: {low: 0.05, high: 0.5, step: 0.05}    # a range (float; int when low/high/step are ints; log: true)
          allocate: [sensitivity, score]               # a choice (values may be lists, e.g. token_drop layers)
          round_to: 8                                  # a fixed value
      token_drop:
        params:
          keep_ratio: {low: 0.5, high: 0.95, step: 0.05}

A space naming an unknown pass or key, a malformed range or choice, or a value the pass's config refuses, is a
``ConfigError`` (one line naming it) before any trial runs. A trial that picks no pass, or a combination the
configs refuse together, is pruned with the reason recorded.

:func:`default_space` derives the space from the model (``inspect``): depth pruning (blocks or branches, up to
:data:`DEPTH_MAX_RATIO`) where at least three blocks are removable, channel pruning where channel groups are
prunable (a vision transformer's embedding width kept, ``ignore_stem: true``: a ``--space`` may offer
``[auto, true]``), token drop where attention blocks are found (in a vision-language model: image tokens only, at the
projector, with each scoring method), sparse attention only where the data's sequences reach
:data:`SPARSE_MIN_TOKENS` (below that, measured, dense attention is cheaper); what it leaves out says why.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic
import yaml

from graphprune.errors import ConfigError
from graphprune.passes import get_pass

#: Sequences shorter than this gain nothing from sparse attention on ORT CPU (MEASURED.md: the blocked patterns win
#: from N ≈ 1024).
SPARSE_MIN_TOKENS = 1024

#: The largest share of blocks (or branches) the default space removes: beyond a third, the training-free loss on
#: MiniLM passed 5% of recall (docs/benchmarks.md, MiniLM: depth pruning).
DEPTH_MAX_RATIO = 0.35


@dataclasses.dataclass(frozen=True)
class Param:
    """One config key of one pass: a range (``low``/``high``/``step``/``log``), a choice, or a fixed value."""

    key: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple | None = None
    fixed: Any = None

    def to_yaml(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        if self.low is not None:
            d = {"low": self.low, "high": self.high}
            if self.step is not None:
                d["step"] = self.step
            if self.log:
                d["log"] = True
            return d
        return self.fixed

    def edges(self) -> list[Any]:
        """The values checked against the config when the space is loaded."""
        if self.choices is not None:
            return list(self.choices)
        if self.low is not None:
            return [self.low, self.high]
        return [self.fixed]

    def suggest(self, trial: Any, name: str) -> Any:
        if self.choices is not None:
            enc = [_encode(c) for c in self.choices]
            return _decode(trial.suggest_categorical(name, enc))
        if self.low is not None:
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1)):
                return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
            v = trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)
            return round(v, 10)  # 0.85, not 0.8500000000000001
        return self.fixed


def _encode(v: Any) -> Any:
    """Optuna choices are scalars: lists and mappings travel as JSON text."""
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


def _decode(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":
        return json.loads(v)
    return v


@dataclasses.dataclass(frozen=True)
class PassSpace:
    name: str
    optional: bool
    params: tuple[Param, ...]


@dataclasses.dataclass(frozen=True)
class Space:
    """An ordered list of pass spaces, plus what the default space left out and why."""

    passes: tuple[PassSpace, ...]
    excluded: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"passes": {p.name: {"optional": p.optional, "params": {q.key: q.to_yaml() for q in p.params}}
                           for p in self.passes}}

    def sample(self, trial: Any) -> list[dict]:
        """The pipeline entries of one Optuna trial (``[]`` when it picked no pass)."""
        entries = []
        for p in self.passes:
            if p.optional and not trial.suggest_categorical(f"{p.name}.use", [True, False]):
                continue
            entry = {"name": p.name}
            for q in p.params:
                entry[q.key] = q.suggest(trial, f"{p.name}.{q.key}")
            entries.append(entry)
        return entries


def _param(pass_name: str, key: str, spec: Any) -> Param:
    where = f"space: passes.{pass_name}.params.{key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty choice list")
        return Param(key, choices=tuple(spec))
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"low", "high", "step", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: a range is {{low, high[, step][, log]}}"
                              + (f"; unknown key {unknown[0]!r}" if unknown else ""))
        low, high, step = spec["low"], spec["high"], spec.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high, step or 1)):
            raise ConfigError(f"{where}: low, high and step must be numbers")
        if low > high or (step is not None and step <= 0):
            raise ConfigError(f"{where}: needs low ≤ high and step > 0 (got {low}, {high}, {step})")
        return Param(key, low=low, high=high, step=step, log=bool(spec.get("log", False)))
    return Param(key, fixed=spec)


def _check_pass(name: str, params: tuple[Param, ...]) -> None:
    try:
        cls = get_pass(name)
    except ConfigError as e:
        raise ConfigError(f"space: {e}") from None
    fields = cls.Config.model_fields
    names = set(fields) | {f.alias for f in fields.values() if f.alias}
    for q in params:
        if q.key not in names:
            allowed = ", ".join(sorted(f.alias or k for k, f in fields.items()))
            raise ConfigError(f"space: passes.{name}: unknown key {q.key!r} (the {name} config has: {allowed})")
        for value in q.edges():
            try:
                cls.Config.model_validate({q.key: value})
            except pydantic.ValidationError as e:
                msg = e.errors()[0]["msg"]
                raise ConfigError(f"space: passes.{name}.params.{q.key}: value {value!r} refused: {msg}") from None


def from_dict(data: Any, source: str = "space") -> Space:
    """Validate a space mapping (the YAML format in the module docstring)."""
    if not isinstance(data, Mapping) or set(data) != {"passes"} or not isinstance(data["passes"], Mapping):
        raise ConfigError(f"{source}: top level must be a mapping with one key 'passes' (pass name → settings)")
    if not data["passes"]:
        raise ConfigError(f"{source}: passes: names no pass")
    out = []
    for name, settings in data["passes"].items():
        settings = settings or {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{source}: passes.{name}: expected a mapping with 'params' (and 'optional')")
        unknown = sorted(set(settings) - {"optional", "params"})
        if unknown:
            raise ConfigError(f"{source}: passes.{name}: unknown key {unknown[0]!r} (allowed: optional, params)")
        raw = settings.get("params") or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: passes.{name}.params: expected a mapping of config keys")
        params = tuple(_param(str(name), str(k), v) for k, v in raw.items())
        try:
            _check_pass(str(name), params)
        except ConfigError as e:
            raise ConfigError(str(e).replace("space:", f"{source}:", 1)) from None
        out.append(PassSpace(str(name), bool(settings.get("optional", True)), params))
    return Space(tuple(out))


def load_space(path: str | Path) -> Space:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {getattr(e, 'problem', e)}") from None
    return from_dict(data, str(path))


def default_space(model: Any, max_tokens: int | None = None) -> Space:
    """The space ``inspect`` facts allow on ``model`` (see the module docstring); ``max_tokens``: the longest
    sequence in the data (None: not a sequence model's data)."""
    from graphprune.analysis.attention import find_attention_blocks
    from graphprune.analysis.channels import analyze_channels
    from graphprune.analysis.depth import residual_blocks
    from graphprune.analysis.vision_language import find_vision_language

    passes: dict[str, Any] = {}
    excluded = []
    blocks = find_attention_blocks(model)
    removable = sum(1 for rb in residual_blocks(model, blocks) if rb)
    groups = analyze_channels(model).groups
    if any(g.prunable for g in groups):
        passes["channel_prune"] = {"params": {"ratio": {"low": 0.05, "high": 0.5, "step": 0.05},
                                              "allocate": ["sensitivity", "score"]}}
        if any(g.prunable and g.stem for g in groups):  # ignore_stem: auto prunes only a ViT's embedding width
            # a ViT's embedding width stays whole unless the space says otherwise: offered on the digits ViT (120
            # selection images), the search chose a width-pruned model that kept all of them and lost 1.5 points of
            # test accuracy; heads, MLPs and token drop alone stayed within 0.5 (docs/search.md)
            passes["channel_prune"]["params"]["ignore_stem"] = True
    else:
        excluded.append("channel_prune: no prunable channel group")
    vl = find_vision_language(model, blocks) if blocks else None
    if vl is not None:  # image tokens only: every text token stays
        passes["token_drop"] = {"params": {"scope": "image", "keep_ratio": {"low": 0.05, "high": 0.5, "step": 0.05},
                                           "method": ["cls_attention", "diversity", "hiprune"],
                                           "query": ["auto", "mean"]}}
        excluded.append("token_drop: image tokens only, after the projector (a vision-language model; the decoder "
                        "stage goes in a --space); sparse_attention: not on a vision-language model's short prefill")
    elif blocks:
        n = len(blocks)
        starts = sorted({max(1, n // 4), max(1, n // 3), max(1, n // 2)})
        passes["token_drop"] = {"params": {"keep_ratio": {"low": 0.5, "high": 0.95, "step": 0.05},
                                           "layers": [list(range(s, n)) for s in starts]}}
        if max_tokens is not None and max_tokens >= SPARSE_MIN_TOKENS:
            passes["sparse_attention"] = {"params": {"pattern": ["sliding_window"], "window": [256, 512]}}
        else:
            excluded.append(f"sparse_attention: sequences of {max_tokens or 'unknown'} tokens are under "
                            f"{SPARSE_MIN_TOKENS}, where dense attention is cheaper")
    else:
        excluded.append("token_drop, sparse_attention: no attention block found")
    if removable >= 3:  # last in the pipeline: the earlier passes' block indices stay valid, and a block a token
        # drop rewrote is no longer a pair of residual branches (skipped; the others may still go)
        passes["depth_prune"] = {"params": {"ratio": {"low": 0.1, "high": DEPTH_MAX_RATIO, "step": 0.05},
                                            "unit": ["block", "sublayer"]}}
    else:
        excluded.append(f"depth_prune: {removable} removable transformer blocks (needs 3)")
    if not passes:
        raise ConfigError("the model offers nothing to search: " + "; ".join(excluded))
    space = from_dict({"passes": passes}, "default space")
    return Space(space.passes, tuple(excluded))
