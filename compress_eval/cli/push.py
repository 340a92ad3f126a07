"""``compress-eval push DIR REPO [--private]``: a checkpoint, with its model card, to the Hub."""

from __future__ import annotations

from pathlib import Path

import typer

from compress_eval.cli.common import user_errors
from compress_eval.results.hub import push


@user_errors
def push_command(
    directory: Path = typer.Argument(..., help="checkpoint directory written by compress or run"),
    repo: str = typer.Argument(..., help="Hub repository id, NAMESPACE/NAME (created if it does not exist)"),
    private: bool = typer.Option(False, "--private", help="create the repository private"),
) -> None:
    """Upload a checkpoint (weights, manifest, recipe, results, model card) to the Hugging Face Hub.

    Needs a token with write access (`hf auth login` or HF_TOKEN).
    """
    typer.echo(f"pushed {directory} to {push(directory, repo, private)}")


def register(app: typer.Typer) -> None:
    app.command("push")(push_command)
