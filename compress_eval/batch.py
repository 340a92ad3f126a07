"""Run the cells of a grid, each into its own run directory; resumable and safe to run in parallel.

A cell is finished when its run directory holds a manifest and results for every task; finished
cells are skipped, a checkpoint without some results is only evaluated. Each cell is done under
its own lock, so any number of batches (``--jobs``, ``make -j``, two terminals) can share one runs
directory: a cell busy elsewhere is left for later, then waited for, never written twice.
Checkpoints are written atomically (temp dir + rename) by the pipeline, so an interrupted cell
leaves either nothing or a checkpoint that the next run evaluates; a cell's recovery fine-tunes save
their progress in ``RUNS/.state/CELL`` as they go, so the next run continues them.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path

from compress_eval import progress
from compress_eval.errors import UserError
from compress_eval.grid import Cell
from compress_eval.results import store

log = logging.getLogger(__name__)

# Beside the runs: the resumable state of cells whose compression has not finished.
STATE_DIR = ".state"


@dataclass
class Outcome:
    cell: str
    label: str
    status: str  # ran | evaluated | skipped | busy | failed
    message: str = ""


def finished_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a readable manifest (a corrupt one means the cell is not done)."""
    try:
        return store.read_manifest(run_dir) is not None
    except store.RunError:
        return False


def run_cell(cell: Cell, runs_dir: Path, data_dir=None, wait: bool = False) -> Outcome:
    """Bring one cell to finished (compress if needed, then evaluate the missing tasks)."""
    from compress_eval import pipeline
    from compress_eval.evaluate import evaluate_and_record
    from compress_eval.tasknames import parse_tasks

    run_dir = runs_dir / cell.name
    with store.run_lock(runs_dir, cell.name, wait) as held:
        if not held:
            return Outcome(cell.name, cell.label, "busy")
        try:
            parse_tasks(list(cell.tasks))  # an unknown task fails the cell before its compression
            compressed = not (run_dir / store.MANIFEST).exists()
            if not compressed and not finished_checkpoint(run_dir):
                log.warning("[%s] %s is corrupt: removing the run to redo it", cell.name, run_dir / store.MANIFEST)
                shutil.rmtree(run_dir)
                compressed = True
            if compressed:
                log.info("[%s] compressing", cell.name)
                state = runs_dir / STATE_DIR / cell.name  # used in one process only (fine_tune's rule)
                pipeline.compress_to_dir(cell.config, run_dir, data_dir, state)
                shutil.rmtree(state, ignore_errors=True)
            if not (run_dir / store.CELL_FILE).exists():
                store.write_cell(run_dir, cell.record())
            missing = [t for t in cell.tasks if t not in store.completed_tasks(run_dir, list(cell.tasks))]
            if not missing:
                return Outcome(cell.name, cell.label, "ran" if compressed else "skipped")
            log.info("[%s] evaluating %s", cell.name, ",".join(missing))
            cfg = cell.config
            evaluate_and_record(str(run_dir), cell.eval.config(missing, data_dir, cfg.device, cfg.dtype))
            return Outcome(cell.name, cell.label, "ran" if compressed else "evaluated")
        except UserError as exc:
            return Outcome(cell.name, cell.label, "failed", str(exc))
        except store.RunError as exc:
            return Outcome(cell.name, cell.label, "failed", f"{run_dir}: {exc}")
        except Exception as exc:  # one broken cell must not stop the others; the summary shows it
            log.error("[%s] failed", cell.name, exc_info=True)
            return Outcome(cell.name, cell.label, "failed", f"{type(exc).__name__}: {exc}")


def _init_worker(threads: int, records, level: int, bars: bool) -> None:
    """A worker process: its share of the cores; its messages sent to the parent (``records``), where the
    parent's logging configuration writes them, and its bars on or off as the parent's; no transformers
    progress bars (as the CLI)."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    progress.enabled = bars
    logger = logging.getLogger("compress_eval")
    logger.addHandler(QueueHandler(records))
    logger.setLevel(level)


class _Relay(logging.Handler):
    """A worker's message, handled in this process as if logged here."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def run_cells(cells: list[Cell], runs_dir: Path, data_dir=None, jobs: int = 1) -> list[Outcome]:
    """Run cells, ``jobs`` at a time (worker processes share the cores); then wait for any cell that
    another batch was running, so that on return every cell is finished or has failed. Every cell is
    checked first: a grid with a bad cell runs none (rather than the good cells, then fails)."""
    problems = check_cells(cells)
    if problems:
        more = f" (and {len(problems) - 1} more: `--check` lists them)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; nothing was run: fix the grid")
    runs_dir.mkdir(parents=True, exist_ok=True)
    if jobs <= 1:
        outcomes = [run_cell(c, runs_dir, data_dir) for c in cells]
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        records = context.Queue()
        relay = QueueListener(records, _Relay())
        relay.start()
        try:
            with futures.ProcessPoolExecutor(
                    jobs, mp_context=context, initializer=_init_worker,
                    initargs=(threads, records, logging.getLogger("compress_eval").getEffectiveLevel(),
                              progress.enabled)) as pool:
                outcomes = list(pool.map(run_cell, cells, [runs_dir] * len(cells), [data_dir] * len(cells)))
        finally:
            relay.stop()
    by_name = {c.name: c for c in cells}
    for i, outcome in enumerate(outcomes):
        if outcome.status == "busy":
            log.info("[%s] busy in another batch: waiting for it", outcome.cell)
            outcomes[i] = run_cell(by_name[outcome.cell], runs_dir, data_dir, wait=True)
    return outcomes


def check_cells(cells: list[Cell]) -> list[str]:
    """Problems that would make cells fail, found without loading a model: unknown methods or method
    options, amounts the model's depth cannot take, unknown tasks, unknown models, local model
    directories the loading gate refuses."""
    from compress_eval.methods.registry import get_method
    from compress_eval.models import gate
    from compress_eval.models.registry import resolve
    from compress_eval.architecture import architecture, load_config
    from compress_eval.tasknames import parse_tasks

    whole, depths = set(), {}

    def model_loads(cfg) -> None:
        source = resolve(cfg.model)
        if source.kind == "local" and source.location not in whole:
            gate.check(source.location, cfg.allow_pickle, cfg.trust_remote_code)
            whole.add(source.location)

    def amount_fits(cfg) -> None:
        method = get_method(cfg)
        if cfg.stages is not None or method.ties_modules or method.removes_sublayers or not any(
                getattr(cfg, f) is not None for f in ("sparsity", "num_blocks", "blocks", "param_sparsity")):
            return
        if cfg.model not in depths:
            depths[cfg.model] = architecture(load_config(cfg.model, cfg.trust_remote_code)).num_blocks
        cfg.blocks_to_remove(depths[cfg.model])
        bad = [b for b in cfg.blocks or [] if not 0 <= b < depths[cfg.model]]
        if bad:
            raise UserError(f"block index {bad[0]} out of range: the model has blocks 0..{depths[cfg.model] - 1}")

    problems = []
    for cell in cells:
        try:  # in this order, so a cell's first problem is the one named
            parse_tasks(list(cell.tasks))
            model_loads(cell.config)
            amount_fits(cell.config)
        except UserError as exc:
            problems.append(f"{cell.name}: {exc}")
    return list(dict.fromkeys(problems))
