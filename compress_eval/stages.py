"""The stages of a run, one kind of thing: a method, a recovery fine-tune or the quantization each runs
on the model with the calibration windows and the run's context, and says what it did as a
:class:`StageRecord`. The pipeline loops over them; a new kind of stage is a class here beside its config.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from compress_eval.config import CompressConfig, MethodStage, QuantizeStage, RecoverStage
from compress_eval.manifest import StageRecord
from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.recovery import fine_tune
from compress_eval.models import checkpoint
from compress_eval.models.adapters import Adapter
from compress_eval.models.loading import shared_modules
from compress_eval.models.sublayers import skipped_paths
from compress_eval.quantize import quantize_model

log = logging.getLogger(__name__)


class Timer:
    """Named wall-clock timings of the pipeline's steps, for the manifest (a step run in several stages
    adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0) + time.perf_counter() - start, 3)


@dataclass
class RunContext:
    """What the stages of one run share, and what they leave for the manifest."""

    cfg: CompressConfig
    model: torch.nn.Module  # the quantize stage replaces it
    adapter: Adapter
    stages: int
    timer: Timer = field(default_factory=Timer)
    teacher: torch.nn.Module | None = None  # kd recovery's uncompressed model
    training: dict[int, torch.Tensor] = field(default_factory=dict)  # each recovery stage's windows, by number
    original: list[int] = field(default_factory=list)  # the original index of each block still there
    records: list[tuple[int, Compressor, CompressionRecord]] = field(default_factory=list)
    recovery: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    tie_map: dict[str, str] = field(default_factory=dict)
    params_after: int = 0  # before quantization: bitsandbytes packs 2 per byte
    state_dir: Path | None = None  # where recovery stages without their own recover_resume keep their state

    def __post_init__(self):
        self.original = list(range(self.adapter.num_blocks))

    def finish(self) -> None:
        """Each method's finishing step (after the fine-tunes), then the ties and size the checkpoint keeps."""
        self.records = [(n, m, m.finish(self.adapter, r)) for n, m, r in self.records]
        self.tie_map = shared_modules(self.model)  # this run's ties and those of the checkpoint it started from
        self.params_after = checkpoint.parameter_count(self.model)

    @contextmanager
    def recording(self, kind: str, what: dict[str, Any]):
        """Times a stage and fills ``what`` with its StageRecord's fields (the sublayers it skipped, the
        size after it)."""
        start, skipped_before = time.perf_counter(), skipped_paths(self.model)
        yield what
        what.update(kind=kind, skipped=[p for p in skipped_paths(self.model) if p not in skipped_before],
                    params_after=checkpoint.parameter_count(self.model),
                    weight_bytes_after=checkpoint.weight_bytes(self.model),
                    seconds=round(time.perf_counter() - start, 3))


class StageRun(ABC):
    """One stage of a run."""

    # Runs on the float model, before the methods' finishing step (quantization does not).
    on_floats: ClassVar[bool] = True

    @abstractmethod
    def run(self, model: torch.nn.Module, calibration: torch.Tensor | None, context: RunContext) -> StageRecord:
        """Change ``model`` (or replace ``context.model``) and say what changed."""


@dataclass
class MethodRun(StageRun):
    number: int
    method: Compressor

    def run(self, model, calibration, context) -> StageRecord:
        if context.stages > 1:
            log.info("stage %d/%d: %s", self.number, context.stages, self.method.name)
        with context.recording("method", {"method": self.method.name}) as what:
            with context.timer.step("compress"):
                record = self.method.compress(context.adapter, calibration)
            gone = set(record.removed_blocks)
            record = replace(record, removed_blocks=[context.original[i] for i in record.removed_blocks])
            context.original = [b for i, b in enumerate(context.original) if i not in gone]
            context.records.append((self.number, self.method, record))
            what.update(removed_blocks=record.removed_blocks, tied=sorted(record.tie_map))
        return StageRecord(**what)


@dataclass
class RecoverRun(StageRun):
    number: int
    stage: RecoverStage

    def run(self, model, calibration, context) -> StageRecord:
        autosave = context.state_dir / f"stage{self.number}" if context.state_dir is not None else None
        with context.recording("recover", {"method": None}) as what:
            with context.timer.step("recover"):
                context.recovery = fine_tune(model, context.training.pop(self.number), self.stage,
                                             seed=context.cfg.seed,
                                             teacher=context.teacher if self.stage.distils else None,
                                             autosave=autosave)
        return StageRecord(**what)


@dataclass
class QuantizeRun(StageRun):
    stage: QuantizeStage
    on_floats: ClassVar[bool] = False

    def run(self, model, calibration, context) -> StageRecord:
        log.info("quantizing to %s with bitsandbytes", self.stage.quantize)
        start = time.perf_counter()
        with context.timer.step("quantize"):
            context.model, context.quantization = quantize_model(model, self.stage.quantize, self.stage.double_quant,
                                                                 self.stage.compute_dtype, context.tie_map)
        return StageRecord(kind="quantize", params_after=context.params_after,
                           weight_bytes_after=checkpoint.weight_bytes(context.model),
                           seconds=round(time.perf_counter() - start, 3))


def stage_runs(cfg: CompressConfig, methods: list[Compressor | None]) -> list[StageRun]:
    """The runs of a (resolved) config's stages, numbered from 1, with their method instances."""
    return [MethodRun(n, method) if isinstance(stage, MethodStage) else RecoverRun(n, stage)
            if isinstance(stage, RecoverStage) else QuantizeRun(stage)
            for n, (stage, method) in enumerate(zip(cfg.stage_list(), methods), 1)]
