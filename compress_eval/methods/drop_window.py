"""Sliding-window layer drop (the FF-merging paper's baseline): remove the contiguous window of k
blocks whose removal gives the lowest calibration perplexity. Every window start s runs only the
blocks after the window, from the cached state entering block s."""

from __future__ import annotations

from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.depth_pruning import DEPTH_DEFAULT, DepthPruningOptions, lowest
from compress_eval.methods.registry import register_method
from compress_eval.scoring.chart import importance_chart
from compress_eval.scoring.importance import removal_ppl


@register_method
class DropWindow(Compressor):
    name = "drop-window"
    runs_partial_blocks = True
    options_class = DepthPruningOptions
    default_amount = DEPTH_DEFAULT
    summary = "remove the contiguous window of blocks with the lowest calibration ppl when skipped"

    def memory_shape(self, blocks: int) -> dict:
        """Candidates: every window start, each advanced through the blocks after its window."""
        shape = super().memory_shape(blocks)
        return {**shape, "logits_scoring": True, "candidates": blocks - shape["remove_blocks"] + 1}

    def compress(self, adapter, calib) -> CompressionRecord:
        k = self.cfg.blocks_to_remove(adapter.num_blocks)
        starts = list(range(adapter.num_blocks - k + 1))
        nll, ppl = removal_ppl(self.options.prefix_states(adapter, calib), starts, width=k)
        best = starts[lowest(nll, 1)[0]]
        removed = list(range(best, best + k))
        adapter.remove_blocks(removed)
        chart = importance_chart([{"blocks": starts, "scores": ppl, "removed": [best]}],
                                 f"Window drop: calibration ppl without blocks s..s+{k - 1}",
                                 "calibration ppl (x = start of the window)")
        return CompressionRecord(
            removed_blocks=removed,
            details={"score": "calibration ppl with blocks s..s+k-1 skipped", "window": k,
                     "starts": starts, "nll": nll, "ppl": ppl, "best_start": best},
            artifacts={"drop_window_scores.png": chart},
        )
