"""``compress-eval models``: aliases, where each resolves, and whether it is available offline."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from compress_eval.cli.common import user_errors
from compress_eval.models.registry import ALIASES, PACKAGED, resolve


@user_errors
def models_command() -> None:
    """List model aliases and where each resolves."""
    table = Table("alias", "kind", "resolves to", "offline")
    for name in list(PACKAGED) + list(ALIASES):
        src = resolve(name)
        table.add_row(name, src.kind, src.location, src.offline_status())
    Console(width=160).print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models_command)
