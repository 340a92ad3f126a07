"""Checkpoint fingerprints: every registered method on the tiny model of every family (tests/conftest.py),
plus a staged recipe, a recovery and a quantization, each saved and hashed, so that a refactor can show
that it changes no checkpoint bit.

    PYTHONPATH=. python3 bench/checkpoint_hashes.py --out before.json
    PYTHONPATH=. python3 bench/checkpoint_hashes.py --out after.json --compare before.json

bench/results/checkpoint_hashes.json holds the fingerprints of commit b47d5be (before issue 34's refactor),
made with this machine's torch and transformers: other versions may change the bits.

Each run is keyed ``family/method``; its value is the sha256 of every saved safetensors file and of the
manifest without what changes from run to run (timings, dates, memory, versions, paths), or the one-line
error a run gave. Too slow for CI (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import FAMILIES, VLM_FAMILIES, saved_model_dir, tiny_model, write_data_dir  # noqa: E402

CALIB = dict(calib_samples=2, seqlen=16, seed=0)
# What a method needs beyond its default amount to run on a 4-block model.
AMOUNTS = {"drop": dict(blocks=[1])}
EXTRA = {  # runs beyond one per method, on the text families
    "stages": dict(stages=[{"method": "shortgpt", "num_blocks": 1}, {"method": "merge", "options": {"window": "1-2"}},
                           {"recover": "lora", "recover_steps": 2}]),
    "recover": dict(method="drop", blocks=[2], recovery={"recover": "full", "recover_steps": 2}),
    "quantize": dict(method="drop", blocks=[2], quantize="int8"),
}
VOLATILE = {"created", "timings_s", "peak_rss_mb", "versions", "git_sha", "data_dir", "seconds"}


def stable(value):
    """The manifest without what differs between two runs of the same compression."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def fingerprint(out: Path, work: Path) -> dict[str, str]:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}
    manifest = json.loads((out / "compress_eval.json").read_text())
    text = json.dumps(stable(manifest), sort_keys=True).replace(str(work), "WORK")
    files["manifest"] = hashlib.sha256(text.encode()).hexdigest()
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--compare", type=Path, help="an earlier --out: report every difference")
    parser.add_argument("--families", nargs="*", default=FAMILIES)
    args = parser.parse_args()

    import torch

    from compress_eval.config import make_config
    from compress_eval.errors import UserError
    from compress_eval.methods.registry import available_methods
    from compress_eval.pipeline import compress_to_dir

    torch.set_num_threads(1)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ckpt-hashes-") as tmp:
        work = Path(tmp)
        data = write_data_dir(work / "data")
        for family in args.families:
            model_dir = saved_model_dir(work / family, tiny_model(family))
            runs = {name: {"method": name, **AMOUNTS.get(name, {})} for name in available_methods()}
            if family not in VLM_FAMILIES:
                runs.update(EXTRA)
            for name, values in runs.items():
                key, out = f"{family}/{name}", work / "out" / family / name
                try:
                    compress_to_dir(make_config(model=str(model_dir), **CALIB, **values), out, data)
                    results[key] = fingerprint(out, work)
                except (UserError, ImportError) as exc:
                    results[key] = f"error: {exc}"
                print(key, "ok" if isinstance(results[key], dict) else results[key], flush=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = sorted(k for k in before.keys() | results.keys() if before.get(k) != results.get(k))
        print(f"{len(results)} runs, {len(differ)} differ from {args.compare}: {', '.join(differ) or 'none'}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
