"""Compression's cost on image questions: the LLaVA built by bench/make_vlm.py (SmolLM2-135M inside, a
vision tower trained on easy-vqa) compressed by each method, then scored on ce_mmmu (easy-vqa test
questions in MMMU's schema, lm-eval's MMMU prompt and answer parsing, chat format, greedy) overall and by
question kind, each row paired with the dense VLM on the same questions (bootstrap interval of the
difference, exact McNemar), and on WikiText-2 perplexity through its language model.

Rows: at 25 % of the language model's blocks ShortGPT, SLEB and fuse, each calibrated on text and on
image-text pairs through the whole VLM (``--calib-data easy-vqa``), and merge at the same share of the
parameters; fuse and ShortGPT healed (LoRA r16, 200 steps of 512-token windows of easy-vqa train
questions, ``--recover-data train``); at 12.5 % ShortGPT, SLEB (the first removals of its 25 % search:
SLEB is greedy) and fuse.

    python3 bench/make_vlm.py                                                   # once (cached)
    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/multimodal.py [--rows ...] [--per-kind 300]

Rows run one at a time and merge into bench/results/multimodal_llava_smollm2.{json,md} (``--rows``: the
ones to (re)run; default: those not there yet); each keeps its per-question correctness, so the paired
statistics are recomputed from the JSON alone. The questions are make_vlm's test sample (``--per-kind`` of
each kind, seeded), written in MMMU's layout in a scratch data directory beside the text corpora.

Answers are generated up to 32 tokens, not mmmu_val's 512: every answer here is one option letter, and a
damaged model that never ends its turn made lm-eval generate all 512 for every question (about 100 min
per row on 2 cores, against 2 for the dense VLM). Each row records the cap it was measured with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from compress_eval.data.easy_vqa import chance_accuracy, write_mmmu
from compress_eval.paths import cache_dir
from compress_eval.results.card import table
from compress_eval.results.paired import accuracy_stderr, paired_accuracy
from make_vlm import test_sample

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NAME = "multimodal_llava_smollm2"
TEXT = ["--calib-samples", "8", "--seqlen", "512", "--seed", "0"]
IMAGE_TEXT = [*TEXT, "--calib-data", "easy-vqa"]
HEAL = ["--recover", "lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.05", "--recover-steps",
        "200", "--recover-seqlen", "512", "--recover-lr", "2e-4", "--recover-schedule", "cosine",
        "--recover-data", "train"]
KINDS = ("colour", "shape", "yes/no")
SEARCH = "sleb 25 % (text)"


def sleb_prefix(rows: dict[str, dict]) -> list[str]:
    """SLEB at 12.5 % (4 of 30 blocks): the first removals of its 25 % search."""
    return ["--method", "drop", "--blocks", ",".join(map(str, rows[SEARCH]["removal_order"][:4]))]


ROWS = {
    "dense": ["--method", "none"],
    **{f"{method} 25 % ({calib})": ["--method", method, "--sparsity", "0.25", *options, *args]
       for method, options in (("shortgpt", []), ("sleb", []), ("fuse", ["--profile", "cpu"]))
       for calib, args in (("text", TEXT), ("image-text", IMAGE_TEXT))},
    "merge 25 % params (6 windows, text)": ["--method", "merge", "--param-sparsity", "0.25", "--num-windows", "6",
                                            *TEXT],
    **{f"{method} 25 % (image-text) + LoRA on image-text": ["--method", method, "--sparsity", "0.25", *options,
                                                           *IMAGE_TEXT, *HEAL]
       for method, options in (("shortgpt", []), ("fuse", ["--profile", "cpu"]))},
    "shortgpt 12.5 % (text)": ["--method", "shortgpt", "--sparsity", "0.125", *TEXT],
    "sleb 12.5 % (text; the first removals of the 25 % search)": sleb_prefix,
    "fuse 12.5 % (text)": ["--method", "fuse", "--sparsity", "0.125", "--profile", "cpu", *TEXT],
}
PPL_WINDOWS = 40
MAX_GEN_TOKS = 32


def cli(args: list[str], env: dict) -> str:
    result = subprocess.run([sys.executable, "-m", "compress_eval", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env)
    if result.returncode:
        sys.exit(f"failed: compress-eval {' '.join(args)}\n{result.stderr[-3000:]}")
    return result.stdout


def scratch_data(questions: list[dict]) -> Path:
    """The data directory of the runs: the text corpora of $COMPRESS_EVAL_DATA_DIR (linked, never copied)
    and ``questions`` in MMMU's layout (what `compress-eval data easy-vqa` writes)."""
    source = os.environ.get("COMPRESS_EVAL_DATA_DIR")
    if not source:
        sys.exit("set COMPRESS_EVAL_DATA_DIR to the data directory (../shared/data)")
    root = Path(tempfile.mkdtemp(prefix="bench-multimodal-data-"))
    for entry in Path(source).resolve().iterdir():
        if entry.name != "mmmu":
            (root / entry.name).symlink_to(entry)
    write_mmmu(questions, root / "mmmu")
    return root


