"""``compress-eval ppl MODEL``: perplexity in the papers' protocol; the last line is the number."""

from __future__ import annotations

import typer

from compress_eval.cli.common import (AllowPickle, DataDir, Device, Dtype, EvalSeqlen, MaxWindows, Offload,
                                      TrustRemoteCode, user_errors)
from compress_eval.eval_config import EvalConfig
from compress_eval.evaluate import evaluate
from compress_eval.tasknames import PPL_TASKS


@user_errors
def ppl_command(
    model: str = typer.Argument(..., help="alias, Hub id, local model or checkpoint directory"),
    dataset: str = typer.Option("wikitext2", help="wikitext2 or c4"),
    seqlen: int = EvalSeqlen,
    max_windows: int = MaxWindows,
    batch_size: int = typer.Option(1, min=1),
    data_dir: str = DataDir,
    device: str = Device,
    dtype: str = Dtype,
    allow_pickle: bool = AllowPickle,
    trust_remote_code: bool = TrustRemoteCode,
    offload: str = Offload,
) -> None:
    """Token perplexity over non-overlapping windows (WikiText-2 test or C4 validation)."""
    if dataset not in PPL_TASKS:
        from compress_eval.errors import UserError

        raise UserError(f"unknown dataset {dataset!r}: use wikitext2 or c4")
    results = evaluate(model, EvalConfig(tasks=[dataset], seqlen=seqlen, data_dir=data_dir, max_windows=max_windows,
                                         batch_size=str(batch_size), device=device, dtype=dtype,
                                         allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                         offload=offload or "auto"))
    r = next(iter(results.values()))
    typer.echo(f"{r['windows']} windows x {seqlen} tokens, {r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tokens/s")
    typer.echo(f"{r['ppl']:.4f}")


def register(app: typer.Typer) -> None:
    app.command("ppl")(ppl_command)
