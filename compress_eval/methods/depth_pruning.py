"""What the depth-pruning methods share: their options and the choice of the lowest scores."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress_eval.config import MethodOptions
from compress_eval.models.adapters import Adapter
from compress_eval.scoring.prefix import PrefixStates


class DepthPruningOptions(MethodOptions):
    batch_size: int = Field(8, ge=1, description="calibration windows per batch when caching and scoring")
    cache_store: Literal["device", "cpu"] = Field(
        "device", description="where the cached hidden states live: the model's device, or cpu to leave "
                              "accelerator memory to the suffix runs (large models)")

    def prefix_states(self, adapter: Adapter, calib: torch.Tensor) -> PrefixStates:
        return PrefixStates(adapter, calib, self.batch_size, None if self.cache_store == "device" else "cpu")


# The papers' main setting (ShortGPT, SLEB and FuseGPT all report 25 % of the blocks removed).
DEPTH_DEFAULT = {"sparsity": 0.25}


def lowest(scores: list[float], k: int) -> list[int]:
    """Positions of the k lowest scores, lowest first; ties go to the lower position."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k]
