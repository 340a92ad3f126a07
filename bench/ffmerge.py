"""FF-sublayer merging on SmolLM2-135M: permute vs vanilla vs dropping whole blocks at matched
parameter reduction, each before and after the same short recovery fine-tune.

Budget run (CPU, what bench/results/ffmerge_smollm2.* holds):
    flock /tmp/compress-eval-locks/heavy.lock python3 bench/ffmerge.py

Full grid (the paper's scale: ~10k feature tokens, every window scored on 8 x 512 calibration
tokens, evaluation on 2048-token windows, a longer recovery; needs a GPU):
    python3 bench/ffmerge.py --feature-tokens 10240 --calib-samples 200 --seqlen 512 \
        --score-samples 8 --window-stride 1 --eval-seqlen 2048 --eval-windows 0 --recover-steps 200 --recover-batch-size 4 --recover-dense

Rows: dense; merge (permute) and merge (vanilla) with a sliding-window search over every start;
drop-window (the paper's layer-pruning baseline: every window of n consecutive blocks scored on
the same calibration windows, the best one dropped) with n the block count whose removal is
closest in parameters to the merge (ties: fewer blocks). Then the same recovery fine-tune for all.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from compress_eval.config import make_config
from compress_eval.data.calibration import calibration_windows, eval_windows
from compress_eval.methods.recovery import RecoveryOptions, fine_tune
from compress_eval.models import checkpoint
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model
from compress_eval.pipeline import compress, save
from compress_eval.scoring.ppl import perplexity, window_nll
from compress_eval.scoring.prefix import PrefixStates

RESULTS = Path(__file__).parent / "results"


def checkpoint_bytes(model, tokenizer, result=None) -> int:
    """Bytes of the safetensors files the pipeline writes for this model (``result``: as compressed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        if result is not None:
            save(result, out)
        else:
            out.mkdir()
            checkpoint.save_model_files(model, tokenizer, out)
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))


@torch.no_grad()
def best_drop_window(adapter, windows: torch.Tensor, n: int, stride: int) -> tuple[int, list[dict]]:
    """Sliding window over the first block dropped: calibration ppl without blocks s..s+n-1."""
    prefix = PrefixStates(adapter, windows, batch_size=1, store="cpu")
    scores = []
    for s in range(0, adapter.num_blocks - n + 1, stride):
        nll, tokens = 0.0, 0
        for b, ids in enumerate(prefix.input_ids):
            hidden = prefix.runner.run(prefix.entering(s, b), start=s + n)
            nll += window_nll(prefix.runner.logits(hidden), ids).sum().item()
            tokens += ids.numel() - ids.size(0)
        scores.append({"window": [s, s + n - 1], "calib_ppl": round(math.exp(nll / tokens), 4)})
    best = min(scores, key=lambda c: c["calib_ppl"])
    return best["window"][0], scores


