"""Evaluation of a model or checkpoint on perplexity tasks, with results stored beside it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from compress_eval.data.calibration import eval_windows
from compress_eval.errors import UserError
from compress_eval.models.registry import load_model
from compress_eval.scoring.ppl import perplexity

# Short names users type -> our task names. Perplexity tasks are the papers' protocol.
PPL_TASKS = {"wikitext2": "wikitext2", "wiki": "wikitext2", "wikitext2_ppl": "wikitext2",
             "c4": "c4", "c4_ppl": "c4"}
RESULTS_FILE = "results_ppl.json"


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise UserError("no tasks given: use e.g. --tasks wikitext2,c4")
    unknown = [t for t in names if t not in PPL_TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}: perplexity tasks are {', '.join(sorted(PPL_TASKS))}")
    return names


def evaluate_ppl(model, tokenizer, tasks: list[str], seqlen: int = 2048, data_dir=None,
                 max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> dict:
    """{task_ppl: {ppl, tokens, windows, seconds, tokens_per_s}} for each perplexity task."""
    results = {}
    for task in tasks:
        dataset = PPL_TASKS[task]
        windows = eval_windows(tokenizer, dataset, seqlen, data_dir, max_windows)
        r = perplexity(model, windows, batch_size=batch_size, progress=progress)
        results[f"{dataset}_ppl"] = {"ppl": r.ppl, "tokens": r.tokens, "windows": r.windows, "seqlen": seqlen,
                                     "seconds": round(r.seconds, 2), "tokens_per_s": round(r.tokens_per_second, 1)}
    return results


def evaluate(name_or_dir: str, tasks: list[str], seqlen: int = 2048, data_dir=None, max_windows=None,
             batch_size: int = 1, device=None, dtype=None, progress: bool = True) -> dict:
    model, tokenizer, _ = load_model(name_or_dir, device, dtype)
    return evaluate_ppl(model, tokenizer, tasks, seqlen, data_dir, max_windows, batch_size, progress)


def store_results(directory: str | Path, results: dict) -> Path:
    """Merge ``results`` into the run directory's results file, atomically (temp file + rename)."""
    path = Path(directory) / RESULTS_FILE
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(merged, fh, indent=2)
    os.replace(tmp, path)
    return path
