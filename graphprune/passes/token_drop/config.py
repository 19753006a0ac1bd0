"""``token_drop``'s YAML keys (:class:`TokenDropConfig`) and the record of one reduction (:class:`TokenReduction`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pydantic

from graphprune.passes.base import PassConfig, Rewrite


class TokenDropConfig(PassConfig):
    """YAML keys of ``token_drop``."""

    method: Literal["cls_attention", "attention_graph", "tome", "diversity", "hiprune"] = "cls_attention"
    keep_ratio: float = 0.7
    layers: list[int] | None = None
    r: int = 8
    schedule: Literal["constant", "pyramid"] | list[float] | dict[str, float] = "constant"
    stages: int = 3
    protect: int | None = None
    keep_order: bool = True
    fuse_rest: bool = False
    placement: Literal["mlp", "block"] = "mlp"
    query: Literal["auto", "cls", "last", "mean"] | tuple[int, int] = "auto"
    iterations: int = 3
    restore: bool | None = None
    scope: Literal["all", "image"] = "all"
    stage: Literal["projector", "decoder"] = "projector"
    anchor_share: float | None = None

    @pydantic.field_validator("anchor_share")
    @classmethod
    def _share(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"anchor_share must be in (0, 1], got {v}")
        return v

    @pydantic.field_validator("keep_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {v}")
        return v

    @pydantic.field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError(f"layers must be distinct non-negative block indices, got {v}")
        return sorted(v) if v is not None else None

    @pydantic.field_validator("r", "iterations")
    @classmethod
    def _nonneg(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be ≥ 0, got {v}")
        return v

    @pydantic.field_validator("protect")
    @classmethod
    def _protect(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"protect must be ≥ 0, got {v}")
        return v

    @pydantic.field_validator("query")
    @classmethod
    def _query(cls, v):
        if isinstance(v, tuple) and not 0 <= v[0] < v[1]:
            raise ValueError(f"query rows [start, stop) need 0 ≤ start < stop, got {list(v)}")
        return v

    @pydantic.field_validator("schedule")
    @classmethod
    def _schedule(cls, v):
        if isinstance(v, list) and not all(0.0 < x <= 1.0 for x in v):
            raise ValueError(f"every ratio in a schedule list must be in (0, 1], got {v}")
        if isinstance(v, dict):
            if set(v) != {"flops"} or not 0.0 < v["flops"] <= 1.0:
                raise ValueError(f"a budget schedule is {{flops: F}} with F in (0, 1], got {v}")
        return v


@dataclasses.dataclass(frozen=True)
class TokenReduction(Rewrite):
    """One block whose stream was reduced: token counts before and after, and a note (e.g. scores recomputed)."""

    layer: int
    tokens_before: int | str
    tokens_after: int | str
    method: str
    note: str | None = None
    scores: str | None = None


__all__ = ["TokenDropConfig", "TokenReduction"]
