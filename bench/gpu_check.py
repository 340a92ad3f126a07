"""CUDA bf16 check: every method on SmolLM2 in bf16 against fp32 on one GPU, FuseGPT's paper profile for
one fusion, and the >= 1 B scale model layer by layer (``--offload cpu``) against in memory, with the
peak device memory of each run. Exits non-zero on any failure; writes bench/results/gpu_check.{json,md}.

    bash bench/gpu_check.sh                      # on a machine with a GPU, after `make setup`
    python3 bench/gpu_check.py --device cpu --quick   # the same logic on a CPU (bf16 there too), minutes

Tolerance: a method's bf16 WikiText-2 perplexity within ``--tolerance`` (5 %) of its fp32 one when both
choose the same blocks; when bf16 rounding flips a close choice, within 3 x that (the row says so).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CALIB = dict(calib_samples=8, seqlen=512, seed=0)
# (label, config values): every method at 10 % of the blocks (3 of SmolLM2's 30), the stages after any.
RUNS = [
    ("dense", dict(method="none")),
    ("shortgpt", dict(method="shortgpt", sparsity=0.1)),
    ("sleb", dict(method="sleb", sparsity=0.1)),
    ("drop-window", dict(method="drop-window", sparsity=0.1)),
    ("mi", dict(method="mi", sparsity=0.1)),
    ("mi-ft", dict(method="mi-ft", sparsity=0.1, options={"profile": "cpu"})),
    ("mi-lowrank", dict(method="mi-lowrank", sparsity=0.1, options={"profile": "cpu"})),
    ("fuse", dict(method="fuse", sparsity=0.1, options={"profile": "cpu"})),
    ("merge", dict(method="merge", options={"ff_fraction": 0.1})),
    ("shortgpt+lora", dict(method="shortgpt", sparsity=0.1, recovery={"recover": "lora", "recover_steps": 20})),
    ("int8", dict(method="none", quantize="int8")),
    ("nf4", dict(method="none", quantize="nf4")),
]
QUICK = {"dense", "shortgpt", "sleb", "fuse", "merge"}


class _Skipped(Exception):
    """--quick leaves out the paper profile (128 x 2048 calibration: GPU work)."""


def measure(values: dict, device: str, dtype: str, data_dir, windows: int) -> dict:
    """Compress in memory, then WikiText-2 perplexity; seconds and peak device memory of both."""
    from compress_eval.config import make_config
    from compress_eval.evaluate import evaluate_ppl
    from compress_eval.pipeline import compress

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = compress(make_config(**{**CALIB, **values, "device": device, "dtype": dtype}), data_dir)
    seconds = time.perf_counter() - start
    ppl = evaluate_ppl(result.model, result.tokenizer, ["wikitext2"], 512, data_dir, windows)["wikitext2_ppl"]["ppl"]
    m = result.manifest
    row = {"removed": m.removed_blocks, "tied": sorted(m.tie_map), "ppl": ppl, "compress_s": round(seconds, 1),
           "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
           "offload": m.offload}
    del result
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def compare(label: str, fp32: dict, bf16: dict, tolerance: float) -> dict:
    same = fp32["removed"] == bf16["removed"] and fp32["tied"] == bf16["tied"]
    rel = abs(bf16["ppl"] - fp32["ppl"]) / fp32["ppl"]
    limit = tolerance if same else 3 * tolerance
    return {"run": label, "fp32": fp32, "bf16": bf16, "rel_diff": round(rel, 4), "same_choice": same,
            "ok": rel <= limit}


def scale_runs(model_dir: Path, device: str, data_dir) -> list[dict]:
    """The scale model in memory and layer by layer: the same blocks chosen, the device peak of each."""
    rows = []
    for label, values in [("shortgpt", dict(method="shortgpt", num_blocks=4)),
                          ("fuse", dict(method="fuse", num_blocks=1, options={"profile": "cpu", "group_size": 3}))]:
        runs = {}
        for offload in ("none", "cpu"):
            runs[offload] = measure({**values, "model": str(model_dir), "calib_samples": 4, "seqlen": 512,
                                     "offload": offload}, device, "bfloat16", data_dir, 4)
        rows.append({"run": f"scale {label}", "none": runs["none"], "cpu": runs["cpu"],
                     "ok": runs["none"]["removed"] == runs["cpu"]["removed"]})
    return rows


def table(header: list[str], rows: list[dict], cells) -> list[str]:
    """A markdown table of runs: ``cells(row)`` for a run that finished, its error across the row otherwise."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        body = [f"error: {r['error']}"] + [""] * (len(header) - 3) if "error" in r else cells(r)
        lines.append("| " + " | ".join([r["run"], *map(str, body), "yes" if r["ok"] else "no"]) + " |")
    return lines


