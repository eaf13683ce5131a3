"""Command-line options generated from a flow's typed parameters: one option per field, with the field's
default and description, so the command line, the Prefect form and the validation cannot disagree.

The options only carry text and numbers to the params model; pydantic checks them there (one message for a
bad value, whether it came from the CLI, the Prefect form or `deploy --param`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

# A field's option under another spelling than --field-name (one flag pair reads better than --use-gpu)
CLI_NAMES: dict[str, tuple[str, ...]] = {"use_gpu": ("--gpu/--cpu",)}


def choices(annotation: Any) -> tuple[str, ...]:
    """The values of a Literal field, () for any other."""
    return tuple(typing.get_args(annotation)) if typing.get_origin(annotation) is Literal else ()


def is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def cli_help(field: FieldInfo) -> str:
    """The field's description, plus the allowed values of a Literal or the list syntax."""
    text = field.description or ""
    if allowed := choices(field.annotation):
        text += f" (one of: {', '.join(allowed)})"  # not [...]: typer's rich help would read it as markup
    if is_list(field.annotation):
        text += " (comma-separated)"
    return text


def cli_default(field: FieldInfo) -> Any:
    default = field.get_default(call_default_factory=True)
    return ",".join(default) if is_list(field.annotation) else default


def cli_type(annotation: Any) -> Any:
    """What typer parses: a Literal or a list arrives as text, the rest as its own type."""
    if choices(annotation) or is_list(annotation):
        return str
    return annotation


def option_parameters(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``model`` (but ``exclude``), annotated with its typer option."""
    parameters = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        option = typer.Option(*CLI_NAMES.get(name, ()), help=cli_help(field))
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=cli_default(field),
                                            annotation=Annotated[cli_type(field.annotation), option]))
    return parameters


def from_cli(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """The options' values as the model's fields take them: a comma-separated list split (empty = default)."""
    out = dict(values)
    for name, field in model.model_fields.items():
        if name in out and is_list(field.annotation):
            items = [item.strip() for item in str(out[name]).split(",") if item.strip()]
            out[name] = items or None
    return out


def params_command(model: type[BaseModel], body: Callable[..., None], *, extra: list[inspect.Parameter],
                   exclude: tuple[str, ...] = ()) -> Any:
    """A typer command function whose options are ``model``'s fields (but ``exclude``, which keep their
    defaults) plus ``extra`` (e.g. --home): typer reads its signature. ``body(values, **extra)`` gets the
    fields' values as the model takes them."""
    parameters = option_parameters(model, exclude) + extra
    extra_names = {p.name for p in extra}

    def command(**kwargs: Any) -> None:
        values = {k: v for k, v in kwargs.items() if k not in extra_names}
        body(from_cli(model, values), **{k: kwargs[k] for k in extra_names})

    command.__name__ = body.__name__
    command.__doc__ = body.__doc__
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command
