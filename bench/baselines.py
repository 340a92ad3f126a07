"""Depth-pruning baselines on SmolLM2-135M: ShortGPT, SLEB, window drop vs dense, plus the speedup of
scoring from cached prefix states over naive full forwards.

Protocol (the issue's reference): calibration 8 x 512 tokens of WikiText-2 validation, seed 0;
perplexity on the first N non-overlapping 512-token windows of WikiText-2 test and of our C4 subset.
The dense model is evaluated once per process. SLEB is run once to the largest sparsity asked for:
its removals are greedy, so the run to k blocks is the first k iterations of that run; its rows use
those removals and the time spent up to iteration k.

    seconds      wall time of ``method.compress`` (scoring + removal; not model load or tokenizing)
    peak_rss_mb  peak resident memory of the process during that compression (Linux VmHWM, reset
                 before each method; for SLEB, over the whole run to the largest sparsity)

The naive side of the speedup counts only its full forward passes (not the deep copies).

Full grid (about an hour of 2 CPU cores):
    python bench/baselines.py --sparsities 0.1,0.2,0.25,0.3 --wikitext-windows 100 --c4-windows 256
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from compress_eval.config import CompressConfig
from compress_eval.data.calibration import calibration_windows, eval_windows
from compress_eval.methods.registry import get_method
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model
from compress_eval.scoring.importance import full_forward_nll, pruned_copy, removal_nll
from compress_eval.scoring.ppl import perplexity
from compress_eval.scoring.prefix import PrefixStates

MODEL = "smollm2-135m"
RESULTS = Path(__file__).resolve().parent / "results"


def reset_peak_rss() -> None:
    """Linux: set the high-water mark (VmHWM) to the current RSS, so the next peak is this step's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def blocks_for(sparsity: float, num_layers: int) -> int:
    return CompressConfig(model=MODEL, method="sleb", sparsity=sparsity).blocks_to_remove(num_layers)


def compress_copy(dense, method: str, k: int, calib):
    """(pruned copy, record, seconds, peak RSS MB) of one method removing k blocks."""
    model = copy.deepcopy(dense)
    compressor = get_method(CompressConfig(model=MODEL, method=method, num_blocks=k))
    reset_peak_rss()
    start = time.perf_counter()
    record = compressor.compress(get_adapter(model), calib)
    return model, record, time.perf_counter() - start, peak_rss_mb()


def ppl_row(model, windows: dict) -> dict:
    return {f"{name}_ppl": round(perplexity(model, w).ppl, 3) for name, w in windows.items()}


def prefix_speedup(dense, calib) -> dict:
    """Cached vs naive scoring of SLEB's first iteration (every block but the two ends), side by side.

    Naive time counts only the full forward passes, not the deep copies that build the pruned models.
    """
    candidates = list(range(1, get_adapter(dense).num_blocks - 1))
    start = time.perf_counter()
    cached = removal_nll(PrefixStates(get_adapter(dense), calib, batch_size=8), candidates)
    cached_s = time.perf_counter() - start
    naive, naive_s = [], 0.0
    for j in candidates:
        model = pruned_copy(dense, [j])
        start = time.perf_counter()
        naive.append(full_forward_nll(model, calib, batch_size=8))
        naive_s += time.perf_counter() - start
        del model
    worst = max(abs(c - n) / abs(n) for c, n in zip(cached, naive))
    return {"what": "one SLEB iteration on the dense model: calibration NLL with each of blocks "
                    f"1..{candidates[-1]} skipped, {calib.size(0)} x {calib.size(1)} tokens",
            "cached_seconds": round(cached_s, 2), "naive_seconds": round(naive_s, 2),
            "speedup": round(naive_s / cached_s, 2), "max_relative_difference": worst,
            "same_choice": min(range(len(cached)), key=cached.__getitem__) == min(range(len(naive)), key=naive.__getitem__)}


