"""One declaration per option: a training knob is declared once, in the dataclass that uses it (``FitConfig``,
``HeadConfig``, ``Resources``); the flows' parameters (the Prefect form) are generated from it, and the CLI
from the parameters: every field has exactly one option with the same default and help."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import typer.main
from pydantic import BaseModel

from flows.cli import app
from flows.options import from_cli
from flows.params import CompareParams, RetrainParams, StudyParams, TrainingParams
from infra.training.cluster import Resources
from infra.training.worker import Checkpoints, Compute
from models.heads import HeadConfig
from models.loop import FitConfig
from models.options import declared_options

CLI_ONLY = {"home", "verbose"}  # where the local stack lives, and what the terminal shows: not flow parameters
KNOB_CLASSES = (FitConfig, HeadConfig, Resources, Checkpoints, Compute)
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command, model, cell_fields", [("run", RetrainParams, ()), ("compare", CompareParams, ()),
                                                         ("study", StudyParams, StudyParams.CELL_FIELDS)])
def test_every_field_has_one_option_with_the_same_default_and_help(command: str, model: type[BaseModel],
                                                                    cell_fields: tuple[str, ...]) -> None:
    """(study: the data and backbone are each grid cell's, not options)"""
    options = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    names = [o.name for o in options if o.name not in CLI_ONLY]
    assert sorted(names) == sorted(set(model.model_fields) - set(cell_fields))  # one each, none extra
    by_field = {o.name: o for o in options}
    for name, field in model.model_fields.items():
        if name in cell_fields:
            continue
        option, default = by_field[name], field.get_default(call_default_factory=True)
        if typing.get_origin(field.annotation) is list:  # comma-separated on the command line
            assert option.default == ",".join(default), (command, name)
            assert from_cli(model, {name: option.default})[name] == default
        else:
            assert option.default == default, (command, name)
        assert field.description and option.help.startswith(field.description), (command, name)
    assert by_field["use_gpu"].opts == ["--gpu"] and by_field["use_gpu"].secondary_opts == ["--cpu"]


@pytest.mark.parametrize("config", KNOB_CLASSES, ids=lambda c: c.__name__)
def test_the_parameters_take_type_default_help_and_bounds_from_the_declaration(config: type) -> None:
    for declared in declared_options(config):
        field = TrainingParams.model_fields[declared.name]
        assert field.default == declared.default and field.description == declared.option.help
        bounds = {(kind := type(m).__name__.lower()): getattr(m, kind) for m in field.metadata}
        assert bounds == declared.option.bounds(), declared.name
        if declared.option.choices:
            assert typing.get_args(field.annotation) == declared.option.choices
    assert CompareParams.model_fields["workers"].default == 1  # a per-flow default, same declaration
    assert CompareParams.model_fields["workers"].metadata == TrainingParams.model_fields["workers"].metadata


def _declarations(name: str) -> list[str]:
    """Where ``name`` is declared as a user option in the product's code: a class field with ``option(...)``
    or ``Field(...)``, or a function parameter annotated with a typer option."""
    found = []
    for package in ("models", "infra", "tasks", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    for stmt in node.body:
                        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                                and stmt.target.id == name and isinstance(stmt.value, ast.Call)
                                and ast.unparse(stmt.value.func) in ("option", "Field")):
                            found.append(f"{path.relative_to(ROOT)}:{node.name}")
                elif isinstance(node, ast.FunctionDef):
                    for arg in node.args.args + node.args.kwonlyargs:
                        if arg.arg == name and arg.annotation is not None and "Option" in ast.unparse(arg.annotation):
                            found.append(f"{path.relative_to(ROOT)}:{node.name}()")
    return found


@pytest.mark.parametrize("name", [o.name for c in KNOB_CLASSES for o in declared_options(c)])
def test_a_training_knob_is_declared_in_one_place(name: str) -> None:
    assert len(_declarations(name)) == 1, _declarations(name)


def test_fp16_is_refused_on_cpu_in_one_line_and_taken_with_gpus() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="precision fp16 needs GPUs"):
        RetrainParams(precision="fp16")
    params = RetrainParams(precision="fp16", use_gpu=True, compile=True)
    compute = params.train_config("mlp", 10).compute
    assert (compute.precision, compute.compile) == ("fp16", True)
    assert Compute().autocast_dtype(on_gpu=False) is None and Compute("bf16").autocast_dtype(on_gpu=False) is not None
