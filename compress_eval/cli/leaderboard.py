"""``compress-eval leaderboard RUNS_DIR``: markdown table on stdout; CSV, HTML and a Pareto plot on disk."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from compress_eval.cli.common import user_errors
from compress_eval.errors import UserError

log = logging.getLogger(__name__)


@user_errors
def leaderboard_command(
    runs_dir: Path = typer.Argument(..., help="a runs directory (one run per sub-directory) or one run"),
    out: Path = typer.Option(None, "--out", "-o", help="where to write the files (default: RUNS_DIR/leaderboard)"),
    sort: str = typer.Option(None, help="rank the rows, best first, by a task (piqa, arc_e, c4, ...), avg (mean "
                                        "accuracy) or ppl (the first perplexity); default: by model and method"),
) -> None:
    """Compare runs: method x sparsity rows, task columns, deltas against the dense (method none) run.

    Deltas marked * differ from the dense row by more than chance (paired tests on the per-document
    records); the mean accuracy has its 95 % interval. Reads only the run directories (manifest,
    results_ppl.json, lm_eval_results.json, records.json); a corrupt or
    unfinished one is reported on stderr and skipped. Writes leaderboard.md, .csv, .html (sortable)
    and pareto.png (quality vs parameters kept and vs bytes of weights).
    """
    from compress_eval.results.html import write_html
    from compress_eval.results.leaderboard import build, markdown, pareto_png, write_csv

    if not runs_dir.is_dir():
        raise UserError(f"runs directory {runs_dir} not found: give the --runs directory of `compress-eval batch`")
    out = out or runs_dir / "leaderboard"
    board = build(runs_dir, exclude=out, sort=sort)
    if not board.rows:
        skipped = (f" ({len(board.problems)} skipped, first {board.problems[0][0]}: {board.problems[0][1]})"
                   if board.problems else "")
        raise UserError(f"no finished runs in {runs_dir}{skipped}: give the --runs directory of a "
                        f"`compress-eval batch` that has finished cells")
    for path, why in board.problems:
        log.warning("skipped %s: %s", path, why)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(board)
    (out / "leaderboard.md").write_text(table)
    write_csv(board, out / "leaderboard.csv")
    plot = pareto_png(board, out / "pareto.png")
    write_html(board, runs_dir, out / "leaderboard.html", plot.name if plot else None)
    typer.echo(table)
    log.info("wrote %s/leaderboard.md, .csv, .html%s", out, ", pareto.png" if plot else "")


def register(app: typer.Typer) -> None:
    app.command("leaderboard")(leaderboard_command)
