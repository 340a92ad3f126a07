"""The method interface: a method takes a model, its adapter and calibration windows, changes the
model in place and returns a record for the manifest. It never loads data or writes files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from compress_eval.config import CompressConfig, MethodOptions
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
    def amount_given(cls, cfg: CompressConfig) -> bool:
        """Whether the user said how much to remove (depth methods: --sparsity/--num-blocks/--blocks/
        --param-sparsity)."""
        return cfg.amount_given()

    @abstractmethod
    def compress(self, adapter: Adapter, calib: torch.Tensor | None) -> CompressionRecord:
        """Compress ``adapter.model`` in place."""

    def finish(self, adapter: Adapter, record: CompressionRecord) -> CompressionRecord:
        """What the method does after the recovery stage (before quantization); nothing by default."""
        return record
