"""Explicit block removal: ``--method drop --blocks 3,4`` (no scoring, no calibration)."""

from __future__ import annotations

from compress_eval.errors import UserError
from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.registry import register_method


@register_method
class Drop(Compressor):
    name = "drop"
    runs_partial_blocks = True
    needs_calibration = False
    takes_blocks = True
    summary = "remove the blocks given by --blocks (original indices)"

    def compress(self, adapter, calib) -> CompressionRecord:
        if not self.cfg.blocks:
            raise UserError("method 'drop' needs --blocks, e.g. --blocks 3,4")
        removed = sorted(self.cfg.blocks)
        self.cfg.blocks_to_remove(adapter.num_blocks)  # refuses removing every block
        adapter.remove_blocks(removed)
        return CompressionRecord(removed_blocks=removed)
