"""Perplexity in the papers' protocol: exp(mean token NLL) over non-overlapping windows.

Not lm-eval's ``wikitext`` task (document-level word perplexity): the numbers are not comparable,
so ours is always named ``wikitext2_ppl`` / ``c4_ppl``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PplResult:
    ppl: float
    nll_sum: float
    tokens: int
    windows: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def model_device(model) -> torch.device:
    from compress_eval.models.offload import execution_device

    return execution_device(model)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window: (batch, seq, vocab) logits, (batch, seq) ids -> (batch,)."""
    shift = logits[:, :-1].float()
    target = ids[:, 1:]
    nll = F.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1), reduction="none")
    return nll.view(target.shape).sum(dim=1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> PplResult:
    """Perplexity of ``model`` over (n, seqlen) token windows."""
    device = model_device(model)
    start = time.perf_counter()
    total = 0.0
    batches = range(0, windows.size(0), batch_size)
    if progress:
        from rich.progress import track

        batches = track(batches, description=f"ppl ({windows.size(0)} x {windows.size(1)} tokens)")
    for b in batches:
        ids = windows[b: b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        total += window_nll(logits, ids).sum().item()
    tokens = windows.size(0) * (windows.size(1) - 1)
    mean = total / tokens
    return PplResult(math.exp(mean) if mean < 700 else math.inf, total, tokens, windows.size(0), time.perf_counter() - start)
