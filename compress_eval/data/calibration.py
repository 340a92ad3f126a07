"""Token windows: non-overlapping evaluation windows and seeded random calibration windows."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from compress_eval.data.corpora import corpus_text, eval_split, training_text
from compress_eval.errors import UserError

# C4 evaluation keeps the first 256 x seqlen tokens (GPTQ's protocol).
C4_EVAL_WINDOWS = 256
# Recovery text from both train splits, half each (general web text and encyclopedic prose).
MIXED_CORPUS = "c4+wikitext2"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (no truncation, no special tokens added mid-text)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids
    return ids[0]


def eval_windows(tokenizer, dataset: str, seqlen: int, data_dir: str | Path | None = None,
                 max_windows: int | None = None) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows of the evaluation split; the tail is dropped."""
    ids = tokenize(tokenizer, corpus_text(dataset, eval_split(dataset), data_dir))
    n = ids.numel() // seqlen
    if dataset == "c4":
        n = min(n, C4_EVAL_WINDOWS)
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"{dataset} has fewer than seqlen={seqlen} tokens: lower the evaluation window "
                        f"(--eval-seqlen of run/compress, --seqlen of eval/ppl)")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_windows(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir: str | Path | None = None) -> torch.Tensor:
    """(nsamples, seqlen) random windows of the calibration split, reproducible from ``seed``.

    WikiText-2 train on the Hub (validation offline); for C4 the training shard on the Hub, and
    offline the documents after the first 1100 of the local subset (the evaluation ones).
    """
    if nsamples < 1 or seqlen < 2:
        raise UserError("calibration needs at least 1 sample of at least 2 tokens")
    ids = tokenize(tokenizer, corpus_text(dataset, "train", data_dir))
    if ids.numel() <= seqlen:
        raise UserError(f"calibration corpus {dataset} is shorter than seqlen={seqlen}: lower --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s: s + seqlen] for s in starts])


def training_windows(tokenizer, dataset: str, count: int, seqlen: int,
                     data_dir: str | Path | None = None) -> torch.Tensor:
    """(count, seqlen) consecutive windows from the start of the train split: each trained on once.
    ``c4+wikitext2`` alternates the two corpora's windows (C4 first), so any prefix of the steps sees both."""
    if dataset == MIXED_CORPUS:
        c4, wiki = (training_windows(tokenizer, name, n, seqlen, data_dir)
                    for name, n in (("c4", (count + 1) // 2), ("wikitext2", count // 2)))
        mixed = torch.empty(count, seqlen, dtype=c4.dtype)
        mixed[0::2], mixed[1::2] = c4, wiki
        return mixed
    needed = count * seqlen
    chars = needed * 8  # well over the characters per token of any LLaMA-class tokenizer
    ids = tokenize(tokenizer, training_text(dataset, data_dir, chars))
    if ids.numel() < needed:
        raise UserError(f"the {dataset} train split has {ids.numel()} tokens, fewer than --recover-steps x "
                        f"--recover-batch-size x --recover-seqlen = {needed}: lower one of them")
    return ids[:needed].view(count, seqlen)
