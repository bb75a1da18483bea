"""The page's state values the server reads, checked: trame shares one state among a server's clients, and any
of them (the page's own console: `window.trame.state.set('disagreement_opacity', [1])`) can set any key to
anything. A value the server would act on is checked here first; a bad one is refused with one line on the page
and the key is set back to the last good value, so it cannot break later clicks for everyone.

No trame here: the checks are plain functions (tested without a browser) and the last good values a dataclass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Collection

from .review import ReviewError

MAX_TEXT = 200  # a typed point is a few dozen characters; longer text is not echoed back to every page


def shown(value: Any) -> str:
    """A value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ReviewError(f"{name} is on or off (true or false), got {shown(value)}")


def as_fraction(name: str, value: Any) -> float:
    """A finite number from 0 to 1 (an opacity)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    raise ReviewError(f"{name} is a number from 0 to 1, got {shown(value)}")


def as_index(name: str, value: Any, low: int, high: int) -> int:
    """A whole number from low to high (a number with nothing after the point counts; text does not)."""
    if (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and float(value).is_integer() and low <= value <= high):
        return int(value)
    raise ReviewError(f"{name} is a whole number from {low} to {high}, got {shown(value)}")


def as_choice(name: str, value: Any, choices: Collection[str]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ReviewError(f"{name} is one of {', '.join(choices)}; got {shown(value)}")


def as_text(name: str, value: Any, max_len: int = MAX_TEXT) -> str:
    if isinstance(value, str) and len(value) <= max_len:
        return value
    raise ReviewError(f"{name} is text of at most {max_len} characters, got {shown(value)}")


def as_nodule_id(value: Any) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_TEXT:
        return value
    raise ReviewError(f"no such nodule: {shown(value)}")


@dataclass
class ViewChoices:
    """The last good value of each state key the server acts on (what it restores a refused value to)."""

    window_preset: str = "Auto"
    show_disagreement: bool = False
    disagreement_opacity: float = 0.5
    include_samples: bool = False
    scale: int = 0
    sample_shown: int = 0
    prompt_mode: str = "click"  # what a click on the CT does: PROMPT_MODES
    sample_pick: int = 0  # the sample "Use this sample" takes and a lock starts from; 0: the most typical
    input_shown: str = ""  # a case of several inputs: the input on show (its name); "" for one volume


# what a click on the CT does: a nodule's click (new, or a redo inside one), or a point refining the selected nodule
PROMPT_MODES = {"click": "Nodule", "include": "Include", "exclude": "Exclude"}
