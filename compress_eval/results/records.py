"""Per-document records: what paired statistics need to tell two models apart on the same documents.

lm-eval reports each model's accuracy and its own standard error, never whether two models differ.
Deciding that needs, for every document both models saw, which of them got it right, so each
evaluation keeps beside its results, per task: lm-eval's ``doc_id``, a short hash of the prompt (to
check that two runs saw the same document, without storing its text) and 0/1 correctness for the
accuracies the board reports; per perplexity task, each window's summed NLL and token count.
"""

from __future__ import annotations

from compress_eval.errors import UserError

# Accuracy metrics kept per document (both where a task has both: the board reports acc_norm for
# HellaSwag and ARC-Challenge, acc elsewhere).
ACCURACIES = ("acc", "acc_norm")
# Characters of lm-eval's sha256 prompt hash kept: enough to tell documents apart, a quarter of the size.
HASH_CHARS = 16


def lm_eval_records(samples: dict, selection=None) -> dict:
    """{task: {doc_id, prompt_hash, acc[, acc_norm], selection}} from lm-eval's logged ``samples``
    (``simple_evaluate(..., log_samples=True)``), documents in doc_id order. ``selection(task)`` says how
    the documents were chosen (``{"limit": N}``, ``{"sample": N, "seed": S}`` or ``{}`` for all)."""
    out = {}
    for task, logged in samples.items():
        rows = sorted(logged, key=lambda s: s["doc_id"])
        metrics = [m for m in ACCURACIES if rows and all(m in s for s in rows)]
        if not metrics:  # perplexity or generation tasks: nothing 0/1 to pair
            continue
        record = {"doc_id": [int(s["doc_id"]) for s in rows],
                  "prompt_hash": [str(s.get("prompt_hash", ""))[:HASH_CHARS] for s in rows]}
        for metric in metrics:
            record[metric] = [int(round(float(s[metric]))) for s in rows]
        record["selection"] = dict(selection(task) if selection else {})
        out[task] = record
    return out


def ppl_records(results: dict) -> dict:
    """{task_ppl: {seqlen, nll, tokens}} from our perplexity results that carry per-window NLLs."""
    return {task: {"seqlen": r["seqlen"], "nll": r["window_nlls"], "tokens": [r["seqlen"] - 1] * len(r["window_nlls"])}
            for task, r in results.items() if r.get("window_nlls") is not None}


def accuracy_metric(task: str, record: dict, normalized: set[str]) -> str:
    """The metric the board reports for ``task`` (its display name in ``normalized``: acc_norm)."""
    wanted = ("acc_norm", "acc") if task in normalized else ("acc", "acc_norm")
    for metric in wanted:
        if metric in record:
            return metric
    raise UserError(f"records of {task} hold no accuracy: evaluate it again")
