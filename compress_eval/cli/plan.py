"""``compress-eval plan MODEL --method M``: predicted peak memory per step, from the config alone."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from compress_eval.cli.common import TrustRemoteCode, user_errors
from compress_eval.cli.compress import METHOD_FLAGS, parse_options


@user_errors
def plan_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="model directory, config.json, alias, or a shipped config "
                                          "(llama3-8b, llama3-70b)"),
    method: str = typer.Option(..., "--method", "-m", help="compression method (see `compress-eval methods`)"),
    profile: str = typer.Option(None, help="fuse/mi profile: default, cpu or paper"),
    offload: str = typer.Option("auto", help="none, cpu, disk, or auto (as `compress --offload`)"),
    device_memory: str = typer.Option(None, help="device memory to plan for, e.g. 24GB (default: free now)"),
    host_memory: str = typer.Option(None, help="host memory to plan for, e.g. 64GB (default: MemAvailable)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option(None, help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16"),
    calib_samples: int = typer.Option(None, min=1, help="calibration windows (default: the method's)"),
    seqlen: int = typer.Option(None, min=2, help="calibration window length (default: the method's)"),
    sparsity: float = typer.Option(None, help="fraction of blocks removed (the saved model's size)"),
    num_blocks: int = typer.Option(None, help="blocks removed (default: the method's default amount)"),
    eval_seqlen: int = typer.Option(2048, min=2, help="window of the ppl evaluation step"),
    no_eval: bool = typer.Option(False, "--no-eval", help="leave out the ppl evaluation step"),
    max_shard_size: str = typer.Option("5GB", help="largest shard the save writes"),
    options: list[str] = typer.Option(None, "--set", help="method option key=value (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    trust_remote_code: bool = TrustRemoteCode,
) -> None:
    """Predict the peak device and host memory of each step of `compress` (load, calibrate, score,
    fine-tune, save, ppl eval) from the model's config alone, and whether the run fits.

    Method options are given as in `compress`: extra flags (`--num-merge 2`) or `--set key=value`.
    """
    from compress_eval.config import make_config
    from compress_eval.plan import make_plan

    opts = parse_options(options, ctx.args)
    if profile is not None:
        opts["profile"] = profile
    cfg = make_config(model=model, method=method, options=opts, device=device, dtype=dtype, offload=offload,
                      calib_samples=calib_samples, seqlen=seqlen, sparsity=sparsity, num_blocks=num_blocks,
                      max_shard_size=max_shard_size, trust_remote_code=trust_remote_code or None)
    plan = make_plan(cfg, device_memory, host_memory, eval_seqlen=None if no_eval else eval_seqlen)
    if as_json:
        typer.echo(json.dumps(plan.model_dump(mode="json"), indent=2))
        return
    gb = 1e9
    typer.echo(f"{plan.model}: {plan.parameters / 1e9:.2f} B parameters, {plan.weight_bytes / gb:.1f} GB in "
               f"{plan.dtype}; {plan.method}, calibration {plan.calibration}, on {plan.device_type}")
    typer.echo(f"offload: {plan.offload}" + (f" ({plan.offload_reason})" if plan.offload_reason else ""))
    if plan.unified:
        table = Table("step", "memory GB", "what")
        for s in plan.steps:
            table.add_row(s.step, f"{s.host / gb:.2f}", s.note)
        table.add_row("peak", f"{plan.peak_host / gb:.2f}", f"available {plan.host_available / gb:.1f} GB "
                                                              f"({plan.host_source})")
    else:
        table = Table("step", "device GB", "host GB", "what")
        for s in plan.steps:
            table.add_row(s.step, f"{s.device / gb:.2f}", f"{s.host / gb:.2f}", s.note)
        table.add_row("peak", f"{plan.peak_device / gb:.2f}", f"{plan.peak_host / gb:.2f}",
                      f"available {plan.device_available / gb:.1f} GB ({plan.device_source}) / "
                      f"{plan.host_available / gb:.1f} GB ({plan.host_source})")
    Console(width=150).print(table)
    for note in plan.notes:
        typer.echo(f"note: {note}")
    typer.echo(plan.verdict)


def register(app: typer.Typer) -> None:
    app.command("plan", context_settings=METHOD_FLAGS)(plan_command)
