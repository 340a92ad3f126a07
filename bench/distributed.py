"""Scale out: SmolLM2 in one process and in two (torchrun, gloo, CPU), side by side.

sleb (2 iterations), fuse (1 fusion) and perplexity (40 windows of 512): wall time, chosen blocks, the
largest weight difference between the two checkpoints, perplexity. On 2 CPU cores two processes share
the cores one process used, so the time ratio shows the overhead, not a speed-up; the manifests'
collective counters (calls, bytes, seconds of rank 0) split each run into compute and communication,
from which the expected time on N GPUs is T(N) = compute / N + communication(N) with ring all-reduce
moving 2 (N - 1) / N of the bytes per collective.

    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/distributed.py

Writes bench/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CALIB = ["--calib-samples", "8", "--seqlen", "512", "--seed", "0"]
RUNS = {
    "sleb": ["compress", "smollm2-135m", "--method", "sleb", "--num-blocks", "2", *CALIB],
    "fuse": ["compress", "smollm2-135m", "--method", "fuse", "--num-blocks", "1", "--profile", "cpu", *CALIB],
    "ppl": ["ppl", "smollm2-135m", "--dataset", "wikitext2", "--seqlen", "512", "--max-windows", "40"],
}
# Gloo on loopback (measured here) vs NVLink-class links: bytes per second for the estimate.
LINK_BYTES_PER_S = {"nvlink": 150e9}


def launch(args: list[str], processes: int, out: Path | None) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // processes))}
    env.pop("WORLD_SIZE", None)
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    start = time.perf_counter()
    result = subprocess.run([*prefix, "-m", "compress_eval", *args, *(["--out", str(out)] if out else [])],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result.stdout


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def estimate(compute_s: float, comm: dict, n: int) -> float:
    """Seconds on n GPUs: the compute split n ways, every collective's bytes over NVLink (ring)."""
    moved = comm["bytes"] * 2 * (n - 1) / n
    return compute_s / n + moved / LINK_BYTES_PER_S["nvlink"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="*", default=list(RUNS))
    args = p.parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    try:
        for name in args.runs:
            row = {"run": name}
            for n in (1, 2):
                out = work / f"{name}-{n}" if RUNS[name][0] == "compress" else None
                seconds, stdout = launch(RUNS[name], n, out)
                row[f"seconds_{n}"] = round(seconds, 1)
                if out is None:
                    row[f"ppl_{n}"] = float(stdout.strip().splitlines()[-1])
                    continue
                manifest = json.loads((out / "compress_eval.json").read_text())
                row[f"removed_{n}"] = manifest["removed_blocks"]
                row[f"compress_s_{n}"] = manifest["timings_s"]["compress"]
                if n == 2:
                    row["collectives"] = manifest["distributed"]["collectives"]
            if RUNS[name][0] == "compress":
                row["max_weight_difference"] = max_difference(work / f"{name}-1", work / f"{name}-2")
                comm = row["collectives"]
                compute = row["compress_s_1"]
                row["expected_s"] = {str(n): round(estimate(compute, comm, n), 2) for n in (1, 2, 4, 8)}
            row["time_ratio"] = round(row["seconds_2"] / row["seconds_1"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(rows, indent=1))
    lines = ["# 1 vs 2 processes (torchrun, gloo, 2 CPU cores), SmolLM2-135M", "",
             "`COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/distributed.py`", "",
             "| run | s, 1 process | s, 2 processes | ratio | chosen (1) | chosen (2) | max weight diff | ppl (1) "
             "| ppl (2) | collectives (calls, MB, s) | expected compress s on 1/2/4/8 GPUs' worth of compute |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("collectives")
        comm = f"{c['calls']}, {c['bytes'] / 2**20:.1f}, {c['seconds']}" if c else "-"
        lines.append(
            f"| {r['run']} | {r['seconds_1']} | {r['seconds_2']} | {r['time_ratio']} | {r.get('removed_1', '-')} | "
            f"{r.get('removed_2', '-')} | {r.get('max_weight_difference', '-')} | {r.get('ppl_1', '-')} | "
            f"{r.get('ppl_2', '-')} | {comm} | "
            f"{' / '.join(map(str, r['expected_s'].values())) if 'expected_s' in r else '-'} |")
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
