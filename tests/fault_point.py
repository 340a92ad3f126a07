"""Run the CLI with a pause at one named point, so a test (or bench/faults.py) can kill it there.

    python tests/fault_point.py POINT READY_FILE [compress-eval arguments...]

At POINT the process writes READY_FILE and sleeps until it is signalled. Points:
``method`` (inside the compression method, after it started), ``save`` (inside the checkpoint save,
weights written, manifest not yet), ``loop-state`` (a FuseGPT --resume state was just written),
``ppl`` (inside a perplexity evaluation, after its first window), ``none`` (no pause).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def pause_here(ready: Path) -> None:
    """Pause (in every process, or under a launcher only in rank $FAULT_RANK when it is set)."""
    if os.environ.get("FAULT_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
        return
    ready.write_text("ready")
    time.sleep(3600)


def in_collective(ready: Path, rank: str) -> Path:
    """The file that exists while a rank other than $FAULT_RANK is inside an all-reduce. With the paused
    rank's READY_FILE it means: that rank waits there for the paused one (an all-reduce needs every rank),
    so a test kills the paused rank then, not after a guessed delay."""
    return ready.with_name(f"{ready.name}.rank{rank}-in-collective")


def announce_collectives(ready: Path) -> None:
    import torch.distributed

    rank = os.environ.get("RANK")
    if rank is None or os.environ.get("FAULT_RANK", rank) == rank:
        return
    all_reduce, inside = torch.distributed.all_reduce, in_collective(ready, rank)

    def announced(*args, **kwargs):
        inside.touch()
        result = all_reduce(*args, **kwargs)
        inside.unlink()
        return result

    torch.distributed.all_reduce = announced


def install(point: str, ready: Path) -> None:
    from compress_eval import pipeline
    from compress_eval.methods import loop_state
    from compress_eval.models import checkpoint
    from compress_eval.scoring import ppl

    if point == "method":
        stage_methods = pipeline.stage_methods

        def paused_methods(cfg):
            methods = stage_methods(cfg)
            for method in methods:
                if method is not None:
                    compress = method.compress

                    def run(adapter, calib, compress=compress):
                        pause_here(ready)
                        return compress(adapter, calib)

                    method.compress = run
            return methods

        pipeline.stage_methods = paused_methods
    elif point == "save":
        save = checkpoint.save_model_files

        def paused_save(*args, **kwargs):
            save(*args, **kwargs)
            pause_here(ready)

        checkpoint.save_model_files = paused_save
    elif point == "loop-state":
        save_state = loop_state.LoopState.save

        def paused_state(self, *args, **kwargs):
            state = save_state(self, *args, **kwargs)
            pause_here(ready)
            return state

        loop_state.LoopState.save = paused_state
    elif point == "ppl":
        window_nll = ppl.window_nll
        calls = []

        def paused_nll(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                pause_here(ready)
            return window_nll(*args, **kwargs)

        ppl.window_nll = paused_nll
    elif point != "none":
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    point, ready, *args = sys.argv[1:]
    install(point, Path(ready))
    announce_collectives(Path(ready))
    from compress_eval.cli.app import main

    sys.argv = ["compress-eval", *args]
    main()
