"""Shared-prefix scoring of log-likelihood requests: a context runs once, its continuations from its
keys and values.

A multiple-choice task asks for log P(continuation | context) once per choice, and lm-eval's HFLM runs
context + continuation for every one of them (HellaSwag's context four times). Here requests are grouped
by their context token sequence, which catches both kinds of sharing: the choices of one question, and
identical contexts across documents (WinoGrande's twin sentences). A group's context runs once with the
KV cache on; its continuations then run together on copies of that cache, right-padded: a padded
position comes after every real one, so the causal mask keeps it out of them, and its outputs are
dropped. Contexts of several groups run in one forward, right-padded the same way; their continuations
then carry an attention mask over the context pads and their own positions. A model with sliding-window
layers (whose window counts cache slots, pads included) batches only contexts of one length.

The numbers are HFLM's own: the context/continuation boundary is the encodings HFLM made (nothing is
re-tokenized), the first continuation token is scored from the context's last position, the log-softmax
runs in HFLM's dtype, and a continuation is greedy when the argmax equals it at every one of its tokens.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# ((context, continuation) or None, context tokens, continuation tokens): HFLM's _loglikelihood_tokens input.
Request = tuple[tuple[str, str] | None, list[int], list[int]]
# forward(input_ids [B, T], cache or None, logits_to_keep, attention_mask, position_ids) -> (logits [B, kept, V],
# cache after the call); logits_to_keep: 0 keeps every position, a [B, 1] tensor one position per row.
Forward = Callable[..., tuple[torch.Tensor, object]]
# A forward's fixed cost, in tokens: SmolLM2-135M on a CPU core takes ~50 ms for one token and ~3-4 ms
# per token more, so a forward of its own beats padding a dozen tokens.
FORWARD_TOKENS = 16


def group_by_context(requests: Sequence[Request], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Indices of the requests that share a context (groups of two or more, in first-seen order), and
    the others: contexts asked once, where sharing saves nothing, requests HFLM would truncate (context
    + continuation longer than ``max_length + 1``), whose boundary moves, and empty ones (HFLM refuses them)."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    alone = []
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(context) + len(continuation) > max_length + 1:
            alone.append(i)
        else:
            groups[tuple(context)].append(i)
    shared = [members for members in groups.values() if len(members) > 1]
    alone += [members[0] for members in groups.values() if len(members) == 1]
    return shared, sorted(alone)


def token_counts(requests: Sequence[Request], max_length: int) -> tuple[int, int]:
    """Tokens HFLM runs through the model for ``requests`` and tokens shared-prefix scoring runs: the
    bound on the speed-up. HFLM's count applies its own reuse (one run for requests whose context +
    continuation[:-1] agree) and truncation."""
    def hf(request: Request) -> tuple[int, ...]:
        return tuple((request[1] + request[2])[-(max_length + 1):][:-1])

    hf_tokens = sum(len(key) for key in {hf(r) for r in requests})
    shared, alone = group_by_context(requests, max_length)
    ours = sum(len(key) for key in {hf(requests[i]) for i in alone})
    ours += sum(len(requests[g[0]][1]) + sum(len(requests[i][2]) - 1 for i in g) for g in shared)
    return hf_tokens, ours


def context_batches(requests: Sequence[Request], groups: Sequence[Sequence[int]], batch_size: int,
                    pad: bool = True) -> list[list[Sequence[int]]]:
    """``groups`` in batches of at most ``batch_size`` contexts, longest first, cut where padding to the
    longest would cost more than another forward (``split_rows``); without ``pad``, a batch holds contexts
    of one length only."""
    ordered = sorted(groups, key=lambda members: -len(requests[members[0]][1]))
    lengths = [len(requests[members[0]][1]) for members in ordered]
    spans = split_rows(lengths, batch_size)
    if not pad:
        spans = [(a + i, a + j) for a, b in spans for i, j in runs(lengths[a:b])]
    return [ordered[start:end] for start, end in spans]


def runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """Spans of equal consecutive values."""
    cuts = [0] + [i for i in range(1, len(values)) if values[i] != values[i - 1]] + [len(values)]
    return list(zip(cuts[:-1], cuts[1:]))


def split_rows(widths: Sequence[int], batch_size: int, forward_tokens: int = FORWARD_TOKENS) -> list[tuple[int, int]]:
    """Cut rows of descending ``widths`` into forwards ``[start, end)`` of at most ``batch_size`` rows, at
    the least cost: tokens run, padding included, plus ``forward_tokens`` a forward (rows of width 0 need
    none). Continuations vary more in length than whole requests do, so one batch padded to its longest
    row would run mostly padding."""
    best, cut = [0.0] + [float("inf")] * len(widths), [0] * (len(widths) + 1)
    for end in range(1, len(widths) + 1):
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + ((forward_tokens + (end - start) * widths[start]) if widths[start] else 0)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    spans, end = [], len(widths)
    while end:
        spans.append((cut[end], end))
        end = cut[end]
    return spans[::-1]


def score_contexts(forward: Forward, contexts: Sequence[list[int]], continuations: Sequence[Sequence[list[int]]],
                   batch_size: int, softmax_dtype: torch.dtype | None = None) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is_greedy) of ``continuations[g]`` after ``contexts[g]``: the contexts run once,
    together, right-padded; the continuations at most ``batch_size`` at a time, longest first
    (``split_rows``), each row on its context's cached keys and values."""
    lengths = torch.tensor([len(c) for c in contexts])
    longest = int(lengths.max())
    padded = bool((lengths < longest).any())
    inputs = torch.tensor([c + [c[-1]] * (longest - len(c)) for c in contexts])
    last, cache = forward(inputs, None, (lengths - 1)[:, None] if padded else 1)
    first = F.log_softmax(last[:, -1], dim=-1, dtype=softmax_dtype)  # scores each continuation's first token
    rows = sorted(((g, j) for g, conts in enumerate(continuations) for j in range(len(conts))),
                  key=lambda row: -len(continuations[row[0]][row[1]]))
    scores: list[list] = [[None] * len(conts) for conts in continuations]
    widths = [len(continuations[g][j]) - 1 for g, j in rows]  # a continuation's last token is never an input
    for start, end in split_rows(widths, batch_size):
        batch = rows[start:end]
        conts = [continuations[g][j] for g, j in batch]
        width = widths[start]
        if width:
            owners = torch.tensor([g for g, _ in batch])
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_select_indices(owners)
            mask = positions = None
            if padded:  # the context pads are masked out, the continuation goes on from its context's end
                mask = torch.cat([torch.arange(longest)[None] < lengths[owners, None],
                                  torch.ones(len(batch), width, dtype=torch.bool)], dim=1).long()
                positions = lengths[owners, None] + torch.arange(width)[None]
            inputs = torch.tensor([c[:-1] + [c[0]] * (width - len(c) + 1) for c in conts])  # right-padded
            logits, _ = forward(inputs, rows_cache, 0, mask, positions)
            rest = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
        for row, ((g, j), cont) in enumerate(zip(batch, conts)):
            logprobs = torch.cat([first[g][None], rest[row, :len(cont) - 1]]) if len(cont) > 1 else first[g][None]
            target = torch.tensor(cont, device=logprobs.device)
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            scores[g][j] = (float(logprobs.gather(1, target[:, None]).sum()), greedy)
    return scores


def score_shared(forward: Forward, requests: Sequence[Request], groups: Sequence[Sequence[int]], batch_size: int,
                 softmax_dtype: torch.dtype | None = None, pad: bool = True,
                 on_scored: Callable[[int], None] = lambda n: None) -> dict[int, tuple[float, bool]]:
    """Scores of the requests in ``groups`` (lists of indices into ``requests`` sharing one context), by
    request index; ``pad``: contexts of different lengths may share a forward (``context_batches``);
    ``on_scored(n)`` is told the number of requests of each batch scored (progress)."""
    scores = {}
    for batch in context_batches(requests, groups, batch_size, pad):
        found = score_contexts(forward, [requests[members[0]][1] for members in batch],
                               [[requests[i][2] for i in members] for members in batch], batch_size, softmax_dtype)
        for members, group_scores in zip(batch, found, strict=True):
            scores.update(zip(members, group_scores, strict=True))
        on_scored(sum(map(len, batch)))
    return scores
