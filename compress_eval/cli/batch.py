"""``compress-eval batch GRID``: run every cell of a grid file into RUNS/<cell>/ (resumable, parallel)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from compress_eval.cli.common import DataDir, user_errors
from compress_eval.errors import UserError


@user_errors
def batch_command(
    grid: Path = typer.Argument(..., help="grid file (YAML), e.g. grids/smoke.yaml"),
    runs: Path = typer.Option(Path("runs"), "--runs", help="runs directory: one sub-directory per cell"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="cells run at once (processes sharing the cores)"),
    models: str = typer.Option(None, help="comma-separated models that replace the grid's"),
    cell: list[str] = typer.Option(None, "--cell", help="run only this cell (a name from --list); repeatable"),
    list_cells: bool = typer.Option(False, "--list", help="print the cells' run-directory names and exit"),
    check: bool = typer.Option(False, "--check", help="validate methods, options, tasks and models; run nothing"),
    data_dir: str = DataDir,
) -> None:
    """Run a grid: each cell (model x method x amount) is compressed and evaluated in its own run
    directory named by its config hash. Finished cells are skipped, so an interrupted batch resumes
    where it stopped; any number of batches may share one runs directory."""
    from compress_eval.batch import check_cells, run_cells
    from compress_eval.grid import expand, load_grid
    from compress_eval.paths import data_dir as resolve_data_dir

    cells = expand(load_grid(grid), [m.strip() for m in models.split(",")] if models else None)
    if cell:
        unknown = sorted(set(cell) - {c.name for c in cells})
        if unknown:
            raise UserError(f"no cell {unknown[0]!r} in {grid}: see `compress-eval batch {grid} --list`")
        cells = [c for c in cells if c.name in cell]
    if list_cells:
        typer.echo("\n".join(c.name for c in cells))
        return
    if check:
        problems = check_cells(cells)
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        if problems:
            raise typer.Exit(2)
        typer.echo(f"{len(cells)} cells OK")
        return
    outcomes = run_cells(cells, runs, resolve_data_dir(data_dir), jobs)
    table = Table("cell", "method", "status", "message", title=f"{grid} -> {runs}")
    for o in outcomes:
        table.add_row(o.cell, o.label, o.status, o.message)
    Console(width=160).print(table)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        typer.echo(f"error: {len(failed)} of {len(outcomes)} cells failed (first: {failed[0].cell}: "
                   f"{failed[0].message}); fix and re-run: finished cells are skipped", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("batch")(batch_command)
