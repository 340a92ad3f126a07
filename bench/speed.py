"""Inference speed: dense SmolLM2-135M against each 25 % checkpoint, measured round-robin in one run.

Prefill (a 256-token prompt) and decode (32 cached steps after it, greedy) tokens per second at
batch 1 and 8, and the resident memory of a process that loaded the model and ran them. Each
measurement is a fresh process (so its peak RSS is the model's alone); every round measures every model once, in turn, and the table gives the median of the rounds, so a slow moment of the machine
falls on all models alike. The compute bound of a checkpoint is the dense model's multiply-adds per
token over its own (linears and LM head; attention over the context is left out, so at 256 tokens the
bound is a little optimistic for depth pruning).

The checkpoints are made here: depth (shortgpt, 25 % of blocks), sublayer (25 % of the blocks'
parameters, chosen on 2 x 128 calibration tokens: speed depends on what is removed, not on how well
it was chosen), merge (the leaderboard's window, 16-26, tied), int8 and nf4 of the dense model; fuse
(the leaderboard's checkpoint, if `--fuse DIR` names it) has depth's shapes.

    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/speed.py [--rounds 3] [--fuse DIR]

Writes bench/results/speed_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compress_eval.results.card import table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m"
CALIB = ["--calib-samples", "8", "--seqlen", "512", "--seed", "0"]
BUILDS = {
    "depth 25 % (shortgpt)": ["--method", "shortgpt", "--sparsity", "0.25", *CALIB],
    "sublayer 25 % of params": ["--method", "sublayer", "--param-sparsity", "0.25", "--calib-samples", "2",
                                "--seqlen", "128", "--seed", "0"],
    "merge 1/3 FF, tied": ["--method", "merge", "--window", "16-26", *CALIB],
    "int8": ["--method", "none", "--quantize", "int8"],
    "nf4": ["--method", "none", "--quantize", "nf4"],
}
PROMPT, NEW_TOKENS, BATCHES = 256, 33, (1, 8)


def measure(directory: str) -> dict:
    """In this (fresh) process: load, then prefill and decode speeds at each batch size, and peak RSS."""
    import torch

    from compress_eval.memory import peak_rss_mb
    from compress_eval.models.checkpoint import parameter_count
    from compress_eval.models.loading import load_model

    torch.manual_seed(0)
    model, _, _ = load_model(directory, "cpu")
    vocab = model.config.get_text_config().vocab_size
    out = {"macs_per_token": macs_per_token(model), "params": parameter_count(model)}
    def generate_s(ids, new_tokens: int) -> float:
        start = time.perf_counter()
        got = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        assert got.shape[1] == ids.shape[1] + new_tokens
        return time.perf_counter() - start

    with torch.no_grad():
        for batch in BATCHES:
            ids = torch.randint(0, vocab, (batch, PROMPT))
            generate_s(ids[:, :16], 2)  # warm-up (kernel selection, allocator)
            start = time.perf_counter()
            model(ids, use_cache=False)
            out[f"prefill_b{batch}"] = batch * PROMPT / (time.perf_counter() - start)
            # Decode: generating N tokens minus generating 1 (the same prefill) is N - 1 cached steps.
            steps_s = generate_s(ids, NEW_TOKENS) - generate_s(ids, 1)
            out[f"decode_b{batch}"] = batch * (NEW_TOKENS - 1) / max(steps_s, 1e-9)
    out["rss_mb"] = peak_rss_mb()
    return out


def macs_per_token(model) -> int:
    """Multiply-adds of one token through the linears and the LM head (removed sublayers have none; a
    tied module runs in every block that uses it, so it counts each time; a quantized linear counts
    its logical shape)."""
    total = 0
    for _, module in model.named_modules(remove_duplicate=False):
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += module.in_features * module.out_features
    return total


def run_worker(directory: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    result = subprocess.run([sys.executable, __file__, "--worker", directory], capture_output=True, text=True,
                            env=env, cwd=ROOT)
    if result.returncode:
        sys.exit(f"measuring {directory} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build(work: Path) -> dict[str, dict]:
    models = {"dense": {"path": MODEL}}
    for name, args in BUILDS.items():
        out = work / name.split()[0]
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "compress_eval", "compress", MODEL, *args, "--out", str(out)],
                                capture_output=True, text=True, cwd=ROOT)
        if result.returncode:
            sys.exit(f"building {name} failed:\n{result.stderr[-3000:]}")
        manifest = json.loads((out / "compress_eval.json").read_text())
        models[name] = {"path": str(out), "params": manifest["params_after"],
                        "weight_bytes": manifest["weight_bytes_after"],
                        "build_s": round(time.perf_counter() - start, 1)}
        print(f"built {name} in {models[name]['build_s']} s", flush=True)
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fuse", help="the leaderboard's fuse checkpoint (runs/leaderboard/...fuse...)")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return
    work = Path(tempfile.mkdtemp(prefix="speed-bench-"))
    try:
        models = build(work)
        if args.fuse:
            manifest = json.loads((Path(args.fuse) / "compress_eval.json").read_text())
            models["fuse 25 % (leaderboard)"] = {"path": args.fuse, "params": manifest["params_after"],
                                                 "weight_bytes": manifest["weight_bytes_after"]}
        samples: dict[str, list[dict]] = {name: [] for name in models}
        for r in range(args.rounds):
            for name, m in models.items():
                samples[name].append(run_worker(m["path"]))
                print(f"round {r + 1}: {name}: {json.dumps(samples[name][-1])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = [k for k in samples["dense"][0] if k not in ("macs_per_token", "params")]
    rows = []
    dense = {k: statistics.median(s[k] for s in samples["dense"]) for k in metrics}
    dense_macs = samples["dense"][0]["macs_per_token"]
    for name, m in models.items():
        row = {"model": name, "params": samples[name][0]["params"], **{k: v for k, v in m.items() if k != "path"},
               "macs_per_token": samples[name][0]["macs_per_token"],
               **{k: round(statistics.median(s[k] for s in samples[name]), 1) for k in metrics}}
        row["compute_bound"] = round(dense_macs / row["macs_per_token"], 3)
        for k in metrics:
            if k != "rss_mb":
                row[f"{k}_speedup"] = round(row[k] / dense[k], 3)
        for k in ("decode_b1", "prefill_b8"):
            row[f"{k}_of_bound"] = round(row[f"{k}_speedup"] / row["compute_bound"], 3)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    result = {"prompt": PROMPT, "new_tokens": NEW_TOKENS, "rounds": args.rounds, "threads": os.cpu_count(),
              "fuse": bool(args.fuse), "rows": rows}
    (RESULTS / "speed_smollm2.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (RESULTS / "speed_smollm2.md").write_text(text)
    print(text)


def markdown(result: dict) -> str:
    """The results table (also re-rendered from the JSON alone)."""
    rows = result["rows"]
    lines = [f"# Inference speed, SmolLM2-135M on {result['threads']} CPU cores (fp32; int8/nf4 bitsandbytes)", "",
             "`COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/speed.py" + (" --fuse DIR" if result["fuse"] else "")
             + f"` ({result['rounds']} rounds, round-robin, medians; prompt {result['prompt']} tokens, "
             f"{result['new_tokens'] - 1} cached decode steps)", "",
             table(["checkpoint", "params", "MACs/token (M)", "compute bound", "prefill tok/s b1", "b8",
                    "decode tok/s b1", "b8", "speed-up prefill b1 / b8", "decode b1 / b8",
                    "of bound: decode b1, prefill b8", "RSS MB"],
                   [[r["model"], r.get("params", "-"), f"{r['macs_per_token'] / 1e6:.1f}", f"{r['compute_bound']}x",
                     r["prefill_b1"], r["prefill_b8"], r["decode_b1"], r["decode_b8"],
                     f"{r['prefill_b1_speedup']} / {r['prefill_b8_speedup']}",
                     f"{r['decode_b1_speedup']} / {r['decode_b8_speedup']}",
                     f"{r['decode_b1_of_bound']}, {r['prefill_b8_of_bound']}", r["rss_mb"]] for r in rows])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