def markdown(rows: list[dict], state: dict, args, elapsed: float) -> str:
    speedup = state["speedup"]
    lines = ["# Depth-pruning baselines on SmolLM2-135M", "",
             f"Calibration {args.calib_samples} x {args.seqlen} tokens of WikiText-2 validation, seed {args.seed}; "
             f"ppl on the first {args.wikitext_windows} windows of {args.seqlen} of WikiText-2 test and the first "
             f"{args.c4_windows} of our C4 subset (not the papers' C4 numbers). CPU fp32, 2 shared cores.", "",
             "| method | sparsity | blocks removed | WikiText-2 ppl | C4 ppl | seconds | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        removed = ",".join(map(str, r.get("removed_blocks", []))) or "-"
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {removed} | {r['wikitext2_ppl']:.2f} | "
                     f"{r['c4_ppl']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    if speedup:
        lines += ["", f"Prefix caching: {speedup['what']}: cached {speedup['cached_seconds']} s vs naive "
                      f"{speedup['naive_seconds']} s = **{speedup['speedup']}x** (max relative score difference "
                      f"{speedup['max_relative_difference']:.1e}, same block chosen: {speedup['same_choice']})."]
    if state["cut"]:
        lines += ["", f"Cut by the time budget ({args.budget_min} min): {', '.join(state['cut'])}."]
    lines += ["", "SLEB rows come from one run to the largest sparsity (greedy: the run to k blocks is its "
                  "first k iterations); their seconds are the time to iteration k.", "",
              f"Command: `PYTHONPATH=. python3 bench/baselines.py {' '.join(args.argv)}` "
              f"({elapsed / 60:.1f} min in all)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="alias or local directory")
    parser.add_argument("--sparsities", default="0.2,0.25", help="fractions of blocks, comma-separated")
    parser.add_argument("--methods", default="shortgpt,sleb,drop-window", help="run in this order")
    parser.add_argument("--wikitext-windows", type=int, default=100)
    parser.add_argument("--c4-windows", type=int, default=25)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speedup-samples", type=int, default=2,
                        help="calibration windows for the cached-vs-naive timing (0: skip it)")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="start no row expected to end after this many minutes (rows left out are listed as cut)")
    parser.add_argument("--out", default=str(RESULTS / "baselines_smollm2.json"))
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    began = time.perf_counter()
    torch.manual_seed(args.seed)
    data_dir = os.environ.get("COMPRESS_EVAL_DATA_DIR")
    dense, tok, _ = load_model(args.model, "cpu")
    calib = calibration_windows(tok, "wikitext2", args.calib_samples, args.seqlen, args.seed, data_dir)
    windows = {"wikitext2": eval_windows(tok, "wikitext2", args.seqlen, data_dir, args.wikitext_windows),
               "c4": eval_windows(tok, "c4", args.seqlen, data_dir, args.c4_windows)}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    num_layers = get_adapter(dense).num_blocks
    out = Path(args.out)
    rows: list[dict] = []
    state: dict = {"speedup": None, "cut": []}

    def write() -> None:
        ordered = sorted(rows, key=lambda r: (r["method"] != "dense", r["method"], r["sparsity"]))
        out.write_text(json.dumps(ordered, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(ordered, state, args, time.perf_counter() - began))

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        write()

    def over_budget(estimate_s: float) -> bool:
        """Whether a row expected to take ``estimate_s`` would end past the budget."""
        return args.budget_min is not None and time.perf_counter() - began + estimate_s > 60 * args.budget_min

    start = time.perf_counter()
    emit({"method": "dense", "sparsity": 0.0, **ppl_row(dense, windows), "seconds": 0.0,
          "peak_rss_mb": round(peak_rss_mb(), 1), "removed_blocks": []})
    eval_s = time.perf_counter() - start
    # One full forward over the calibration windows costs about eval_s * calib windows / eval windows;
    # scoring one candidate from its cached state costs about half of that.
    forward_s = eval_s * calib.size(0) / sum(w.size(0) for w in windows.values())
    if args.speedup_samples:
        state["speedup"] = prefix_speedup(dense, calib[: args.speedup_samples])
        print(json.dumps(state["speedup"]), flush=True)
        out.with_name(out.stem + "_prefix_speedup.json").write_text(json.dumps(state["speedup"], indent=1) + "\n")
        write()
    sleb_run = None  # one greedy run to the largest k serves every sparsity
    for method in args.methods.split(","):
        for s in sparsities:
            k = blocks_for(s, num_layers)
            k_max = max(blocks_for(x, num_layers) for x in sparsities)
            scoring = {"shortgpt": 1, "drop-window": (num_layers - k + 1) / 2,
                       "sleb": 0 if sleb_run else k_max * num_layers / 2}.get(method, 0) * forward_s
            if over_budget(eval_s + scoring):
                state["cut"].append(f"{method} {s:.0%}")
                write()
                continue
            if method != "sleb":
                model, record, seconds, rss = compress_copy(dense, method, k, calib)
                removed = record.removed_blocks
            else:
                if sleb_run is None:
                    _, record, _, rss = compress_copy(dense, "sleb", k_max, calib)
                    sleb_run = (record, rss)
                record, rss = sleb_run
                removed = sorted(record.details["removal_order"][:k])
                seconds = record.details["iterations"][k - 1]["seconds"]
                model = pruned_copy(dense, removed)
            emit({"method": method, "sparsity": s, **ppl_row(model, windows), "seconds": round(seconds, 1),
                  "peak_rss_mb": round(rss, 1), "removed_blocks": removed})
            del model
    print(f"done in {(time.perf_counter() - began) / 60:.1f} min; wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
