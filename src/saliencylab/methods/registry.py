"""Name -> method registry. The CLI's choices, the README's table and the tests' parametrisation read it."""

from __future__ import annotations

import difflib
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from saliencylab.errors import UserError
from saliencylab.methods.options import Mismatch, OptionError, check, describe, expects, parse

Method = Callable[..., torch.Tensor]
Check = Callable[[Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name.
        fn: `(model, x[B, C, *spatial], target[B], **options) -> map[B, *spatial]`; checks its options.
        family: gradient, cam, perturbation or model-free (the order of listings).
        paper: where the method comes from.
        uses_model: False for model-free methods (spectral residual).
        display: the normalisation that shows it best ('minmax' for maps with a large offset, like RISE).
        consistency: checks that involve several options at once; returns a message or None.
    """

    name: str
    fn: Method
    family: str
    paper: str
    uses_model: bool = True
    display: str = "percentile"
    consistency: Check | None = None

    def options(self) -> dict[str, Any]:
        """Keyword-only options and their defaults."""
        sig = inspect.signature(self.fn)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def option_types(self) -> dict[str, Any]:
        """Keyword-only options and their annotations (`Annotated` ranges and `Literal` choices kept)."""
        return _option_types(self.fn)

    def parse_option(self, option: str, text: str) -> Any:
        """A command-line string for `option` -> a checked value; OptionError naming the option otherwise."""
        types = self.option_types()
        if option not in types:
            raise OptionError(f"{self.name} has no option '{option}'; it has {', '.join(types) or 'none'}")
        try:
            return parse(types[option], text)
        except Mismatch as err:
            raise OptionError(f"{self.name}.{option}={text}: {err}; "
                              f"{option} takes {expects(types[option])}") from None

    def check_option(self, option: str, value: Any) -> Any:
        """Check a Python value for `option` against its annotation; OptionError naming the option otherwise."""
        types = self.option_types()
        if option not in types:
            raise OptionError(f"{self.name} has no option '{option}'; it has {', '.join(types) or 'none'}")
        try:
            return check(types[option], value)
        except Mismatch as err:
            shown = value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
            raise OptionError(f"{self.name}({option}={shown!r}): {err}; "
                              f"{option} takes {expects(types[option])}") from None

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check every given option, then the rules between options (on the defaults merged in)."""
        for k, v in options.items():
            self.check_option(k, v)
        if self.consistency is not None:
            problem = self.consistency({**self.options(), **options})
            if problem:
                raise OptionError(f"{self.name}: {problem}")
        return dict(options)

    def describe_options(self) -> dict[str, dict[str, Any]]:
        """Per option: default, expects (words), choices, min/max, nullable (for listings and forms)."""
        defaults = self.options()
        return {k: {"default": _plain(defaults[k]), **describe(tp)} for k, tp in self.option_types().items()}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


@functools.cache
def _option_types(fn: Method) -> dict[str, Any]:
    raw = inspect.unwrap(fn)
    try:
        hints = typing.get_type_hints(raw, include_extras=True)
    except Exception:  # an annotation that cannot be evaluated at run time: leave those options unchecked
        hints = {}
    sig = inspect.signature(raw)
    return {n: hints.get(n, Any) for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, family: str, paper: str, uses_model: bool = True,
                    display: str = "percentile", consistency: Check | None = None) -> Callable[[Method], Method]:
    """Register `fn` under `name`; a duplicate name is an error.

    The registered function (and the name it is bound to in its module) checks its keyword options
    against their annotations on every call, so Python callers get the command line's checks.
    """

    def deco(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> torch.Tensor:
            spec.check_options({k: v for k, v in kwargs.items() if k in spec.option_types()})
            return fn(*args, **kwargs)

        spec = MethodSpec(name, checked, family, paper, uses_model, display, consistency)
        METHODS[name] = spec
        return checked

    return deco


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, with close-match suggestions in the error."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown method '{name}'.{hint} Choose from: {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(spec: str) -> list[MethodSpec]:
    """'vanilla,gradcam' -> specs, checked; 'all' -> every registered method."""
    names = list(METHODS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--methods is empty; name at least one method, e.g. --methods vanilla,gradcam")
    return [get_method(n) for n in names]


def parse_method_options(pairs: list[str], methods: list[MethodSpec],
                         batch_size: int | None = None) -> dict[str, dict[str, Any]]:
    """['smoothgrad.n_samples=32', ...] -> {'smoothgrad': {'n_samples': 32}}, each value parsed and checked
    against the option's annotation before any work starts.

    Args:
        pairs: METHOD.OPTION=VALUE strings (the CLI's repeated --set).
        methods: the methods that will run; an option for another method is an error.
        batch_size: a pass size for every method that takes `batch_size` (None: each method's default).

    Raises:
        UserError (OptionError for a bad value): one line naming the pair and what it takes.
    """
    opts: dict[str, dict[str, Any]] = {m.name: {} for m in methods}
    by_name = {m.name: m for m in methods}
    for spec in methods:
        if batch_size is not None and "batch_size" in spec.options():
            opts[spec.name]["batch_size"] = spec.check_option("batch_size", batch_size)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, option = key.strip().partition(".")
        if not sep or not dot:
            raise UserError(f"--set '{pair}': write METHOD.OPTION=VALUE, e.g. --set smoothgrad.n_samples=32")
        if method not in by_name:
            raise UserError(f"--set '{pair}': method '{method}' is not among --methods ({', '.join(by_name)})")
        spec = by_name[method]
        if option not in spec.options():
            known = ", ".join(spec.options()) or "none"
            raise UserError(f"--set '{pair}': {method} has no option '{option}'; it has {known}")
        try:
            opts[method][option] = spec.parse_option(option, value)
        except OptionError as err:
            raise OptionError(f"--set {err}") from None
    for spec in methods:
        try:
            spec.check_options(opts[spec.name])
        except OptionError as err:
            raise OptionError(f"--set {err}") from None
    return opts
