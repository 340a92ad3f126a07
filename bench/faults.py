"""Faults at scale (SmolLM2-135M by default): kills of real runs, re-runs compared with uninterrupted
ones, and the bad-input table of tests/test_bad_inputs.py on the real model.

    COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/faults.py --kills 24 --seed 0

Kills: each round picks a kill point, a scenario that has it (ShortGPT compress, FuseGPT compress
with --resume, a batch of two cells, an eval) and a signal (SIGTERM or SIGKILL), starts the command
as its own process and kills it there: a quarter of the rounds inside the checkpoint save (weights
written, manifest not yet), a quarter right after a FuseGPT --resume state write (both through
tests/fault_point.py, which pauses the command at that point), the rest at a uniformly random moment
of the reference duration (which rarely falls in a save). Then it checks what the kill left (a
half-written output, a temp dir after SIGTERM) and re-runs the command (the same one; --resume
continues FuseGPT) to compare with the uninterrupted reference: same removed blocks, bitwise-equal
weights, equal perplexities. Bad inputs: every case of the test table through the CLI (in process),
with the real model where a case names one and its bad amounts written for the model's depth (so no
case does real work); each must be one ``error:`` line, exit 2, no traceback, nothing left.
Writes bench/results/faults.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))

SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
POINT = REPO / "tests" / "fault_point.py"
# kill point -> the scenarios that pass it ("random": a moment of the run, any scenario)
KILL_POINTS = {"save": ["compress-shortgpt", "compress-fuse-resume", "batch"],
               "loop-state": ["compress-fuse-resume"]}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "compress_eval", *map(str, args)]


def scenarios(model: str, work: Path) -> dict[str, dict]:
    """name -> {command(out) -> argv, output path, what to compare}."""
    calib = ["--calib-samples", "2", "--seqlen", "128"]
    grid = work / "grid.yaml"
    grid.write_text(json.dumps({"models": [model], "tasks": ["wikitext2"], "eval": {"seqlen": 128, "max_windows": 4},
                                "config": {"calib_samples": 2, "seqlen": 128},
                                "methods": ["none", {"method": "shortgpt", "num_blocks": [3]}]}))
    return {
        "compress-shortgpt": {"argv": lambda out: cli("compress", model, "--method", "shortgpt", "--num-blocks", 3,
                                                      *calib, "--out", out)},
        "compress-fuse-resume": {"argv": lambda out: cli("compress", model, "--method", "fuse", "--num-blocks", 2,
                                                         "--calib-samples", 2, "--seqlen", 64, "--epochs", 1,
                                                         "--set", "batch_size=1", "--set", "coef_rank=8",
                                                         "--set", "lora_rank=8", "--set",
                                                         f"resume={out.parent / (out.name + '.state')}",
                                                         "--out", out)},
        "batch": {"argv": lambda out: cli("batch", grid, "--runs", out)},
        "eval": {"argv": lambda out: cli("eval", out, "--tasks", "wiki,c4", "--seqlen", 128, "--max-windows", 6),
                 "needs_checkpoint": True},
    }


def weights_digest(directory: Path) -> dict:
    """sha256 of every tensor's bytes (bitwise comparison without keeping two models in memory)."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(tensors.items())}


