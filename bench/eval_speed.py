"""Shared-prefix scoring: wall time of lm-eval's `--model hf` against `--model compressed` (issue 30).

Both models score the same seeded sample of documents of each task (lm-eval's `samples` argument), in
chunks taken round-robin (hf then compressed, then the other way round), so the load of other work on
the machine falls on both alike. Time is the models' log-likelihood calls only (task building is not
timed). Beside each measured ratio stands the task's token-count bound: the tokens HFLM runs through the
model over the tokens shared-prefix scoring runs, counted from the very requests scored. Per document
the two models' correctness must agree in fp32; a bf16 pass (where the CPU has bf16 kernels, or with
--dtypes) is reported with its paired accuracy change against fp32.

    COMPRESS_EVAL_DATA_DIR=../shared/data flock /tmp/compress-eval-locks/heavy.lock \\
        python3 bench/eval_speed.py --docs 500
    python3 bench/eval_speed.py --docs 200 --first --name eval_speed_first200   # the identity check
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
from pathlib import Path

import torch
from lm_eval.models.huggingface import HFLM

from compress_eval.lm_eval_plugin import CompressedLM, tasks_dir
from compress_eval.models.registry import local_path_or_id, resolve
from compress_eval.scoring.shared_prefix import token_counts

TASKS = ["ce_piqa", "ce_arc_easy", "ce_arc_challenge", "ce_hellaswag", "ce_winogrande"]
METRICS = ("acc", "acc_norm")
# fp32 targets (issue 30): speed-up per task, the five weighted by complete-set time, share of the bound.
TARGETS = {"ce_hellaswag": 1.6, "ce_arc_easy": 2.0}
WEIGHTED_TARGET, BOUND_SHARE = 1.5, 0.75
OUT = Path(__file__).resolve().parent / "results"


class Timed:
    """An lm-eval model that adds up the seconds of its log-likelihood calls."""

    seconds = 0.0

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        start = time.perf_counter()
        try:
            return super().loglikelihood(requests, disable_tqdm=True)
        finally:
            self.seconds += time.perf_counter() - start


class TimedHF(Timed, HFLM):
    pass


class TimedShared(Timed, CompressedLM):
    """``compressed`` that also counts the tokens each path would run for the requests it is given."""

    tokens = (0, 0)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        self.tokens = tuple(a + b for a, b in zip(self.tokens, token_counts(requests, self.max_length)))
        return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.machine())


def bf16_kernels() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 is emulated."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return torch.cuda.is_available() or "avx512_bf16" in flags or "amx_bf16" in flags


def documents(task_manager, task: str, n: int, seed: int, first: bool) -> tuple[list[int], int]:
    """The documents scored (the first n, or n drawn with ``seed``) and the task's size."""
    size = len(task_manager.load([task])["tasks"][task].eval_docs)
    ids = list(range(min(n, size))) if first else sorted(random.Random(seed).sample(range(size), min(n, size)))
    return ids, size


