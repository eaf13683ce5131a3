"""How a config field becomes a user option: one declaration holds its type, default, help and bounds.

A knob is a field of the dataclass that uses it (``FitConfig`` in ``models.loop``, ``HeadConfig`` in
``models.net``, the Ray resources in ``infra.training.cluster``), declared with ``option(...)``. The flows'
typed parameters (``flows/params.py``: the Prefect form and validation) are generated from those fields, and
the CLI's options from the parameters, so adding a knob touches its dataclass and the code that uses it.
Pure stdlib: ``models`` stays free of pydantic.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

OPTION = "headbench.option"  # the key of a field's metadata that marks it as a user option


@dataclass(frozen=True)
class Option:
    """Help and bounds of a user option (the bounds are pydantic's: ge, gt, le, lt)."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None  # a string from this list (a drop-down in the Prefect form)

    def bounds(self) -> dict[str, float]:
        return {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(self, k)) is not None}


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that is also a user option: ``lr: float = option(0.01, "peak learning rate", gt=0)``."""
    return dataclasses.field(default=default, metadata={OPTION: Option(help, ge, gt, le, lt, choices)})


@dataclass(frozen=True)
class DeclaredOption:
    name: str
    type: Any  # the resolved annotation, e.g. ``int | None``
    default: Any
    option: Option


def declared_options(config: type) -> list[DeclaredOption]:
    """The fields of dataclass ``config`` declared with ``option``, in declaration order."""
    hints = typing.get_type_hints(config)
    return [DeclaredOption(f.name, hints[f.name], f.default, f.metadata[OPTION])
            for f in dataclasses.fields(config) if OPTION in f.metadata]


def option_values(config: type, source: Any) -> dict[str, Any]:
    """``{name: source.name}`` for every option of ``config``: what a params object holds of it."""
    return {o.name: getattr(source, o.name) for o in declared_options(config)}
