"""Pairing two runs' per-document records, task by task, for ``compress-eval compare`` and the board.

Two runs pair on a task only when they were scored on the same documents (same ids, same prompt
hashes) or the same perplexity windows; otherwise the difference is named, never guessed around.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress_eval.errors import UserError
from compress_eval.results import paired, records
from compress_eval.results.store import NORMALIZED_ACC_TASKS, read_records
from compress_eval.tasknames import display_name


class PairingError(UserError):
    """Two runs' records of a task cannot be paired (different documents or windows)."""


@dataclass(frozen=True)
class TaskPair:
    task: str  # display name (piqa, hellaswag, wikitext2_ppl, ...)
    metric: str  # acc, acc_norm or ppl
    result: paired.Paired


def by_display_name(section: dict) -> dict:
    """Records keyed by the task they report as (an offline ``ce_`` twin pairs with lm-eval's task)."""
    return {display_name(task): record for task, record in section.items()}


def documents(task: str, a: dict, b: dict, names: tuple[str, str]) -> None:
    """PairingError naming how two tasks' documents differ, if they do."""
    if a["doc_id"] != b["doc_id"]:
        only = sorted(set(a["doc_id"]) ^ set(b["doc_id"]))
        raise PairingError(
            f"{task}: {names[0]} was scored on {len(a['doc_id'])} documents ({describe(a)}), {names[1]} on "
            f"{len(b['doc_id'])} ({describe(b)}); {len(only)} are not in both: evaluate both with the same "
            f"--limit or --sample/--sample-seed")
    differ = [d for d, x, y in zip(a["doc_id"], a["prompt_hash"], b["prompt_hash"]) if x != y]
    if differ:
        raise PairingError(f"{task}: {len(differ)} documents have different prompts in {names[0]} and {names[1]} "
                           f"(first: doc {differ[0]}): the task's data or prompt changed between them")


def describe(record: dict) -> str:
    selection = record.get("selection") or {}
    if "sample" in selection:
        return f"a sample of {selection['sample']}, seed {selection['seed']}"
    return f"the first {selection['limit']}" if "limit" in selection else "all"


def windows(task: str, a: dict, b: dict, names: tuple[str, str]) -> None:
    if (a["seqlen"], len(a["nll"])) != (b["seqlen"], len(b["nll"])):
        raise PairingError(f"{task}: {names[0]} was measured on {len(a['nll'])} windows of {a['seqlen']} tokens, "
                           f"{names[1]} on {len(b['nll'])} of {b['seqlen']}: evaluate both with the same "
                           f"--eval-seqlen and --max-windows")


def pair_accuracy(task: str, a: dict, b: dict, names: tuple[str, str], seed: int) -> TaskPair:
    documents(task, a, b, names)
    metric = records.accuracy_metric(task, a, NORMALIZED_ACC_TASKS)
    if metric not in b:
        raise PairingError(f"{task}: {names[1]} has no {metric} records: evaluate it again")
    return TaskPair(task, metric, paired.paired_accuracy(a[metric], b[metric], seed=seed))


def pair_ppl(task: str, a: dict, b: dict, names: tuple[str, str], seed: int) -> TaskPair:
    windows(task, a, b, names)
    return TaskPair(task, "ppl", paired.paired_ppl(a["nll"], b["nll"], a["tokens"], seed=seed))


def run_records(path: Path) -> dict:
    held = read_records(path)
    if not held.get("lm_eval") and not held.get("ppl"):
        raise UserError(f"{path} has no per-document records (records.json): it was evaluated before they were "
                        f"kept, or not at all; run `compress-eval eval {path} --tasks ...` again")
    return held


def compare_runs(run_a: Path, run_b: Path, seed: int = 0) -> list[TaskPair]:
    """B against A on every task both recorded: perplexities first, then accuracies."""
    a, b = run_records(run_a), run_records(run_b)
    names = (Path(run_a).name, Path(run_b).name)
    out = []
    for kind, pair in (("ppl", pair_ppl), ("lm_eval", pair_accuracy)):
        ra, rb = by_display_name(a.get(kind) or {}), by_display_name(b.get(kind) or {})
        out += [pair(task, ra[task], rb[task], names, seed) for task in sorted(ra) if task in rb]
    if not out:
        raise UserError(f"{names[0]} and {names[1]} share no evaluated task: evaluate both on the same tasks")
    return out


def accuracy_vectors(held: dict, tasks: list[str]) -> list[np.ndarray] | None:
    """One run's 0/1 vectors of ``tasks`` (display names, the board's metric each), None if any is missing."""
    section = by_display_name(held.get("lm_eval") or {})
    if not all(task in section for task in tasks):
        return None
    return [np.asarray(section[t][records.accuracy_metric(t, section[t], NORMALIZED_ACC_TASKS)]) for t in tasks]


def pair_metric(a: dict, b: dict, task: str, names: tuple[str, str]) -> TaskPair | None:
    """Two runs' held records paired on one task (display name), None when either lacks its records or
    they were scored on other documents (the board then shows the delta unmarked)."""
    kind, pair = ("ppl", pair_ppl) if task.endswith("_ppl") else ("lm_eval", pair_accuracy)
    ra, rb = by_display_name(a.get(kind) or {}), by_display_name(b.get(kind) or {})
    if task not in ra or task not in rb:
        return None
    try:
        return pair(task, ra[task], rb[task], names, 0)
    except UserError:
        return None


def pair_average(a: dict, b: dict, tasks: list[str], names: tuple[str, str]) -> tuple[float, float, float] | None:
    """B - A of the mean accuracy over ``tasks`` with its paired interval, None unless every task pairs
    (both runs hold its records, on the same documents)."""
    va, vb = accuracy_vectors(a, tasks), accuracy_vectors(b, tasks)
    if va is None or vb is None:
        return None
    ra, rb = by_display_name(a["lm_eval"]), by_display_name(b["lm_eval"])
    try:
        for task in tasks:
            documents(task, ra[task], rb[task], names)
            if records.accuracy_metric(task, ra[task], NORMALIZED_ACC_TASKS) not in rb[task]:
                return None
    except PairingError:
        return None
    return paired.paired_average(list(zip(va, vb)))
