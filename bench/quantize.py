"""bitsandbytes on SmolLM2-135M (CPU): dense vs int8 vs nf4, and FF merging with and without int8.

Budget run (what bench/results/quantize_smollm2.* holds):
    flock /tmp/compress-eval-locks/heavy.lock python3 bench/quantize.py --budget-min 20

Full grid (every WikiText-2 window of 512 tokens, fp4 and double quantization too):
    python3 bench/quantize.py --windows 0 --variants dense int8 nf4 nf4-dq fp4 merge merge+int8 \
        --budget-min 0

Every variant is made through the pipeline's own code (``compress`` with ``--method none`` or
``merge`` and the quantization stage), saved as the pipeline saves it and reloaded with our loader.
Perplexity windows are scored round-robin (window i by every variant before window i+1), so the
variants are timed side by side under the same machine load and all share the same windows; the
budget stops the rounds early, and the output says how many windows were scored. The merge rows
need the ``merge`` method (issue 7); without it they are reported as unavailable.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from compress_eval.config import make_config
from compress_eval.data.calibration import eval_windows
from compress_eval.methods.registry import available_methods
from compress_eval.models.checkpoint import git_sha, weight_bytes
from compress_eval.models.loading import load_model
from compress_eval.pipeline import compress, save
from compress_eval.quantize import quantize_model
from compress_eval.scoring.ppl import window_nll

RESULTS = Path(__file__).parent / "results"
QUANT = {"dense": None, "int8": "int8", "nf4": "nf4", "nf4-dq": "nf4", "fp4": "fp4"}


def make_variants(names: list[str], model: str, merge_options: dict, log) -> tuple[dict, dict]:
    """{name: Compressed} made through the pipeline, and {name: why not} for the rest."""
    made, missing = {}, {}
    for name in names:
        base, _, quant = name.partition("+")
        if base == "merge" and "merge" not in available_methods():
            missing[name] = "the merge method (issue 7) is not on this branch"
            continue
        if base == "merge":
            cfg = make_config(model=model, method="merge", options=merge_options)
        else:
            cfg = make_config(model=model, method="none", quantize=QUANT[base], double_quant=base == "nf4-dq")
        if base == "merge" and quant and "merge" in made:  # int8 on top of the same merged model
            merged = made["merge"]
            quantized, quantization = quantize_model(merged.model, quant, tie_map=merged.manifest.tie_map)
            manifest = merged.manifest.model_copy(update={"quantization": quantization,
                                                          "weight_bytes_after": quantization["weight_bytes_after"]})
            made[name] = replace(merged, model=quantized, manifest=manifest)
            continue
        if quant:
            cfg = cfg.model_copy(update={"quantize": quant})
        log(f"making {name}")
        made[name] = compress(cfg)
    return made, missing


@torch.no_grad()
def reload_check(name, result, ids) -> dict:
    """Checkpoint bytes on disk, and whether our loader gives back the very same logits and ties."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        model, tie_map = result.model, result.manifest.tie_map
        save(replace(result, manifest=result.manifest.model_copy(deep=True)), out)
        disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        reloaded, _, _ = load_model(str(out), str(ids.device))
        same = torch.equal(reloaded(ids).logits, model(ids).logits)
        tied = all(reloaded.get_submodule(dst) is reloaded.get_submodule(src) for dst, src in tie_map.items())
    return {"checkpoint_bytes": disk, "reload_identical_logits": same, "reload_tied": tied}


@torch.no_grad()
def round_robin_ppl(models: dict, windows: torch.Tensor, deadline: float, on_round) -> dict:
    """Per variant: NLL sum, tokens and seconds over the same windows, one window per variant per round."""
    stats = {name: {"nll": 0.0, "tokens": 0, "seconds": 0.0, "windows": 0} for name in models}
    for model in models.values():  # warm-up: first-call allocations and kernel selection are not timed
        model(input_ids=windows[:1, :16], use_cache=False)
    for i in range(windows.size(0)):
        if time.time() > deadline and i > 0:
            break
        ids = windows[i: i + 1]
        for name, model in models.items():
            start = time.perf_counter()
            nll = window_nll(model(input_ids=ids, use_cache=False).logits, ids).sum().item()
            s = stats[name]
            s["seconds"] += time.perf_counter() - start
            s["nll"] += nll
            s["tokens"] += ids.size(1) - 1
            s["windows"] += 1
        on_round(stats)
    return stats


