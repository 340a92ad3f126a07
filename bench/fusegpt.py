"""FuseGPT ablation on SmolLM2-135M: fuse (per loss) vs mi-lowrank vs mi-ft vs mi vs sleb / shortgpt.

Every variant sees the same calibration windows (WikiText-2 validation, seed 0), seqlen and seed;
each runs in its own process so its peak RSS is its own. Rows are merged into
bench/results/fusegpt_smollm2.json (key: label + sparsity) and the markdown table is rewritten.

The full grid of the issue (a long CPU run or a GPU):

    COMPRESS_EVAL_DATA_DIR=../shared/data flock /tmp/compress-eval-locks/heavy.lock \
    python3 bench/fusegpt.py --sparsity 0.2 0.25 0.3 \
        --calib-samples 16 --seqlen 256 --epochs 10 --eval-windows 100 \
        --variants none mi mi-ft:loss=mse mi-lowrank:loss=mse mi-lowrank:loss=kl-batch \
                   fuse:loss=mse fuse:loss=kl-batch fuse:loss=kd-logits sleb shortgpt

A variant is METHOD[:key=value,key=value] with the method's options (e.g. fuse:loss=mse,extra_rank=64);
``calib_samples=N`` in a variant gives it the first N of the calibration windows (same seed).

``--baselines FILE`` takes the dense, SLEB and ShortGPT rows from bench/baselines.py's output instead
of recomputing them (SLEB is the costliest row on a CPU). Both scripts draw calibration and evaluation
windows with the same functions, so the rows are comparable only when that run used the same
calibration (samples, seqlen, seed) and evaluation windows as this one: pass the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NAME = "fusegpt_smollm2"


def parse_variant(spec: str) -> tuple[str, dict]:
    from compress_eval.cli.compress import scalar

    method, _, rest = spec.partition(":")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        options[key] = scalar(value)
    return method, options


def run_one(spec: str, args) -> dict:
    """Compress and evaluate one variant in this process; returns its row."""
    import torch

    from compress_eval.config import make_config
    from compress_eval.data.calibration import eval_windows
    from compress_eval.memory import peak_rss_mb
    from compress_eval.pipeline import compress
    from compress_eval.scoring.ppl import perplexity

    torch.set_num_threads(args.threads)
    method, options = parse_variant(spec)
    from compress_eval.methods.registry import available_methods

    calibrated = available_methods()[method].needs_calibration
    if calibrated and method in ("mi", "mi-ft", "mi-lowrank", "fuse"):
        options = {"mi_samples": args.mi_samples, "batch_size": args.batch_size, **options}
        if method != "mi":
            options = {"epochs": args.epochs, **options}
    calib_samples = options.pop("calib_samples", args.calib_samples)  # e.g. sleb:calib_samples=2
    cfg = make_config(model=args.model, method=method, sparsity=None if method == "none" else args.sparsity,
                      calib_samples=calib_samples, seqlen=args.seqlen, seed=args.seed, options=options)
    result = compress(cfg, args.data_dir)
    model, tokenizer, manifest = result.model, result.tokenizer, result.manifest.model_dump()
    row = {"method": method, "label": spec, "sparsity": 0.0 if method == "none" else args.sparsity,
           "options": manifest["method_options"], "removed_blocks": manifest["removed_blocks"],
           "seconds": manifest["timings_s"].get("compress", 0.0) + manifest["timings_s"].get("calibrate", 0.0)}
    for dataset, count in (("wikitext2", args.eval_windows), ("c4", args.c4_windows)):
        windows = eval_windows(tokenizer, dataset, args.eval_seqlen, args.data_dir, count)
        result = perplexity(model, windows)
        row[f"{dataset}_ppl"] = round(result.ppl, 3)
        row[f"{dataset}_eval_seconds"] = round(result.seconds, 1)
    row["peak_rss_mb"] = peak_rss_mb()
    details = manifest["details"]
    if "iterations" in details:
        row["iteration_seconds"] = [it["seconds"] for it in details["iterations"]]
    row["protocol"] = protocol(args, calib_samples)
    return row


def protocol(args, calib_samples: int) -> dict:
    return {"calib": f"wikitext2 validation {calib_samples} x {args.seqlen}, seed {args.seed}",
            "eval": f"first {args.eval_windows} (WikiText-2) / {args.c4_windows} (C4) windows of {args.eval_seqlen}"}


def baseline_rows(path: Path, args) -> list[dict]:
    """bench/baselines.py's dense / SLEB / ShortGPT rows at our sparsities, in this script's row shape."""
    rows = []
    for r in json.loads(path.read_text()):
        if r["method"] not in ("dense", "sleb", "shortgpt") or (r["method"] != "dense" and r["sparsity"] not in args.sparsity):
            continue
        method = "none" if r["method"] == "dense" else r["method"]
        rows.append({**r, "method": method, "label": f"{method} (baselines.py)",
                     "protocol": {**protocol(args, args.calib_samples), "from": str(path.relative_to(ROOT))}})
    return rows


def markdown(rows: list[dict]) -> str:
    dense = [r for r in rows if r["method"] == "none"]
    sleb = {r["sparsity"]: r["wikitext2_ppl"] for r in rows if r["method"] == "sleb"}
    lines = ["| variant | sparsity | calibration | WikiText-2 ppl | C4 ppl | x SLEB (wt2) | compress s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["wikitext2_ppl"])):
        ratio = f"{r['wikitext2_ppl'] / sleb[r['sparsity']]:.2f}" if r["sparsity"] in sleb else "-"
        calib = r["protocol"]["calib"].removeprefix("wikitext2 validation ") if r["method"] != "none" else "-"
        lines.append(f"| {r['label']} | {r['sparsity']:.2f} | {calib} | {r['wikitext2_ppl']:.2f} | "
                     f"{r['c4_ppl']:.2f} | {ratio} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    head = [f"# FuseGPT ablation, SmolLM2-135M (CPU; ppl on the {rows[0]['protocol']['eval']})", ""] if rows else []
    if dense:
        head.append(f"Dense: WikiText-2 {dense[0]['wikitext2_ppl']:.2f}, C4 {dense[0]['c4_ppl']:.2f}.\n")
    return "\n".join(head + lines) + "\n"


def mi_speedup(args) -> dict:
    """Macro Influence of every block of the dense model: cached prefix states vs pruned full copies."""
    import torch

    from compress_eval.data.calibration import calibration_windows
    from compress_eval.methods.fusegpt import macro_influence
    from compress_eval.models.adapters import get_adapter
    from compress_eval.models.loading import load_model
    from compress_eval.scoring.importance import naive_macro_influence, pruned_copy
    from compress_eval.scoring.prefix import PrefixStates

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model, "cpu")
    calib = calibration_windows(tokenizer, "wikitext2", args.mi_speedup, args.seqlen, args.seed, args.data_dir)
    start = time.perf_counter()
    cached = macro_influence(PrefixStates(get_adapter(model), calib, args.batch_size))
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_macro_influence(model, calib, args.batch_size)
    naive_s = time.perf_counter() - start
    start = time.perf_counter()  # the naive side's deep copies, timed alone and taken out of it
    for i in range(len(cached)):
        pruned_copy(model, [i])
    copies_s = time.perf_counter() - start
    return {"what": f"MI of all {len(cached)} blocks of the dense model, {calib.size(0)} x {calib.size(1)} tokens, "
                    f"{args.threads} threads; naive = full forwards of pruned copies (the copies' time excluded)",
            "cached_seconds": round(cached_s, 2), "naive_seconds": round(naive_s - copies_s, 2),
            "copies_seconds": round(copies_s, 2), "speedup": round((naive_s - copies_s) / cached_s, 2),
            "max_abs_difference": max(abs(c - n) for c, n in zip(cached, naive)),
            "same_choice": cached.index(min(cached)) == naive.index(min(naive))}


def write_results(out: Path, rows: list[dict]) -> None:
    """The JSON rows and the markdown table; a hand-written "## Notes" section of the table is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    md = out.with_suffix(".md")
    notes = md.read_text().partition("\n## Notes")[2] if md.exists() else ""
    md.write_text(markdown(rows) + (f"\n## Notes{notes}" if notes else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=["mi", "mi-lowrank:loss=mse", "fuse:loss=mse",
                                                          "fuse:loss=kl-batch"])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--mi-samples", type=int, default=None, help="windows for MI (default all)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=50)
    parser.add_argument("--c4-windows", type=int, default=None, help="C4 windows (default: --eval-windows)")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("COMPRESS_EVAL_DATA_DIR"),
                        help="shared/data layout (default: $COMPRESS_EVAL_DATA_DIR)")
    parser.add_argument("--out", default=str(RESULTS / f"{NAME}.json"))
    parser.add_argument("--budget-min", type=float, default=None,
                        help="start no new variant after this many minutes (rows so far are kept)")
    parser.add_argument("--baselines", type=Path, default=None,
                        help="take dense/sleb/shortgpt rows from this bench/baselines.py output (same protocol!)")
    parser.add_argument("--mi-speedup", type=int, metavar="N", default=None,
                        help="only time MI from cached prefix states vs naive on N calibration windows")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.c4_windows = args.c4_windows or args.eval_windows
    if args.baselines and not args.baselines.is_file():
        parser.error(f"--baselines {args.baselines}: no such file (run bench/baselines.py first, or drop --baselines)")
    if args.mi_speedup:
        result = mi_speedup(args)
        print(json.dumps(result), flush=True)
        RESULTS.joinpath(f"{NAME}_mi_speedup.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    if args.one:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's messages, on stderr
        args.sparsity = args.sparsity[0]
        print("ROW " + json.dumps(run_one(args.one, args)), flush=True)
        return
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    if args.baselines:
        imported = baseline_rows(args.baselines.resolve(), args)
        keys = {(r["label"], r["sparsity"]) for r in imported}
        rows = [r for r in rows if (r["label"], r["sparsity"]) not in keys] + imported
        write_results(out, rows)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    begun = time.perf_counter()
    for sparsity, spec in [(s, v) for s in args.sparsity for v in args.variants]:
        if args.budget_min is not None and time.perf_counter() - begun > 60 * args.budget_min:
            print(f"budget of {args.budget_min} min spent: skipping {spec} at {sparsity}", flush=True)
            continue
        passed = {k: v for k, v in vars(args).items()
                  if k not in ("variants", "sparsity", "one", "out", "budget_min", "baselines") and v is not None}
        cmd = [sys.executable, __file__, "--one", spec, "--sparsity", str(sparsity)] + [
            a for k, v in passed.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            print(f"{spec} at {sparsity} failed (exit {proc.returncode}); see its stderr above", flush=True)
            continue
        row = json.loads(next(line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")))
        row["wall_seconds"] = round(time.perf_counter() - start, 1)
        rows = [r for r in rows if (r["label"], r["sparsity"]) != (row["label"], row["sparsity"])] + [row]
        write_results(out, rows)
        print(json.dumps({k: row[k] for k in ("label", "sparsity", "wikitext2_ppl", "c4_ppl", "seconds",
                                                "peak_rss_mb")}), flush=True)


if __name__ == "__main__":
    main()
