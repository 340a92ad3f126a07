"""``compress-eval eval MODEL_OR_DIR --tasks ...``: evaluate and store results beside a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from compress_eval.cli.common import DataDir, Device, Dtype, user_errors
from compress_eval.evaluate import evaluate, parse_tasks, store_results
from compress_eval.models.checkpoint import read_manifest


def run_evaluation(target, tasks, seqlen, data_dir, max_windows, batch_size, device, dtype) -> dict:
    results = evaluate(target, tasks, seqlen, data_dir, max_windows, batch_size, device, dtype)
    if Path(target).is_dir() and read_manifest(target) is not None:
        store_results(target, results)
    table = Table("task", "ppl", "windows", "seconds", "tokens/s", title=str(target))
    for task, r in results.items():
        table.add_row(task, f"{r['ppl']:.4f}", str(r["windows"]), f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.0f}")
    Console(width=120).print(table)
    return results


@user_errors
def eval_command(
    model: str = typer.Argument(..., help="alias, Hub id, local model or checkpoint directory"),
    tasks: str = typer.Option(..., help="comma-separated tasks, e.g. wikitext2,c4"),
    seqlen: int = typer.Option(2048, min=2, help="window length of perplexity tasks"),
    max_windows: int = typer.Option(None, min=1, help="perplexity tasks: score only the first N windows"),
    batch_size: int = typer.Option(1, min=1),
    data_dir: str = DataDir,
    device: str = Device,
    dtype: str = Dtype,
) -> None:
    """Evaluate a model or checkpoint; results are stored in the checkpoint directory."""
    run_evaluation(model, parse_tasks(tasks), seqlen, data_dir, max_windows, batch_size, device, dtype)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
