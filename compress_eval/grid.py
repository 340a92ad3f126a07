"""Grid files: models x methods (with options) x amounts, evaluated on tasks, expanded into cells.

A cell is one compression + its evaluation. Its run directory is named by a hash of its config, so
re-running a grid finds the cells it already finished, and two grids that share a cell share its run.
The hash covers what determines the result (the compression config as written, defaults omitted,
and the evaluation protocol) and not the task list: adding a task to a grid evaluates the missing
task on the existing checkpoints instead of compressing again.

```yaml
models: [smollm2-135m]
sparsities: [0.1, 0.25]          # default amounts for methods that remove blocks
tasks: [wikitext2, c4]
eval: {seqlen: 512, max_windows: 20, limit: 200}   # limit: lm-eval tasks' first N documents
config: {calib_samples: 8, seed: 0}   # CompressConfig defaults for every cell
methods:
  - none                          # the dense reference: one cell per model, no amount
  - {method: drop, blocks: [[20, 21, 22]]}
  - {method: merge, label: merge-vanilla, options: {permute: false}, sweep: {ff_fraction: [0.333, 0.5]},
     sparsities: [null]}
  - {label: fuse+merge, stages: [{method: fuse, sparsity: 0.2}, {method: merge, options: {ff_fraction: 0.2}}]}
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress_eval.config import CompressConfig, validation_message
from compress_eval.errors import UserError
from compress_eval.eval_config import EvalConfig
from compress_eval.methods.registry import resolve_config

HASH_CHARS = 12


class MethodEntry(BaseModel):
    """One method of a grid; each list field multiplies the cells, options are passed as they are."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(None, description="the method (or give stages)")
    stages: list[dict[str, Any]] | None = Field(None, description="a multi-stage recipe's stages, amounts inside")
    label: str | None = Field(None, description="name on the leaderboard (default: the method)")
    options: dict[str, Any] = Field(default_factory=dict)
    sweep: dict[str, list] = Field(default_factory=dict, description="option -> values, one cell each")
    sparsities: list[float | None] | None = Field(None, description="overrides the grid's sparsities")
    num_blocks: list[int] | None = None
    blocks: list[list[int]] | None = None
    param_sparsities: list[float] | None = Field(None, description="fractions of the decoder's parameters")
    config: dict[str, Any] = Field(default_factory=dict, description="CompressConfig keys for this method")

    @model_validator(mode="after")
    def _method_or_stages(self):
        if (self.method is None) == (self.stages is None):
            raise ValueError("give a method entry either method or stages")
        return self

    @property
    def name(self) -> str:
        """The label's default: the method, or a staged entry's methods joined by +."""
        return self.method or "+".join(str(s.get("method")) for s in self.stages if "method" in s) or "none"


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seqlen: int = Field(2048, ge=2)
    max_windows: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=1, description="lm-eval tasks: the first N documents of each")
    sample: int | dict[str, int] | None = Field(
        None, description="lm-eval tasks: a seeded N documents of each, or per task ({hellaswag: 2000}), the same "
                          "for every cell (instead of limit)")
    sample_seed: int = 0
    gen_kwargs: dict[str, str | int | float | bool] | None = Field(
        None, description="lm-eval's generation settings over the generate-until tasks' own, e.g. {max_gen_toks: 32}")
    batch_size: int = Field(1, ge=1)  # speed only: left out of the hash

    @model_validator(mode="after")
    def _one_selection(self):
        if self.limit is not None and self.sample is not None:
            raise ValueError("limit (the first N documents) and sample (a seeded N) choose the documents two ways: "
                             "give one of them")
        return self

    def config(self, tasks: list[str], data_dir, device: str | None, dtype: str | None) -> EvalConfig:
        """The evaluation of a cell: these settings on its missing ``tasks``, on the cell's device and dtype."""
        return EvalConfig(tasks=tasks, seqlen=self.seqlen, max_windows=self.max_windows,
                          batch_size=str(self.batch_size), device=device, dtype=dtype, limit=self.limit,
                          sample=self.sample, sample_seed=self.sample_seed, gen_kwargs=self.gen_kwargs,
                          data_dir=None if data_dir is None else str(data_dir))


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    models: list[str] = Field(min_length=1)
    methods: list[MethodEntry | str] = Field(min_length=1)
    sparsities: list[float] = Field(default_factory=list)
    tasks: list[str] = Field(min_length=1)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    config: dict[str, Any] = Field(default_factory=dict)


