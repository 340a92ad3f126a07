"""Quality at each size, on SmolLM2-135M or Qwen2.5-Coder-0.5B: each method with and without recovery, on
the issue's protocol (the first 40 x 512 WikiText-2 test windows and 10 x 512 C4 ones).

Rows run one at a time (`--rows NAME ...`, default every row not yet in the results) and are merged
into bench/results/quality_<model>.json, so a long table is built over several runs; each row keeps
its command, params kept, weight bytes, compress seconds (method and recovery) and peak RSS.

Rows of both models:
- curves without recovery at 12.5, 25 and 37.5 % of the blocks: ShortGPT, SLEB (one search at 37.5 %;
  the smaller sizes drop its first removals, SLEB being greedy), drop-window, fuse, and the best recipe
  (fuse, then 200 steps of LoRA distillation of the dense logits on the calibration windows);
- healing on general text, one budget for every method: LoRA r32 (alpha 64, dropout 0.05) on every
  linear but the head, 1000 steps of one 512-token sequence of C4 and WikiText-2 train alternating
  (C4's documents after the 1100 that perplexity reads, WikiText-2's train split; each sequence seen
  once, disjoint from every evaluation document), lr 1e-3, 1 % warm-up then cosine, (CE + KL to the
  dense logits) / 2. A heal saves its progress every 50 steps in --work and continues there when
  the bench is run again.
SmolLM2 also keeps its earlier rows: healing on WikiText-2 train alone at 200 steps (lr 2e-4, or 1e-3
in the rows named '(lr 1e-3)', ce+kd in those named ', ce+kd') and the ablations of fuse and merge.

    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/quality.py [--model M] [--rows ...] [--list] [--work DIR]

The checkpoints that other rows start from are kept in --work (our cache by default) between runs.

Writes bench/results/quality_<model>.{json,md} and quality_<model>_curves.png.
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
import time
from pathlib import Path

from compress_eval.paths import cache_dir
from compress_eval.results.card import table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# model -> the stem of its result files (SmolLM2's keeps its earlier name)
MODELS = {"smollm2-135m": "smollm2", "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b"}
CALIB = ["--calib-samples", "8", "--seqlen", "512", "--seed", "0"]
LORA16 = ["--recover", "lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.05"]
HEAL = [*LORA16, "--recover-steps", "200", "--recover-seqlen", "512", "--recover-lr", "2e-4", "--recover-schedule",
        "cosine", "--recover-data", "train"]
# A second, stronger budget (lr 1e-3, all else the same), its rows named with this suffix and measured
# against ShortGPT healed on it.
STRONG = " (lr 1e-3)"
HEAL_STRONG = [*HEAL[:HEAL.index("--recover-lr") + 1], "1e-3", *HEAL[HEAL.index("--recover-lr") + 2:]]
# Healing by the mixed loss, its rows named with this and measured against ShortGPT healed by it too.
MIXED = ", ce+kd"
MIX = ["--recover-loss", "ce+kd", "--recover-kd-weight", "0.5"]
# Healing on general text, the one budget of every method (see the docstring).
GENERAL = " + heal (C4+WikiText-2, 1000 steps)"
HEAL_GENERAL = ["--recover", "lora", "--lora-r", "32", "--lora-alpha", "64", "--lora-dropout", "0.05",
                "--recover-steps", "1000", "--recover-seqlen", "512", "--recover-lr", "1e-3", "--recover-schedule",
                "cosine", "--recover-data", "c4+wikitext2", *MIX]
FUSE = ["--method", "fuse", "--profile", "cpu", *CALIB]
SIZES = ("12.5", "25", "37.5")  # % of the blocks
SLEB_SEARCH = "sleb 37.5 % (search)"
BASELINES = ("shortgpt", "sleb", "drop-window")
BEST = "fuse {p} % + KD on the calibration (200 steps)"


def fraction(percent: str) -> str:
    return str(float(percent) / 100)


def kd_on_calibration(base: str, steps: str, lr: str, seqlen: str) -> list[str]:
    """Distillation of the dense logits on the calibration windows alone (no training text): part of the
    compression, so in the no-recovery track."""
    return [f"@{base}", "--method", "none", *LORA16, "--recover-steps", steps, "--recover-seqlen", seqlen,
            "--recover-lr", lr, "--recover-schedule", "cosine", "--recover-data", "calibration", "--recover-loss",
            "kd", "--calib-samples", str(4096 // int(seqlen)), "--seqlen", seqlen, "--seed", "0"]


def sleb_prefix(percent: str):
    """A SLEB row at ``percent`` %: the first removals of the 37.5 % search (resolved when the row runs)."""
    def args(bench: Bench) -> list[str]:
        k = -(-round(bench.depth() * float(percent) / 100, 6) // 1)  # ceil, as blocks_to_remove rounds
        order = bench.finished()[SLEB_SEARCH]["removal_order"]
        return ["--method", "drop", "--blocks", ",".join(map(str, order[:int(k)]))]
    return args


def staged(name: str, stages: list[dict]):
    """A multi-stage recipe row: its recipe written into the work directory when the row runs."""
    def args(bench: Bench) -> list[str]:
        recipe = bench.work / f"{slug(name)}.yaml"
        recipe.write_text(json.dumps({"calib_samples": 8, "seqlen": 512, "seed": 0, "stages": stages}))
        return ["--recipe", str(recipe)]
    return args


def curve_rows(sleb: dict[str, str]) -> dict:
    """name -> (compress arguments, track): the curves without recovery, and the rows healed on general text.
    ``sleb``: the SLEB row of each size (the search's, or a model's own earlier one)."""
    rows = {"dense": (["--method", "none"], "none")}
    for p in SIZES:
        rows[f"shortgpt {p} %"] = (["--method", "shortgpt", "--sparsity", fraction(p), *CALIB], "no recovery")
        rows[f"drop-window {p} %"] = (["--method", "drop-window", "--sparsity", fraction(p), *CALIB], "no recovery")
        if p != "37.5":
            rows[f"sleb {p} % (first removals of the 37.5 % search)"] = (sleb_prefix(p), "no recovery")
        else:
            rows[SLEB_SEARCH] = (["--method", "sleb", "--sparsity", fraction(p), *CALIB], "no recovery")
        rows[f"fuse {p} %"] = ([*FUSE, "--sparsity", fraction(p)], "no recovery")
        rows[BEST.format(p=p)] = (kd_on_calibration(f"fuse {p} %", "200", "2e-4", "512"), "no recovery")
    for base in ("shortgpt 25 %", sleb["25"], "drop-window 25 %", BEST.format(p="25")):
        rows[base + GENERAL] = ([f"@{base}", "--method", "none", *HEAL_GENERAL], "recovery")
    return rows


def sleb_blocks(percent: str) -> str:
    """The blocks SLEB chose on SmolLM2 at ``percent`` % with this calibration in bench/baselines.py (23-33
    min each): its rows drop them rather than search again."""
    rows = json.loads((RESULTS / "baselines_smollm2.json").read_text())
    chosen = next(r["removed_blocks"] for r in rows if r["method"] == "sleb" and r["sparsity"] == int(percent) / 100)
    return ",".join(map(str, chosen))


def smollm2_rows() -> dict:
    """SmolLM2's earlier rows (names and commands unchanged: their results are kept), then the curves."""
    sleb25 = "sleb 25 % (its blocks from bench/baselines.py)"
    return {
        "dense": (["--method", "none"], "none"),
        **{f"shortgpt {p} %": (["--method", "shortgpt", "--sparsity", f"0.{p}", *CALIB], "no recovery")
           for p in ("20", "25", "30")},
        **{f"sleb {p} % (its blocks from bench/baselines.py)": (["--method", "drop", "--blocks", sleb_blocks(p)],
                                                              "no recovery") for p in ("20", "25", "30")},
        "sublayer 25 % params (4 x 512 calibration)": (
            ["--method", "sublayer", "--param-sparsity", "0.25", "--calib-samples", "4", "--seqlen", "512", "--seed",
             "0"], "no recovery"),
        **{f"fuse {p} %": ([*FUSE, "--sparsity", f"0.{p}"], "no recovery") for p in ("20", "25", "30")},
        "fuse 25 % --align-ff": ([*FUSE, "--sparsity", "0.25", "--align-ff"], "no recovery"),
        "fuse 25 % (groups of 4)": ([*FUSE, "--sparsity", "0.25", "--group-size", "4"], "no recovery"),
        # fuse's control at that group size: the same trainable low-rank term, nothing injected.
        "mi-lowrank 25 % (groups of 4)": (["--method", "mi-lowrank", "--profile", "cpu", *CALIB, "--sparsity",
                                           "0.25", "--group-size", "4"], "no recovery"),
        "fuse 25 % (kd-logits group fine-tune)": ([*FUSE, "--sparsity", "0.25", "--loss", "kd-logits"],
                                                  "no recovery"),
        # FF merging at the same size (ceil(0.25 x 30 blocks' parameters / one FF's) = 11 FFs tied): one window
        # (the paper), several small ones, and the drop-window baseline the paper compares it with.
        "merge 25 % params (one window)": (["--method", "merge", "--param-sparsity", "0.25", *CALIB], "no recovery"),
        "merge 25 % params (6 windows of 2-3 layers)": (
            ["--method", "merge", "--param-sparsity", "0.25", "--num-windows", "6", *CALIB], "no recovery"),
        "drop-window 25 %": (["--method", "drop-window", "--sparsity", "0.25", *CALIB], "no recovery"),
        # The last KD row spends the same calibration tokens and training token-steps on 4x as many, shorter
        # windows.
        **{f"fuse 25 % + KD on the calibration{label}": (kd_on_calibration("fuse 25 %", steps, lr, seqlen),
                                                         "no recovery") for label, steps, lr, seqlen in (
            ("", "64", "2e-4", "512"), (" (200 steps)", "200", "2e-4", "512"),
            (" (200 steps, lr 1e-3)", "200", "1e-3", "512"), (" (32 x 128 windows, 800 steps)", "800", "2e-4", "128"))},
        "shortgpt 25 % + LoRA": (["@shortgpt 25 %", "--method", "none", *HEAL], "recovery"),
        "sleb 25 % + LoRA": ([f"@{sleb25}", "--method", "none", *HEAL], "recovery"),
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
        f"shortgpt 25 % + LoRA{MIXED}{STRONG}": (["@shortgpt 25 %", "--method", "none", *HEAL_STRONG, *MIX],
                                                 "recovery"),
        f"fuse 25 % + KD on the calibration (200 steps) + LoRA{MIXED}{STRONG}": (
            ["@fuse 25 % + KD on the calibration (200 steps)", "--method", "none", *HEAL_STRONG, *MIX], "recovery"),
        # Rows never measured before: fuse then merge at the matched total size (4 blocks fused away, then
        # as many FFs tied as make 25 % of the decoder's parameters in all: 3.5 of 26 blocks' worth), the
        # KD pass after kd-logits group fine-tunes, and sublayer at the calibration of the other rows.
        "fuse then merge, 25 % params in all (4 blocks fused, then FFs tied)": (staged("fuse then merge", [
            {"method": "fuse", "sparsity": 0.125, "options": {"profile": "cpu"}},
            {"method": "merge", "param_sparsity": round(3.5 / 26, 4), "options": {"num_windows": 3}}]),
            "no recovery"),
        "fuse 25 % (kd-logits group fine-tune) + KD on the calibration (200 steps)": (
            kd_on_calibration("fuse 25 % (kd-logits group fine-tune)", "200", "2e-4", "512"), "no recovery"),
        "sublayer 25 % params (8 x 512 calibration)": (
            ["--method", "sublayer", "--param-sparsity", "0.25", *CALIB], "no recovery"),
        **curve_rows({"25": sleb25}),
    }


