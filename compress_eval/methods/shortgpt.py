"""ShortGPT: remove, in one shot, the k blocks of lowest Block Influence on the calibration data."""

from __future__ import annotations

from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.depth_pruning import DEPTH_DEFAULT, DepthPruningOptions, lowest
from compress_eval.methods.registry import register_method
from compress_eval.scoring.chart import importance_chart
from compress_eval.scoring.importance import block_influence


@register_method
class ShortGPT(Compressor):
    name = "shortgpt"
    runs_partial_blocks = True
    options_class = DepthPruningOptions
    default_amount = DEPTH_DEFAULT
    summary = "remove the blocks of lowest Block Influence, 1 - cos(X_i, X_i+1), in one shot (ShortGPT)"

    def compress(self, adapter, calib) -> CompressionRecord:
        k = self.cfg.blocks_to_remove(adapter.num_blocks)
        bi = block_influence(self.options.prefix_states(adapter, calib))
        order = lowest(bi, k)
        adapter.remove_blocks(order)
        blocks = list(range(len(bi)))
        chart = importance_chart([{"blocks": blocks, "scores": bi, "removed": order}],
                                 f"ShortGPT Block Influence ({k} lowest removed)", "BI = 1 - mean cos(X_i, X_i+1)")
        return CompressionRecord(
            removed_blocks=sorted(order),
            details={"score": "block influence, 1 - mean cos(X_i, X_i+1) over calibration tokens",
                     "block_influence": bi, "removal_order": order},
            artifacts={"shortgpt_block_influence.png": chart},
        )
