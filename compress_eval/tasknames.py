"""Task names: the short names users type, the canonical ones we store results under, and the
offline ``ce_`` twins of lm-eval tasks. Shared by evaluation and the run directory's readers."""

from __future__ import annotations

import difflib

from compress_eval.errors import UserError
from compress_eval.paths import data_dir as resolve_data_dir

# Short names users type -> our task names. Perplexity tasks are the papers' protocol.
PPL_TASKS = {"wikitext2": "wikitext2", "wiki": "wikitext2", "wikitext2_ppl": "wikitext2",
             "c4": "c4", "c4_ppl": "c4"}
# Short names -> lm-eval task names; with a data directory each runs as our offline "ce_" twin.
LM_EVAL_TASKS = {"piqa": "piqa", "arc_easy": "arc_easy", "arc_e": "arc_easy", "arc_challenge": "arc_challenge",
                 "arc_c": "arc_challenge", "hellaswag": "hellaswag", "hs": "hellaswag",
                 "winogrande": "winogrande", "wg": "winogrande",
                 "mmmu": "mmmu_val", "mmmu_val": "mmmu_val", "ce_mmmu": "ce_mmmu"}
OFFLINE_PREFIX = "ce_"
# Offline twins named otherwise than ce_ + the lm-eval name (MMMU's is one task, not a group of 30 subjects).
OFFLINE_TWINS = {"mmmu_val": "ce_mmmu"}
# Tasks that show the model images: they run on the ``compressed-multimodal`` model type.
IMAGE_TASKS = ("mmmu_val", "ce_mmmu")


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """Canonical task names (``wikitext2``, ``c4``, lm-eval names), in order, without repeats."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise UserError("no tasks given: use e.g. --tasks wiki,c4,piqa,arc_e")
    out = []
    for name in names:
        canonical = PPL_TASKS.get(name) or LM_EVAL_TASKS.get(name)
        if canonical is None:
            close = difflib.get_close_matches(name, list(PPL_TASKS) + list(LM_EVAL_TASKS), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"unknown task {name!r}: {hint}tasks are {', '.join(sorted(PPL_TASKS | LM_EVAL_TASKS))}; "
                            f"any other lm-eval task runs with `compress-eval lm-eval --model compressed ...`")
        if canonical not in out:
            out.append(canonical)
    return out


def split_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(perplexity tasks, lm-eval tasks) of canonical names."""
    return [t for t in tasks if t in PPL_TASKS], [t for t in tasks if t not in PPL_TASKS]


def lm_eval_task_name(task: str, data_dir) -> str:
    """Our offline twin of an lm-eval task when there is a data directory, else lm-eval's own; a task named
    ce_ needs the data directory."""
    offline = resolve_data_dir(data_dir) is not None
    if task.startswith(OFFLINE_PREFIX):
        if not offline:
            raise UserError(f"task {task} reads its offline copy from the data directory: set --data-dir or "
                            f"COMPRESS_EVAL_DATA_DIR, or run {display_name(task)} (lm-eval's task, from the Hub)")
        return task
    return OFFLINE_TWINS.get(task, OFFLINE_PREFIX + task) if offline else task


def split_image_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(text tasks, image tasks) of canonical lm-eval task names."""
    return [t for t in tasks if t not in IMAGE_TASKS], [t for t in tasks if t in IMAGE_TASKS]


def display_name(lm_eval_task: str) -> str:
    """The lm-eval task an offline twin reproduces (``ce_piqa`` -> ``piqa``, ``ce_mmmu`` -> ``mmmu_val``)."""
    twin_of = {twin: task for task, twin in OFFLINE_TWINS.items()}
    return twin_of.get(lm_eval_task, lm_eval_task.removeprefix(OFFLINE_PREFIX))
