"""Shared CLI plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import signal

import typer

from compress_eval import distributed
from compress_eval.errors import UserError


def user_errors(fn):
    """Wrap a command so a :class:`UserError` prints ``error: ...`` and exits 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except RuntimeError as exc:  # data parallel: a collective whose peer process died
            line = distributed.peer_failure(exc)
            if line is None:
                raise
            # Said once: the launcher's SIGTERM, which may follow (even while the line is written), is
            # ignored from here on rather than answered with a second line; the process is ending anyway.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {value!r} (e.g. 3,4)") from None


DataDir = typer.Option(None, "--data-dir", help="local data directory (layout of shared/data); "
                       "default: $COMPRESS_EVAL_DATA_DIR, else the one `compress-eval data prepare` wrote, "
                       "else the Hugging Face Hub")
Device = typer.Option(None, help="cpu or cuda (default: cuda when available)")
Dtype = typer.Option(None, help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
EvalSeqlen = typer.Option(2048, min=2, help="window length of perplexity tasks (the papers use 2048; "
                          "512 for quick CPU runs)")
GenKwargs = typer.Option(None, help="lm-eval's generation settings over the generate-until tasks' own, e.g. "
                                    "max_gen_toks=32 (key=value,...)")
Sample = typer.Option(None, help="lm-eval tasks: a seeded sample of N documents of each, or per task "
                                 "(hellaswag=2000: the others whole); the same for every model, so runs pair "
                                 "(instead of --limit's first N)")
SampleSeed = typer.Option(0, help="the seed that draws --sample's documents")
MaxWindows = typer.Option(None, min=1, help="perplexity tasks: score only the first N windows (quick partial run)")
AllowPickle = typer.Option(False, "--allow-pickle", help="also read pickle weights (pytorch_model.bin), which can "
                           "run code when loaded; default: safetensors only")
TrustRemoteCode = typer.Option(False, "--trust-remote-code", help="run the model repository's own Python code "
                               "(transformers' trust_remote_code)")
Offload = typer.Option(None, help="where the weights wait while other blocks run: none (all on the device), "
                       "cpu (host memory), disk (their safetensors files), auto (default: chosen from the "
                       "model's size and the free memory)")
OffloadDir = typer.Option(None, help="--offload disk: directory for the blocks a method changes (default: temp)")
MaxShardSize = typer.Option(None, help="largest safetensors shard of the saved checkpoint, e.g. 5GB, 500MB "
                            "(default 5GB; with --offload it bounds the memory the save takes)")
