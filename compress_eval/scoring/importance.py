"""Block importance for depth pruning, from cached prefix states.

* ShortGPT's Block Influence, BI_i = 1 - mean_{n,t} cos(X_i, X_{i+1}): a block that barely turns
  the hidden state matters little. The states come from :class:`PrefixStates` (hooks on the blocks),
  never from ``output_hidden_states``, whose last entry has the final norm applied.
* SLEB's calibration loss of the model with block j (or a window of blocks) skipped: the summed
  token NLL of the calibration windows, each candidate running only its suffix from the cached X_j.

FuseGPT's Macro Influence (``methods/fusegpt.py``) is scored from the same cache.

The ``naive_*`` functions compute the same numbers the plain way (hooked full forwards, full
forwards of a pruned copy); they are the reference for the tests and the speedup benchmark.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from compress_eval import distributed
from compress_eval.models.adapters import get_adapter
from compress_eval.scoring.prefix import PrefixStates, batches
from compress_eval.scoring.ppl import model_device, window_nll


def token_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(x_t, y_t) for every token, in fp32 (bf16 cosines of near-parallel states round to 1)."""
    return F.cosine_similarity(x.float(), y.float(), dim=-1)


def block_influence(prefix: PrefixStates) -> list[float]:
    """BI_i for every block i of the cached model."""
    scores = []
    for i in range(prefix.adapter.num_blocks):
        cos_sum, count = 0.0, 0
        for b in range(prefix.num_batches):
            cos = token_cosines(prefix.entering(i, b), prefix.entering(i + 1, b))
            cos_sum += cos.sum().item()
            count += cos.numel()
        cos_sum, count = distributed.all_sum([cos_sum, count])
        scores.append(1.0 - cos_sum / count)
    return scores


def removal_nll(prefix: PrefixStates, candidates=None, width: int = 1) -> list[float]:
    """Calibration NLL of the model without blocks i..i+width-1, for each candidate start i."""
    return prefix.score_each_removal(prefix.batch_nll, candidates, width)


def removal_ppl(prefix: PrefixStates, candidates=None, width: int = 1) -> tuple[list[float], list[float]]:
    """(calibration NLL, calibration perplexity) of the model without blocks i..i+width-1, for each
    candidate start i."""
    nll = removal_nll(prefix, candidates, width)
    return nll, [prefix.ppl(n) for n in nll]


def pruned_copy(model, remove: list[int]):
    """A deep copy of ``model`` without the given blocks (current indices)."""
    pruned = copy.deepcopy(model)
    get_adapter(pruned).remove_blocks(remove)
    return pruned


@torch.no_grad()
def full_forward_nll(model, calib: torch.Tensor, batch_size: int = 8) -> float:
    """Summed next-token NLL of the calibration windows by full forward passes."""
    device = model_device(model)
    total = 0.0
    for ids in batches(calib, batch_size):
        ids = ids.to(device)
        total += window_nll(model(input_ids=ids, use_cache=False).logits, ids).sum().item()
    return total


def naive_removal_nll(model, calib: torch.Tensor, remove: list[int], batch_size: int = 8) -> float:
    """Calibration NLL of a pruned deep copy of ``model``, by full forward passes."""
    return full_forward_nll(pruned_copy(model, remove), calib, batch_size)


@torch.no_grad()
def naive_block_influence(model, calib: torch.Tensor, batch_size: int = 8) -> list[float]:
    """BI from full forward passes, block inputs and outputs taken by hooks."""
    adapter = get_adapter(model)
    sums = [0.0] * adapter.num_blocks
    count = 0

    def make_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            sums[i] += token_cosines(x, adapter.block_output(output)).sum().item()
        return hook

    handles = [block.register_forward_hook(make_hook(i), with_kwargs=True)
               for i, block in enumerate(adapter.blocks)]
    try:
        for ids in batches(calib, batch_size):
            model(input_ids=ids.to(model_device(model)), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / count for s in sums]


@torch.no_grad()
def last_states(model, calib: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """The last block's output (before the final norm) per calibration batch, by full forwards of the
    decoder (``base_model``: embeddings, every block, final norm; no LM head), taken by a hook."""
    adapter = get_adapter(model)
    states = []
    handle = adapter.blocks[-1].register_forward_hook(
        lambda module, args, kwargs, output: states.append(adapter.block_output(output)), with_kwargs=True)
    try:
        for ids in batches(calib, batch_size):
            model.base_model(input_ids=ids.to(model_device(model)), use_cache=False)
    finally:
        handle.remove()
    return states


def naive_macro_influence(model, calib: torch.Tensor, batch_size: int = 8) -> list[float]:
    """FuseGPT's MI_i = 1 - mean cos(H, H^(-i)) with H^(-i) from a pruned copy run through every block."""
    dense = last_states(model, calib, batch_size)
    scores = []
    for i in range(get_adapter(model).num_blocks):
        pruned = last_states(pruned_copy(model, [i]), calib, batch_size)
        scores.append(1.0 - sum(token_cosines(d, h).sum().item() for d, h in zip(dense, pruned)) / calib.numel())
    return scores