def method_cells(r: dict) -> list:
    a, b = r["fp32"], r["bf16"]
    return [a["removed"] or a["tied"] or "-", b["removed"] or b["tied"] or "-", f"{a['ppl']:.3f}", f"{b['ppl']:.3f}",
            f"{r['rel_diff']:.2%}", f"{a['compress_s']} / {b['compress_s']}",
            f"{a['peak_device_mb']} / {b['peak_device_mb']}"]


def scale_cells(r: dict) -> list:
    a, b = r["none"], r["cpu"]
    return [a["removed"], b["removed"], a["peak_device_mb"], b["peak_device_mb"],
            f"{a['compress_s']} / {b['compress_s']}"]


def markdown(report: dict) -> str:
    lines = [f"# CUDA bf16 check ({report['device_name']})", "",
             f"`{report['command']}`: {report['seconds']:.0f} s, {'PASSED' if report['ok'] else 'FAILED'}. "
             f"{report['model']}, calibration 8 x 512 (WikiText-2, seed 0), WikiText-2 perplexity on "
             f"{report['windows']} windows of 512; tolerance {report['tolerance']:.0%} (3x when bf16 chooses "
             f"other blocks).", ""]
    lines += table(["run", "removed (fp32)", "removed (bf16)", "ppl fp32", "ppl bf16", "rel. diff",
                    "compress s fp32 / bf16", "peak device MB fp32 / bf16", "ok"], report["methods"], method_cells)
    lines += [""] + table(["scale model (bf16)", "removed in memory", "removed --offload cpu",
                           "peak device MB in memory", "peak device MB --offload cpu", "compress s", "ok"],
                          report["scale"], scale_cells)
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scale-model", type=Path, default=Path("/tmp/scale-1b"),
                   help="the >= 1 B model (made by bench/make_scale_model.py when missing)")
    p.add_argument("--windows", type=int, default=20, help="WikiText-2 windows of 512 for perplexity")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--quick", action="store_true",
                   help="five methods, no paper profile, no scale model (a CPU check of the script)")
    p.add_argument("--data-dir", default=None, help="default: $COMPRESS_EVAL_DATA_DIR")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_check")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here: run this on a machine with a GPU (or --device cpu to check the script)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = {"command": " ".join(["python3", "bench/gpu_check.py", *sys.argv[1:]]), "model": args.model,
              "windows": args.windows,
              "tolerance": args.tolerance, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "methods": [], "scale": []}
    for label, values in RUNS:
        if args.quick and label not in QUICK:
            continue
        try:
            values = {**values, "model": args.model}
            fp32 = measure(values, args.device, "float32", args.data_dir, args.windows)
            bf16 = measure(values, args.device, "bfloat16", args.data_dir, args.windows)
            row = compare(label, fp32, bf16, args.tolerance)
        except Exception as exc:  # the check reports every run, then fails as a whole
            traceback.print_exc()
            row = {"run": label, "error": f"{type(exc).__name__}: {exc}".splitlines()[0], "ok": False}
        print(json.dumps(row), flush=True)
        report["methods"].append(row)
    try:
        if args.quick:
            raise _Skipped
        paper = measure({"model": args.model, "method": "fuse", "num_blocks": 1, "options": {"profile": "paper"}},
                        args.device, "bfloat16", args.data_dir, args.windows)
        report["methods"].append({"run": "fuse --profile paper (1 fusion)", "fp32": paper, "bf16": paper,
                                  "rel_diff": 0.0, "same_choice": True, "ok": True})
    except _Skipped:
        pass
    except Exception as exc:
        traceback.print_exc()
        report["methods"].append({"run": "fuse --profile paper", "error": str(exc).splitlines()[0], "ok": False})
    if not args.quick:
        try:
            if not (args.scale_model / "config.json").exists():
                subprocess.run([sys.executable, str(ROOT / "bench" / "make_scale_model.py"), "--out",
                                str(args.scale_model)], check=True)
            report["scale"] = scale_runs(args.scale_model, args.device, args.data_dir)
        except Exception as exc:
            traceback.print_exc()
            report["scale"] = [{"run": "scale model", "error": str(exc).splitlines()[0], "ok": False}]
    report["seconds"] = time.perf_counter() - start
    report["ok"] = all(r["ok"] for r in report["methods"] + report["scale"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