def score_chunk(lm, task: str, ids: list[int], task_manager) -> dict[int, dict]:
    """Per-document correctness (METRICS) of ``lm`` on documents ``ids`` of ``task``."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[task], samples={task: ids}, task_manager=task_manager,
                          log_samples=True, bootstrap_iters=0)
    return {s["doc_id"]: {m: s[m] for m in METRICS if m in s} for s in out["samples"][task]}


def run_dtype(dtype: str, args, task_manager) -> list[dict]:
    """Every task on both models in one dtype, chunks round-robin; one row per task."""
    model = local_path_or_id(resolve(args.model))
    common = dict(pretrained=model, device="cpu", batch_size=args.batch_size, dtype=dtype)
    hf, ours = TimedHF(**common), TimedShared(**common)
    rows = []
    for task in args.tasks:
        ids, size = documents(task_manager, task, args.docs, args.seed, args.first)
        hf.seconds = ours.seconds = 0.0
        ours.tokens = (0, 0)
        correct = {"hf": {}, "compressed": {}}
        for c in range(args.chunks):  # contiguous, so that neighbouring documents (twins) stay together
            chunk = ids[c * len(ids) // args.chunks:(c + 1) * len(ids) // args.chunks]
            order = [("hf", hf), ("compressed", ours)]
            for name, lm in order if c % 2 == 0 else order[::-1]:
                correct[name].update(score_chunk(lm, task, chunk, task_manager))
        rows.append(task_row(task, size, ids, hf.seconds, ours.seconds, ours.tokens, correct))
        print(json.dumps({"dtype": dtype, **{k: v for k, v in rows[-1].items() if k != "correct"}}), flush=True)
    return rows


def task_row(task: str, size: int, ids: list[int], hf_s: float, ours_s: float, tokens: tuple[int, int],
             correct: dict) -> dict:
    metrics = [m for m in METRICS if m in correct["hf"][ids[0]]]
    differing = sum(correct["hf"][i] != correct["compressed"][i] for i in ids)
    bound = tokens[0] / tokens[1]
    return {"task": task, "n": len(ids), "size": size, "hf_s": round(hf_s, 1), "compressed_s": round(ours_s, 1),
            "speedup": round(hf_s / ours_s, 3), "hf_tokens": tokens[0], "compressed_tokens": tokens[1],
            "bound": round(bound, 3), "of_bound": round(hf_s / ours_s / bound, 3),
            "acc": {name: {m: sum(correct[name][i][m] for i in ids) / len(ids) for m in metrics}
                    for name in correct},
            "docs_differing": differing, "correct": {name: {str(i): correct[name][i] for i in ids}
                                                     for name in correct}}


def weighted(rows: list[dict]) -> float:
    """Speed-up over the tasks' complete sets: each task's time per document times its size, summed."""
    return (sum(r["hf_s"] / r["n"] * r["size"] for r in rows)
            / sum(r["compressed_s"] / r["n"] * r["size"] for r in rows))


def paired_change(low: list[dict], fp32: list[dict]) -> list[dict]:
    """Per task and metric, the compressed model's accuracy change from fp32 to the lower precision, on
    the same documents: the change and how many documents flipped each way."""
    changes = []
    for lo, hi in zip(low, fp32, strict=True):
        for m in lo["acc"]["compressed"]:
            a, b = hi["correct"]["compressed"], lo["correct"]["compressed"]
            gained = sum(b[i][m] > a[i][m] for i in a)
            lost = sum(b[i][m] < a[i][m] for i in a)
            changes.append({"task": lo["task"], "metric": m, "fp32": hi["acc"]["compressed"][m],
                            "low": lo["acc"]["compressed"][m], "change": (gained - lost) / lo["n"],
                            "gained": gained, "lost": lost})
    return changes


def met(value: float, need: float) -> str:
    return "met" if value >= need else f"missed by {need - value:.2f}x"


def verdicts(rows: list[dict]) -> list[str]:
    """The fp32 targets, each met or missed by how much."""
    lines = []
    for r in rows:
        need = max(TARGETS.get(r["task"], 0.0), BOUND_SHARE * r["bound"])
        lines.append(f"{r['task']}: {r['speedup']:.2f}x against {need:.2f}x needed ({met(r['speedup'], need)})")
    if {r["task"] for r in rows} == set(TASKS):
        w = weighted(rows)
        lines.append(f"five weighted by complete-set time: {w:.2f}x against {WEIGHTED_TARGET}x "
                     f"({met(w, WEIGHTED_TARGET)})")
    same = all(r["docs_differing"] == 0 for r in rows)
    lines.append(f"per-document correctness hf = compressed on every task: {'yes' if same else 'NO'}")
    return lines


def write(result: dict, name: str) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
    a = result["args"]
    lines = [f"# Shared-prefix scoring: `--model hf` against `--model compressed`, {a['model']}, CPU",
             "", f"`{result['command']}`", "",
             f"{'First' if a['first'] else 'A seeded sample (seed ' + str(a['seed']) + ') of'} {a['docs']} "
             f"documents per task, batch size {a['batch_size']}, {a['chunks']} chunks round-robin, "
             f"torch threads: {result['threads']}, {result['cpu']}. Time: the models' log-likelihood calls. "
             "Bound: tokens HFLM runs / tokens shared-prefix scoring runs, from the same requests. "
             "Complete-set weighting: each task's seconds per document times its size.", ""]
    for dtype, rows in result["runs"].items():
        lines += [f"## {dtype}", "", "| task | docs / size | hf s | compressed s | speed-up | token bound | "
                  "of bound | hf acc | compressed acc | docs differing |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            acc = {name: " / ".join(f"{v:.4f}" for v in r["acc"][name].values()) for name in r["acc"]}
            lines.append(f"| {r['task']} | {r['n']} / {r['size']} | {r['hf_s']} | {r['compressed_s']} | "
                         f"{r['speedup']:.2f}x | {r['bound']:.2f}x ({r['hf_tokens']} / {r['compressed_tokens']}) | "
                         f"{r['of_bound']:.2f} | {acc['hf']} | {acc['compressed']} | {r['docs_differing']} |")
        lines += ["", "(acc / acc_norm where the task has both.)", ""]
        if dtype == "float32":
            lines += [f"- {v}" for v in result["verdicts"]] + [""]
    if result.get("bf16_change"):
        lines += ["## bf16 against fp32 (compressed, same documents)", "",
                  "| task | metric | fp32 | bf16 | change | gained | lost |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['task']} | {c['metric']} | {c['fp32']:.4f} | {c['low']:.4f} | {c['change']:+.4f} | "
                  f"{c['gained']} | {c['lost']} |" for c in result["bf16_change"]]
    if result.get("bf16_skipped"):
        lines += [f"bf16: not run ({result['bf16_skipped']})."]
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda s: [t for t in s.split(",") if t])
    parser.add_argument("--docs", type=int, default=500, help="documents per task")
    parser.add_argument("--first", action="store_true", help="the first --docs documents, not a seeded sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=4, help="round-robin chunks per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared machine a second thread mostly waits for a core)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default: float32, and bfloat16 where the CPU has bf16 kernels)")
    parser.add_argument("--name", default="eval_speed")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=tasks_dir(), include_defaults=False)
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] + (["bfloat16"] if bf16_kernels() else [])
    result = {"command": " ".join(["python3", "bench/eval_speed.py", *sys.argv[1:]]), "args": vars(args),
              "threads": torch.get_num_threads(), "cpu": cpu_name(), "runs": {}}
    for dtype in dtypes:
        result["runs"][dtype] = run_dtype(dtype, args, task_manager)
    if "float32" in result["runs"]:
        result["verdicts"] = verdicts(result["runs"]["float32"])
        print("\n".join(result["verdicts"]))
        if "bfloat16" in result["runs"]:
            result["bf16_change"] = paired_change(result["runs"]["bfloat16"], result["runs"]["float32"])
    if not bf16_kernels() and "bfloat16" not in dtypes:
        result["bf16_skipped"] = "this CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated"
    write(result, args.name)


if __name__ == "__main__":
    main()