def matched_blocks(adapter, ff_removed: int) -> int:
    """Blocks whose removal is closest in parameter count to ``ff_removed`` FF sublayers (ties: fewer)."""
    block = sum(p.numel() for p in adapter.blocks[0].parameters())
    ff = sum(p.numel() for p in adapter.mlp(adapter.blocks[0]).parameters())
    target = ff_removed * ff
    return min(range(1, adapter.num_blocks), key=lambda n: (abs(n * block - target), n))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's messages, on stderr
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--fractions", type=float, nargs="+", default=[1 / 3, 1 / 2])
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows (recovery uses all)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--feature-tokens", type=int, default=2048)
    p.add_argument("--score-samples", type=int, default=2, help="calibration windows scoring each candidate")
    p.add_argument("--window-stride", type=int, default=2, help="score every n-th window start (merge and drop)")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=4, help="0: every window")
    p.add_argument("--recover", default="lora")
    p.add_argument("--recover-steps", type=int, default=8)
    p.add_argument("--recover-batch-size", type=int, default=1)
    p.add_argument("--recover-dense", action="store_true", help="also fine-tune the dense model (a control)")
    p.add_argument("--tag", default="smollm2")
    args = p.parse_args()
    started = time.perf_counter()
    recovery = RecoveryOptions(recover=args.recover, recover_steps=args.recover_steps,
                               recover_batch_size=args.recover_batch_size)
    rows = []

    model, tok, _ = load_model(args.model)
    test = {d: eval_windows(tok, d, args.eval_seqlen, max_windows=args.eval_windows or None) for d in ("wikitext2", "c4")}

    def evaluate(model, tok):
        t = time.perf_counter()
        r = {f"{d}_ppl": round(perplexity(model, w).ppl, 3) for d, w in test.items()}
        return {**r, "eval_windows": test["wikitext2"].size(0), "eval_s": round(time.perf_counter() - t, 1)}

    def record_rows(variant, fraction, model, tok, calib, nbytes, compress_s, extra, recover=True):
        base = {"variant": variant, "ff_fraction": fraction, "params": checkpoint.parameter_count(model),
                "checkpoint_bytes": nbytes, "compress_s": compress_s, **extra}
        rows.append({**base, "stage": "compressed", **evaluate(model, tok)})
        print(json.dumps(rows[-1]), flush=True)
        write(args, rows, started, done=False)
        if not recover:
            return
        t = time.perf_counter()
        summary = fine_tune(model, calib, recovery)
        rows.append({**base, "stage": f"+{args.recover} {args.recover_steps} steps", "recover_s":
                     round(time.perf_counter() - t, 1), "loss_first_last": [summary["loss_first"],
                     summary["loss_last"]], **evaluate(model, tok)})
        print(json.dumps(rows[-1]), flush=True)
        write(args, rows, started, done=False)

    calib = calibration_windows(tok, "wikitext2", args.calib_samples, args.seqlen, 0)
    record_rows("dense", 0, model, tok, calib, checkpoint_bytes(model, tok), 0, {}, recover=args.recover_dense)

    for fraction in args.fractions:
        ff_removed = None
        for permute in (True, False):
            cfg = make_config(model=args.model, method="merge", calib_samples=args.calib_samples, seqlen=args.seqlen,
                              options={"ff_fraction": fraction, "permute": permute,
                                       "feature_tokens": args.feature_tokens, "score_samples": args.score_samples,
                                       "window_stride": args.window_stride})
            t = time.perf_counter()
            result = compress(cfg)
            model, tok = result.model, result.tokenizer
            compress_s = round(time.perf_counter() - t, 1)
            d = result.manifest.details
            ff_removed = d["ff_removed"]
            extra = {"window": d["window"], "ff_removed": ff_removed,
                     "mean_matched_correlation": round(sum(d["mean_matched_correlation"].values())
                                                       / len(d["mean_matched_correlation"]), 4),
                     "candidates": d["candidates"]}
            nbytes = checkpoint_bytes(model, tok, result)
            record_rows("merge-permute" if permute else "merge-vanilla", fraction, model, tok, calib, nbytes,
                        compress_s, extra)
        model, tok, _ = load_model(args.model)
        adapter = get_adapter(model)
        n = matched_blocks(adapter, ff_removed)
        t = time.perf_counter()
        best, scores = best_drop_window(adapter, calib[: args.score_samples], n, args.window_stride)
        adapter.remove_blocks(list(range(best, best + n)))
        compress_s = round(time.perf_counter() - t, 1)
        record_rows("drop-window", fraction, model, tok, calib, checkpoint_bytes(model, tok), compress_s,
                    {"window": [best, best + n - 1], "blocks_removed": n, "candidates": scores})

    write(args, rows, started, done=True)


def write(args, rows, started, done: bool) -> None:
    """Results so far (rewritten after every row, so a cut-off run still leaves its table)."""
    dense_params = rows[0]["params"]
    for r in rows:
        r["param_reduction_pct"] = round(100 * (1 - r["params"] / dense_params), 2)
    out = {"model": args.model, "device": "cpu", "args": vars(args), "complete": done,
           "total_s": round(time.perf_counter() - started),
           "cuts": "budget run: see --help for the full grid; features on --feature-tokens tokens, "
                   "every --window-stride-th window start scored on --score-samples calibration windows, "
                   "ppl on the first --eval-windows windows of --eval-seqlen tokens (not the papers' "
                   "2048-token protocol), a short recovery",
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ffmerge_{args.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"ffmerge_{args.tag}.md").write_text(markdown(out))
    if done:
        print(markdown(out))


def markdown(out: dict) -> str:
    a = out["args"]
    status = "" if out["complete"] else " (INCOMPLETE: run cut off)"
    lines = [f"# FF-sublayer merging on {out['model']} ({out['device']}, {out['total_s']} s total){status}", "",
             f"Calibration: {a['calib_samples']} x {a['seqlen']} WikiText-2 validation tokens (features on the first "
             f"{a['feature_tokens']}; window starts 0, {a['window_stride']}, {2 * a['window_stride']}, ... scored on "
             f"{a['score_samples']} windows); recovery: "
             f"{a['recover']} {a['recover_steps']} steps x {a['recover_batch_size']} x {a['seqlen']} tokens; "
             f"perplexity on the first {a['eval_windows'] or 'all'} windows of {a['eval_seqlen']} tokens "
             f"(WikiText-2 test, C4 validation subset).", "",
             "| variant | FF frac | window | removed | params | reduction | ckpt MB | stage | WikiText-2 | C4 | "
             "compress s | recover s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        removed = (f"{r['ff_removed']} FF" if "ff_removed" in r else
                   f"{r['blocks_removed']} blocks" if "blocks_removed" in r else "-")
        window = "-" if "window" not in r else f"{r['window'][0]}-{r['window'][1]}"
        lines.append(f"| {r['variant']} | {r['ff_fraction']:.2f} | {window} | {removed} | {r['params'] / 1e6:.2f}M | "
                     f"{r['param_reduction_pct']:.1f}% | {r['checkpoint_bytes'] / 1e6:.1f} | {r['stage']} | "
                     f"{r['wikitext2_ppl']:.2f} | {r['c4_ppl']:.2f} | {r['compress_s']} | {r.get('recover_s', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