def run_row(name: str, vlm: Path, work: Path, env: dict, questions: list[dict], done: dict) -> dict:
    args = ROWS[name](done) if callable(ROWS[name]) else ROWS[name]
    out = work / "checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cli(["compress", str(vlm), *args, "--out", str(out)], env)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "compress_eval.json").read_text())
    cli(["eval", str(out), "--tasks", "mmmu", "--batch-size", "8", "--gen-kwargs", f"max_gen_toks={MAX_GEN_TOKS}"],
        env)
    record = json.loads((out / "records.json").read_text())["lm_eval"]["ce_mmmu"]
    if record["doc_id"] != list(range(len(questions))):
        sys.exit(f"{name}: ce_mmmu scored {len(record['doc_id'])} documents, not the {len(questions)} written")
    ppl = float(cli(["ppl", str(out), "--dataset", "wikitext2", "--seqlen", "512", "--max-windows",
                     str(PPL_WINDOWS)], env).strip().splitlines()[-1])
    return {"row": name, "command": " ".join(["compress-eval compress <the VLM>", *args]),
            "correct": record["acc"], "questions": len(questions), "max_gen_toks": MAX_GEN_TOKS,
            "wikitext2": round(ppl, 2), "lm_blocks": manifest["blocks_after"],
            "params": manifest["params_after"], "weight_bytes": manifest["weight_bytes_after"],
            "compress_s": round(sum(manifest["timings_s"].get(k, 0) for k in ("compress", "recover")), 1),
            "wall_s": round(wall, 1), "peak_rss_mb": manifest["peak_rss_mb"],
            "removed_blocks": manifest["removed_blocks"],
            **({"removal_order": manifest["details"]["removal_order"]}
               if "removal_order" in manifest.get("details", {}) else {}),
            "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
            "date": datetime.date.today().isoformat()}


def size_of(name: str) -> str:
    return re.search(r"(\d+(?:\.\d+)?) %", name).group(1) if "%" in name else "0"


def verdicts(rows: list[dict]) -> list[str]:
    """At each size, the row that keeps the most of what the VLM sees, against the next best on the same
    questions: whether its lead is more than chance."""
    lines = []
    for size in sorted({size_of(r["row"]) for r in rows} - {"0"}, key=float):
        ranked = sorted((r for r in rows if size_of(r["row"]) == size), key=lambda r: -np.mean(r["correct"]))
        if len(ranked) < 2:
            continue
        best, second = ranked[:2]
        p = paired_accuracy(second["correct"], best["correct"])
        lines.append(f"- {size} %: **{best['row']}** keeps the most ({p.b:.3f}); against {second['row']} "
                     f"({p.a:.3f}) its lead is {p.delta:+.3f} [{p.low:+.3f}, {p.high:+.3f}], McNemar p = {p.p:.3g}: "
                     + ("more than chance." if p.significant else "not more than chance on these questions."))
    return lines


