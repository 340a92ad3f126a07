"""Run directories: the one owner of every file in them (the model's own files aside: weights, config and
tokenizer are written by ``models.checkpoint`` as transformers lays them out), how to read a finished run,
and one writer per run at a time.

A run directory is the pipeline's checkpoint (model files, ``compress_eval.json`` manifest,
``recipe.yaml``, the methods' charts) plus what evaluations store beside it: ``results_ppl.json`` (our perplexity
protocol) and ``lm_eval_results.json`` (lm-eval's own results schema); ``batch`` adds ``cell.json``;
``records.json`` keeps each evaluation's per-document (per-window) outcomes for paired statistics.
The leaderboard reads nothing else. ``README.md``, the model card, is rendered from the rest
whenever the checkpoint is saved or a result is stored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from compress_eval.config import validation_message
from compress_eval.errors import UserError
from compress_eval.jsonfile import JSONFileError, read_json_object, write_json_atomic, write_text_atomic
from compress_eval.manifest import Manifest
from compress_eval.models.adapters import is_multimodal
from compress_eval.models.registry import hub_id
from compress_eval.results import records
from compress_eval.results.card import MARKER, render_card
from compress_eval.tasknames import LM_EVAL_TASKS, PPL_TASKS, display_name

MANIFEST = "compress_eval.json"
RECIPE_FILE = "recipe.yaml"
PPL_FILE = "results_ppl.json"
LM_EVAL_FILE = "lm_eval_results.json"
RECORDS_FILE = "records.json"  # {"lm_eval": {task: per-document}, "ppl": {task_ppl: per-window}}
CELL_FILE = "cell.json"  # written by `batch`: the grid cell (label, tasks, eval settings, hash)
CARD_FILE = "README.md"
LOCK_DIR = ".locks"
# Accuracy reported per lm-eval task: acc_norm where the depth-pruning papers (SLEB, FuseGPT) report
# it, plain acc elsewhere.
NORMALIZED_ACC_TASKS = {"hellaswag", "arc_challenge"}


class RunError(UserError):
    """A directory that is not a complete, readable run: the leaderboard reports and skips it, a
    loader refuses it in one line."""


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, None if the file is absent; RunError if it is not a JSON object."""
    try:
        return read_json_object(path)
    except JSONFileError as exc:
        raise RunError(str(exc)) from None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(directory) / MANIFEST, manifest.model_dump(mode="json"))


def read_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of a run or checkpoint directory, None if it has none; RunError if it is corrupt."""
    path = Path(directory) / MANIFEST
    data = read_json(path)
    if data is None:
        return None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise RunError(f"{path}: {validation_message(exc)}; re-run the compression that made it") from None


def _results(path: Path) -> dict:
    """What a results file already holds (a corrupt one is an error, never silently replaced)."""
    try:
        return read_json_object(path) or {}
    except JSONFileError as exc:
        raise RunError(f"{exc}: move it away to evaluate again") from None


def store_ppl_results(run_dir: str | Path, results: dict) -> Path:
    """Merge perplexity ``results`` ({task_ppl: {ppl, ..., window_nlls}}) into the run's results file,
    the per-window NLLs into its records."""
    path = Path(run_dir) / PPL_FILE
    store_records(run_dir, "ppl", records.ppl_records(results))
    summary = {task: {k: v for k, v in r.items() if k != "window_nlls"} for task, r in results.items()}
    write_json_atomic(path, {**_results(path), **summary})
    write_card(run_dir)
    return path


def store_records(run_dir: str | Path, kind: str, new: dict) -> None:
    """Merge per-task records of ``kind`` (``lm_eval`` or ``ppl``) into the run's records file: a task
    evaluated again replaces its records, as it replaces its result."""
    if not new:
        return
    path = Path(run_dir) / RECORDS_FILE
    held = _results(path)
    held[kind] = {**(held.get(kind) or {}), **new}
    write_json_atomic(path, held)


def read_records(run_dir: str | Path) -> dict:
    """The run's per-document records ({} when it has none: evaluated before records were kept)."""
    return read_json(Path(run_dir) / RECORDS_FILE) or {}


def store_lm_eval_results(run_dir: str | Path, results: dict, selection=None) -> Path:
    """Save lm-eval's results JSON in the run directory, in lm-eval's own schema, and the per-document
    records of its logged samples (``selection(task)``: how its documents were chosen).

    A later evaluation on other tasks adds its tasks: the per-task sections (``results``,
    ``configs``, ``versions``, ...) are merged, the run-level fields are those of the latest run.
    """
    path = Path(run_dir) / LM_EVAL_FILE
    store_records(run_dir, "lm_eval", records.lm_eval_records(results.get("samples") or {}, selection))
    write_json_atomic(path, merge_lm_eval_results(_results(path), results))
    write_card(run_dir)
    return path


def merge_lm_eval_results(merged: dict, results: dict) -> dict:
    """``merged`` with ``results`` of other tasks added: the per-task sections (``results``, ``configs``,
    ``versions``, ...) merged, the run-level fields those of ``results``; samples are not kept."""
    for key, value in results.items():
        if key != "samples":
            merged[key] = {**merged[key], **value} if isinstance(merged.get(key), dict) and key != "config" \
                else value
    return merged


def write_recipe(run_dir: Path, recipe: str | None) -> None:
    (Path(run_dir) / RECIPE_FILE).write_text(recipe or "")


