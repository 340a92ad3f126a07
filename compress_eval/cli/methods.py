"""``compress-eval methods``: the registered methods and their options with defaults."""

from __future__ import annotations

import typer

from compress_eval.cli.common import user_errors
from compress_eval.config import RecoveryOptions
from compress_eval.methods.registry import available_methods


@user_errors
def methods_command() -> None:
    """List compression methods and their options (set with --set key=value), then the recovery
    stage's options, which every method takes."""
    for name, cls in available_methods().items():
        typer.echo(f"{name}: {cls.summary}")
        print_fields(cls.options_class)
    typer.echo("recovery stage (after any method): fine-tune on the calibration windows")
    print_fields(RecoveryOptions)


def print_fields(options_class) -> None:
    for field, info in options_class.model_fields.items():
        typer.echo(f"    {field} = {info.default!r}  {info.description or ''}".rstrip())


def register(app: typer.Typer) -> None:
    app.command("methods")(methods_command)