def write(rows: list[dict], report: dict | None, questions: list[dict], out: Path) -> None:
    kinds = np.array([q["subfield"] for q in questions])
    chance = {k: chance_accuracy([q for q in questions if q["subfield"] == k]) for k in KINDS}
    out.with_suffix(".json").write_text(json.dumps({"vlm": report, "chance": chance_accuracy(questions),
                                                    "chance_by_kind": chance, "rows": rows}, indent=1) + "\n")
    dense = next((r for r in rows if r["row"] == "dense"), None)

    def cells(r: dict) -> list:
        correct = np.asarray(r["correct"])
        acc = f"{correct.mean():.3f} ± {accuracy_stderr(correct):.3f}"
        by_kind = [f"{correct[kinds == k].mean():.3f}" for k in KINDS]
        if dense is None or r is dense:
            return [acc, "-", "-", *by_kind]
        p = paired_accuracy(dense["correct"], correct)
        marks = ["*" if paired_accuracy(np.asarray(dense["correct"])[kinds == k], correct[kinds == k]).significant
                 else "" for k in KINDS]
        return [acc, f"{p.delta:+.3f} [{p.low:+.3f}, {p.high:+.3f}]{'*' if p.significant else ''}", f"{p.p:.3g}",
                *(f"{v}{m}" for v, m in zip(by_kind, marks))]

    built = (f"The VLM (bench/make_vlm.py, seed {report['seed']}, built in {report['build_seconds']:.0f} s): test "
             f"accuracy {report['test']['accuracy']:.3f} on {report['test']['questions']} questions; its WikiText-2 "
             f"ppl {report['text_ppl']['vlm']:.2f} against SmolLM2's {report['text_ppl']['smollm2']:.2f}."
             if report else "")
    lines = ["# Compressing the language model of a LLaVA (SmolLM2-135M inside)", "",
             "`COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/multimodal.py` (ce_mmmu: easy-vqa test "
             f"questions, {len(questions)} ({', '.join(f'{(kinds == k).sum()} {k}' for k in KINDS)}), greedy, chat "
             f"format; WikiText-2: the first {PPL_WINDOWS} windows of 512). Chance: {chance_accuracy(questions):.3f} "
             f"overall, {', '.join(f'{k} {v:.3f}' for k, v in chance.items())}. Δ: the row minus dense on the same "
             "questions, 95 % paired bootstrap interval; * where the difference is more than chance (McNemar "
             "p < 0.05, also per kind).", "", built, "",
             table(["row", "ce_mmmu acc ± s.e.", "Δ vs dense [95 % CI]", "McNemar p", *KINDS, "WikiText-2 ppl",
                    "LM blocks", "params kept", "compress s", "peak RSS MB"],
                   [[r["row"], *cells(r), r["wikitext2"], r["lm_blocks"],
                     f"{r['params'] / dense['params']:.3f}" if dense else "-", r["compress_s"], r["peak_rss_mb"]]
                    for r in rows]),
             "", "## Which compression keeps vision best", "", *verdicts(rows)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vlm", type=Path, default=cache_dir() / "models" / "llava-smollm2-easyvqa")
    p.add_argument("--rows", nargs="*", help="rows to (re)run, of: " + ", ".join(ROWS).replace("%", "%%"))
    p.add_argument("--per-kind", type=int, default=300, help="test questions of each kind (make_vlm's sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / NAME, help="results, .json and .md")
    args = p.parse_args()
    if not (args.vlm / "config.json").is_file():
        sys.exit(f"{args.vlm} holds no VLM: run python3 bench/make_vlm.py first")
    path = args.out.with_suffix(".json")
    done = {r["row"]: r for r in json.loads(path.read_text())["rows"] if "correct" in r} if path.exists() else {}
    wanted = args.rows or [name for name in ROWS if name not in done]
    unknown = [name for name in wanted if name not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}: choose among {list(ROWS)}")
    if any(callable(ROWS[n]) for n in wanted) and SEARCH not in done and SEARCH not in wanted:
        wanted.insert(0, SEARCH)
    wanted.sort(key=list(ROWS).index)
    report_file = args.vlm / "make_vlm.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    questions = test_sample(args.seed, args.per_kind)
    data = scratch_data(questions)
    work = Path(tempfile.mkdtemp(prefix="bench-multimodal-"))
    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(data)}
    try:
        for name in wanted:
            done[name] = run_row(name, args.vlm, work, env, questions, done)
            print(json.dumps({k: v for k, v in done[name].items() if k != "correct"}), flush=True)
            write([done[n] for n in ROWS if n in done], report, questions, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
