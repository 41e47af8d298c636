"""Method options checked against their annotations: types, `Literal` choices and `Annotated` ranges.

A method declares each option once, in its signature, e.g. `n_samples: Annotated[int, Range(min=1)] = 16`
or `rule: Literal["gausslegendre", "riemann_left"] = "gausslegendre"`. From that annotation this module
parses a command-line string (`--set smoothgrad.n_samples=32`), checks a Python value, and describes the
option for listings (`saliencylab methods`, a web form). Supported: bool, int, float, str, None, `Literal`,
unions (`X | Y`), `tuple[X, ...]` (comma-separated on the command line), `torch.Tensor` (Python only) and
`Annotated[X, Range(...)]` or `Annotated[int, Odd()]`; any other annotation is passed through unchecked.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from saliencylab.errors import UserError

_NONE_WORDS = ("none", "null")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric option, as `Annotated` metadata: `Annotated[int, Range(min=1)]`.

    Attributes:
        min, max: bounds (None: unbounded).
        min_open, max_open: exclude the bound itself (p in (0, 1]: `Range(0, 1, min_open=True)`).
    """

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def contains(self, value: float) -> bool:
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)):
            return False
        return not (self.max is not None and (value > self.max or (self.max_open and value == self.max)))

    def describe(self) -> str:
        """'>= 1', '> 0', 'in (0, 1]'."""
        if self.min is not None and self.max is not None:
            lo, hi = "(" if self.min_open else "[", ")" if self.max_open else "]"
            return f"in {lo}{_num(self.min)}, {_num(self.max)}{hi}"
        if self.min is not None:
            return f"{'>' if self.min_open else '>='} {_num(self.min)}"
        if self.max is not None:
            return f"{'<' if self.max_open else '<='} {_num(self.max)}"
        return ""


@dataclass(frozen=True)
class Odd:
    """`Annotated` metadata: the integer must be odd (a filter with a centre pixel)."""


Count = Annotated[int, Range(min=1)]
"""An integer >= 1 (samples, steps, masks, pixels)."""
PassSize = Annotated[int, Range(min=1)] | None
"""Most samples per forward pass; None lets the method choose."""
NonNegative = Annotated[float, Range(min=0)]
"""A number >= 0 (noise levels, sigmas)."""


class OptionError(UserError, ValueError):
    """A method option with a value of the wrong type or out of its range: one line naming the option.

    A UserError (the CLI prints it and exits 2) and a ValueError (what Python callers expect).
    """


class Mismatch(Exception):
    """Internal: why a value does not fit an annotation (the caller adds which option)."""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _split(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """(base type, its Annotated metadata)."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        return base, tuple(meta)
    return tp, ()


def _members(tp: Any) -> tuple[Any, ...] | None:
    """The members of a union, or None for a non-union."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _is_tensor(tp: Any) -> bool:
    return getattr(tp, "__name__", "") == "Tensor" and getattr(tp, "__module__", "").startswith("torch")


def expects(tp: Any) -> str:
    """What a value of this annotation must be, in words: 'an integer >= 1', 'one of black, blur, or a number'."""
    base, meta = _split(tp)
    rng = " ".join(m.describe() for m in meta if isinstance(m, Range))
    members = _members(base)
    if members is not None:  # 'black, blur, a number, or a tensor'; 'an integer >= 1 or none'
        words = [_choices(m) if typing.get_origin(m) is Literal else expects(m) for m in members]
        words = [w for w in words if w]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])}{',' * (len(words) > 2)} or {words[-1]}"
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(base))
    if typing.get_origin(base) is tuple:
        return f"a comma-separated list of {_plural(expects(typing.get_args(base)[0]))}"
    word = {bool: "true or false", int: "an integer", float: "a number", str: "a name",
            type(None): "none"}.get(base)
    if word is None:
        word = "a tensor (from Python only)" if _is_tensor(base) else f"a {getattr(base, '__name__', base)}"
    if any(isinstance(m, Odd) for m in meta):
        word = word.replace("an integer", "an odd integer")
    return f"{word} {rng}".strip()


def _choices(tp: Any) -> str:
    return ", ".join(str(c) for c in typing.get_args(tp))


