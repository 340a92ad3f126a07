"""The manifest (``compress_eval.json``): what was done to a checkpoint, as one typed model.

Written by the pipeline's save, parsed by every reader (the loader re-ties modules from
``tie_map`` and empties the ``skipped`` sublayers, a quantized checkpoint is placed from ``quantization``, the leaderboard reads the
counts). Fields other writers (older or newer releases) added are kept and ignored, so every
manifest written so far still reads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

FORMAT = "compress-eval/1"


class BaseModelRef(BaseModel):
    """The model that was compressed: the name given, and where it resolved (local, packaged, hub)."""

    model_config = ConfigDict(extra="allow")

    name: str
    kind: str | None = None
    location: str | None = None


class StageRecord(BaseModel):
    """What one stage did: what it removed (indices in the original model) or tied, the size after it."""

    model_config = ConfigDict(extra="allow")

    kind: str = Field(description="method, recover or quantize")
    method: str | None = None
    removed_blocks: list[int] = Field(default_factory=list)
    tied: list[str] = Field(default_factory=list, description="module paths that share another's storage")
    skipped: list[str] = Field(default_factory=list, description="sublayers it removed (module paths after it)")
    params_after: PositiveInt
    weight_bytes_after: PositiveInt
    seconds: float


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    created: str | None = None
    base_model: BaseModelRef
    method: str
    config: dict[str, Any] = Field(default_factory=dict, description="the resolved CompressConfig")
    method_options: dict[str, Any] = Field(default_factory=dict)
    recipe: str | None = None
    seed: int | None = None
    data_dir: str | None = Field(None, description="the local data directory the run read (calibration, "
                                                   "fine-tunes); None: the Hugging Face Hub")
    blocks_before: PositiveInt
    blocks_after: PositiveInt | None = None
    removed_blocks: list[int] = Field(default_factory=list, description="indices in the original model")
    tie_map: dict[str, str] = Field(default_factory=dict, description="module path -> the path it shares")
    skipped: list[str] = Field(default_factory=list, description="module paths of removed attention or MLP "
                                                                 "sublayers (no weights; empty modules on load)")
    params_before: PositiveInt
    params_after: PositiveInt
    weight_bytes_before: PositiveInt = Field(description="bytes of the stored tensors (see weight_bytes)")
    weight_bytes_after: PositiveInt
    offload: str | None = Field(None, description="where the weights waited while blocks ran: none, cpu or disk")
    distributed: dict[str, Any] | None = Field(None, description="data parallel: world size, windows per rank")
    quantization: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    stages: list[StageRecord] = Field(default_factory=list, description="each stage in the order it ran")
    details: dict[str, Any] = Field(default_factory=dict, description="the method's own record (several "
                                                                      "methods: 'STAGE:METHOD' -> its record)")
    timings_s: dict[str, float] = Field(default_factory=dict)
    peak_rss_mb: float | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    git_sha: str | None = None

    @property
    def quantized(self) -> bool:
        return bool(self.quantization)