def model_rows(model: str) -> dict:
    if model == "smollm2-135m":
        return smollm2_rows()
    return curve_rows({"25": "sleb 25 % (first removals of the 37.5 % search)"})


EVAL = {"wikitext2": 40, "c4": 10}


def cli(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "compress_eval", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"failed: compress-eval {' '.join(args)}\n{result.stderr[-3000:]}")
    return result.stdout


def torch_threads() -> int:
    """The threads each command's torch uses (its OMP_NUM_THREADS, else one per core)."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Bench:
    """One model's rows, results file and working directory."""

    def __init__(self, model: str, work: Path):
        self.model, self.work = model, work / slug(model)
        self.rows = model_rows(model)
        self.path = RESULTS / f"quality_{MODELS[model]}.json"

    def base_of(self, name: str) -> str | None:
        args = self.rows[name][0]
        return args[0][1:] if isinstance(args, list) and args[0].startswith("@") else None

    def finished(self) -> dict[str, dict]:  # read again before each write: another run may have added rows
        return {r["row"]: r for r in json.loads(self.path.read_text())} if self.path.exists() else {}

    def depth(self) -> int:
        from compress_eval.architecture import architecture, load_config

        return architecture(load_config(self.model)).num_blocks

    def run_row(self, name: str) -> dict:
        """Compress (or heal) one row into the work directory, evaluate it, and keep its checkpoint only when
        another row starts from it. A heal saves its progress beside it and continues from there."""
        args, track = self.rows[name]
        if callable(args):
            args = args(self)
        base = self.base_of(name)
        model, args = (str(self.work / slug(base)), args[1:]) if base else (self.model, args)
        out = self.work / slug(name)
        state = self.work / f"{slug(name)}.state"
        resume = ["--recover-resume", str(state), "--recover-save-every", "50"] if "--recover" in args else []
        shutil.rmtree(out, ignore_errors=True)
        load = round(os.getloadavg()[0], 2)
        start = time.perf_counter()
        cli(["compress", model, *args, *resume, "--out", str(out)])
        seconds = time.perf_counter() - start
        shutil.rmtree(state, ignore_errors=True)
        manifest = json.loads((out / "compress_eval.json").read_text())
        recovery = manifest.get("recovery")
        row = {"row": name, "track": track,
               "command": " ".join(["compress-eval compress", f"<the '{base}' checkpoint>" if base else self.model,
                                    *args]),
               "params": manifest["params_after"], "weight_bytes": manifest["weight_bytes_after"],
               "compress_s": round(sum(manifest["timings_s"].get(k, 0) for k in ("compress", "recover")), 1),
               "wall_s": round(seconds, 1), "peak_rss_mb": manifest["peak_rss_mb"],
               "removed_blocks": manifest["removed_blocks"], "skipped": manifest.get("skipped", []),
               **({"removal_order": manifest["details"]["removal_order"]}
                  if "removal_order" in manifest.get("details", {}) else {}),
               "recovery": {k: recovery[k] for k in ("loss_first", "loss_last", "seconds", "resumed_at_step")
                            if k in recovery} if recovery else None,
               "date": datetime.date.today().isoformat(),
               # what the seconds were measured beside: the row's threads and the machine's load when it began
               "threads": torch_threads(), "load_at_start": load}
        for dataset, windows in EVAL.items():
            stdout = cli(["ppl", str(out), "--dataset", dataset, "--seqlen", "512", "--max-windows", str(windows)])
            row[dataset] = round(float(stdout.strip().splitlines()[-1]), 2)
        if not any(self.base_of(other) == name for other in self.rows):
            shutil.rmtree(out)
        return row

    def write(self, rows: list[dict]) -> None:
        RESULTS.mkdir(exist_ok=True)
        self.path.write_text(json.dumps(rows, indent=1))
        by_name = {r["row"]: r for r in rows}
        dense = by_name.get("dense")

        def ratio(row, ref):
            return f"{row['wikitext2'] / ref['wikitext2']:.3f} / {row['c4'] / ref['c4']:.3f}" if ref else "-"

        stem = MODELS[self.model]
        lines = [f"# Quality at each size, {self.model} (2 CPU cores)", "",
                 f"`COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/quality.py --model {self.model}` (rows merged "
                 f"across runs). Recovery in the rows named '{GENERAL}': LoRA r32 on every linear, 1000 x 512 tokens "
                 "of C4 and WikiText-2 train alternating, lr 1e-3 cosine, (CE + KL to the dense logits) / 2; in the "
                 "other recovery rows LoRA r16, 200 x 512 tokens of WikiText-2 train, lr 2e-4 cosine (or lr 1e-3 in "
                 f"the rows named '{STRONG}'; by (CE + KL) / 2 in those named '{MIXED}'). x ref: WikiText-2 / C4 ppl "
                 "over the best of SLEB, ShortGPT and drop-window at the same size, each corpus on its own (no "
                 "recovery), or over ShortGPT 25 % healed on the same budget and loss (recovery). A row made from "
                 "another row's checkpoint (healed, or distilled on the calibration) counts its own stage in compress "
                 "s: add its base row's.", "",
                 table(["row", "track", "WikiText-2 (40 x 512)", "C4 (10 x 512)", "x dense", "x ref", "params",
                        "params kept", "weight bytes", "compress s", "peak RSS MB"],
                       [[r["row"], r["track"], r["wikitext2"], r["c4"], ratio(r, dense), ratio(r, reference(r, by_name)),
                         f"{r['params']:,}", f"{r['params'] / dense['params']:.3f}" if dense else "-",
                         f"{r['weight_bytes']:,}", r["compress_s"], r["peak_rss_mb"]] for r in rows]),
                 "", "## Curves without recovery (WikiText-2 / C4)", "",
                 table(["method", *(f"{p} % of the blocks" for p in SIZES)],
                       [[method, *(f"{c['wikitext2']} / {c['c4']}" if (c := curve_point(by_name, method, p)) else "-"
                                   for p in SIZES)] for method in CURVES]),
                 "", f"![size against perplexity](quality_{stem}_curves.png)"]
        (RESULTS / f"quality_{stem}.md").write_text("\n".join(lines) + "\n")
        curves_png(by_name, dense, RESULTS / f"quality_{stem}_curves.png", self.model)
        print("\n".join(lines))


