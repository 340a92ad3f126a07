"""The method interface: a method takes a model, its adapter and calibration windows, changes the
model in place and returns a record for the manifest. It never loads data and writes nothing into the
run directory (its charts go back in the record); the one file it may write is a long method's own
resumable state, in the directory the user names (FuseGPT's ``--resume``, ``methods.loop_state``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from compress_eval.config import Amount, CompressConfig, MethodOptions
from compress_eval.models.adapters import Adapter


@dataclass
class CompressionRecord:
    """What a method did, in terms a reader of the manifest can check.

    ``removed_blocks`` are indices in the original model; ``tie_map`` maps a module path to the
    path of the module it shares storage with; ``details`` holds per-iteration scores and the like.
    """

    removed_blocks: list[int] = field(default_factory=list)
    tie_map: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content (charts)


class Compressor(ABC):
    """Base class of every compression method (registered by name in ``methods.registry``)."""

    name: ClassVar[str]
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    needs_calibration: ClassVar[bool] = True
    takes_blocks: ClassVar[bool] = False  # explicit --blocks (others choose their blocks themselves)
    ties_modules: ClassVar[bool] = False  # shares modules across blocks (the manifest's tie map)
    removes_sublayers: ClassVar[bool] = False  # leaves blocks without their attention or MLP
    # Works on blocks that lost a sublayer (it runs or drops whole blocks, or reads only the sublayers left).
    runs_partial_blocks: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    # What a run given no amount uses (CompressConfig fields; method options under "options"), stated
    # in the log and recorded in the manifest's config; empty: the amount must be given.
    default_amount: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: CompressConfig):
        self.cfg = cfg
        self.options = self.options_class(**cfg.options)

    @classmethod
    def resolved_config(cls, cfg: CompressConfig) -> CompressConfig:
        """``cfg`` with what this method decides when the user did not (e.g. a profile's calibration
        size), as a new config; the identity for methods without such defaults. Must be idempotent."""
        return cfg

    @classmethod
    def given_amount(cls, cfg: Amount) -> dict[str, Any]:
        """How much the user said to remove, ``{field or option: value}`` in the order a run directory names
        them (empty: nothing said, so :attr:`default_amount` applies). Depth methods read the
        :class:`Amount` fields; a method with an amount of its own (merge's --ff-fraction) adds it."""
        return cfg.given()

    @classmethod
    def run_label(cls, stage: Amount) -> str:
        """The amount in the directory ``compress`` names without --out (``0.25``, ``2``, ``p0.3``, ``b3-4``,
        an option's value; ``0``: none), from a resolved stage."""
        key, value = next(iter(cls.given_amount(stage).items()), (None, 0))
        if key == "blocks":
            return "b" + "-".join(map(str, value))
        if key == "param_sparsity":
            return f"p{value}"
        return str(round(value, 3) if isinstance(value, float) else value)

    def memory_shape(self, blocks: int) -> dict[str, Any]:
        """What this method's run holds in memory, as ``plan.RunShape`` fields (besides the settings every
        run shares), for a model of ``blocks`` blocks: by default one pass that scores blocks from the
        prefix cache of every calibration window, or none without calibration."""
        cfg, o = self.cfg, self.options
        removed = cfg.blocks_to_remove(blocks) if cfg.given() else 1  # the method's default amount, else one
        if not self.needs_calibration:
            return {"kind": "none", "remove_blocks": removed, "score_samples": 0}
        return {"kind": "depth", "remove_blocks": removed, "score_samples": cfg.calib_samples,
                "cache_on_host": getattr(o, "cache_store", "device") == "cpu"}

    @abstractmethod
    def compress(self, adapter: Adapter, calib: torch.Tensor | None) -> CompressionRecord:
        """Compress ``adapter.model`` in place."""

    def finish(self, adapter: Adapter, record: CompressionRecord) -> CompressionRecord:
        """What the method does after the recovery stage (before quantization); nothing by default."""
        return record