def snapshot(out: Path) -> dict:
    """What a finished run made, in comparable form: per run directory its removed blocks, weights
    digest and perplexities (an eval leaves only perplexities)."""
    dirs = [out] if (out / "compress_eval.json").exists() else sorted(
        p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    result = {}
    for d in dirs:
        manifest = json.loads((d / "compress_eval.json").read_text())
        ppl = json.loads((d / "results_ppl.json").read_text()) if (d / "results_ppl.json").exists() else {}
        result[d.name if d != out else "."] = {
            "removed": manifest["removed_blocks"], "weights": weights_digest(d),
            "ppl": {k: v["ppl"] for k, v in sorted(ppl.items())}}
    return result


def run_to_end(argv: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"reference run failed: {' '.join(argv)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result


def leftovers(parent: Path) -> list[str]:
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*") if ".tmp-" in p.name)


def half_written(out: Path, runs_dir: bool) -> bool:
    """A checkpoint directory without its manifest; for a batch's runs directory, any run directory
    without one (the runs directory itself and its .locks exist from the start)."""
    if not out.exists():
        return False
    if not runs_dir:
        return not (out / "compress_eval.json").exists()
    return any(not (c / "compress_eval.json").exists() for c in out.iterdir()
               if c.is_dir() and not c.name.startswith("."))


def schedule(kills: int, names: list[str], durations: dict[str, float], rng: random.Random) -> list[tuple]:
    """(scenario, kill point, signal, delay) of each round: a quarter of them at each named point, so
    that saves and state writes are hit as often as the record needs, the rest at random moments."""
    named = [p for p in KILL_POINTS for _ in range(kills // 4)]
    points = named + ["random"] * (kills - len(named))
    rng.shuffle(points)
    rounds = []
    for i, point in enumerate(points):
        name = rng.choice(KILL_POINTS[point]) if point in KILL_POINTS else names[i % len(names)]
        delay = 0.0 if point in KILL_POINTS else rng.uniform(0.05, 1.0) * durations[name]
        rounds.append((name, point, rng.choice(list(SIGNALS)), delay))
    return rounds


def start_until(argv: list[str], point: str, delay: float, ready: Path, env: dict) -> subprocess.Popen:
    """The command started, and returned at its kill point: after ``delay`` for a random moment, else
    once tests/fault_point.py says it paused there (or the command ended without reaching it)."""
    if point in KILL_POINTS:
        argv = [sys.executable, str(POINT), point, str(ready), *argv[3:]]  # argv[:3]: python -m compress_eval
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if point not in KILL_POINTS:
        time.sleep(delay)
    while point in KILL_POINTS and not ready.exists() and proc.poll() is None:
        time.sleep(0.05)
    return proc


def kill_round(i: int, plan: tuple, spec: dict, work: Path, env: dict, reference: dict,
               base_checkpoint: Path) -> dict:
    name, point, sig, delay = plan
    parent = work / f"kill{i:02d}"
    parent.mkdir()
    out = parent / "out"
    if spec.get("needs_checkpoint"):
        shutil.copytree(base_checkpoint, out)
        for f in out.glob("results_*.json"):
            f.unlink()
    argv = spec["argv"](out)
    started = time.perf_counter()
    proc = start_until(argv, point, delay, work / f"ready{i:02d}", env)
    finished_first = proc.poll() is not None
    if not finished_first:
        proc.send_signal(SIGNALS[sig])
    _, err = proc.communicate()
    after_kill = leftovers(parent)
    row = {"round": i, "scenario": name, "point": point, "signal": sig,
           "delay_s": round(delay if point == "random" else time.perf_counter() - started, 2), "rc": proc.returncode,
           "finished_before_kill": finished_first, "traceback": "Traceback" in err,
           "half_written": False if spec.get("needs_checkpoint") else half_written(out, name == "batch"),
           "temp_dirs_after_kill": after_kill}
    # a run the signal came too late for is compared as it is; a killed one is run again to the end
    rerun = None if finished_first else subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    row["rerun_rc"] = None if rerun is None else rerun.returncode
    row["resumed"] = rerun is not None and "resuming" in rerun.stderr
    row["temp_dirs_after_rerun"] = leftovers(parent)
    row["identical"] = (rerun is None or rerun.returncode == 0) and snapshot(out) == reference[name]
    # a SIGTERM must clean up by itself; a SIGKILL's temp dir must be gone after the re-run
    row["leftover"] = bool((sig == "SIGTERM" and after_kill) or row["temp_dirs_after_rerun"] or row["half_written"])
    shutil.rmtree(parent, ignore_errors=True)
    return row


def bad_inputs(model_dir: Path, data_dir: Path, work: Path) -> list[dict]:
    """Every case of tests/test_bad_inputs.py on the real model, in process."""
    from test_bad_inputs import CASES, depth, run_case, scaled

    rows = []
    for case_id, setup, args, fragment in CASES:
        fragment = scaled(fragment, depth(model_dir))
        start = time.perf_counter()
        result, left = run_case(setup, args, model_dir, work / f"bad-{case_id}",
                                env={"COMPRESS_EVAL_DATA_DIR": str(data_dir)})
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        rows.append({"case": case_id, "exit": result.exit_code, "one_line": len(lines) == 1
                     and lines[0].startswith("error: ") and fragment in lines[0],
                     "traceback": "Traceback" in result.output, "left": [str(p) for p in left],
                     "message": lines[-1] if lines else "", "seconds": round(time.perf_counter() - start, 2)})
        shutil.rmtree(work / f"bad-{case_id}", ignore_errors=True)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"# Faults on {result['model']}", "",
        f"Command: `{result['command']}` (git {result['git_sha']}, {result['date']}, {result['seconds']:.0f} s).", "",
        f"- kills: {s['kills']} ({s['by_signal']}; at {s['by_point']}); finished before the kill: "
        f"{s['finished_before_kill']}",
        f"- re-runs identical to the uninterrupted run: {s['identical']} / {s['kills']} "
        f"(resumed from --resume state: {s['resumed']})",
        f"- leftovers found (temp dir after SIGTERM, half-written output, temp dir after the re-run): {s['leftovers']}",
        f"- tracebacks after a kill: {s['tracebacks']}",
        f"- bad inputs tried: {s['bad_inputs']}; one-line errors (exit 2, no traceback, nothing left): "
        f"{s['one_line_errors']}", "",
        "| round | scenario | point | signal | kill at (s) | rc | re-run identical | temp dirs after kill | leftover |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in result["kills"]:
        lines.append(f"| {r['round']} | {r['scenario']} | {r['point']} | {r['signal']} | {r['delay_s']} | {r['rc']} | "
                     f"{'yes' if r['identical'] else 'NO'} | {len(r['temp_dirs_after_kill'])} | "
                     f"{'YES' if r['leftover'] else 'no'} |")
    failures = [b for b in result["bad_inputs"] if not (b["one_line"] and b["exit"] == 2 and not b["traceback"]
                                                        and not b["left"])]
    lines += ["", f"Bad inputs that were not one clean line: {len(failures)}"]
    lines += [f"- {b['case']}: exit {b['exit']}, {b['message']}" for b in failures]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=24, help="random kill rounds (>= 20 for the record)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip-bad-inputs", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "faults")
    args = parser.parse_args()

    from compress_eval.models.checkpoint import git_sha
    from compress_eval.models.registry import local_path_or_id, resolve
    from compress_eval.paths import data_dir as resolve_data_dir

    data_dir = resolve_data_dir(None)
    if data_dir is None:
        raise SystemExit("set COMPRESS_EVAL_DATA_DIR (e.g. ../shared/data)")
    started = time.perf_counter()
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="compress-eval-faults-") as tmp:
        work = Path(tmp)
        specs = scenarios(args.model, work)
        reference, durations = {}, {}
        base = work / "reference-checkpoint"
        for name, spec in specs.items():
            out = base if spec.get("needs_checkpoint") else work / f"reference-{name}"
            if spec.get("needs_checkpoint"):
                subprocess.run(specs["compress-shortgpt"]["argv"](base), env=env, check=True, capture_output=True,
                               cwd=REPO)
            durations[name], _ = run_to_end(spec["argv"](out), env)
            reference[name] = snapshot(out)
            print(json.dumps({"reference": name, "seconds": round(durations[name], 1)}), flush=True)
        kills = []
        for i, plan in enumerate(schedule(args.kills, list(specs), durations, rng)):
            kills.append(kill_round(i, plan, specs[plan[0]], work, env, reference, base))
            print(json.dumps(kills[-1]), flush=True)
        bad = [] if args.skip_bad_inputs else bad_inputs(Path(local_path_or_id(resolve(args.model))), data_dir, work)
    clean = [b for b in bad if b["one_line"] and b["exit"] == 2 and not b["traceback"] and not b["left"]]
    result = {
        "command": "COMPRESS_EVAL_DATA_DIR=../shared/data python3 bench/faults.py " + " ".join(sys.argv[1:]),
        "model": args.model, "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
        "reference_seconds": {k: round(v, 1) for k, v in durations.items()},
        "summary": {"kills": len(kills),
                    "by_signal": {s: sum(k["signal"] == s for k in kills) for s in SIGNALS},
                    "finished_before_kill": sum(k["finished_before_kill"] for k in kills),
                    "by_point": {p: sum(k["point"] == p for k in kills) for p in [*KILL_POINTS, "random"]},
                    "identical": sum(k["identical"] for k in kills), "resumed": sum(k["resumed"] for k in kills),
                    "leftovers": sum(k["leftover"] for k in kills),
                    "tracebacks": sum(k["traceback"] for k in kills),
                    "bad_inputs": len(bad), "one_line_errors": len(clean)},
        "kills": kills, "bad_inputs": bad}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    summary = result["summary"]
    ok = (summary["identical"] == summary["kills"] and not summary["leftovers"] and not summary["tracebacks"]
          and summary["one_line_errors"] == summary["bad_inputs"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