CURVES = {"shortgpt": "shortgpt {p} %", "sleb": "sleb {p} %", "drop-window": "drop-window {p} %",
          "fuse": "fuse {p} %", "fuse + KD on the calibration": BEST}


def curve_point(rows: dict[str, dict], method: str, percent: str) -> dict | None:
    """The row of ``method`` at ``percent`` % (SLEB: the search's own, or a row of its removals)."""
    prefix = CURVES[method].format(p=percent)
    found = [r for name, r in rows.items() if (name == prefix or method == "sleb" and name.startswith(prefix + " ("))
             and r["track"] == "no recovery"]
    return found[0] if found else None


def reference(row: dict, rows: dict[str, dict]) -> dict | None:
    """What a row is measured against: the best baseline at its size per corpus (no recovery), ShortGPT 25 %
    healed on the same budget and loss (recovery)."""
    if row["track"] == "recovery":
        if row["row"].endswith(GENERAL):
            return rows.get("shortgpt 25 %" + GENERAL)
        return rows.get("shortgpt 25 % + LoRA" + (MIXED if MIXED in row["row"] else "")
                        + (STRONG if row["row"].endswith(STRONG) else ""))
    size = re.search(r"(\d+(?:\.\d+)?) %", row["row"])
    if not size:
        return None
    found = [r for method in BASELINES for name, r in rows.items()
             if r["track"] == "no recovery" and (name == f"{method} {size.group(1)} %"
                                                  or name.startswith(f"{method} {size.group(1)} % ("))]
    return {"wikitext2": min(r["wikitext2"] for r in found), "c4": min(r["c4"] for r in found)} if found else None


