"""Removed sublayers: a decoder block is ``h += Attn(norm(h)); h += MLP(norm(h))``, and a removed
attention or MLP sublayer is a parameter-free module that adds nothing to the residual stream.

A removed sublayer's output is zeros, so the block computes exactly ``h + 0`` where the sublayer was
(a norm applied after it, as Gemma-2's, maps zeros to zeros). Its weights are gone: a checkpoint
stores only what is left, its manifest lists the removed module paths (``skipped``), and the loader
puts the empty modules back in place (``Adapter.skip_paths``). A removed attention still tells the KV
cache how many positions went by (zero keys of one channel: the cache counts an empty tensor as no
positions), because ``generate`` reads the sequence length from the cache's first layer.
"""

from __future__ import annotations

import torch
from torch import nn

# What transformers versions have called a decoder layer's cache argument.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


class SkippedAttention(nn.Module):
    """An attention sublayer that was removed: zeros out (and no attention weights)."""

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx  # renumbered with its block (the cache is indexed by it)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
        if cache is not None and hasattr(cache, "update") and self.layer_idx is not None:
            marker = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(marker, marker, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """An MLP sublayer that was removed: zeros out."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


KINDS = ("attn", "mlp")


def skipped_module(kind: str, original: nn.Module) -> nn.Module:
    """The empty module that takes the place of a removed sublayer of ``kind``."""
    if kind == "attn":
        return SkippedAttention(getattr(original, "layer_idx", None))
    if kind == "mlp":
        return SkippedMLP()
    raise ValueError(f"sublayer kind must be one of {KINDS}, got {kind!r}")


def is_skipped(module: nn.Module) -> bool:
    return isinstance(module, (SkippedAttention, SkippedMLP))


def skipped_paths(model: nn.Module) -> list[str]:
    """Module paths of every removed sublayer in ``model`` (what its manifest records)."""
    return [name for name, module in model.named_modules() if is_skipped(module)]
