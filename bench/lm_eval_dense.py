"""Dense model through lm-eval with our `compressed` model type: offline benchmarks and papers' ppl.

Every offline task (acc, acc_norm, stderr, wall time) and wikitext2_ppl / c4_ppl through lm-eval
next to `compress-eval ppl` on the same windows. On a shared 2-core CPU the full sets do not fit
(HellaSwag alone is 40k requests), so by default each task takes its first --limit documents and
the table extrapolates the full-set time linearly. The full run:

    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/lm_eval_dense.py --limit 0 --ppl-windows 0

Run under the heavy-CPU lock: flock /tmp/compress-eval-locks/heavy.lock python3 bench/lm_eval_dense.py
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from compress_eval.eval_config import EvalConfig
from compress_eval.evaluate import evaluate
from compress_eval.lm_eval_plugin import CompressedLM, tasks_dir

FULL_SIZES = {"ce_piqa": 1838, "ce_arc_easy": 2376, "ce_arc_challenge": 1172, "ce_hellaswag": 10042,
              "ce_winogrande": 1267}
PPL = {"wikitext2_ppl": "wikitext2", "c4_ppl": "c4"}
OUT = Path(__file__).resolve().parent / "results"


def run_task(lm, task: str, limit, metadata: dict) -> tuple[dict, float, int]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=tasks_dir(), include_defaults=False, metadata=metadata)
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, log_samples=False)
    return out["results"][task], time.perf_counter() - start, out["n-samples"][task]["effective"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=",".join(FULL_SIZES))
    parser.add_argument("--limit", type=int, default=300, help="documents per task; 0 = the full set")
    parser.add_argument("--ppl-windows", type=int, default=8, help="windows per ppl task; 0 = all")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--name", default="lm_eval_dense")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = CompressedLM(pretrained=args.model, device="cpu", batch_size=args.batch_size)
    rows = []
    for task in [t for t in args.tasks.split(",") if t]:
        r, seconds, n = run_task(lm, task, args.limit or None, {})
        rows.append({"task": task, "n": n, "full": FULL_SIZES[task], "seconds": round(seconds, 1),
                     "full_seconds_est": round(seconds * FULL_SIZES[task] / n),
                     **{k.replace(",none", ""): v for k, v in r.items() if k.endswith(",none")}})
        print(json.dumps(rows[-1]), flush=True)
    for task, dataset in PPL.items():
        windows = args.ppl_windows or None
        meta = {"pretrained": args.model, "seqlen": args.seqlen}
        r, seconds, n = run_task(lm, task, windows, meta)
        ours = evaluate(args.model, EvalConfig(tasks=[dataset], seqlen=args.seqlen, max_windows=windows, device="cpu",
                                               progress=False))
        ours = ours[f"{dataset}_ppl"]
        rows.append({"task": task, "n": n, "seqlen": args.seqlen, "seconds": round(seconds, 1),
                     "lm_eval_ppl": r["token_perplexity,none"], "compress_eval_ppl": ours["ppl"],
                     "rel_diff": abs(r["token_perplexity,none"] / ours["ppl"] - 1), "ours_seconds": ours["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = [f"# {args.model} through lm-eval (`--model compressed`), CPU, batch {args.batch_size}",
             "", f"Offline tasks: first {args.limit or 'all'} documents each; time for the full set extrapolated "
             "linearly.", "", "| task | n / full | acc | ± | acc_norm | ± | seconds | full set (est. s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "acc" in r:
            norm = (f"{r['acc_norm']:.4f} | {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else "- | -")
            lines.append(f"| {r['task']} | {r['n']} / {r['full']} | {r['acc']:.4f} | {r['acc_stderr']:.4f} | "
                         f"{norm} | {r['seconds']} | {r['full_seconds_est']} |")
    lines += ["", f"Perplexity, first {args.ppl_windows or 'all'} windows of {args.seqlen} tokens:", "",
              "| task | windows | lm-eval ppl | compress-eval ppl | rel. diff | lm-eval s | ours s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "lm_eval_ppl" in r:
            lines.append(f"| {r['task']} | {r['n']} | {r['lm_eval_ppl']:.4f} | {r['compress_eval_ppl']:.4f} | "
                         f"{r['rel_diff']:.1e} | {r['seconds']} | {r['ours_seconds']} |")
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
