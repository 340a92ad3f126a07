"""Run directories: what a finished run holds, how to read it, and one writer per run at a time.

A run directory is the pipeline's checkpoint (manifest ``compress_eval.json``) plus the results the
evaluations stored beside it: ``results_ppl.json`` (our perplexity protocol) and
``lm_eval_results.json`` (lm-eval's own results schema). The leaderboard reads nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from compress_eval.jsonfile import JSONFileError, read_json_object
from compress_eval.evaluate import LM_EVAL_TASKS, PPL_TASKS, RESULTS_FILE as PPL_FILE, display_name
from compress_eval.models.checkpoint import MANIFEST

LM_EVAL_FILE = "lm_eval_results.json"
CELL_FILE = "cell.json"  # written by `batch`: the grid cell (label, tasks, eval settings, hash)
LOCK_DIR = ".locks"
# Accuracy reported per lm-eval task: acc_norm where the depth-pruning papers (SLEB, FuseGPT) report
# it, plain acc elsewhere.
NORMALIZED_ACC_TASKS = {"hellaswag", "arc_challenge"}


class RunError(Exception):
    """A directory that is not a complete, readable run (reported and skipped, never fatal)."""


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, None if the file is absent; RunError if it is not a JSON object."""
    try:
        return read_json_object(path)
    except JSONFileError as exc:
        raise RunError(str(exc)) from None


def ppl_key(task: str) -> str:
    """The key a perplexity task is stored under in results_ppl.json (``wiki`` -> ``wikitext2_ppl``)."""
    return f"{PPL_TASKS[task]}_ppl"


def completed_tasks(run_dir: Path, tasks: list[str]) -> set[str]:
    """Those of ``tasks`` whose results are stored in ``run_dir``.

    Short names (``arc_e``) count through their lm-eval name, and an offline ``ce_`` twin's result
    counts for the task it reproduces, so a finished cell is never evaluated again.
    """
    ppl = read_json(run_dir / PPL_FILE) or {}
    lm_eval = {display_name(t) for t in (read_json(run_dir / LM_EVAL_FILE) or {}).get("results", {})}
    return {t for t in tasks if (t in PPL_TASKS and ppl_key(t) in ppl) or LM_EVAL_TASKS.get(t, t) in lm_eval}


@contextlib.contextmanager
def run_lock(runs_dir: Path, name: str, wait: bool):
    """Hold the lock of one run (``RUNS/.locks/NAME.lock``); yields False if busy and not ``wait``.

    ``flock`` locks belong to the open file, so this excludes other threads as well as other
    processes, and the kernel releases it when a holder dies (a crashed batch leaves no stale lock).
    """
    lock_dir = runs_dir / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class Run:
    """One run directory as the leaderboard sees it."""

    path: Path
    model: str
    method: str
    label: str
    sparsity: float | None  # the config's sparsity, else the fraction of blocks removed
    removed_blocks: int
    blocks_before: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    metrics: dict[str, float] = field(default_factory=dict)  # wikitext2_ppl, piqa (accuracy 0..1), ...
    protocol: dict[str, tuple] = field(default_factory=dict)  # ppl metric -> (seqlen, windows)
    reference: bool = False  # the dense model (method none, not quantized): the row deltas refer to

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before


def default_label(manifest: dict) -> str:
    """``method`` plus its explicit options and quantization, e.g. ``merge permute=False +int8``."""
    config = manifest.get("config") or {}
    parts = [manifest["method"]]
    parts += [f"{k}={v}" for k, v in sorted((config.get("options") or {}).items())]
    if config.get("quantize"):
        parts.append(f"+{config['quantize']}")
    return " ".join(parts)


def lm_eval_accuracies(results: dict) -> dict[str, float]:
    """{task: accuracy} from lm-eval's results JSON (tasks without an accuracy are left out)."""
    out = {}
    per_task = results.get("results") or {}
    if not isinstance(per_task, dict):
        raise RunError(f"{LM_EVAL_FILE}: 'results' is a {type(per_task).__name__}, not lm-eval's task mapping")
    for task, metrics in per_task.items():
        if not isinstance(metrics, dict):
            continue
        names = ["acc_norm,none", "acc,none"] if task in NORMALIZED_ACC_TASKS else ["acc,none", "acc_norm,none"]
        value = next((metrics[n] for n in names if isinstance(metrics.get(n), (int, float))), None)
        if value is not None:
            out[task] = float(value)
    return out


def positive_counts(manifest: dict) -> None:
    """RunError unless the manifest's counts (what the leaderboard divides by) are positive integers."""
    for key in ("blocks_before", "params_before", "params_after", "weight_bytes_before", "weight_bytes_after"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RunError(f"{MANIFEST}: {key} is {value!r}, not a positive integer")


def read_manifest(path: Path) -> dict:
    """The manifest of a run directory, checked for what a reader relies on; RunError if unusable."""
    manifest = read_json(path / MANIFEST)
    if manifest is None:
        raise RunError(f"no {MANIFEST} (not a run directory, or a compression that never finished)")
    positive_counts(manifest)
    if not isinstance(manifest.get("base_model"), dict) or not isinstance(manifest.get("method"), str):
        raise RunError(f"{MANIFEST}: base_model or method missing")
    return manifest


def read_run(path: Path) -> Run:
    """Read a run directory; RunError says why it cannot be used."""
    manifest = read_manifest(path)
    ppl = read_json(path / PPL_FILE) or {}
    lm_eval = read_json(path / LM_EVAL_FILE) or {}
    cell = read_json(path / CELL_FILE) or {}
    try:
        config = manifest.get("config") or {}
        removed = len(manifest.get("removed_blocks") or [])
        blocks_before = manifest["blocks_before"]
        sparsity = config.get("sparsity")
        run = Run(
            path=path, model=str(manifest["base_model"]["name"]), method=str(manifest["method"]),
            label=str(cell.get("label") or default_label(manifest)),
            sparsity=float(sparsity) if sparsity is not None else (removed / blocks_before if removed else None),
            removed_blocks=removed, blocks_before=blocks_before,
            params_before=int(manifest["params_before"]), params_after=int(manifest["params_after"]),
            bytes_before=int(manifest["weight_bytes_before"]), bytes_after=int(manifest["weight_bytes_after"]),
            reference=manifest["method"] == "none" and not config.get("quantize"),
        )
        for key, value in ppl.items():
            if value["ppl"] is None:  # not finite when measured (stored as null)
                continue
            run.metrics[key] = float(value["ppl"])
            run.protocol[key] = (value.get("seqlen"), value.get("windows"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RunError(f"manifest or results lack a field ({type(exc).__name__}: {exc})") from None
    for task, acc in lm_eval_accuracies(lm_eval).items():
        run.metrics.setdefault(task, acc)
    if not run.metrics:
        raise RunError(f"no results yet (neither {PPL_FILE} nor {LM_EVAL_FILE})")
    return run
