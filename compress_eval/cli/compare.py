"""``compress-eval compare RUN_A RUN_B [RUN_C ...]``: does each run differ from the first, and by how much?"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from compress_eval.cli.common import user_errors
from compress_eval.errors import UserError


def value_text(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric == "ppl" else f"{100 * value:.2f}"


def comparison_table(run_a: Path, run_b: Path, seed: int) -> Table:
    from compress_eval.results.compare import compare_runs
    from compress_eval.results.paired import LEVEL

    table = Table("task", "metric", "A ± se", "B ± se", "B - A", f"{LEVEL:.0%} CI", "McNemar p", "n", "differ?",
                  title=f"A = {run_a.name}, B = {run_b.name}")
    for pair in compare_runs(run_a, run_b, seed):
        r, m = pair.result, pair.metric
        scale = 1 if m == "ppl" else 100
        table.add_row(pair.task, m, f"{value_text(m, r.a)} ± {scale * r.stderr_a:.2f}",
                      f"{value_text(m, r.b)} ± {scale * r.stderr_b:.2f}", f"{scale * r.delta:+.2f}",
                      f"[{scale * r.low:+.2f}, {scale * r.high:+.2f}]", "-" if r.p is None else f"{r.p:.3g}",
                      str(r.n), "yes" if r.significant else "no")
    return table


@user_errors
def compare_command(
    runs: list[Path] = typer.Argument(..., help="run directories: each is compared with the first"),
    seed: int = typer.Option(0, help="seed of the bootstrap resamples"),
) -> None:
    """Paired comparison of evaluated runs on the documents (and perplexity windows) they share.

    Per task: each accuracy (%) with its standard error, the paired difference B - A, its 95 %
    confidence interval (paired bootstrap over documents) and the exact McNemar p-value; per
    perplexity, the difference with a bootstrap interval over windows. Runs scored on different
    documents are refused, with the difference named.
    """
    if len(runs) < 2:
        raise UserError("compare needs at least two run directories: RUN_A RUN_B [...]")
    for run in runs:
        if not run.is_dir():
            raise UserError(f"run directory {run} not found")
    console = Console(width=140)
    for other in runs[1:]:
        console.print(comparison_table(runs[0], other, seed))
    typer.echo("A delta differs from 0 ('yes') when its interval excludes 0 and, for accuracies, McNemar's p < 0.05.")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