def write_artifacts(run_dir: Path, artifacts: dict[str, bytes]) -> None:
    """What the methods made beside their record (charts), each under its own name."""
    for name, content in artifacts.items():
        (Path(run_dir) / name).write_bytes(content)


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run directory itself (it holds a manifest), not a directory of runs."""
    return (Path(path) / MANIFEST).exists()


def base_model_id(manifest: Manifest) -> str | None:
    """The Hub id of the model a checkpoint was made from, through any chain of local checkpoints
    (a quantization run on a pruned checkpoint names the pruned one's base); None if it has none."""
    ref = manifest.base_model
    while ref.kind == "local" and ref.location:
        try:
            parent = read_manifest(ref.location)
        except RunError:
            return None
        if parent is None:
            return None
        ref = parent.base_model
    return hub_id(ref.name, ref.kind, ref.location)


def write_card(run_dir: str | Path, repo_id: str | None = None) -> Path | None:
    """Render the run's model card from its manifest and results into README.md (atomically); None,
    writing nothing, when there is no manifest yet or the README.md is not one of ours (a user's).
    ``repo_id``: the Hub repository it is pushed to, named in the card's download line."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    path = run_dir / CARD_FILE
    if manifest is None or (path.exists() and MARKER not in path.read_text(encoding="utf-8", errors="replace")):
        return None
    lm_eval = _results(run_dir / LM_EVAL_FILE)
    multimodal = is_multimodal((read_json(run_dir / "config.json") or {}).get("model_type"))
    text = render_card(manifest, base_model_id(manifest), _results(run_dir / PPL_FILE),
                       lm_eval_accuracies(lm_eval), lm_eval, repo_id, multimodal)
    return write_text_atomic(path, text)


def write_cell(run_dir: Path, record: dict) -> None:
    write_json_atomic(run_dir / CELL_FILE, record)


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
    return {t for t in tasks
            if (t in PPL_TASKS and ppl_key(t) in ppl) or display_name(LM_EVAL_TASKS.get(t, t)) in lm_eval}


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
    # ppl metric -> (seqlen, windows); lm-eval task -> (documents evaluated, documents in the task, how chosen)
    protocol: dict[str, tuple] = field(default_factory=dict)
    reference: bool = False  # the dense model (method none, not quantized): the row deltas refer to
    manifest: Manifest | None = None  # what the row's detail shows (recipe, stages, seconds, peak RSS)
    records: dict = field(default_factory=dict)  # records.json: what the board's paired tests read

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before


def default_label(manifest: Manifest) -> str:
    """``method`` plus its explicit options and quantization, e.g. ``merge permute=False +int8``."""
    config = manifest.config
    parts = [manifest.method]
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
        normalized = display_name(task) in NORMALIZED_ACC_TASKS  # the offline ce_ twins report as theirs
        names = ["acc_norm,none", "acc,none"] if normalized else ["acc,none", "acc_norm,none"]
        value = next((metrics[n] for n in names if isinstance(metrics.get(n), (int, float))), None)
        if value is not None:
            out[task] = float(value)
    return out


def selection_text(selection: dict | None) -> str:
    """How a task's documents were chosen, as the protocol compares it: a seeded sample is other documents
    than the first N (unknown for runs evaluated before records were kept: taken as the first N)."""
    if selection and "sample" in selection:
        return f"seed {selection['seed']}"
    return "first"


def read_run(path: Path) -> Run:
    """Read a run directory; RunError says why it cannot be used."""
    manifest = read_manifest(path)
    if manifest is None:
        raise RunError(f"no {MANIFEST} (not a run directory, or a compression that never finished)")
    ppl = read_json(path / PPL_FILE) or {}
    lm_eval = read_json(path / LM_EVAL_FILE) or {}
    cell = read_json(path / CELL_FILE) or {}
    removed = len(manifest.removed_blocks)
    sparsity = manifest.config.get("sparsity")
    run = Run(
        path=path, model=manifest.base_model.name, method=manifest.method,
        label=str(cell.get("label") or default_label(manifest)),
        sparsity=float(sparsity) if sparsity is not None else (removed / manifest.blocks_before if removed else None),
        removed_blocks=removed, blocks_before=manifest.blocks_before,
        params_before=manifest.params_before, params_after=manifest.params_after,
        bytes_before=manifest.weight_bytes_before, bytes_after=manifest.weight_bytes_after,
        reference=manifest.method == "none" and not manifest.config.get("quantize"), manifest=manifest,
    )
    try:
        for key, value in ppl.items():
            if value["ppl"] is None:  # not finite when measured (stored as null)
                continue
            run.metrics[key] = float(value["ppl"])
            run.protocol[key] = (value.get("seqlen"), value.get("windows"))
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{PPL_FILE}: results lack a field ({type(exc).__name__}: {exc})") from None
    samples = lm_eval.get("n-samples") if isinstance(lm_eval.get("n-samples"), dict) else {}
    run.records = read_records(path)
    selections = {task: r.get("selection") for task, r in (run.records.get("lm_eval") or {}).items()}
    for task, acc in lm_eval_accuracies(lm_eval).items():
        run.metrics.setdefault(task, acc)
        n = samples.get(task)
        if isinstance(n, dict) and "effective" in n:
            run.protocol.setdefault(task, (n["effective"], n.get("original"), selection_text(selections.get(task))))
    if not run.metrics:
        raise RunError(f"no results yet (neither {PPL_FILE} nor {LM_EVAL_FILE})")
    return run
