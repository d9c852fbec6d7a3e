"""Settings dataclasses that check themselves, so a notebook user gets the same errors as the CLI.

Every recipe's settings derive from `Settings`: on construction each field is checked against
its annotation (int, float, bool, str, a Literal's choices, optional values, nested settings)
and the bounds declared with `setting(...)`; a bad value raises SettingsError naming the field.
The flows' YAML profiles validate these same classes (pydantic accepts dataclasses as they are),
so each option, its default, its allowed values and its help text are declared once, here.
"""

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from .errors import GptflowError


class SettingsError(GptflowError, ValueError):
    """A setting out of its allowed range. A ValueError too, so pydantic reports it with the key's path."""


def setting(default: Any = MISSING, *, doc: str = "", ge: float | None = None, gt: float | None = None,
            lt: float | None = None, default_factory: Any = MISSING):
    """A dataclass field with its help text and bounds (checked by Settings on construction)."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "lt": lt}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def type_name(annotation) -> str:
    """How an error message names what a setting accepts: 'bool or one of 'auto'', 'int or null'."""
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@dataclass(frozen=True)
class Settings:
    """Base of every settings dataclass: type and bound checks in __post_init__."""

    # Read by pydantic when a profile validates these dataclasses: unknown keys are errors.
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise SettingsError(f"{f.name} must be {type_name(hints[f.name])}, got {value!r}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._check_bounds(f, value)

    @staticmethod
    def _check_bounds(f, value):
        meta = f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{f.name} must be a finite number, got {value}")
        if meta.get("gt") is not None and not value > meta["gt"]:
            raise SettingsError(f"{f.name} must be greater than {meta['gt']}, got {value}")
        if meta.get("ge") is not None and not value >= meta["ge"]:
            raise SettingsError(f"{f.name} must be at least {meta['ge']}, got {value}")
        if meta.get("lt") is not None and not value < meta["lt"]:
            raise SettingsError(f"{f.name} must be less than {meta['lt']}, got {value}")
