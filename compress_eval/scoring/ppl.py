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

from compress_eval import distributed
from compress_eval.progress import bar


@dataclass
class PplResult:
    ppl: float
    nll_sum: float
    tokens: int
    windows: int
    seconds: float
    window_nlls: list[float] | None = None  # each window's summed NLL, in window order (paired statistics)

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
    """Perplexity of ``model`` over (n, seqlen) token windows (``progress``: with a bar)."""
    device = model_device(model)
    start = time.perf_counter()
    local = distributed.shard(windows)  # data parallel: this process's windows, NLL summed over all
    local_nlls: list[float] = []
    for b in bar(range(0, local.size(0), batch_size), f"ppl ({windows.size(0)} x {windows.size(1)} tokens)",
                 disable=not progress, unit="batch"):
        ids = local[b: b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        local_nlls += window_nll(logits, ids).tolist()
    # Every window's NLL in window order: each rank fills its own (shard's) positions, the sum joins them.
    nlls = [0.0] * windows.size(0)
    for k, value in zip(range(distributed.rank(), windows.size(0), distributed.world_size()), local_nlls):
        nlls[k] = value
    nlls = distributed.all_sum(nlls)
    total = math.fsum(nlls)
    tokens = windows.size(0) * (windows.size(1) - 1)
    mean = total / tokens
    return PplResult(math.exp(mean) if mean < 700 else math.inf, total, tokens, windows.size(0),
                     time.perf_counter() - start, nlls)
