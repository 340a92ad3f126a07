"""Stop a fine-tune at its first NaN/inf: a diverged run must fail loudly, never save a NaN checkpoint."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from compress_eval.errors import UserError


def nonfinite_tensors(params: Iterable[torch.Tensor]) -> int:
    """How many of ``params`` hold a NaN or inf.

    Fast path: one float32 sum per tensor and a single sync (a NaN or inf makes its sum non-finite);
    only when some sum is non-finite (or a finite tensor's sum overflowed) is the exact
    ``torch.isfinite`` scan run. On SmolLM2-135M (all 135M weights, 2 CPU threads) the fast path took
    ~16 ms against ~5-8 s per training step; the exact scan alone ~300 ms.
    """
    params = [p.detach() for p in params]
    if not params or torch.stack([p.sum(dtype=torch.float32) for p in params]).isfinite().all():
        return 0
    return sum(not bool(torch.isfinite(p).all()) for p in params)


def require_finite(loss: float, params: Iterable[torch.Tensor], where: str, lrs: dict[str, float]) -> None:
    """Raise :class:`UserError` if ``loss`` or any trainable parameter is NaN/inf.

    Call once per step after the optimizer step, with the step's loss (already ``.item()``-ed for
    logging) and the trainable parameters only. ``where`` names the place ("fuse block 1/2 epoch 1/2
    step 3/4"); ``lrs`` maps the option flags that set the learning rates to their values, and the
    message asks to lower them.
    """
    if not math.isfinite(loss):
        problem = f"loss is {loss}"
    else:
        bad = nonfinite_tensors(params)
        if not bad:
            return
        problem = f"{bad} trainable tensor(s) hold NaN/inf after the optimizer step (loss {loss:.6g})"
    rates = ", ".join(f"{flag} {value:g}" for flag, value in lrs.items())
    raise UserError(f"training diverged at {where}: {problem} with learning rate {rates}; "
                    f"lower {' / '.join(lrs)}")