# Where a run keeps its weights and how it shards them: not what it computes, so not in the hash.
PLACEMENT = {"offload", "offload_dir", "max_shard_size"}


@dataclass(frozen=True)
class Cell:
    """One compression config and the evaluation to run on it."""

    label: str
    config: CompressConfig
    tasks: tuple[str, ...]
    eval: EvalSettings

    def identity(self) -> dict:
        return {"compress": self.config.model_dump(mode="json", exclude_defaults=True, exclude=PLACEMENT),
                "eval": self.eval.model_dump(mode="json", exclude_defaults=True, exclude={"batch_size"})}

    @property
    def key(self) -> str:
        """Stable across runs, machines and key order: a hash of the canonical JSON of ``identity``."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]

    @property
    def name(self) -> str:
        """Run directory name: readable prefix (model, label, amount) + the hash that identifies it."""
        parts = [Path(self.config.model).name, self.label, self.config.label(), self.key]
        return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p).strip("-") for p in parts if p)

    def record(self) -> dict:
        """What ``batch`` writes to the run's cell.json (the leaderboard takes the label from it)."""
        return {"label": self.label, "key": self.key, "tasks": list(self.tasks), **self.identity()}


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file {path} not found (see grids/ for examples)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"grid {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"grid {path} must be a mapping with models, methods, tasks (see grids/)")
    try:
        return Grid(**data)
    except ValidationError as exc:
        raise UserError(f"grid {path}: {validation_message(exc)}") from exc


def amounts(entry: MethodEntry, grid: Grid) -> list[dict]:
    """The amount fields of each cell of one method entry (none: one cell without an amount)."""
    if entry.blocks is not None:
        return [{"blocks": b} for b in entry.blocks]
    if entry.num_blocks is not None:
        return [{"num_blocks": n} for n in entry.num_blocks]
    if entry.param_sparsities is not None:
        return [{"param_sparsity": p} for p in entry.param_sparsities]
    sparsities = entry.sparsities if entry.sparsities is not None else grid.sparsities
    if entry.method == "none" or entry.stages is not None or not sparsities:
        return [{}]
    return [{"sparsity": s} for s in sparsities]


def sweep_points(entry: MethodEntry) -> list[dict]:
    keys = sorted(entry.sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(entry.sweep[k] for k in keys))]


def expand(grid: Grid, models: list[str] | None = None) -> list[Cell]:
    """Every cell of the grid, in file order, without duplicates; ``models`` replaces the grid's."""
    cells: dict[str, Cell] = {}
    for model in models or grid.models:
        for entry in grid.methods:
            entry = MethodEntry(method=entry) if isinstance(entry, str) else entry
            for point in sweep_points(entry):
                label = " ".join([entry.label or entry.name] + [f"{k}={v}" for k, v in point.items()])
                for amount in amounts(entry, grid):
                    what = {"stages": entry.stages} if entry.stages is not None else \
                        {"method": entry.method, "options": {**entry.options, **point}}
                    values = {**grid.config, **entry.config, "model": model, **what, **amount}
                    try:
                        cfg = resolve_config(CompressConfig(**values))
                    except ValidationError as exc:
                        raise UserError(f"grid method {label!r}: {validation_message(exc)}") from exc
                    cell = Cell(label, cfg, tuple(grid.tasks), grid.eval)
                    cells.setdefault(cell.key, cell)
    return list(cells.values())
