"""``compress-eval export DIR --out PLAIN``: a copy of a checkpoint that plain transformers loads."""

from __future__ import annotations

from pathlib import Path

import typer

from compress_eval.cli.common import user_errors


@user_errors
def export_command(
    directory: Path = typer.Argument(..., help="checkpoint directory written by compress or run"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (must not exist)"),
) -> None:
    """Write a checkpoint as plain transformers loads it: tied modules written out in full, removed
    sublayers as zero weights (the same function at full size)."""
    from compress_eval.models.export import export_plain

    typer.echo(f"exported {export_plain(directory, out)}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
