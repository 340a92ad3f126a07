"""The identity method: the dense reference row of a leaderboard, or a base for ``--quantize`` alone."""

from __future__ import annotations

from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.registry import register_method


@register_method
class NoCompression(Compressor):
    name = "none"
    runs_partial_blocks = True
    needs_calibration = False
    summary = "leave the model as it is (dense reference, or quantization alone with --quantize)"

    def memory_shape(self, blocks: int) -> dict:
        return {"kind": "none", "remove_blocks": 0, "score_samples": 0}

    def compress(self, adapter, calib) -> CompressionRecord:
        return CompressionRecord()
