"""``compress-eval methods``: the registered methods and their options with defaults."""

from __future__ import annotations

import typer

from compress_eval.cli.common import user_errors
from compress_eval.methods.registry import available_methods


@user_errors
def methods_command() -> None:
    """List compression methods and their options (set with --set key=value)."""
    for name, cls in available_methods().items():
        typer.echo(f"{name}: {cls.summary}")
        for field, info in cls.options_class.model_fields.items():
            typer.echo(f"    {field} = {info.default!r}  {info.description or ''}".rstrip())


def register(app: typer.Typer) -> None:
    app.command("methods")(methods_command)