def _plural(text: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a name", "names")):
        if text.startswith(one):
            return many + text[len(one):]
    return text


def parse(tp: Any, text: str) -> Any:
    """A command-line string -> a value of the annotation, or Mismatch with the reason."""
    base, meta = _split(tp)
    members = _members(base)
    if members is not None:
        # None first, then the narrowest types: '1' is an int before a float, a float before a name
        order = sorted(members, key=lambda m: _PARSE_ORDER.get(_split(m)[0], _PARSE_ORDER.get(
            typing.get_origin(_split(m)[0]), 9)))
        reasons = []
        for m in order:
            try:
                return _check_meta(parse(m, text), meta)
            except Mismatch as err:
                reasons.append(str(err))
        # a value of the right kind that failed a range says more than "not a number"; "not none" says least
        raise Mismatch(next((r for r in reasons if "out of range" in r),
                            next((r for r in reasons if not r.endswith("is not none")), reasons[0])))
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if text not in [str(c) for c in choices]:
            raise Mismatch(f"'{text}' is not a choice")
        return next(c for c in choices if str(c) == text)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        parts = [p.strip() for p in text.split(",")]
        return _check_meta(tuple(parse(item, p) for p in parts), meta)
    if base is type(None):
        if text.strip().lower() not in _NONE_WORDS:
            raise Mismatch(f"'{text}' is not none")
        return None
    if base is bool:
        if text.strip().lower() not in _TRUE + _FALSE:
            raise Mismatch(f"'{text}' is not true or false")
        return text.strip().lower() in _TRUE
    if base is int:
        try:
            value = int(text.strip())
        except ValueError:
            raise Mismatch(f"'{text}' is not {'an integer' if _is_float(text) else 'a number'}") from None
        return _check_meta(value, meta)
    if base is float:
        try:
            value = float(text.strip())
        except ValueError:
            raise Mismatch(f"'{text}' is not a number") from None
        return _check_meta(_finite(value), meta)
    if base is str:
        if not text.strip():
            raise Mismatch("the value is empty")
        return text
    if _is_tensor(base):
        raise Mismatch(f"'{text}' is not a tensor (tensors can be passed from Python only)")
    return text  # an annotation we do not know: pass the text through


_PARSE_ORDER = {type(None): 0, bool: 1, Literal: 2, int: 3, float: 4, tuple: 5, str: 6}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise Mismatch(f"{value} is not a finite number")
    return value


def _check_meta(value: Any, meta: tuple[Any, ...]) -> Any:
    for m in meta:
        if isinstance(m, Range) and not m.contains(value):
            raise Mismatch(f"{value!r} is out of range")
        if isinstance(m, Odd) and value % 2 != 1:
            raise Mismatch(f"{value!r} is even")
    return value


def check(tp: Any, value: Any) -> Any:
    """Check a Python value against the annotation; return it unchanged, or raise Mismatch with the reason."""
    base, meta = _split(tp)
    members = _members(base)
    if members is not None:
        reasons = []
        for m in members:
            try:
                return _check_meta(check(m, value), meta)
            except Mismatch as err:
                reasons.append(str(err))
        raise Mismatch(next((r for r in reasons if "out of range" in r), f"{value!r} is not allowed"))
    if typing.get_origin(base) is Literal:
        if not isinstance(value, str | int) or value not in typing.get_args(base):
            raise Mismatch(f"{value!r} is not a choice")
        return value
    if typing.get_origin(base) is tuple:
        if not isinstance(value, tuple | list):
            raise Mismatch(f"{value!r} is not a tuple")
        item = typing.get_args(base)[0]
        for v in value:
            check(item, v)
        return _check_meta(value, meta)
    if base is type(None):
        if value is not None:
            raise Mismatch(f"{value!r} is not None")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise Mismatch(f"{value!r} is not true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise Mismatch(f"{value!r} is not an integer")
        return _check_meta(value, meta)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise Mismatch(f"{value!r} is not a number")
        _finite(float(value))
        return _check_meta(value, meta)
    if base is str:
        if not isinstance(value, str) or not value:
            raise Mismatch(f"{value!r} is not a non-empty string")
        return value
    if _is_tensor(base):
        import torch

        if not isinstance(value, torch.Tensor):
            raise Mismatch(f"{type(value).__name__} is not a tensor")
        return value
    return value


def describe(tp: Any) -> dict[str, Any]:
    """Machine-readable description: expects (words), choices (Literal strings), min/max, nullable, odd."""
    out: dict[str, Any] = {"expects": expects(tp), "choices": [], "nullable": False}
    out["odd"] = False

    def walk(t: Any) -> None:
        base, meta = _split(t)
        for m in meta:
            if isinstance(m, Range):
                out.update({"min": m.min, "max": m.max, "min_open": m.min_open, "max_open": m.max_open})
            out["odd"] = out["odd"] or isinstance(m, Odd)
        members = _members(base)
        if members is not None:
            for m in members:
                walk(m)
        elif typing.get_origin(base) is Literal:
            out["choices"] += [c for c in typing.get_args(base) if c not in out["choices"]]
        elif typing.get_origin(base) is tuple:
            walk(typing.get_args(base)[0])
        elif base is type(None):
            out["nullable"] = True

    walk(tp)
    return out
