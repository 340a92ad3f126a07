"""``compress-eval eval MODEL_OR_DIR --tasks ...``: evaluate and store results beside a checkpoint."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from compress_eval.cli.common import (AllowPickle, DataDir, Device, Dtype, EvalSeqlen, GenKwargs, MaxWindows,
                                      Offload, Sample, SampleSeed, TrustRemoteCode, user_errors)
from compress_eval.errors import UserError
from compress_eval.eval_config import EvalConfig
from compress_eval.evaluate import evaluate_and_record
from compress_eval.tasknames import display_name, parse_tasks

METRICS = ("acc", "acc_norm")


def parse_limit(value: float | None) -> int | float | None:
    """lm-eval's --limit: N documents per task, or a fraction of each task when below 1."""
    if value is None:
        return None
    if value <= 0:
        raise UserError(f"--limit must be positive, got {value}")
    return int(value) if value >= 1 and float(value).is_integer() else value


def parse_gen_kwargs(value: str | None) -> dict | None:
    """lm-eval's --gen_kwargs: ``key=value,...`` over the generate-until tasks' own generation settings."""
    if not value:
        return None
    from lm_eval.utils import simple_parse_args_string

    if any("=" not in part or not part.split("=")[0].strip() for part in value.split(",")):
        raise UserError(f"--gen-kwargs takes key=value pairs joined by commas (e.g. max_gen_toks=32), got {value!r}")
    return simple_parse_args_string(value)


def summary_table(title: str, ppl: dict, lm_results: dict | None) -> Table:
    """One row per task and metric: value, stderr, documents, seconds."""
    table = Table("task", "metric", "value", "± stderr", "n", "seconds", title=title)
    for task, r in ppl.items():
        table.add_row(task, "ppl", f"{r['ppl']:.4f}", "", f"{r['windows']} x {r['seqlen']}", f"{r['seconds']:.1f}")
    if lm_results:
        seconds = lm_results.get("total_evaluation_time_seconds", "")
        for i, (task, r) in enumerate(lm_results["results"].items()):
            n = lm_results.get("n-samples", {}).get(task, {}).get("effective", "")
            for metric in METRICS:
                if f"{metric},none" in r:
                    stderr = r.get(f"{metric}_stderr,none")
                    table.add_row(display_name(task), metric, f"{r[f'{metric},none']:.4f}",
                                  f"{stderr:.4f}" if isinstance(stderr, float) else "", str(n),
                                  f"{float(seconds):.1f} (all lm-eval)" if i == 0 and metric == "acc" else "")
    return table


def run_evaluation(target: str, cfg: EvalConfig) -> None:
    """Evaluate, store the results in a checkpoint directory, print the summary table."""
    ppl, lm_results = evaluate_and_record(target, cfg)
    Console(width=120).print(summary_table(str(target), ppl, lm_results))


@user_errors
def eval_command(
    model: str = typer.Argument(..., help="alias, Hub id, local model or checkpoint directory"),
    tasks: str = typer.Option(..., help="comma-separated tasks: wiki, c4, piqa, arc_e, arc_c, hs, wg, mmmu "
                                        "(images: a vision-language model) or their full names"),
    seqlen: int = EvalSeqlen,
    max_windows: int = MaxWindows,
    limit: float = typer.Option(None, help="lm-eval tasks: only the first N documents (a fraction if < 1)"),
    sample: str = Sample,
    sample_seed: int = SampleSeed,
    num_fewshot: int = typer.Option(None, min=0, help="lm-eval tasks: few-shot examples (default: task's own)"),
    gen_kwargs: str = GenKwargs,
    batch_size: str = typer.Option("1", help="batch size, or auto (lm-eval finds the largest that fits)"),
    data_dir: str = DataDir,
    device: str = Device,
    dtype: str = Dtype,
    allow_pickle: bool = AllowPickle,
    trust_remote_code: bool = TrustRemoteCode,
    offload: str = Offload,
) -> None:
    """Evaluate a model or checkpoint; results are stored in the checkpoint directory.

    Perplexity (wiki, c4) is the papers' protocol; the benchmarks run through lm-evaluation-harness
    (offline copies from the data directory when one is set, else lm-eval's Hub tasks).
    """
    run_evaluation(model, EvalConfig(
        tasks=parse_tasks(tasks), seqlen=seqlen, max_windows=max_windows, batch_size=batch_size, device=device,
        dtype=dtype, limit=parse_limit(limit), sample=sample, sample_seed=sample_seed, num_fewshot=num_fewshot,
        gen_kwargs=parse_gen_kwargs(gen_kwargs), data_dir=data_dir, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, offload=offload or "auto"))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
