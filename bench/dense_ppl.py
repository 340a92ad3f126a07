"""Dense perplexity in the papers' protocol, with throughput, and the reload check of a pruned model.

    flock /tmp/compress-eval-locks/heavy.lock python3 bench/dense_ppl.py --model smollm2-135m \
        --runs wikitext2:512 c4:512 wikitext2:2048:30

Each run is DATASET:SEQLEN[:MAX_WINDOWS]; results go to bench/results/dense_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from compress_eval.data.calibration import eval_windows
from compress_eval.models.adapters import get_adapter
from compress_eval.manifest import Manifest
from compress_eval.models.loading import load_checkpoint
from compress_eval.models.loading import load_model
from compress_eval.scoring.ppl import perplexity


def reload_delta(model, tokenizer, windows: torch.Tensor, remove: list[int]) -> float:
    """max |logit difference| between an in-memory pruned model and its saved-and-reloaded copy."""
    get_adapter(model).remove_blocks(remove)
    with torch.no_grad():
        before = model(windows).logits
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        counts = dict(blocks_before=1, params_before=1, params_after=1, weight_bytes_before=1, weight_bytes_after=1)
        reloaded, _ = load_checkpoint(tmp, Manifest(base_model={"name": "in-memory"}, method="drop", **counts),
                                      dtype=model.dtype)
        with torch.no_grad():
            after = reloaded.eval()(windows).logits
    return (before - after).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", nargs="+", default=["wikitext2:512", "c4:512"])
    parser.add_argument("--remove", default="10,20", help="blocks removed for the reload check")
    args = parser.parse_args()
    model, tokenizer, _ = load_model(args.model)
    rows = []
    for run in args.runs:
        dataset, seqlen, *limit = run.split(":")
        windows = eval_windows(tokenizer, dataset, int(seqlen), max_windows=int(limit[0]) if limit else None)
        r = perplexity(model, windows, progress=True)
        rows.append({"dataset": dataset, "seqlen": int(seqlen), "windows": r.windows, "ppl": round(r.ppl, 4),
                     "seconds": round(r.seconds, 1), "tokens_per_s": round(r.tokens_per_second, 1),
                     "partial": bool(limit)})
        print(json.dumps(rows[-1]), flush=True)
    ids = eval_windows(tokenizer, "wikitext2", 512, max_windows=2)
    delta = reload_delta(model, tokenizer, ids, [int(x) for x in args.remove.split(",")])
    out = {"model": args.model, "device": str(next(model.parameters()).device), "ppl": rows,
           "reload_max_abs_logit_delta": delta, "reload_removed_blocks": args.remove}
    print(json.dumps(out, indent=2))
    path = Path(__file__).parent / "results" / f"dense_{Path(args.model).name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
