"""``compress-eval data prepare|check|easy-vqa``: make and verify a local data directory."""

from __future__ import annotations

from pathlib import Path

import typer

from compress_eval.cli.common import user_errors
from compress_eval.data import prepare as data
from compress_eval import paths

data_app = typer.Typer(no_args_is_help=True, help="Prepare and check local evaluation data (layout of shared/data).")


@data_app.command("prepare")
@user_errors
def prepare_command(
    directory: Path = typer.Option(None, "--dir", help=f"where to write (default: {paths.prepared_data_dir()}, which "
                                   "is then used without --data-dir)"),
    only: str = typer.Option(None, help=f"comma-separated, some of {','.join(data.TASKS)} (default: all)"),
    source: Path = typer.Option(None, "--from", help="link the files of this local data directory instead of "
                                "downloading them (they are checked and hashed the same)"),
) -> None:
    """Write the data our perplexity and offline lm-eval tasks read, from the Hub's own data sets, with a
    MANIFEST.json of each file's sha256 and source."""
    root = directory or paths.prepared_data_dir()
    tasks = data.parse_only(only)
    written = data.prepare(root, tasks, source)
    for check in data.check(root):
        if check.task in tasks:
            typer.echo(f"{check.task:<14} {'ok' if check.ok else 'FAILED':<6} {check.detail}")
    typer.echo(f"wrote {len(written)} files to {root}")


@data_app.command("check")
@user_errors
def check_command(
    directory: Path = typer.Argument(None, help=f"data directory (default: {paths.prepared_data_dir()})"),
) -> None:
    """Per task: are the files our readers open present, do they parse, and do their hashes match
    MANIFEST.json where there is one. Exit 1 when any task fails."""
    checks = data.check(directory or paths.prepared_data_dir())
    for check in checks:
        typer.echo(f"{check.task:<14} {'ok' if check.ok else 'FAILED':<6} {check.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@data_app.command("easy-vqa")
@user_errors
def easy_vqa_command(
    out: Path = typer.Option(None, "--out", help=f"the mmmu folder of a data directory (default: "
                             f"{paths.prepared_data_dir() / 'mmmu'})"),
    split: str = typer.Option("test", help="test (written as MMMU's validation, which ce_mmmu reads) or "
                              "train (as dev)"),
    seed: int = typer.Option(0, help="seed of the options' order and of --limit's sample"),
    limit: int = typer.Option(None, help="a seeded sample of this many questions"),
) -> None:
    """Convert easy-vqa (PyPI easy-vqa) into MMMU's schema and layout, for the offline ce_mmmu task."""
    from compress_eval.data.easy_vqa import chance_accuracy, convert

    path, rows = convert(out or paths.prepared_data_dir() / "mmmu", split, seed, limit)
    typer.echo(f"wrote {len(rows)} questions to {path} (chance accuracy {chance_accuracy(rows):.4f})")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
