"""One source of truth for run options: every field of the typed flow parameters (the Prefect form) has
exactly one CLI option with the same default, and the CLI has no option the parameters lack."""

from __future__ import annotations

import pytest
import typer.main
from pydantic import BaseModel

from flows.cli import app
from flows.params import CompareParams, RetrainParams

CLI_ONLY = {"home", "verbose"}  # where the local stack lives, and what the terminal shows: not flow parameters
RENAMED = {"gpu": "use_gpu"}  # --gpu/--cpu sets use_gpu


@pytest.mark.parametrize("command, model", [("run", RetrainParams), ("compare", CompareParams)])
def test_every_field_has_one_option_with_the_same_default(command: str, model: type[BaseModel]) -> None:
    options = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    by_field = {RENAMED.get(o.name, o.name): o for o in options if o.name not in CLI_ONLY}
    assert set(by_field) == set(model.model_fields)
    for name, field in model.model_fields.items():
        option = by_field[name]
        if name == "strategies":  # a comma-separated string on the command line, empty = the field's default
            assert option.default == ""
            continue
        assert option.default == field.default, (command, name)
        assert option.help, (command, name)