def curves_png(rows: dict[str, dict], dense: dict | None, path: Path, model: str) -> None:
    """Perplexity against the share of blocks removed, one line per method, each corpus a panel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    for ax, corpus in zip(fig.subplots(1, 2), ("wikitext2", "c4")):
        for method in CURVES:
            points = [(float(p), c[corpus]) for p in SIZES if (c := curve_point(rows, method, p))]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if dense:
            ax.axhline(dense[corpus], color="grey", linestyle=":", label="dense")
        ax.set(xlabel="% of the blocks removed", ylabel=f"{corpus} perplexity", yscale="log",
               title=f"{model}: {corpus}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    p.add_argument("--rows", nargs="*", help="rows to (re)run; default: those not in the results yet")
    p.add_argument("--list", action="store_true")
    p.add_argument("--work", type=Path, default=cache_dir() / "quality-bench",
                   help="where the checkpoints other rows start from (and the heals' progress) are kept between runs")
    args = p.parse_args()
    bench = Bench(args.model, args.work)
    if args.list:
        print("\n".join(bench.rows))
        return
    done = bench.finished()
    wanted = args.rows or [name for name in bench.rows if name not in done]
    unknown = [name for name in wanted if name not in bench.rows]
    if unknown:
        sys.exit(f"unknown rows {unknown}: see --list")
    # A row needs its base row's checkpoint (kept from an earlier run, else made in this one), a SLEB size the
    # search's results.
    bench.work.mkdir(parents=True, exist_ok=True)
    needed = []

    def need(name: str, *, rerun: bool = True, checkpoint: bool = False) -> None:
        """``name`` and, first, what it needs where not kept: a base row's checkpoint, the SLEB search's results."""
        kept = (bench.work / slug(name) / "compress_eval.json").is_file() if checkpoint else name in bench.finished()
        if name in needed or not rerun and kept:
            return
        if base := bench.base_of(name):
            need(base, rerun=False, checkpoint=True)
        elif name != SLEB_SEARCH and name.startswith("sleb "):
            need(SLEB_SEARCH, rerun=False)
        needed.append(name)

    for name in wanted:
        need(name)
    for name in needed:
        row = bench.run_row(name)
        print(json.dumps(row), flush=True)
        done = {**bench.finished(), name: row}
        bench.write([done[n] for n in bench.rows if n in done])


if __name__ == "__main__":
    main()
