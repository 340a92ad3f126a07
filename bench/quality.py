"""Quality at each size: SmolLM2-135M compressed by each method, with and without recovery at one fixed
budget, on the issue's protocol (the first 40 x 512 WikiText-2 test windows and 10 x 512 C4 ones).

Rows run one at a time (`--rows NAME ...`, default every row not yet in the results) and are merged
into bench/results/quality_smollm2.json, so a long table is built over several runs; each row keeps
its command, params kept, weight bytes, compress seconds (method and recovery) and peak RSS.

The recovery budget, the same for every method: LoRA rank 16 (alpha 32, dropout 0.05) on every
linear but the head, 200 steps of one 512-token sequence of WikiText-2 train (the first 102,400
tokens, each seen once), lr 2e-4, 1 % warm-up then cosine, next-token loss.
A few rows repeat it at lr 1e-3, against ShortGPT on that budget, to see whether a stronger budget
changes the ranking; a few heal by the mean of next-token loss and KL to the dense logits, against
ShortGPT healed the same way.

    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/quality.py [--rows ...] [--list] [--work DIR]

The checkpoints that healed rows start from are kept in --work (our cache by default) between runs.

Writes bench/results/quality_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compress_eval.paths import cache_dir
from compress_eval.results.card import table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m"
CALIB = ["--calib-samples", "8", "--seqlen", "512", "--seed", "0"]
HEAL = ["--recover", "lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.05", "--recover-steps",
        "200", "--recover-seqlen", "512", "--recover-lr", "2e-4", "--recover-schedule", "cosine",
        "--recover-data", "train"]
# A second, stronger budget (lr 1e-3, all else the same), its rows named with this suffix and measured
# against ShortGPT healed on it.
STRONG = " (lr 1e-3)"
HEAL_STRONG = [*HEAL[:HEAL.index("--recover-lr") + 1], "1e-3", *HEAL[HEAL.index("--recover-lr") + 2:]]
# Healing by the mixed loss, its rows named with this and measured against ShortGPT healed by it too.
MIXED = ", ce+kd"
MIX = ["--recover-loss", "ce+kd", "--recover-kd-weight", "0.5"]


def sleb_blocks(percent: str) -> str:
    """The blocks SLEB chose at ``percent`` % with this calibration in bench/baselines.py (23-33 min each):
    its rows drop them rather than search again."""
    rows = json.loads((RESULTS / "baselines_smollm2.json").read_text())
    chosen = next(r["removed_blocks"] for r in rows if r["method"] == "sleb" and r["sparsity"] == int(percent) / 100)
    return ",".join(map(str, chosen))


FUSE = ["--method", "fuse", "--profile", "cpu", *CALIB]
# name -> (compress arguments, track); "@ROW" as the model: that row's checkpoint (healed separately, so a
# row's quality before and after recovery is one compression).
ROWS = {
    "dense": (["--method", "none"], "none"),
    **{f"shortgpt {p} %": (["--method", "shortgpt", "--sparsity", f"0.{p}", *CALIB], "no recovery")
       for p in ("20", "25", "30")},
    **{f"sleb {p} % (its blocks from bench/baselines.py)": (["--method", "drop", "--blocks", sleb_blocks(p)],
                                                          "no recovery") for p in ("20", "25", "30")},
    "sublayer 25 % params (4 x 512 calibration)": (
        ["--method", "sublayer", "--param-sparsity", "0.25", "--calib-samples", "4", "--seqlen", "512", "--seed", "0"],
        "no recovery"),
    **{f"fuse {p} %": ([*FUSE, "--sparsity", f"0.{p}"], "no recovery") for p in ("20", "25", "30")},
    "fuse 25 % --align-ff": ([*FUSE, "--sparsity", "0.25", "--align-ff"], "no recovery"),
    "fuse 25 % (groups of 4)": ([*FUSE, "--sparsity", "0.25", "--group-size", "4"], "no recovery"),
    # fuse's control at that group size: the same trainable low-rank term, nothing injected.
    "mi-lowrank 25 % (groups of 4)": (["--method", "mi-lowrank", "--profile", "cpu", *CALIB, "--sparsity", "0.25",
                                       "--group-size", "4"], "no recovery"),
    "fuse 25 % (kd-logits group fine-tune)": ([*FUSE, "--sparsity", "0.25", "--loss", "kd-logits"], "no recovery"),
    # FF merging at the same size (ceil(0.25 x 30 blocks' parameters / one FF's) = 11 FFs tied): one window
    # (the paper), several small ones, and the drop-window baseline the paper compares it with.
    "merge 25 % params (one window)": (["--method", "merge", "--param-sparsity", "0.25", *CALIB], "no recovery"),
    "merge 25 % params (6 windows of 2-3 layers)": (
        ["--method", "merge", "--param-sparsity", "0.25", "--num-windows", "6", *CALIB], "no recovery"),
    "drop-window 25 %": (["--method", "drop-window", "--sparsity", "0.25", *CALIB], "no recovery"),
    # A final whole-model distillation on the calibration windows alone (no training text): part of the
    # compression, so in the no-recovery track. The last row spends the same calibration tokens and
    # training token-steps on 4x as many, shorter windows.
    **{f"fuse 25 % + KD on the calibration{label}": (
        ["@fuse 25 %", "--method", "none", "--recover", "lora", "--lora-r", "16", "--lora-alpha", "32",
         "--lora-dropout", "0.05", "--recover-steps", steps, "--recover-seqlen", seqlen, "--recover-lr", lr,
         "--recover-schedule", "cosine", "--recover-data", "calibration", "--recover-loss", "kd",
         "--calib-samples", str(4096 // int(seqlen)), "--seqlen", seqlen, "--seed", "0"],
        "no recovery") for label, steps, lr, seqlen in (
            ("", "64", "2e-4", "512"), (" (200 steps)", "200", "2e-4", "512"),
            (" (200 steps, lr 1e-3)", "200", "1e-3", "512"), (" (32 x 128 windows, 800 steps)", "800", "2e-4", "128"))},
    "shortgpt 25 % + LoRA": (["@shortgpt 25 %", "--method", "none", *HEAL], "recovery"),
    "sleb 25 % + LoRA": (["@sleb 25 % (its blocks from bench/baselines.py)", "--method", "none", *HEAL], "recovery"),
    "sublayer 25 % params + LoRA": (["@sublayer 25 % params (4 x 512 calibration)", "--method", "none", *HEAL],
                                    "recovery"),
    "merge 25 % params (6 windows of 2-3 layers) + LoRA": (
        ["@merge 25 % params (6 windows of 2-3 layers)", "--method", "none", *HEAL], "recovery"),
    "drop-window 25 % + LoRA": (["@drop-window 25 %", "--method", "none", *HEAL], "recovery"),
    "fuse 25 % + LoRA": (["@fuse 25 %", "--method", "none", *HEAL], "recovery"),
    "fuse 25 % + LoRA, kd loss": (["@fuse 25 %", "--method", "none", *HEAL, "--recover-loss", "kd"], "recovery"),
    "fuse 25 % + KD on the calibration (200 steps) + LoRA": (
        ["@fuse 25 % + KD on the calibration (200 steps)", "--method", "none", *HEAL], "recovery"),
    f"shortgpt 25 % + LoRA{STRONG}": (["@shortgpt 25 %", "--method", "none", *HEAL_STRONG], "recovery"),
    f"fuse 25 % + KD on the calibration (200 steps) + LoRA{STRONG}": (
        ["@fuse 25 % + KD on the calibration (200 steps)", "--method", "none", *HEAL_STRONG], "recovery"),
    # Healing by (CE + KL to the dense logits) / 2: the text's next tokens and the teacher's distribution.
    f"shortgpt 25 % + LoRA{MIXED}{STRONG}": (["@shortgpt 25 %", "--method", "none", *HEAL_STRONG, *MIX], "recovery"),
    f"fuse 25 % + KD on the calibration (200 steps) + LoRA{MIXED}{STRONG}": (
        ["@fuse 25 % + KD on the calibration (200 steps)", "--method", "none", *HEAL_STRONG, *MIX], "recovery"),
}
EVAL = {"wikitext2": 40, "c4": 10}


def cli(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "compress_eval", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"failed: compress-eval {' '.join(args)}\n{result.stderr[-3000:]}")
    return result.stdout


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def base_of(name: str) -> str | None:
    first = ROWS[name][0][0]
    return first[1:] if first.startswith("@") else None


def run_row(name: str, work: Path) -> dict:
    """Compress (or heal) one row into ``work``, evaluate it, and keep its checkpoint only when another
    row starts from it."""
    args, track = ROWS[name]
    base = base_of(name)
    model, args = (str(work / slug(base)), args[1:]) if base else (MODEL, args)
    out = work / slug(name)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cli(["compress", model, *args, "--out", str(out)])
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "compress_eval.json").read_text())
    row = {"row": name, "track": track,
           "command": " ".join(["compress-eval compress", f"<the '{base}' checkpoint>" if base else MODEL, *args]),
           "params": manifest["params_after"], "weight_bytes": manifest["weight_bytes_after"],
           "compress_s": round(sum(manifest["timings_s"].get(k, 0) for k in ("compress", "recover")), 1),
           "wall_s": round(seconds, 1), "peak_rss_mb": manifest["peak_rss_mb"],
           "removed_blocks": manifest["removed_blocks"], "skipped": manifest.get("skipped", []),
           "recovery": {k: manifest["recovery"][k] for k in ("loss_first", "loss_last", "seconds")}
           if manifest.get("recovery") else None,
           "date": datetime.date.today().isoformat()}
    for dataset, windows in EVAL.items():
        stdout = cli(["ppl", str(out), "--dataset", dataset, "--seqlen", "512", "--max-windows", str(windows)])
        row[dataset] = round(float(stdout.strip().splitlines()[-1]), 2)
    if not any(base_of(other) == name for other in ROWS):
        shutil.rmtree(out)
    return row


def reference(row: dict, rows: dict[str, dict]) -> dict | None:
    """The row a row is measured against: SLEB at the same size without recovery, ShortGPT + LoRA on the
    same budget with."""
    if row["track"] == "recovery":
        return rows.get("shortgpt 25 % + LoRA" + (MIXED if MIXED in row["row"] else "")
                        + (STRONG if row["row"].endswith(STRONG) else ""))
    size = re.search(r"(\d+) %", row["row"])
    return size and rows.get(f"sleb {size.group(1)} % (its blocks from bench/baselines.py)")


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality_smollm2.json").write_text(json.dumps(rows, indent=1))
    by_name = {r["row"]: r for r in rows}
    dense = by_name.get("dense")

    def ratio(row):
        ref = reference(row, by_name)
        return f"{row['wikitext2'] / ref['wikitext2']:.3f} / {row['c4'] / ref['c4']:.3f}" if ref else "-"

    lines = ["# Quality at each size, SmolLM2-135M (2 CPU cores)", "",
             "`COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/quality.py` (rows merged across runs; recovery: "
             "LoRA r16 on every linear, 200 x 512 tokens of WikiText-2 train, lr 2e-4 cosine, or lr 1e-3 in the "
             f"rows named '{STRONG}'; by (CE + KL to the dense logits) / 2 in those named '{MIXED}'). x ref: "
             "WikiText-2 / C4 ppl over SLEB's at the same size (no recovery) or over "
             "ShortGPT 25 % + LoRA's on the same budget and loss (recovery). A row made from another row's checkpoint "
             "(healed, or distilled on the calibration) counts its own stage in compress s: add its base row's.", "",
             table(["row", "track", "WikiText-2 (40 x 512)", "C4 (10 x 512)", "x ref", "params", "params kept",
                    "weight bytes", "compress s", "peak RSS MB"],
                   [[r["row"], r["track"], r["wikitext2"], r["c4"], ratio(r), f"{r['params']:,}",
                     f"{r['params'] / dense['params']:.3f}" if dense else "-", f"{r['weight_bytes']:,}",
                     r["compress_s"], r["peak_rss_mb"]] for r in rows])]
    (RESULTS / "quality_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", help="rows to (re)run; default: those not in the results yet")
    p.add_argument("--list", action="store_true")
    p.add_argument("--work", type=Path, default=cache_dir() / "quality-bench",
                   help="where the checkpoints other rows start from are kept between runs")
    args = p.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    path = RESULTS / "quality_smollm2.json"

    def finished() -> dict[str, dict]:  # read again before each write: another run may have added rows
        return {r["row"]: r for r in json.loads(path.read_text())} if path.exists() else {}

    done = finished()
    wanted = args.rows or [name for name in ROWS if name not in done]
    unknown = [name for name in wanted if name not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}: see --list")
    # A healed row needs its base row's checkpoint: kept from an earlier run, else made in this one.
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    needed = []

    def need(name: str, *, rerun: bool) -> None:  # its base first, and the base's base, where not kept
        if name in needed or not rerun and (work / slug(name) / "compress_eval.json").is_file():
            return
        if base := base_of(name):
            need(base, rerun=False)
        needed.append(name)

    for name in wanted:
        need(name, rerun=True)
    for name in needed:
        row = run_row(name, work)
        print(json.dumps(row), flush=True)
        done = {**finished(), name: row}
        write([done[n] for n in ROWS if n in done])


if __name__ == "__main__":
    main()