def rows_of(made: dict, stats: dict, checks: dict) -> list[dict]:
    dense_bytes = weight_bytes(made["dense"].model) if "dense" in made else None
    rows = []
    for name, result in made.items():
        s, q = stats[name], result.manifest.quantization or {}
        nbytes = weight_bytes(result.model)
        rows.append({
            "variant": name,
            "quantization": q.get("kind"),
            "double_quant": q.get("double_quant"),
            "compute_dtype": q.get("compute_dtype"),
            "params": result.manifest.params_after,
            "weight_bytes": nbytes,
            "weight_bytes_vs_dense": round(nbytes / dense_bytes, 4) if dense_bytes else None,
            "ppl": round(float(torch.tensor(s["nll"] / s["tokens"]).exp()), 4) if s["tokens"] else None,
            "windows": s["windows"],
            "tokens_per_s": round(s["tokens"] / s["seconds"], 1) if s["seconds"] else None,
            "quantize_s": q.get("seconds"),
            **checks.get(name, {}),
        })
    return rows


def markdown(result: dict) -> str:
    lines = [f"# bitsandbytes on {result['model']} ({result['device']}, {result['threads']} threads)", "",
             f"WikiText-2 perplexity over the first {result['windows_scored']} windows of {result['seqlen']} tokens "
             f"(asked: {result['windows_asked']}), scored round-robin; bytes are the state dict's distinct "
             f"tensors (scales and codebooks included) and the safetensors files on disk.", "",
             "| variant | ppl | weight MB | vs dense | checkpoint MB | tokens/s | reload identical | tied |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['ppl']} | {r['weight_bytes'] / 1e6:.1f} | {r['weight_bytes_vs_dense']} | "
                     f"{r.get('checkpoint_bytes', 0) / 1e6:.1f} | {r['tokens_per_s']} | "
                     f"{r.get('reload_identical_logits')} | {r.get('reload_tied')} |")
    for name, why in result["unavailable"].items():
        lines.append(f"| {name} | not run: {why} | | | | | | |")
    lines += ["", f"Merge options: `{json.dumps(result['merge_options'])}` (a fixed window, no search, no recovery).",
              "", result["note"], "", f"Code: {result['source']}; {result['seconds']} s in all.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=["dense", "int8", "nf4", "merge", "merge+int8"])
    parser.add_argument("--windows", type=int, default=50, help="WikiText-2 windows (0: all)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--merge", default='{"window": "20-24"}', help="merge method options (JSON)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-min", type=float, default=20, help="stop scoring rounds after this (0: none)")
    parser.add_argument("--out", default=str(RESULTS / "quantize_smollm2.json"))
    parser.add_argument("--source", default=None, help="recorded as the code the run used (default: git HEAD)")
    args = parser.parse_args()
    start = time.time()
    deadline = start + args.budget_min * 60 if args.budget_min else float("inf")
    torch.set_num_threads(args.threads)
    merge_options = json.loads(args.merge)
    made, missing = make_variants(args.variants, args.model, merge_options, print)
    _, tokenizer, _ = load_model(args.model, "cpu")
    windows = eval_windows(tokenizer, "wikitext2", args.seqlen, max_windows=args.windows or None)
    first = windows[:1, :64]
    checks = {name: reload_check(name, result, first) for name, result in made.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(stats):
        result = {
            "model": args.model, "device": "cpu", "threads": torch.get_num_threads(), "seqlen": args.seqlen,
            "windows_asked": args.windows or int(windows.size(0)),
            "windows_scored": min(s["windows"] for s in stats.values()), "merge_options": merge_options,
            "rows": rows_of(made, stats, checks), "unavailable": missing,
            "seconds": round(time.time() - start, 1), "source": args.source or git_sha(),
            "note": ("int8 on CPU: bitsandbytes casts activations to fp16 and runs LLM.int8()'s vector-wise "
                     "int8 matmul with outlier decomposition (threshold 6.0); nf4/fp4 dequantize per matmul "
                     "into the compute dtype (fp32 here)."),
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(json.dumps({r["variant"]: (r["ppl"], r["tokens_per_s"]) for r in result["rows"]}), flush=True)

    round_robin_ppl({name: result.model for name, result in made.items()}, windows, deadline, write)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
