"""SLEB: remove blocks one at a time, each time the one whose skipping least raises the summed token
NLL of the calibration windows; scores are recomputed on the pruned model after every removal.

As the official code does, the first and the last remaining blocks are never candidates
(``--no-protect-ends`` lifts that).
"""

from __future__ import annotations

import time

from pydantic import Field

from compress_eval.errors import UserError
from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.depth_pruning import DEPTH_DEFAULT, DepthPruningOptions, lowest
from compress_eval.methods.registry import register_method
from compress_eval.progress import bar
from compress_eval.scoring.chart import importance_chart
from compress_eval.scoring.importance import removal_ppl
from compress_eval.scoring.prefix import calibration_tokens


class SlebOptions(DepthPruningOptions):
    protect_ends: bool = Field(True, description="never remove the first or the last remaining block")


def candidate_blocks(num_blocks: int, protect_ends: bool) -> list[int]:
    return list(range(1, num_blocks - 1)) if protect_ends else list(range(num_blocks))


@register_method
class Sleb(Compressor):
    name = "sleb"
    runs_partial_blocks = True
    options_class = SlebOptions
    default_amount = DEPTH_DEFAULT
    summary = "remove blocks one by one, each time the one whose skipping least raises calibration NLL (SLEB)"

    def memory_shape(self, blocks: int) -> dict:
        """Candidates: every block that may go, each advanced through the blocks after it."""
        candidates = len(candidate_blocks(blocks, self.options.protect_ends))
        return {**super().memory_shape(blocks), "logits_scoring": True, "candidates": candidates}

    def compress(self, adapter, calib) -> CompressionRecord:
        k = self.cfg.blocks_to_remove(adapter.num_blocks)
        if self.options.protect_ends and adapter.num_blocks - k < 2:
            raise UserError(f"sleb keeps the first and last blocks: remove at most {adapter.num_blocks - 2} "
                            "blocks, or pass --no-protect-ends")
        original = list(range(adapter.num_blocks))  # original index of each current block
        tokens = calibration_tokens(calib)
        iterations, start = [], time.perf_counter()
        for _ in bar(range(k), "sleb: removals", unit="block"):
            candidates = candidate_blocks(adapter.num_blocks, self.options.protect_ends)
            nll, ppl = removal_ppl(self.options.prefix_states(adapter, calib), candidates)
            best = candidates[lowest(nll, 1)[0]]
            iterations.append({"candidates": [original[c] for c in candidates], "nll": nll,
                               "ppl": ppl, "removed": original[best],
                               "seconds": round(time.perf_counter() - start, 3)})
            adapter.remove_blocks([best])
            del original[best]
        order = [it["removed"] for it in iterations]
        chart = importance_chart(
            [{"blocks": it["candidates"], "scores": it["ppl"], "removed": [it["removed"]]} for it in iterations],
            f"SLEB: calibration ppl with each block skipped ({k} iterations)", "calibration ppl without the block")
        return CompressionRecord(
            removed_blocks=sorted(order),
            details={"score": "summed token NLL of the calibration windows with the block skipped",
                     "calibration_tokens": tokens, "removal_order": order, "iterations": iterations},
            artifacts={"sleb_scores.png": chart},
        )
