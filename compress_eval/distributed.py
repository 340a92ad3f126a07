"""Data parallelism over processes started by ``torchrun`` or ``accelerate launch``.

Calibration and evaluation windows are dealt out: window ``w`` lives on rank ``w % world`` at position
``w // world`` of that rank's share (:func:`shard`). Every score is a sum over windows (ShortGPT's
cosines, SLEB's NLL, Macro Influence's cosines, perplexity's NLL and token count), so summing the
ranks' parts (:func:`all_sum`) gives every rank the one-process numbers, up to the order of the
additions, and every rank chooses the same blocks. A fine-tune walks the one-process order of batches;
each rank runs its members of a batch (:func:`local_positions`) and the gradients are summed weighted
by each rank's share of the batch (:func:`reduce_gradients`): the one-process gradient of a mean loss.
Rank 0 alone writes (:func:`is_main`).

Without a launcher (no ``WORLD_SIZE`` > 1 in the environment) every function is the identity and no
process group is made.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch


# Time and bytes spent in collectives by this process: the communication share for the manifest.
TRAFFIC = {"seconds": 0.0, "bytes": 0, "calls": 0}


@contextlib.contextmanager
def _collective(t: torch.Tensor):
    start = time.perf_counter()
    yield
    TRAFFIC["seconds"] += time.perf_counter() - start
    TRAFFIC["bytes"] += t.numel() * t.element_size()
    TRAFFIC["calls"] += 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@functools.cache
def _state():
    """accelerate's process state (it initializes the process group the launcher described)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    return _state().process_index if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    """This process's device under a launcher (``cuda:LOCAL_RANK`` on GPUs), else None (the caller's choice)."""
    return _state().device if world_size() > 1 else None


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's windows: every ``world``-th one from its rank on."""
    return windows[rank()::world_size()] if world_size() > 1 else windows


def local_positions(batch: torch.Tensor) -> torch.Tensor:
    """Of a batch of window indices (into all windows), this rank's members as positions in its shard."""
    if world_size() == 1:
        return batch
    return batch[batch % world_size() == rank()] // world_size()


def all_sum(values):
    """The sum over ranks of a float, a list of floats or a tensor (float64 for the scalars)."""
    if world_size() == 1:
        return values
    if isinstance(values, torch.Tensor):
        values = values.clone()
        with _collective(values):
            torch.distributed.all_reduce(values)
        return values
    scalar = not isinstance(values, (list, tuple))
    t = torch.tensor([values] if scalar else list(values), dtype=torch.float64, device=_state().device)
    with _collective(t):
        torch.distributed.all_reduce(t)
    return t.item() if scalar else t.tolist()


def reduce_gradients(params: list[torch.nn.Parameter], local: int, total: int) -> None:
    """Gradients of this rank's mean loss over ``local`` of the batch's ``total`` members, summed over
    ranks with weight ``local / total``: the gradient of the mean loss over the whole batch."""
    if world_size() == 1:
        return
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        grad = grad * (local / total)
        with _collective(grad):
            torch.distributed.all_reduce(grad)
        p.grad = grad


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


STOPPED_BY_LAUNCHER = ("another process of this run stopped, or the run was cancelled (the launcher sent SIGTERM): "
                       "this one stops too and writes nothing; the launcher's report names the process that failed")


def peer_failure(exc: BaseException) -> str | None:
    """The one line for a collective that failed because another process of the run is gone, else None."""
    # gloo reports a dead peer as a plain RuntimeError naming its transport; NCCL as a DistError
    said = str(exc)
    if world_size() > 1 and (isinstance(exc, torch.distributed.DistError)
                             or any(mark in said for mark in ("/gloo/", "NCCL", "closed by peer", "reset by peer"))):
        first = (said.strip().splitlines() or [type(exc).__name__])[0][:160]
        return (f"another process of this run stopped ({first}): this one stops too and writes nothing; "
                f"the launcher's report names the process that failed")
    return None


def record(windows: int) -> dict | None:
    """The manifest's account of the split: world size, each rank's number of windows, and rank 0's
    collectives so far (calls, bytes, seconds: the communication share of the run)."""
    if world_size() == 1:
        return None
    counts = [len(range(r, windows, world_size())) for r in range(world_size())]
    return {"world_size": world_size(), "windows_per_rank": counts, "backend": str(_state().backend),
            "collectives": {"calls": TRAFFIC["calls"], "bytes": TRAFFIC["bytes"],
                            "seconds": round(TRAFFIC["seconds"], 3)}}
