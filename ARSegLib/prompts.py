"""What a user tells the model about one object, as types rather than bare points.

A click is an include point: a new object, or a redo when it falls inside one. A refinement steers the samples of
an object already segmented: extra include points ("it reaches here"), exclude points ("not this"), one of its
samples taken as the result, or the coarse scales 1..k of one sample kept while only the finer scales are drawn
again. Every front end (Slicer, the console, `arseg segment/batch`, the page, the worker protocol) speaks these
types; pipeline.py acts on them. Pure data: no torch, no MRML."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

INCLUDE = "include"
EXCLUDE = "exclude"
PROMPT_KINDS = (INCLUDE, EXCLUDE)


class PromptError(ValueError):
    """A prompt or refinement that cannot be acted on; the message says which field and why."""


def _point3(point, what: str) -> Tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in point)
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be three numbers R, A, S in millimetres, got {point!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise PromptError(f"{what} must be three finite numbers R, A, S in millimetres, got {point!r}")
    return values


@dataclass(frozen=True)
class Prompt:
    """One point the user placed, in RAS millimetres, and what it means."""

    kind: str  # INCLUDE or EXCLUDE
    point_ras: Tuple[float, float, float]

    def __post_init__(self):
        if self.kind not in PROMPT_KINDS:
            raise PromptError(f"a prompt's kind is one of {', '.join(PROMPT_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "point_ras", _point3(self.point_ras, f"the {self.kind} point"))

    def to_dict(self, digits: Optional[int] = 3) -> Dict[str, Any]:
        """digits: the point rounded for a report; None keeps it exact (the worker protocol)."""
        return {"kind": self.kind, "point_ras": [v if digits is None else round(v, digits) for v in self.point_ras]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Prompt:
        return cls(kind=d["kind"], point_ras=tuple(d["point_ras"]))


def include(point_ras) -> Prompt:
    return Prompt(INCLUDE, tuple(point_ras))


def exclude(point_ras) -> Prompt:
    return Prompt(EXCLUDE, tuple(point_ras))


@dataclass(frozen=True)
class Refinement:
    """How a refinement steers an object's samples. The fields combine; an empty refinement is no refinement.

    lock_scales = k keeps the token maps of scales 1..k of the source sample on every plane and draws only the
    finer scales; the source is sample `from_sample` (1-based), or, when None, the most typical sample (the one
    whose mask agrees best with the consensus). use_sample = i makes sample i (1-based) the result, no model run."""

    prompts: Tuple[Prompt, ...] = ()
    lock_scales: int = 0
    from_sample: Optional[int] = None
    use_sample: Optional[int] = None

    def __post_init__(self):
        prompts = tuple(p if isinstance(p, Prompt) else Prompt.from_dict(p) for p in self.prompts)
        object.__setattr__(self, "prompts", prompts)
        for name in ("lock_scales", "from_sample", "use_sample"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise PromptError(f"{name} must be a whole number, got {v!r}")
        if self.lock_scales < 0:
            raise PromptError(f"lock_scales must be 0 or more, got {self.lock_scales}")
        for name in ("from_sample", "use_sample"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PromptError(f"{name} counts samples from 1, got {v}")
        if self.from_sample is not None and not self.lock_scales:
            raise PromptError("from_sample names the sample whose coarse scales are kept: give lock_scales too")
        if self.use_sample is not None and (self.prompts or self.lock_scales):
            raise PromptError("use_sample takes one sample as it is: it does not combine with points or locked scales")

    @property
    def empty(self) -> bool:
        return not self.prompts and not self.lock_scales and self.use_sample is None

    def points(self, kind: str) -> Tuple[Tuple[float, float, float], ...]:
        return tuple(p.point_ras for p in self.prompts if p.kind == kind)

    def check_against(self, n_scales: int, n_samples: int) -> Refinement:
        """The model- and result-dependent limits, checked before any work."""
        if self.lock_scales >= n_scales:
            raise PromptError(f"lock_scales keeps scales 1..k and draws the finer ones again: k must be below the "
                              f"model's {n_scales} scales, got {self.lock_scales}")
        for name in ("from_sample", "use_sample"):
            v = getattr(self, name)
            if v is not None and v > n_samples:
                raise PromptError(f"{name} {v} does not exist: the result has {n_samples} samples")
        return self

    def to_dict(self, digits: Optional[int] = 3) -> Dict[str, Any]:
        d: Dict[str, Any] = {"prompts": [p.to_dict(digits) for p in self.prompts]}
        for name in ("lock_scales", "from_sample", "use_sample"):
            if getattr(self, name):
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Refinement:
        return cls(prompts=tuple(Prompt.from_dict(p) for p in d.get("prompts", ())),
                   lock_scales=int(d.get("lock_scales", 0)), from_sample=d.get("from_sample"),
                   use_sample=d.get("use_sample"))


def refinement(include_points: Sequence = (), exclude_points: Sequence = (), lock_scales: int = 0,
               from_sample: Optional[int] = None, use_sample: Optional[int] = None) -> Refinement:
    """The console's spelling: points as (R, A, S) triples."""
    return Refinement(prompts=tuple([include(p) for p in include_points] + [exclude(p) for p in exclude_points]),
                      lock_scales=lock_scales, from_sample=from_sample, use_sample=use_sample)


@dataclass
class PromptHistory:
    """The prompts that made an object, in order: its click, then each refinement (shown in the report)."""

    click_ras: Tuple[float, float, float]
    refinements: list = field(default_factory=list)  # [Refinement]

    def to_list(self):
        return [{"kind": "click", "point_ras": [round(v, 3) for v in self.click_ras]}] + \
               [r.to_dict() for r in self.refinements]
