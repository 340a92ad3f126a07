"""Sublayer pruning (BlockPruner, Zhong et al.): every attention and every MLP sublayer of every block
is a candidate; remove, one at a time, the one whose skipping least raises the summed token NLL of the
calibration windows (recomputed on the pruned model after each removal), until the parameters
removed reach the target.

Skipping a sublayer leaves the states entering its block unchanged, so each candidate runs only its
own block (without the sublayer) and the blocks after it, from the cached state (as SLEB, with twice
the candidates). A block that loses both sublayers is the identity and is removed as a block.
"""

from __future__ import annotations

import math
import time

from pydantic import Field

from compress_eval.errors import UserError
from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.depth_pruning import DEPTH_DEFAULT, DepthPruningOptions, lowest
from compress_eval.methods.registry import register_method
from compress_eval.models.sublayers import KINDS
from compress_eval.progress import bar
from compress_eval.scoring.prefix import calibration_tokens


class SublayerOptions(DepthPruningOptions):
    num_sublayers: int | None = Field(None, ge=1, description="remove this many sublayers (instead of a "
                                                              "parameter target)")


def parameter_target(cfg, adapter) -> int:
    """Parameters to remove: --param-sparsity (or --sparsity, the same fraction of the blocks'
    parameters) of the blocks, or --num-blocks blocks' worth."""
    fraction = cfg.param_sparsity or cfg.sparsity or (cfg.num_blocks and cfg.num_blocks / adapter.num_blocks)
    if not fraction or fraction >= 1:
        raise UserError("method 'sublayer' needs an amount below the whole decoder: give --param-sparsity F, "
                        "--sparsity F (0 < F < 1), --num-blocks N (fewer than the blocks) or --num-sublayers N")
    return math.ceil(round(fraction * adapter.block_parameters(), 6))


@register_method
class SublayerPruning(Compressor):
    name = "sublayer"
    options_class = SublayerOptions
    default_amount = DEPTH_DEFAULT
    removes_sublayers = True
    runs_partial_blocks = True
    summary = ("remove attention and MLP sublayers one by one, each time the one whose skipping least raises "
               "calibration NLL, until the parameters removed reach the target (BlockPruner)")

    @classmethod
    def given_amount(cls, cfg) -> dict:
        count = cfg.options.get("num_sublayers")
        return {**cfg.given(), **({} if count is None else {"num_sublayers": count})}

    def memory_shape(self, blocks: int) -> dict:
        """Candidates: both sublayers of every block, each advanced through the blocks after it."""
        return {**super().memory_shape(blocks), "logits_scoring": True, "candidates": 2 * blocks}

    def compress(self, adapter, calib) -> CompressionRecord:
        if self.cfg.blocks is not None:
            raise UserError("method 'sublayer' chooses its sublayers: give --param-sparsity or --num-sublayers, "
                            "not --blocks")
        count = self.options.num_sublayers
        if count is not None and self.cfg.given():
            raise UserError("give method 'sublayer' one amount: --num-sublayers, or --param-sparsity / --sparsity "
                            "/ --num-blocks")
        target = None if count is not None else parameter_target(self.cfg, adapter)
        if count is not None and count >= 2 * adapter.num_blocks:
            raise UserError(f"--num-sublayers {count} would remove all {2 * adapter.num_blocks} sublayers: lower it")
        original = list(range(adapter.num_blocks))  # original index of each current block
        tokens = calibration_tokens(calib)
        iterations, removed_params, removed_blocks, start = [], 0, [], time.perf_counter()
        with bar(total=count or target, desc="sublayer: removals", unit="sublayer" if count else "param") as shown:
            while (len(iterations) < count) if count is not None else (removed_params < target):
                candidates = [(i, kind) for i in range(adapter.num_blocks) for kind in KINDS
                              if adapter.has_sublayer(i, kind)]
                if len(candidates) == 1:
                    raise UserError("the target would remove every sublayer: lower the amount")
                prefix = self.options.prefix_states(adapter, calib)
                nll = prefix.score_each_sublayer_removal(prefix.batch_nll, candidates)
                i, kind = candidates[lowest(nll, 1)[0]]
                params = adapter.sublayer_parameters(i, kind)
                removed_params += params
                iterations.append({"candidates": [[original[c], k] for c, k in candidates], "nll": nll,
                                   "ppl": [prefix.ppl(x) for x in nll], "removed": [original[i], kind],
                                   "parameters": params, "seconds": round(time.perf_counter() - start, 3)})
                adapter.skip_sublayer(i, kind)
                if not any(adapter.has_sublayer(i, k) for k in KINDS):  # the block is now the identity
                    adapter.remove_blocks([i])
                    removed_blocks.append(original.pop(i))
                shown.update(1 if count else params)
        return CompressionRecord(
            removed_blocks=sorted(removed_blocks),
            details={"score": "summed token NLL of the calibration windows with the sublayer skipped",
                     "calibration_tokens": tokens, "target_parameters": target,
                     "removed_parameters": removed_params,
                     "removal_order": [it["removed"] for it in iterations], "iterations": iterations},
        )
