"""Compression's cost on image questions: the LLaVA built by bench/make_vlm.py (SmolLM2-135M inside, a
vision tower trained on easy-vqa) compressed by each method at 25 % of its language model's blocks, then
scored on ce_mmmu (easy-vqa test questions in MMMU's schema, lm-eval's MMMU prompt and answer parsing,
chat format, greedy) and on WikiText-2 perplexity through its language model. Fuse runs twice: calibrated
on text (as the paper) and on image-text pairs through the whole VLM (``--calib-data easy-vqa``).

    python3 bench/make_vlm.py                                                   # once (cached)
    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/multimodal.py [--rows ...] [--questions 500]

Rows run one at a time and merge into bench/results/multimodal_llava_smollm2.{json,md} (``--rows``: the
ones to (re)run; default: those not there yet). The questions are a seeded sample of easy-vqa's test
split in MMMU's layout (as `compress-eval data easy-vqa` writes it) in a scratch data directory beside the
text corpora.

Answers are generated up to 32 tokens, not mmmu_val's 512: every answer here is one option letter, and a
damaged model that never ends its turn made lm-eval generate all 512 for every question (about 100 min
per row on 2 cores, against 2 for the dense VLM). Each row records the cap it was measured with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compress_eval.data.easy_vqa import chance_accuracy, mmmu_rows, write_mmmu
from compress_eval.paths import cache_dir
from compress_eval.results.card import table
from quality import sleb_blocks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NAME = "multimodal_llava_smollm2"
TEXT_CALIB = ["--calib-samples", "8", "--seqlen", "512", "--seed", "0"]
ROWS = {
    "dense": ["--method", "none"],
    "shortgpt": ["--method", "shortgpt", "--sparsity", "0.25", *TEXT_CALIB],
    "drop-window": ["--method", "drop-window", "--sparsity", "0.25", *TEXT_CALIB],
    "mi": ["--method", "mi", "--sparsity", "0.25", "--profile", "cpu", *TEXT_CALIB],
    "fuse (text calibration)": ["--method", "fuse", "--sparsity", "0.25", "--profile", "cpu", *TEXT_CALIB],
    "fuse (image-text calibration)": ["--method", "fuse", "--sparsity", "0.25", "--profile", "cpu",
                                      *TEXT_CALIB, "--calib-data", "easy-vqa"],
    # The VLM's language model is SmolLM2 unchanged, so text-calibrated SLEB picks its SmolLM2 blocks (as
    # shortgpt and fuse did here): dropped rather than searched again (30 min).
    "sleb (its blocks from bench/baselines.py)": ["--method", "drop", "--blocks", sleb_blocks("25")],
    "merge (25 % of the FF parameters)": ["--method", "merge", "--param-sparsity", "0.25", *TEXT_CALIB],
}
PPL_WINDOWS = 40
MAX_GEN_TOKS = 32


def cli(args: list[str], env: dict) -> str:
    result = subprocess.run([sys.executable, "-m", "compress_eval", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env)
    if result.returncode:
        sys.exit(f"failed: compress-eval {' '.join(args)}\n{result.stderr[-3000:]}")
    return result.stdout


def scratch_data(questions: int, seed: int) -> tuple[Path, float]:
    """The data directory of the runs: the text corpora of $COMPRESS_EVAL_DATA_DIR (linked, never copied)
    and ``questions`` easy-vqa test questions in MMMU's layout (what `compress-eval data easy-vqa` writes);
    with the chance accuracy of those questions."""
    source = os.environ.get("COMPRESS_EVAL_DATA_DIR")
    if not source:
        sys.exit("set COMPRESS_EVAL_DATA_DIR to the data directory (../shared/data)")
    root = Path(tempfile.mkdtemp(prefix="bench-multimodal-data-"))
    for entry in Path(source).resolve().iterdir():
        if entry.name != "mmmu":
            (root / entry.name).symlink_to(entry)
    rows = mmmu_rows("test", seed, questions)
    write_mmmu(rows, root / "mmmu")
    return root, round(chance_accuracy(rows), 4)


def run_row(name: str, vlm: Path, work: Path, env: dict, questions: int) -> dict:
    out = work / "checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cli(["compress", str(vlm), *ROWS[name], "--out", str(out)], env)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "compress_eval.json").read_text())
    cli(["eval", str(out), "--tasks", "mmmu", "--batch-size", "8", "--gen-kwargs", f"max_gen_toks={MAX_GEN_TOKS}"],
        env)
    mmmu = json.loads((out / "lm_eval_results.json").read_text())["results"]["ce_mmmu"]
    ppl = float(cli(["ppl", str(out), "--dataset", "wikitext2", "--seqlen", "512", "--max-windows",
                     str(PPL_WINDOWS)], env).strip().splitlines()[-1])
    return {"row": name, "command": " ".join(["compress-eval compress <the VLM>", *ROWS[name]]),
            "mmmu_acc": round(mmmu["acc,none"], 4), "questions": questions, "max_gen_toks": MAX_GEN_TOKS,
            "wikitext2": round(ppl, 2), "lm_blocks": manifest["blocks_after"],
            "params": manifest["params_after"], "weight_bytes": manifest["weight_bytes_after"],
            "compress_s": round(manifest["timings_s"].get("compress", 0), 1), "wall_s": round(wall, 1),
            "peak_rss_mb": manifest["peak_rss_mb"], "removed_blocks": manifest["removed_blocks"],
            "date": datetime.date.today().isoformat()}


def standard_error(accuracy: float, questions: int) -> float:
    """Of a mean of ``questions`` right/wrong answers (lm-eval's acc_stderr): which rows differ by more
    than chance."""
    return math.sqrt(accuracy * (1 - accuracy) / (questions - 1))


def write(rows: list[dict], report: dict | None, chance: float, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"vlm": report, "chance": chance, "rows": rows}, indent=1) + "\n")
    dense = next((r for r in rows if r["row"] == "dense"), None)
    built = (f"The VLM (bench/make_vlm.py, seed {report['seed']}, built in {report['build_seconds']:.0f} s): test "
             f"accuracy {report['test']['accuracy']:.3f} on {report['test']['questions']} questions (chance "
             f"{report['test']['chance']:.3f}; " + ", ".join(
                 f"{kind} {v['accuracy']:.3f} vs {v['chance']:.3f}" for kind, v in report['test']['by_kind'].items())
             + f"); its text ppl equals SmolLM2's ({report['text_ppl']['vlm']:.2f})." if report else "")
    lines = ["# Compressing the language model of a LLaVA (SmolLM2-135M inside), 25 % of its blocks", "",
             "`COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/multimodal.py` (ce_mmmu: easy-vqa test "
             f"questions, greedy, chat format; WikiText-2: the first {PPL_WINDOWS} windows of 512). A uniformly "
             f"random choice scores {chance:.3f} on these questions.", "", built, "",
             table(["row", "ce_mmmu acc", "± s.e.", "questions", "max gen toks", "WikiText-2 ppl", "LM blocks",
                    "params", "params kept", "weight bytes", "compress s", "peak RSS MB"],
                   [[r["row"], r["mmmu_acc"], f"{standard_error(r['mmmu_acc'], r['questions']):.3f}", r["questions"],
                     r["max_gen_toks"], r["wikitext2"], r["lm_blocks"], f"{r['params']:,}",
                     f"{r['params'] / dense['params']:.3f}" if dense else "-", f"{r['weight_bytes']:,}",
                     r["compress_s"], r["peak_rss_mb"]] for r in rows])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vlm", type=Path, default=cache_dir() / "models" / "llava-smollm2-easyvqa")
    p.add_argument("--rows", nargs="*", help="rows to (re)run, of: " + ", ".join(ROWS).replace("%", "%%"))
    p.add_argument("--questions", type=int, default=500, help="easy-vqa test questions (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / NAME, help="results, .json and .md")
    args = p.parse_args()
    if not (args.vlm / "config.json").is_file():
        sys.exit(f"{args.vlm} holds no VLM: run python3 bench/make_vlm.py first")
    path = args.out.with_suffix(".json")
    done = {r["row"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    wanted = args.rows or [name for name in ROWS if name not in done]
    unknown = [name for name in wanted if name not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}: choose among {list(ROWS)}")
    report_file = args.vlm / "make_vlm.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    data, chance = scratch_data(args.questions, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-multimodal-"))
    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(data)}
    try:
        for name in wanted:
            done[name] = run_row(name, args.vlm, work, env, args.questions)
            print(json.dumps(done[name]), flush=True)
            write([done[n] for n in ROWS if n in done], report, chance, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
