"""Help pages that read like a manual: click-style metavars instead of typer's `<bool>`, `<list[str]>` and
`{out}`, and defaults written into the help text (where they wrap) instead of a column that truncates them.

Use `HelpTyper` in place of `typer.Typer`; every command it registers gets `HelpCommand`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

_NAMES = {str: "TEXT", int: "INTEGER", float: "NUMBER", bool: "BOOLEAN"}


def metavar(annotation: Any) -> str:
    """The word shown for a value: TEXT, INTEGER, NUMBER, PATH; a list shows its element's word."""
    if get_origin(annotation) in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return metavar(args[0]) if args else "TEXT"
    if isinstance(annotation, type):
        if issubclass(annotation, os.PathLike):
            return "PATH"
        if issubclass(annotation, enum.Enum):
            return "|".join(str(m.value) for m in annotation)
        return _NAMES.get(annotation, annotation.__name__.upper())
    return "TEXT"


def default_text(param: TyperOption | TyperArgument) -> str | None:
    """The default as the user would type it, or None where there is nothing worth showing."""
    value = param.default
    if value is None or callable(value):
        return None
    if isinstance(param, TyperOption) and param.is_bool_flag:
        if param.secondary_opts:
            return (param.opts if value else param.secondary_opts)[-1].lstrip("-")
        return None  # a plain flag is off unless given
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or None
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _escape(text: str) -> str:
    try:
        from rich.markup import escape
    except ImportError:  # plain click help: no markup to escape
        return text
    return escape(text)


class HelpOption(TyperOption):
    """An option whose type column shows a click-style word (nothing for a flag)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_bool_flag:
            return None
        return self.metavar or metavar(self.type_descriptor.annotation)


class HelpArgument(TyperArgument):
    """An argument named in capitals (OUT, INPUTS...) in the usage line and the arguments panel."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _rich_display_name(self) -> str:
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        name = self._rich_display_name()
        return name if self.required else f"[{name}]"


def tidy(param: Any) -> None:
    """Give a typer parameter the help look above (in place): class, metavar, default in the help text."""
    if isinstance(param, TyperOption):
        param.__class__ = HelpOption
    elif isinstance(param, TyperArgument):
        param.__class__ = HelpArgument
        if param.metavar is None:
            param.metavar = param.name.upper()
    else:
        return
    shown = default_text(param) if param.show_default is True else None
    if shown is not None:
        param.help = f"{param.help or ''}  " + _escape(f"[default: {shown}]")
    if not isinstance(param.show_default, str):
        param.show_default = False


class _Tidy:
    """Mixin for click commands: `tidy` every parameter, the --help option included."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            tidy(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            tidy(option)
        return option


class HelpCommand(_Tidy, TyperCommand):
    """A typer command whose parameters get `tidy`'s help look."""


class HelpGroup(_Tidy, TyperGroup):
    """The top-level group, with the same help look."""


def fold_parameter_help() -> None:
    """Render each parameter's help (text, env var, default, required) as one Text that wraps and folds long
    words, instead of typer's rich `Columns`, which cuts a word wider than the column with an ellipsis."""
    try:
        from rich.columns import Columns
        from rich.text import Text
        from typer import rich_utils
    except ImportError:  # no rich: click's plain help wraps by itself
        return
    original = rich_utils._get_parameter_help
    if getattr(original, "folds", False):
        return

    def folded(*args: Any, **kwargs: Any) -> Any:
        cell = original(*args, **kwargs)
        parts = getattr(cell, "renderables", None) if isinstance(cell, Columns) else None
        if not parts or not all(isinstance(p, Text) for p in parts):
            return cell
        text = Text(overflow="fold")
        for i, part in enumerate(parts):
            text.append_text(Text(" ") if i else Text())
            text.append_text(part)
        return text

    folded.folds = True  # type: ignore[attr-defined]
    rich_utils._get_parameter_help = folded
    for name in ("highlighter", "negative_highlighter"):  # option names fold too, on a narrow terminal
        setattr(rich_utils, name, _Folding(getattr(rich_utils, name)))


class _Folding:
    """Wraps a rich highlighter so that the Text it returns folds instead of ending in an ellipsis."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, text: Any) -> Any:
        out = self.inner(text)
        out.overflow = "fold"
        return out


class HelpTyper(typer.Typer):
    """`typer.Typer` whose group is `HelpGroup` and whose commands default to `HelpCommand`."""

    def __init__(self, *args: Any, cls: type[TyperGroup] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, cls=cls or HelpGroup, **kwargs)
        fold_parameter_help()

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Callable[[Any], Any]:
        return super().command(*args, cls=cls or HelpCommand, **kwargs)
